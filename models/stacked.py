"""The stacked multi-task layer: one wrapped Linear serves every task of every adapter group.

Per group, all task parameters live in one flat tensor ``flat`` of shape (S, D): a slot per task plus a
last slot for the global Theta, each slot the concatenation of that task's parameters over all wrapped
modules. A forward runs under per-row routing (models/routing.py: global task ids, or top-k ids with
weights); each group maps it to its own slots once per forward, and every wrapped Linear gathers the rows'
parameters and applies them with batched matmuls. There is no Python loop over tasks, and the frozen weights are
never touched, so a batch that mixes or blends tasks runs in one pass, in training and inference alike.
At inference, a long input whose rows all use one adapter (a prompt's prefill) runs that adapter merged
into a temporary copy of the weight instead: one GEMM, as in the base model.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tasks.registry import ConfigError
from tasks.schema import AdapterSpec

from . import kernels
from . import routing as routing_state
from .adapter import AdapterType
from .routing import GLOBAL, GroupRouting, Routing  # noqa: F401 (GLOBAL re-exported)
from .targets import ALL_LINEAR, as_linear, is_conv1d, resolve_targets, targeted


@dataclass(frozen=True)
class Slice:
    offset: int
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


class Group(nn.Module):
    """Tasks that share adapter type, rank and targets; their parameters are stacked in ``flat``."""

    def __init__(self, key: str, spec: AdapterSpec, atype: AdapterType, task_ids: list[int], n_tasks: int,
                 modules: dict[str, nn.Linear], primary: bool):
        super().__init__()
        self.key, self.spec, self.atype, self.task_ids = key, spec, atype, list(task_ids)
        self.layout: dict[str, dict[str, Slice]] = {}
        self.frozen: dict[str, dict[str, Tensor]] = {}
        offset = 0
        for name, lin in modules.items():
            # float32 like the adapter values (a bf16 base's SVD factors too); autocast lowers them in training
            self.frozen[name] = {k: v.float() for k, v in atype.frozen(spec, lin).items()}
            self.layout[name] = {}
            for pname, shape in atype.shapes(spec, lin, self.frozen[name]).items():
                self.layout[name][pname] = Slice(offset, tuple(shape))
                offset += self.layout[name][pname].numel
        self.dim = offset
        self.fan_in_fan_out = False  # set by build_stack when the wrapped modules store (in, out) weights (Conv1D)
        self.targets = list(spec.target_modules)  # as resolved for this base model by build_stack
        self.theta_slot = len(self.task_ids)
        self.register_buffer("flat", torch.zeros(self.theta_slot + 1, self.dim), persistent=False)
        # slot_map[global_id + 1] -> slot in this group, -1 when the task is not in this group.
        slot_map = torch.full((n_tasks + 1,), -1, dtype=torch.long)
        slot_map[torch.tensor(self.task_ids, dtype=torch.long) + 1] = torch.arange(len(self.task_ids))
        if primary:
            slot_map[0] = self.theta_slot  # the fallback id GLOBAL uses the primary group's Theta
        self.register_buffer("slot_map", slot_map, persistent=False)
        self._modules_ref = modules
        self._parts_of: Tensor | None = None
        self._parts: dict[tuple[str, str], Tensor] = {}

    @property
    def n_tasks(self) -> int:
        return len(self.task_ids)

    def share_theta(self) -> None:
        """tau = infinity: every task of the group is routed to Theta (one shared adapter)."""
        self.slot_map[1:][self.slot_map[1:] >= 0] = self.theta_slot

    def init_theta(self, gen: torch.Generator) -> Tensor:
        """Theta at its adapter type's init, as one flat vector (D,)."""
        parts = []
        for name, lin in self._modules_ref.items():
            init = self.atype.init(self.spec, lin, self.frozen[name], gen)
            parts += [init[p].reshape(-1) for p in self.layout[name]]
        return torch.cat(parts)

    def params(self, module: str) -> dict[str, Tensor]:
        """Views (S, *shape) of the module's parameters inside ``flat``.

        ``flat`` is split once per new tensor (one split, whose backward is one cat): slicing it per
        module instead would make autograd allocate a full-size zero gradient for every slice.
        """
        if self._parts_of is not self.flat:
            keys = [(m, p) for m, p, _ in self.slices()]
            sizes = [s.numel for _, _, s in self.slices()]
            self._parts = dict(zip(keys, self.flat.split(sizes, dim=-1)))
            self._parts_of = self.flat
        lead = self.flat.shape[:-1]
        return {p: self._parts[(module, p)].view(*lead, *s.shape) for p, s in self.layout[module].items()}

    def slices(self):
        """(module, param, Slice) for every parameter tensor of one task, in layout order."""
        for m, ps in self.layout.items():
            for p, s in ps.items():
                yield m, p, s


class AdapterStack(nn.Module):
    """All adapter groups of a model. Routing is an argument of each forward (``using``), not state."""

    gather_cache_bytes = 1 << 30  # at most this much of gathered per-row parameters is kept per Routing
    union_decode = True  # decode steps may apply the rows' distinct adapters as one wide LoRA (union_pays)

    def __init__(self, groups: list[Group]):
        super().__init__()
        self.groups = nn.ModuleList(groups)

    def using(self, routing: "Routing | Tensor | None", weights: Tensor | None = None):
        """Context manager: the forwards inside it route rows by ``routing`` (a Routing, or ids (N,) / (N, K)
        with optional weights); None runs the frozen base model."""
        return routing_state.active(self, Routing.of(routing, weights))

    def routing_for(self, g: Group, device: torch.device) -> GroupRouting | None:
        routing = routing_state.current(self)
        if routing is None:
            return None
        if g.key not in routing.groups:
            slots = g.slot_map[routing.ids.to(g.slot_map.device) + 1]
            w = routing.weights.to(device=device) * (slots >= 0).to(device)
            slots = slots.clamp(min=0).to(device)
            r = None
            if bool(w.ne(0).any()):
                ones = slots.shape[1] == 1 and bool((w == 1).all())
                uniform = int(slots[0, 0]) if ones and bool((slots == slots[0, 0]).all()) else None
                r = GroupRouting(slots, None if ones else w.to(g.flat.dtype), uniform)
            routing.groups[g.key] = r
        return routing.groups[g.key]

    def gather(self, g: Group, module: str, r: GroupRouting, tokens_per_row: int) -> dict[str, Tensor]:
        """Each row's parameters of one module, (N, K, *shape). A generation's decode steps (one token per row,
        no autograd) reuse those gathered at the first step under the same routing (``kept``). A 64-row step
        with 8 or 64 adapters measured 1.35-1.37x the base model's when regathering, 1.12x reusing them
        (bench/decode_step.py)."""
        def rows() -> dict[str, Tensor]:
            n, k = r.slots.shape
            idx = r.slots.reshape(-1)
            return {name: v.index_select(0, idx).view(n, k, *v.shape[1:]) for name, v in g.params(module).items()}

        return self.kept(g, module, r, rows) if tokens_per_row == 1 and not torch.is_grad_enabled() else rows()

    def kept(self, g: Group, module: str, r: GroupRouting, build) -> dict[str, Tensor]:
        """What ``build()`` derives from the parameters for one module under routing ``r``, kept across the decode
        steps of a generation while the parameters are unchanged and the kept copies fit ``gather_cache_bytes``."""
        hit = r.gathered.get(module)
        if hit is not None and hit[0] is g.flat and hit[1] == g.flat._version:
            return hit[2]
        value = build()
        size = sum(t.numel() * t.element_size() for t in value.values())
        routing = routing_state.current(self)
        if routing is not None and routing.gathered_bytes + size <= self.gather_cache_bytes:
            r.gathered[module] = (g.flat, g.flat._version, value)
            routing.gathered_bytes += size
        return value


def union_pays(r: GroupRouting) -> bool:
    """Whether a decode step (one token per row, no autograd) applies the rows' distinct adapters as one wide LoRA
    (``union``) rather than each row's gathered copy in batched matmuls. The union reads each of the U adapters
    once but multiplies every row by all of them; a gather copies an adapter per row and choice (N K of them); a
    small matmul costs about its bytes until roughly 16 rows share each weight, hence U (1 + N / 16) against N K.
    One adapter for every row always pays (two plain matmuls on kept, pre-scaled factors). A prefill (many
    tokens per row) keeps the per-row path: there the union's extra multiplications dominate (16 rows of ~70
    tokens over 5 adapters: 1.9 against 1.4 s)."""
    if r.uniform is not None:
        return True
    n, k = r.slots.shape
    return r.mix()[0].numel() * (1 + n / 16) <= n * k


def union(g: Group, module: str, r: GroupRouting) -> dict[str, Tensor]:
    """The rows' distinct adapters of one module as one LoRA of rank U r: A (U r, in) with each
    adapter's scale folded in, B (out, U r), and C (N, U r), each row's weight on the rank block of each adapter
    it uses (0 elsewhere). The change for x (N, L, in) is then ((x A^T) * C) B^T: two matmuls whatever the mix."""
    used, mix = r.mix()
    params = g.params(module)
    loras = [g.atype.to_lora({k: v[s] for k, v in params.items()}, g.frozen[module], g.spec) for s in used.tolist()]
    rank = loras[0][0].shape[0]  # one group: one rank
    A = torch.cat([A * (alpha / rank) for A, _, alpha in loras])
    B = torch.cat([B for _, B, _ in loras], dim=1)
    return {"union_A": A, "union_B": B, "union_C": mix.repeat_interleave(rank, dim=1).to(A.dtype)}


class StackedLinear(nn.Module):
    """A frozen nn.Linear plus the adapters of every group that targets it."""

    def __init__(self, base: nn.Linear, name: str, stack: AdapterStack, groups: list[Group],
                 original: nn.Module | None = None):
        super().__init__()
        self.base, self.name, self.groups = base, name, groups
        object.__setattr__(self, "_stack", stack)  # a reference, not a submodule
        object.__setattr__(self, "original", original if original is not None else base)  # put back on unwrap

    @property
    def weight(self) -> Tensor:
        return self.base.weight

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: Tensor) -> Tensor:
        """The groups' output changes first (plain matmuls when every row uses the same parameters, else each
        row's parameters gathered into batched matmuls), then the frozen product accumulated into their sum.

        Without autograd, a group whose rows all use one adapter is merged into the weight instead when that
        is cheaper (``merge_pays``: long inputs such as a prompt's prefill): W + s B A costs one small matmul
        and one weight-sized copy, and the layer then runs a single GEMM, the base model's own. A decode step
        whose rows use one adapter or few (``union_pays``) applies their ``union``, kept across steps."""
        y, W = None, self.base.weight
        tokens = x.numel() // x.shape[-1]
        x3 = x if x.dim() == 3 else x.unsqueeze(1)
        step = x3.shape[1] == 1 and not torch.is_grad_enabled()  # a decode step: one token per row
        for g in self.groups:
            r = self._stack.routing_for(g, x.device)
            if r is None:
                continue
            # a bf16/fp16 base outside autocast (inference): the adapter runs on its float32 values (small bf16
            # matmuls cost more than casting the input: measured 118 against 90 us a layer on a CPU with AMX)
            cast = x.dtype != g.flat.dtype and not torch.is_autocast_enabled(x.device.type)
            if step and self._stack.union_decode and union_pays(r):
                u = self._stack.kept(g, self.name, r, lambda g=g, r=r: union(g, self.name, r))
                h = F.linear(x3.to(g.flat.dtype) if cast else x3, u["union_A"])
                d = F.linear(h if r.uniform is not None else h.mul_(u["union_C"][:, None]), u["union_B"])
                d = d.view(*x.shape[:-1], -1)
            else:
                frozen = g.frozen[self.name]
                one = None if r.uniform is None else {k: v[r.uniform] for k, v in g.params(self.name).items()}
                if one is not None and not torch.is_grad_enabled() and merge_pays(tokens, self.in_features,
                                                                                  self.out_features):
                    A, B, alpha = g.atype.to_lora(one, frozen, g.spec)
                    W = torch.addmm(W, B.to(W.dtype), A.to(W.dtype), alpha=alpha / A.shape[0])
                    continue
                if one is not None:
                    d = g.atype.delta_one(x.to(g.flat.dtype) if cast else x, one, frozen, g.spec)
                else:
                    rows = self._stack.gather(g, self.name, r, x3.shape[1])
                    d = g.atype.delta(x3.to(g.flat.dtype) if cast else x3, rows, r.weights, frozen, g.spec)
                    d = d.view(*x.shape[:-1], -1)
            d = d.to(x.dtype) if cast else d
            y = d if y is None else y + d
        if y is None:
            return kernels.linear(x, W, self.base.bias)
        return self._base_into(y, x, W)

    def _base_into(self, y: Tensor, x: Tensor, W: Tensor) -> Tensor:
        """y + x W^T + bias in one addmm accumulating into y: in place when no gradient is recorded (y is the
        fresh change built by forward, held by nobody else), out of place under autograd."""
        b = self.base.bias
        x2 = x.reshape(-1, x.shape[-1])
        if torch.is_grad_enabled():
            y = torch.addmm(y.reshape(-1, y.shape[-1]), x2, W.t()).view_as(y)
            return y if b is None else y + b
        fused = kernels.linear_add(y.view(-1, y.shape[-1]), x2, W)  # where oneDNN is this shape's faster kernel
        if fused is not None:
            y = fused.view_as(y)
        else:
            y.view(-1, y.shape[-1]).addmm_(x2, W.t())
        return y if b is None else y.add_(b)


def merge_pays(tokens: int, d_in: int, d_out: int) -> bool:
    """Whether merging one adapter into a (d_out, d_in) weight beats applying it to ``tokens`` inputs: the
    merge writes a weight-sized matrix, the unmerged path reads and writes tokens x (d_in + d_out) values."""
    return tokens * (d_in + d_out) >= d_in * d_out


def build_stack(model: nn.Module, groups_spec: list[tuple[str, AdapterSpec, AdapterType, list[int]]],
                n_tasks: int) -> AdapterStack:
    """Wrap every targeted Linear of ``model`` once and return the stack of groups.

    ``groups_spec``: (key, spec, adapter type, global task ids) per group; the first is the primary
    group, whose Theta serves the GLOBAL fallback id. Layers wrapped by an earlier stack are unwrapped
    first, so one base model can be re-used by successive MultiTaskModels (the last one owns it).
    """
    for name, m in list(model.named_modules()):
        if isinstance(m, StackedLinear):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, m.original)
    originals: dict[str, nn.Module] = {}
    views: dict[str, nn.Linear] = {}
    groups = []
    for i, (key, spec, atype, ids) in enumerate(groups_spec):
        targets = resolve_targets(model, spec.target_modules)  # the default means each architecture's projections
        found = targeted(model, targets)
        if not found:
            raise ConfigError([f"adapter.target_modules: no Linear module of the base model matches "
                               f"{spec.target_modules} (adapter group {key}); '{ALL_LINEAR}' adapts every one"])
        for n, m in found.items():
            originals[n] = m
            views.setdefault(n, as_linear(m))  # one view per module, shared by the groups that target it
        group = Group(key, spec, atype, ids, n_tasks, {n: views[n] for n in found}, primary=(i == 0))
        group.fan_in_fan_out = any(is_conv1d(m) for m in found.values())  # stored (in, out), as GPT-2's Conv1D
        group.targets = targets
        groups.append(group)
    stack = AdapterStack(groups)
    for name in sorted({n for g in groups for n in g.layout}):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        wrapped = StackedLinear(views[name], name, stack, [g for g in groups if name in g.layout], originals[name])
        setattr(parent, child, wrapped)
    return stack
