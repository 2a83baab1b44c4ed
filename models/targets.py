"""Which modules of a base model an adapter wraps: PEFT's name rule, ``all-linear``, per-architecture
defaults, and GPT-2's Conv1D.

``target_modules`` follows PEFT: a module is targeted when its name equals a target or ends with "." + target;
``all-linear`` (as PEFT) targets every Linear except the output layer. The default (``DEFAULT_TARGETS``: every
attention and MLP projection, in Llama's names) means the same projections on architectures that name them
otherwise (``ARCHITECTURE_TARGETS``, by ``config.model_type``: Phi-3's fused qkv_proj / gate_up_proj, GPT-2's
c_attn / c_proj / c_fc, ...); on an unknown architecture where none of those names exists it means
``all-linear``. GPT-2-style ``Conv1D`` layers (weight
stored as (in, out)) are adapted too: the stacked layer sees them through a Linear that views the same weight
transposed (no copy), and their PEFT export says ``fan_in_fan_out``.
"""
from __future__ import annotations

from torch import nn

from tasks.schema import ALL_PROJECTIONS

ALL_LINEAR = "all-linear"
DEFAULT_TARGETS = ALL_PROJECTIONS  # the schema's default
# Attention and MLP projections of architectures whose names differ from Llama's.
ARCHITECTURE_TARGETS = {
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "falcon": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "bloom": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "phi": ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"],
    "gpt_bigcode": ["c_attn", "c_proj", "c_fc"],
}


def resolve_targets(model: nn.Module, targets: list[str]) -> list[str]:
    """The targets to apply: ``targets`` as given, except the default, which becomes the architecture's own
    projection names (or all-linear where the model has none of the default names and no entry here)."""
    if list(targets) != DEFAULT_TARGETS:
        return list(targets)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in ARCHITECTURE_TARGETS:
        return list(ARCHITECTURE_TARGETS[model_type])
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) or is_conv1d(m)]
    return list(targets) if any(matches(n, targets) for n in names) else [ALL_LINEAR]


def matches(name: str, targets: list[str]) -> bool:
    """PEFT's rule: a module is targeted when its name equals a target or ends with '.' + target."""
    return any(name == t or name.endswith("." + t) for t in targets)


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers always has it today
        return None
    return Conv1D


def as_linear(module: nn.Module) -> nn.Linear | None:
    """The module as a Linear (itself, or a transposed view of a Conv1D's weight), or None."""
    if isinstance(module, nn.Linear):
        return module
    conv = _conv1d_type()
    if conv is not None and isinstance(module, conv):
        d_in, d_out = module.weight.shape
        lin = nn.Linear(d_in, d_out, bias=module.bias is not None, device="meta")
        lin.weight = nn.Parameter(module.weight.t(), requires_grad=False)  # a view of the same storage
        if module.bias is not None:
            lin.bias = module.bias
        return lin
    return None


def is_conv1d(module: nn.Module) -> bool:
    conv = _conv1d_type()
    return conv is not None and isinstance(module, conv)


def targeted(model: nn.Module, targets: list[str]) -> dict[str, nn.Module]:
    """name -> module (Linear or Conv1D) for every module ``targets`` selects, in model order."""
    everything = ALL_LINEAR in targets
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    out = {}
    for name, m in model.named_modules():
        if not (isinstance(m, nn.Linear) or is_conv1d(m)):  # the test only: views are made once, by the caller
            continue
        if everything and m is not head or not everything and matches(name, targets):
            out[name] = m
    return out


def leaf_names(names) -> list[str]:
    """The distinct last components of module names (what a PEFT config lists for them)."""
    return sorted({n.rsplit(".", 1)[-1] for n in names})
