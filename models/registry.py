"""Adapter types by name. A new type is one file under models/ and one line here."""
from __future__ import annotations

from .adapter import AdapterType
from .lora import LoRA
from .moslora import MoSLoRA
from .svfit import SVFit

ADAPTERS: dict[str, AdapterType] = {
    "lora": LoRA(),
    "moslora": MoSLoRA(),
    "svfit": SVFit(),
}
