"""HiddenKey regulariser (Wang et al. 2024, "LoRA Meets Dropout under a Unified Framework").

Following the paper's HiddenKey method, training drops whole key columns of the attention logits (column-wise
DropKey), applies element-wise dropout to each decoder layer's FFN output (HiddenCut), and adds a bidirectional KL
loss between two forward passes. Rates are per batch row, so one batch can mix tasks with and without HiddenKey.

Defaults (tasks/schema.py ``HiddenKeySpec``), for frozen decoders pre-trained without dropout: DropKey 0.05, the
low end of the paper's 0.05-0.2; HiddenCut at the model's own pre-training hidden dropout
(:func:`pretrained_hidden_dropout`, 0 for LLaMA-style models); KL weight 1. When HiddenCut is on, massive
activations (:func:`massive`) pass it untouched. The measurements behind them: docs/variants.md.

Usage::

    hk = HiddenKey(model)                    # switches the model to ``attn_implementation="hiddenkey"``
    hk.set_rows(key_rate, hidden_rate)       # (N,) rates for the next training forwards
    logits_1 = model(**batch).logits
    logits_2 = model(**batch).logits
    loss = ce + kl_weight * bidirectional_kl(logits_1, logits_2, token_mask).mean()

In eval mode, for rows with rate 0, and for models not passed to ``HiddenKey``, the attention function hands over to
the stock sdpa one, so those outputs are bit-identical to an unregularised model.
"""
from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AttentionInterface, AttentionMaskInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

ATTN_IMPLEMENTATION = "hiddenkey"
MASSIVE_RATIO = 100.0  # Sun et al.'s massive activations are ~1000x the median; ordinary outliers stay below 100x
_OWNERS: weakref.WeakKeyDictionary[nn.Module, HiddenKey] = weakref.WeakKeyDictionary()


def hiddenkey_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                        dropout: float = 0.0, scaling: float | None = None, **kwargs) -> tuple[Tensor, Tensor | None]:
    """Attention function registered as ``"hiddenkey"``: column DropKey when active, stock sdpa otherwise."""
    owner = _OWNERS.get(module)
    if owner is None or owner._key_rate is None or not module.training:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    return owner._drop_keys(module, query, key, value, attention_mask, dropout, scaling, **kwargs)


def _allowed(attention_mask: Tensor | None, q_len: int, k_len: int, device: torch.device) -> Tensor:
    """Boolean (N|1, 1|H, Q, K) pattern of keys each query may see, with sdpa's meaning of a missing mask."""
    if attention_mask is None:  # sdpa then uses is_causal for a prefill and full attention for one query
        full = torch.ones(q_len, k_len, dtype=torch.bool, device=device)
        return (full if q_len == 1 else full.tril()).view(1, 1, q_len, k_len)
    if attention_mask.dtype == torch.bool:
        return attention_mask
    return attention_mask > torch.finfo(attention_mask.dtype).min


class HiddenKey:
    """Per-row HiddenKey for a transformers decoder: off until :meth:`set_rows`, and always off in eval mode.

    Masks can be recorded in one pass (:meth:`record`) and replayed in the next (:meth:`replay`); the masks drawn or
    replayed by the last forward are kept in ``last_key_masks`` ((N, H, K) bool, True = dropped, one per attention
    layer) and ``last_hidden_masks`` ((N, L, D) bool, one per MLP).
    """

    def __init__(self, model: PreTrainedModel):
        AttentionInterface.register(ATTN_IMPLEMENTATION, hiddenkey_attention)
        AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)  # else custom names get no mask at all
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
        if model.config._attn_implementation != ATTN_IMPLEMENTATION:
            raise ValueError(f"{type(model).__name__} does not dispatch attention through AttentionInterface")
        mlps = [module for name, module in model.named_modules() if name.endswith(".mlp")]
        if not mlps:
            raise ValueError(f"{type(model).__name__} has no '*.mlp' modules for HiddenCut")
        for module in model.modules():
            _OWNERS[module] = self
        for mlp in mlps:
            mlp.register_forward_hook(self._cut_hidden)
        model.register_forward_pre_hook(self._new_pass)
        self._key_rate: Tensor | None = None
        self._hidden_rate: Tensor | None = None
        self._mode: str | None = None  # None, "record" or "replay"
        self._tape: dict[str, list[Tensor]] = {"key": [], "hidden": []}
        self._cursor = {"key": 0, "hidden": 0}
        self.last_key_masks: list[Tensor] = []
        self.last_hidden_masks: list[Tensor] = []

    def set_rows(self, key_rate: Tensor, hidden_rate: Tensor) -> None:
        """Set the (N,) DropKey and HiddenCut rates, in [0, 1), of the rows of the next training forwards."""
        key_rate, hidden_rate = torch.as_tensor(key_rate).float(), torch.as_tensor(hidden_rate).float()
        if key_rate.shape != hidden_rate.shape or key_rate.dim() != 1:
            raise ValueError(f"rates must both be (N,), got {tuple(key_rate.shape)} and {tuple(hidden_rate.shape)}")
        for rate in (key_rate, hidden_rate):
            if ((rate < 0) | (rate >= 1)).any():
                raise ValueError(f"rates must lie in [0, 1), got {rate.tolist()}")
        self._key_rate = key_rate if key_rate.any() else None
        self._hidden_rate = hidden_rate if hidden_rate.any() else None

    def clear(self) -> None:
        """Deactivate: every forward behaves like the stock model again."""
        self._key_rate = self._hidden_rate = None

    @contextmanager
    def record(self) -> Iterator[None]:
        """Store every mask drawn inside the block, replacing any earlier recording."""
        self._tape = {"key": [], "hidden": []}
        with self._in_mode("record"):
            yield

    @contextmanager
    def replay(self) -> Iterator[None]:
        """Reuse the recorded masks, in the order they were drawn, instead of drawing new ones."""
        self._cursor = {"key": 0, "hidden": 0}
        with self._in_mode("replay"):
            yield

    @contextmanager
    def _in_mode(self, mode: str) -> Iterator[None]:
        self._mode = mode
        try:
            yield
        finally:
            self._mode = None

    def _new_pass(self, module: nn.Module, args: tuple) -> None:
        self.last_key_masks, self.last_hidden_masks = [], []

    def _mask(self, kind: str, rate: Tensor, shape: tuple[int, ...], draw: Callable[[], Tensor]) -> Tensor:
        """Draw (or replay) one boolean "dropped" mask of ``shape`` for a batch with per-row ``rate``."""
        if rate.shape[0] != shape[0]:
            raise ValueError(f"HiddenKey rates are set for {rate.shape[0]} rows, the batch has {shape[0]}")
        if self._mode == "replay":
            tape, index = self._tape[kind], self._cursor[kind]
            if index >= len(tape) or tape[index].shape != shape:
                raise RuntimeError(f"replayed {kind} mask {index} does not match this forward (recorded {len(tape)})")
            self._cursor[kind] += 1
            mask = tape[index]
        else:
            mask = draw()
            if self._mode == "record":
                self._tape[kind].append(mask)
        (self.last_key_masks if kind == "key" else self.last_hidden_masks).append(mask)
        return mask

    def _drop_keys(self, module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                   dropout: float, scaling: float | None, **kwargs) -> tuple[Tensor, Tensor]:
        """Eager attention whose dropped key columns get a logit of -inf for every query of that row and head."""
        n, heads, q_len, head_dim = query.shape
        k_len = key.shape[2]
        rate = self._key_rate.to(query.device)
        allowed = _allowed(attention_mask, q_len, k_len, query.device)
        # Keep each row's first visible key (its first non-padding one), so no real query loses all its keys.
        first = allowed.any(dim=2).any(dim=1).int().argmax(dim=-1).expand(n)

        def draw() -> Tensor:
            dropped = torch.rand(n, heads, k_len, device=query.device) < rate.view(n, 1, 1)
            dropped[torch.arange(n, device=query.device), :, first] = False
            return dropped

        dropped = self._mask("key", rate, (n, heads, k_len), draw).to(query.device)
        groups = heads // key.shape[1]  # grouped-query attention shares each key/value head among `groups` heads
        scores = query @ key.repeat_interleave(groups, dim=1).transpose(-1, -2)
        scores = scores * (head_dim**-0.5 if scaling is None else scaling)
        if attention_mask is not None and attention_mask.dtype != torch.bool:
            scores = scores + attention_mask
        # The dtype minimum rather than -inf keeps fully masked (padding) queries finite, as in eager attention.
        visible = allowed & ~dropped[:, :, None, :]
        scores = scores.masked_fill(~visible, torch.finfo(scores.dtype).min)
        weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        output = F.dropout(weights, p=dropout, training=True) @ value.repeat_interleave(groups, dim=1)
        output = output.transpose(1, 2).contiguous()
        untouched = rate == 0
        if untouched.any():  # rows with rate 0 take the stock sdpa result, bit for bit
            stock, _ = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                              scaling=scaling, **kwargs)
            output = torch.where(untouched.view(n, 1, 1, 1), stock, output)
        return output, weights

    def _cut_hidden(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
        """HiddenCut: inverted element-wise dropout on an MLP output, scaled by 1 / (1 - p) per row, except on
        massive activations (see :func:`massive`), which pass unchanged."""
        if self._hidden_rate is None or not module.training:
            return None
        rate = self._hidden_rate.to(output.device).view(-1, *[1] * (output.dim() - 1))
        dropped = self._mask("hidden", self._hidden_rate, tuple(output.shape),
                             lambda: torch.rand(output.shape, device=output.device) < rate)
        dropped = dropped.to(output.device)
        keep = (~dropped).to(output.dtype) * (1 / (1 - rate)).to(output.dtype)
        return output * torch.where(massive(output), torch.ones_like(keep), keep)


def massive(hidden: Tensor, ratio: float = MASSIVE_RATIO) -> Tensor:
    """Massive activations (Sun et al. 2024, "Massive Activations in Large Language Models"): entries whose |x|
    exceeds ``ratio`` times the median |x| of their token's hidden vector. Decoders such as SmolLM2 and LLaMA
    carry a few of them (here up to ~20,000x the median) on the first token and delimiters; attention uses them
    as a bias, so dropping or rescaling one breaks the frozen model for every later layer (training on BBC
    topics under element-wise HiddenCut at rate 0.1 ended 5.3x worse than LoRA). HiddenCut leaves them alone."""
    magnitude = hidden.detach().abs()
    return magnitude > ratio * magnitude.median(dim=-1, keepdim=True).values


# Config fields that hold a model's pre-training dropout on hidden states (residual branch outputs), by family:
# GPT-2 / Phi, BERT / RoBERTa (the paper's encoders), Falcon / BLOOM, OPT. LLaMA-style configs have none.
HIDDEN_DROPOUT_FIELDS = ("resid_pdrop", "hidden_dropout_prob", "hidden_dropout", "dropout")


def pretrained_hidden_dropout(config) -> float:
    """The hidden-state dropout rate the model was pre-trained with (0 when its config has none): HiddenCut's
    default. The paper's HiddenCut rate 0.1 matches RoBERTa's own hidden dropout, so its encoders saw a perturbation
    they were trained for; a decoder pre-trained without dropout is not: on SmolLM2-135M (no dropout field) element-
    wise HiddenCut at 0.1 raised the untrained model's NLL from 3.87 to 6.3-6.5 nats even with massive activations
    exempt (4.4 when every entry above 3x its token's median is exempt), and LoRA + HiddenKey trained under it ended
    4x worse than LoRA on BBC topics (docs/variants.md)."""
    for name in HIDDEN_DROPOUT_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1:
            return float(value)
    return 0.0


def bidirectional_kl(logits_a: Tensor, logits_b: Tensor, token_mask: Tensor) -> Tensor:
    """Per-row KL(p_a||p_b) + KL(p_b||p_a) (a sum, not an average), summed over the vocabulary for each token and
    averaged over the valid tokens of each row; (N, L, V) logits and an (N, L) mask give an (N,) tensor."""
    log_a, log_b = F.log_softmax(logits_a.float(), dim=-1), F.log_softmax(logits_b.float(), dim=-1)
    per_token = ((log_a.exp() - log_b.exp()) * (log_a - log_b)).sum(dim=-1)
    mask = token_mask.to(per_token.dtype)
    return (per_token * mask).sum(dim=-1) / mask.sum(dim=-1).clamp(min=1)
