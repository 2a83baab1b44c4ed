"""The stacked multi-task layer against PEFT's LoRA, and its routing semantics."""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_lm

from models.base import prepare
from models.multitask import MultiTaskModel
from models.stacked import GLOBAL, StackedLinear, merge_pays
from models.routing import Routing
from tasks.schema import AdapterSpec

SPEC = AdapterSpec(rank=4, alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                     "down_proj"])
NAMES = ["ta", "tb", "tc"]


@pytest.fixture
def mtm_and_params():
    lm = tiny_lm()
    prepare(lm, None)
    base_state = copy.deepcopy(lm.state_dict())
    mtm = MultiTaskModel(lm, None, "tiny", [(n, SPEC) for n in NAMES])
    gen = torch.Generator().manual_seed(1)
    g = mtm.groups[0]
    flat = torch.randn(g.n_tasks + 1, g.dim, generator=gen) * 0.1  # nonzero B: adapters really act
    mtm.set_params({g.key: (flat[:-1], flat[-1])})
    return mtm, base_state


def batch(n=6, length=7, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 128, (n, length), generator=gen)
    return ids, torch.ones_like(ids)


def peft_model(mtm):
    """A PEFT LoRA model on a fresh copy of the base with one adapter per task, weights copied from ours."""
    from peft import LoraConfig, get_peft_model

    lm = tiny_lm()
    cfg = LoraConfig(r=SPEC.rank, lora_alpha=SPEC.alpha, target_modules=SPEC.target_modules, lora_dropout=0.0,
                     init_lora_weights=False)
    pm = get_peft_model(lm, cfg, adapter_name=NAMES[0])
    for n in NAMES[1:]:
        pm.add_adapter(n, cfg)
    g = mtm.groups[0]
    with torch.no_grad():
        for name, module in pm.named_modules():
            if isinstance(getattr(module, "lora_A", None), torch.nn.ModuleDict) and module.lora_A:
                key = name.removeprefix("base_model.model.")
                for slot, n in enumerate(NAMES):
                    p = {k: v[slot] for k, v in g.params(key).items()}
                    module.lora_A[n].weight.copy_(p["A"])
                    module.lora_B[n].weight.copy_(p["B"])
    return pm.eval()


def test_mixed_batch_matches_peft_per_task(mtm_and_params):
    mtm, _ = mtm_and_params
    ids, mask = batch()
    task_ids = torch.tensor([0, 1, 2, 2, 0, 1])  # a batch mixing 3 tasks
    with torch.no_grad():
        ours = mtm(ids, mask, task_ids).logits
        pm = peft_model(mtm)
        theirs = pm(input_ids=ids, attention_mask=mask, adapter_names=[NAMES[t] for t in task_ids]).logits
        plain = mtm(ids, mask, None).logits
    assert (ours - theirs).abs().max() < 1e-5
    assert (ours - plain).abs().max() > 1e-3  # the adapters do change the output


def test_uniform_fast_path_equals_gathered_path(mtm_and_params):
    mtm, _ = mtm_and_params
    ids, mask = batch()
    with torch.no_grad():
        fast = mtm(ids, mask, torch.full((6,), 1)).logits  # every row task 1: plain matmuls
        # the same rows through the gather path: blend task 1 with a zero-weight task 0
        gathered = mtm(ids, mask, torch.tensor([[1, 0]] * 6), torch.tensor([[1.0, 0.0]] * 6)).logits
    assert (fast - gathered).abs().max() < 1e-5


def test_blend_is_output_space_sum(mtm_and_params):
    mtm, _ = mtm_and_params
    ids, mask = batch(n=2)
    w = torch.tensor([[0.3, 0.7], [0.5, 0.5]])
    lin = mtm.lm.model.layers[0].self_attn.q_proj
    assert isinstance(lin, StackedLinear)
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        with mtm.routed(torch.tensor([[0, 2], [1, 2]]), w):
            blended = lin(x)
        outs = {}
        for t in range(3):
            with mtm.routed(torch.full((2,), t)):
                outs[t] = lin(x)
        assert torch.equal(lin(x), lin.base(x))  # outside a routed forward: the base model
    expect = torch.stack([0.3 * outs[0][0] + 0.7 * outs[2][0], 0.5 * outs[1][1] + 0.5 * outs[2][1]])
    assert (blended - expect).abs().max() < 1e-5


def test_global_id_uses_theta_and_base_weights_untouched(mtm_and_params):
    mtm, base_state = mtm_and_params
    g = mtm.groups[0]
    lin = mtm.lm.model.layers[1].mlp.down_proj
    x = torch.randn(3, 4, 128)
    with torch.no_grad():
        with mtm.routed(torch.tensor([GLOBAL, 0, GLOBAL])):
            y = lin(x)
        p = {k: v[g.theta_slot] for k, v in g.params("model.layers.1.mlp.down_proj").items()}
        expect = lin.base(x) + (x @ p["A"].T @ p["B"].T) * (SPEC.alpha / SPEC.rank)
    assert (y[0] - expect[0]).abs().max() < 1e-5 and (y[2] - expect[2]).abs().max() < 1e-5
    assert (y[1] - expect[1]).abs().max() > 1e-4
    # the wrapped base weights are the original tensors, unchanged, and frozen
    for name, tensor in mtm.lm.state_dict().items():
        if "lora" not in name:
            assert torch.equal(tensor, base_state[name.replace(".base.", ".")])
    assert not any(p.requires_grad for p in mtm.lm.parameters())


def test_each_linear_wrapped_once_per_target(mtm_and_params):
    mtm, _ = mtm_and_params
    wrapped = [n for n, m in mtm.lm.named_modules() if isinstance(m, StackedLinear)]
    assert len(wrapped) == 2 * 7  # 2 layers x 7 projections
    assert not any(isinstance(m.base, StackedLinear) for m in mtm.lm.modules() if isinstance(m, StackedLinear))


@pytest.mark.parametrize("type_", ["lora", "moslora", "svfit"])
@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("length", [1, 5])
def test_linear_with_bias_uniform_and_mixed_rows(type_, grad, length, monkeypatch):
    """Uniform routing computes the change first and accumulates the base matmul into it (in place without
    autograd), or without autograd merges it into the weight when the input is long (``merge_pays``); the bias
    must still be added once, and mixed rows must agree with it, in both grad modes and on both sides of the
    merge threshold."""
    from models.registry import ADAPTERS
    from models.stacked import build_stack

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 10, bias=True))
    model.requires_grad_(False)
    spec = AdapterSpec(type=type_, rank=3, alpha=6, target_modules=["0"])
    stack = build_stack(model, [("g", spec, ADAPTERS[type_], [0, 1])], 2)
    (g,) = stack.groups
    g.flat = torch.randn(g.flat.shape) * 0.3
    lin = model[0]
    import models.stacked as stacked

    merges = []  # merge_pays answers, asked only where a merge is possible (no autograd, not a decode step)
    monkeypatch.setattr(stacked, "merge_pays", lambda *a: merges.append(merge_pays(*a)) or merges[-1])
    x = torch.randn(4, length, 12)
    assert merge_pays(4 * length, 12, 10) == (length == 5)
    with torch.set_grad_enabled(grad):
        plain = lin.base(x)
        with stack.using(torch.full((4,), 1)):
            uniform = lin(x)
        merged = any(merges)
        with stack.using(torch.tensor([1, 0, 1, 0])):
            mixed = lin(x)
        p1 = {k: v[1] for k, v in g.params("0").items()}
        expect = plain + g.atype.delta_one(x, p1, g.frozen["0"], g.spec)
    torch.testing.assert_close(uniform, expect, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[0::2], expect[0::2], atol=1e-5, rtol=1e-5)
    assert (mixed[1] - expect[1]).abs().max() > 1e-3  # row 1 uses task 0: a different change
    assert (uniform - plain).abs().max() > 1e-3
    assert merged == (length == 5 and not grad)  # merged only without autograd, above the threshold


def test_decode_steps_reuse_gathered_rows_until_params_or_routing_change():
    """Without autograd, one-token-per-row forwards (decode steps) keep each module's gathered per-row parameters
    for the next step; a change of the parameters (in place or a new tensor) or of the routing regathers."""
    from models.registry import ADAPTERS
    from models.stacked import build_stack

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 10))
    model.requires_grad_(False)
    spec = AdapterSpec(rank=3, alpha=6, target_modules=["0"])
    stack = build_stack(model, [("g", spec, ADAPTERS["lora"], [0, 1, 2])], 3)
    (g,) = stack.groups
    g.flat = torch.randn(g.flat.shape) * 0.3
    lin, ids = model[0], torch.tensor([0, 1, 2, 0])
    x = torch.randn(4, 1, 12)
    routing = Routing(ids)

    def fresh():
        with stack.using(Routing(ids)):  # a new routing starts with nothing kept
            return lin(x)

    def step():
        with stack.using(routing):  # the same Routing object across decode steps
            return lin(x), routing.groups[g.key].gathered

    with torch.no_grad():
        y1, gathered = step()
        kept = gathered["0"][2]
        y, gathered = step()
        torch.testing.assert_close(y, y1)
        assert gathered["0"][2] is kept  # reused, not regathered
        g.flat.mul_(2)  # in place, as an optimiser step
        y2, _ = step()
        assert (y2 - y1).abs().max() > 1e-3
        torch.testing.assert_close(y2, fresh())
        g.flat = g.flat * 0.5  # a new tensor, as set_params
        torch.testing.assert_close(step()[0], y1)
        prefill = Routing(ids)
        with stack.using(prefill):
            lin(torch.randn(4, 3, 12))  # a prefill (3 tokens per row): nothing kept
        assert not prefill.groups[g.key].gathered
    graded = Routing(ids)
    with stack.using(graded):
        lin(x)  # autograd on: nothing kept
    assert not graded.groups[g.key].gathered


def test_routing_is_an_argument_of_the_forward_not_shared_state():
    """Routing lives only inside ``using``: a forward after it, or in another thread meanwhile, is the base
    model's; another model's layers ignore it."""
    import threading

    from models.registry import ADAPTERS
    from models.stacked import build_stack

    torch.manual_seed(0)
    model, other = torch.nn.Sequential(torch.nn.Linear(12, 10)), torch.nn.Sequential(torch.nn.Linear(12, 10))
    model.requires_grad_(False)
    other.requires_grad_(False)
    spec = AdapterSpec(rank=3, alpha=6, target_modules=["0"])
    stack = build_stack(model, [("g", spec, ADAPTERS["lora"], [0, 1])], 2)
    other_stack = build_stack(other, [("g", spec, ADAPTERS["lora"], [0, 1])], 2)
    for st in (stack, other_stack):
        st.groups[0].flat = torch.randn(st.groups[0].flat.shape) * 0.3
    x = torch.randn(2, 1, 12)
    seen = {}
    with torch.no_grad():
        with stack.using(torch.tensor([0, 1])):
            routed = model(x)
            thread = threading.Thread(target=lambda: seen.update(y=model(x)))
            thread.start()
            thread.join()
            assert torch.equal(other(x), other[0].base(x))  # another model is not routed
        assert (routed - model[0].base(x)).abs().max() > 1e-3
        torch.testing.assert_close(seen["y"], model[0].base(x))
        torch.testing.assert_close(model(x), model[0].base(x))


@pytest.mark.parametrize("type_", ["lora", "moslora", "svfit"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_decode_step_over_few_adapters_applies_their_union_as_the_per_row_path_does(type_, dtype):
    """Rows that share few adapters (blends included) decode through one wide LoRA of the adapters they use
    (``union``); it changes each row's output as the per-row gathered path does, on a float32 or a bf16 base,
    and is kept across steps. Many distinct adapters per row keep the per-row path (``union_pays``)."""
    from models.registry import ADAPTERS
    from models.stacked import build_stack, union_pays

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 10, bias=True)).to(dtype)
    model.requires_grad_(False)
    spec = AdapterSpec(type=type_, rank=3, alpha=6, target_modules=["0"])
    stack = build_stack(model, [("g", spec, ADAPTERS[type_], [0, 1, 2, 3])], 4)
    (g,) = stack.groups
    g.flat = torch.randn(g.flat.shape) * 0.3
    lin, x = model[0], torch.randn(6, 1, 12).to(dtype)
    ids = torch.tensor([[0, 1], [1, GLOBAL], [0, 1], [2, 0], [1, 0], [0, 2]])
    w = torch.tensor([[0.7, 0.3], [1.0, 0.0], [0.5, 0.5], [0.2, 0.8], [1.0, 0.0], [0.6, 0.4]])
    outs = {}
    with torch.no_grad():
        for union_on in (True, False):
            stack.union_decode = union_on
            routing = Routing(ids, w)
            with stack.using(routing):
                outs[union_on] = lin(x)
                kept = routing.groups[g.key].gathered["0"][2]
                assert ("union_C" in kept) == union_on
                torch.testing.assert_close(lin(x), outs[union_on])  # the next step reuses what was kept
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(outs[True], outs[False], atol=tol, rtol=tol)
    assert (outs[True] - lin.base(x)).abs().max() > 1e-2  # the adapters act
    stack.union_decode = True
    with stack.using(Routing(torch.tensor([[0, 1, 2]] * 8))):  # 8 rows, K = 3, U = 3: 3 (1 + 8/16) <= 24
        assert union_pays(stack.routing_for(g, x.device))
    with stack.using(Routing(torch.arange(4).repeat(2))):  # 8 rows over 4 adapters, K = 1: 4 x 1.5 <= 8
        assert union_pays(stack.routing_for(g, x.device))
    with stack.using(Routing(torch.tensor([0, 1, 2]))):  # 3 rows, 3 adapters: 3 (1 + 3/16) > 3
        assert not union_pays(stack.routing_for(g, x.device))
    with stack.using(Routing(torch.tensor([2]))):  # one adapter: always (pre-scaled factors, kept)
        assert union_pays(stack.routing_for(g, x.device))
        prefill = lin(torch.randn(1, 4, 12).to(dtype))  # four tokens: not a decode step, nothing kept
        assert not stack.routing_for(g, x.device).gathered and prefill.shape == (1, 4, 10)
