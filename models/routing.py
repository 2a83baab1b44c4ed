"""Per-row routing as an argument of each forward, never state left on the model between calls.

A ``Routing`` names, for every row of a batch, the adapters it uses: (N, K) global task ids (GLOBAL = the
global Theta) and (N, K) weights that blend the K choices in output space. A caller runs a forward under it:

    with stack.using(Routing(ids, weights)):
        out = lm(input_ids=..., ...)

The active routing lives in a context variable for the duration of the ``with`` only, so two threads (or
two interleaved generations) never see each other's routing, and a forward outside any ``with`` runs the
frozen base model. A Routing also keeps what it derived per adapter group (slots, and the rows' gathered
parameters during decoding): a decode loop that reuses one Routing object while its rows are unchanged
gathers once; a batch whose rows change (continuous batching) builds a new one.
"""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
from torch import Tensor

GLOBAL = -1  # routing id of the global adapter Theta


@dataclass
class GroupRouting:
    slots: Tensor  # (N, K) slot per row and choice
    weights: Tensor | None  # (N, K), zero where the choice is not in this group; None: K = 1, every weight 1
    uniform: int | None  # the single slot every row uses with weight 1, if so (fast path)
    # module -> (flat, flat's version, the rows' gathered parameters), kept for the decode steps of a generation
    gathered: dict[str, tuple[Tensor, int, dict[str, Tensor]]] = field(default_factory=dict)
    _mix: tuple[Tensor, Tensor] | None = None

    def mix(self) -> tuple[Tensor, Tensor]:
        """The distinct slots the rows use (U,), and each row's weight on each of them (N, U)."""
        if self._mix is None:
            w = self.weights if self.weights is not None else torch.ones(self.slots.shape, device=self.slots.device)
            used, where = torch.unique(self.slots.masked_fill(w == 0, -1), return_inverse=True)
            mix = torch.zeros(self.slots.shape[0], used.numel(), device=w.device).scatter_add_(1, where, w.float())
            keep = used >= 0  # -1: choices with weight 0
            self._mix = used[keep], mix[:, keep]
        return self._mix


class Routing:
    """Adapters per row: ids (N,) or (N, K) global task ids, weights (N, K) (default: every weight 1)."""

    def __init__(self, ids: Tensor, weights: Tensor | None = None):
        ids = torch.as_tensor(ids).long()
        if ids.dim() == 1:
            ids = ids[:, None]
        if ids.dim() != 2:
            raise ValueError(f"routing ids must be (N,) or (N, K), got shape {tuple(ids.shape)}")
        if weights is None:
            weights = torch.ones(ids.shape, dtype=torch.float32)
        self.ids, self.weights = ids, torch.as_tensor(weights, dtype=torch.float32).reshape(ids.shape)
        self.groups: dict[str, GroupRouting | None] = {}  # per group key, derived on first use
        self.gathered_bytes = 0

    @property
    def rows(self) -> int:
        return self.ids.shape[0]

    @classmethod
    def of(cls, ids: "Tensor | Routing | None", weights: Tensor | None = None) -> "Routing | None":
        """A Routing from ids (+ weights), an existing Routing, or None (adapters off)."""
        if ids is None or isinstance(ids, Routing):
            return ids
        return cls(ids, weights)


# (stack, routing) of the forward in progress in this context; the stack check keeps one model's routing off
# another model's layers.
_ACTIVE: ContextVar[tuple[object, Routing | None] | None] = ContextVar("borahub_routing", default=None)


@contextmanager
def active(stack: object, routing: Routing | None):
    token = _ACTIVE.set((stack, routing))
    try:
        yield routing
    finally:
        _ACTIVE.reset(token)


def current(stack: object) -> Routing | None:
    """The routing of the forward in progress on ``stack``'s layers, or None (adapters off)."""
    now = _ACTIVE.get()
    return now[1] if now is not None and now[0] is stack else None
