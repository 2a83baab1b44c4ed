"""Adapter variants on a tiny random Llama: MoSLoRA, SVFit, HiddenKey wiring, PEFT export, mixed-type training."""
from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import tiny_lm, tiny_tokenizer, write_tiny_registry

from hub import store as store_mod
from hub.cli import main
from hub.workspace import Workspace
from models.bora import BoraPrior
from models.gmt import keep_count
from models.multitask import MultiTaskModel
from models.regularisers import HiddenKeyLoss
from models.stacked import GLOBAL
from models.svfit import GAIN, choose_rank, top_singular
from tasks.registry import ConfigError
from tasks.schema import AdapterSpec, HiddenKeySpec, TaskSpec

TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(autouse=True)
def svd_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BORAHUB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "svd"


def spec(type_: str, **kw) -> AdapterSpec:
    return AdapterSpec(type=type_, rank=4, alpha=8, target_modules=TARGETS, **kw)


def randomise(mtm: MultiTaskModel, scale: float = 0.2, seed: int = 0) -> None:
    """Random nonzero task parameters (a trained-looking adapter); Theta stays at init."""
    gen = torch.Generator().manual_seed(seed)
    params = mtm.init_params(seed)
    mtm.set_params({k: (scale * torch.randn(theta.shape, generator=gen), Theta)
                    for k, (theta, Theta) in params.items()})


def ids_batch(n: int = 3, length: int = 10, seed: int = 1) -> torch.Tensor:
    return torch.randint(4, 128, (n, length), generator=torch.Generator().manual_seed(seed))


def logits(model, ids, task_ids=None):
    with torch.no_grad():
        if task_ids is None:
            return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        return model(ids, torch.ones_like(ids), torch.as_tensor(task_ids)).logits


def merged_reference(mtm: MultiTaskModel, task_id: int, delta_weight) -> torch.nn.Module:
    """A fresh copy of the base model with the task's dW added to every target weight."""
    ref = tiny_lm()
    g, slot = mtm.locate(task_id)
    with torch.no_grad():
        for m in g.layout:
            p = {k: v[slot] for k, v in g.params(m).items()}
            ref.get_submodule(m).weight += delta_weight(p, g.frozen[m])
    return ref


# -- MoSLoRA -----------------------------------------------------------------------------------------
def test_moslora_starts_exactly_where_lora_starts():
    def parts(kind):  # each module's parts at the group's init, seed 0, as a one-type hub (the bench's runs)
        mtm = MultiTaskModel(tiny_lm(), tiny_tokenizer(), "tiny", [("a", spec(kind))])
        g = mtm.groups[0]
        Theta = mtm.init_params(0)[g.key][1]
        return {m: {p: Theta[s.offset: s.offset + s.numel].view(s.shape) for p, s in parts.items()}
                for m, parts in g.layout.items()}

    mos, lora = parts("moslora"), parts("lora")
    assert mos.keys() == lora.keys() and len(mos) > 1
    for m in mos:  # the mixer draws nothing from the generator: every A is LoRA's A of the same seed
        torch.testing.assert_close(mos[m]["A"], lora[m]["A"], atol=0, rtol=0)
        torch.testing.assert_close(mos[m]["M"], torch.eye(4), atol=0, rtol=0)  # B M A = B A: LoRA's start
        assert mos[m]["B"].abs().max() == 0
    A = mos["model.layers.0.mlp.down_proj"]["A"]  # in 128, rank 4
    assert 0.5 / 128**0.5 < A.abs().max() <= 1 / 128**0.5  # Kaiming-uniform, a = sqrt(5)


def test_moslora_mixer_leaves_the_identity_once_b_moves():
    from conftest import tiny_batcher

    from models.trainer import Trainer

    mtm = MultiTaskModel(tiny_lm(), tiny_tokenizer(), "tiny", [("a", spec("moslora")), ("b", spec("moslora"))])
    prior = BoraPrior(mtm, 10.0, torch.full((2,), 6.0), mtm.init_params(0))
    Trainer(prior, tiny_batcher(2), steps=3, lr=0.01, seed=0).fit(progress=False)
    g = mtm.groups[0]
    s = g.layout["model.layers.0.mlp.down_proj"]["M"]
    M = prior.values()[g.key][0][0, s.offset: s.offset + s.numel].view(s.shape)
    assert (M - torch.eye(4)).abs().max() > 1e-3  # the mixer trains from the identity


def test_moslora_merged_weight_equals_unmerged_forward():
    mtm = MultiTaskModel(tiny_lm(), tiny_tokenizer(), "tiny", [("a", spec("moslora")), ("b", spec("moslora"))])
    randomise(mtm)
    scale = 8 / 4
    ids = ids_batch()
    refs = [merged_reference(mtm, t, lambda p, f: p["B"] @ p["M"] @ p["A"] * scale) for t in (0, 1)]
    expected = [logits(r, ids) for r in refs]
    assert (expected[0] - expected[1]).abs().max() > 1e-2  # the two tasks really differ
    for t in (0, 1):  # every row on one task: the uniform fast path
        assert (logits(mtm, ids, [t] * 3) - expected[t]).abs().max() < 1e-5
    mixed = logits(mtm, ids, [0, 1, 0])  # per-row gather path
    for row, t in enumerate([0, 1, 0]):
        assert (mixed[row] - expected[t][row]).abs().max() < 1e-5


# -- SVFit -------------------------------------------------------------------------------------------
def test_svfit_is_exact_at_init_and_trains_r_values_per_matrix():
    base = tiny_lm()
    mtm = MultiTaskModel(tiny_lm(), tiny_tokenizer(), "tiny", [("a", spec("svfit")), ("b", spec("svfit"))])
    mtm.set_params(mtm.init_params(0, noise=0.0))
    ids = ids_batch()
    for route in ([0, 0, 0], [0, 1, 0], [GLOBAL] * 3):
        assert (logits(mtm, ids, route) - logits(base, ids)).abs().max() < 1e-5
    (g,) = mtm.groups
    n_matrices = 2 * len(TARGETS)
    assert len(g.layout) == n_matrices and g.dim == 4 * n_matrices  # r trainable numbers per matrix per task
    assert g.flat.shape == (3, 4 * n_matrices)  # two tasks + Theta; U_r, V_r live once, in g.frozen


def test_svfit_delta_is_the_papers_singular_value_update():
    """W' = U_r diag(s_r + ds) V_r^T + (W - U_r diag(s_r) V_r^T) with ds = s_r * g (the relative change g is what
    trains), built from a full SVD of each weight."""
    mtm = MultiTaskModel(tiny_lm(), tiny_tokenizer(), "tiny", [("a", spec("svfit"))])
    randomise(mtm, scale=0.5)
    ref = tiny_lm()
    g, slot = mtm.locate(0)
    with torch.no_grad():
        for m in g.layout:
            W = ref.get_submodule(m).weight
            U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
            ds = GAIN * S[:4] * g.params(m)["g"][slot].double()
            top = U[:, :4] @ torch.diag(S[:4]) @ Vh[:4]
            W.copy_(U[:, :4] @ torch.diag(S[:4] + ds) @ Vh[:4] + (W.double() - top))
    ids = ids_batch()
    assert (logits(mtm, ids, [0] * 3) - logits(ref, ids)).abs().max() < 1e-4
    assert (logits(mtm, ids, [0] * 3) - logits(tiny_lm(), ids)).abs().max() > 1e-2


def test_svfit_energy_rank_and_disk_cache(svd_cache):
    s = torch.tensor([3.0, 2.0, 1.0])  # shares of s^2: 9/14, 13/14, 14/14
    assert [choose_rank(s, AdapterSpec(type="svfit", energy=e)) for e in (0.5, 0.9, 0.95, 1.0)] == [1, 2, 3, 3]
    assert choose_rank(s, AdapterSpec(type="svfit", rank=8)) == 3
    weight = torch.randn(12, 6, generator=torch.Generator().manual_seed(0))
    U, S, Vh = top_singular(weight, AdapterSpec(type="svfit", energy=0.9))
    (cached,) = svd_cache.glob("*.safetensors")
    s_all = torch.linalg.svdvals(weight)
    assert U.shape[1] == Vh.shape[0] == choose_rank(s_all, AdapterSpec(type="svfit", energy=0.9)) < 6
    torch.testing.assert_close(U.T @ weight @ Vh.T, torch.diag(s_all[: U.shape[1]]), atol=1e-5, rtol=0)
    cached.write_bytes(b"damaged")  # a broken cache entry is recomputed, not trusted
    U2, S2, Vh2 = top_singular(weight, AdapterSpec(type="svfit", energy=0.9))
    torch.testing.assert_close(S2, s_all[: U.shape[1]], atol=1e-5, rtol=0)
    assert torch.equal(U2 @ torch.diag(s_all[: U.shape[1]]) @ Vh2, U @ torch.diag(s_all[: U.shape[1]]) @ Vh)
    assert cached.read_bytes() != b"damaged"


@pytest.mark.parametrize("type_", ["moslora", "svfit"])
def test_blending_is_in_output_space(type_):
    """A row routed to K tasks with weights w gets sum_k w_k * delta_k(x), in the batched per-row path."""
    mtm = MultiTaskModel(tiny_lm(), tiny_tokenizer(), "tiny", [("a", spec(type_)), ("b", spec(type_))])
    randomise(mtm)
    (g,) = mtm.groups
    m = "model.layers.1.mlp.down_proj"
    p, frozen = g.params(m), g.frozen[m]
    x = torch.randn(2, 5, 128, generator=torch.Generator().manual_seed(3))
    slots, w = torch.tensor([[0, 1], [1, 0]]), torch.tensor([[0.7, 0.3], [0.5, 0.5]])
    blended = g.atype.delta(x, {k: v[slots] for k, v in p.items()}, w, frozen, g.spec)
    for n in range(2):
        parts = [g.atype.delta_one(x[n], {k: v[slots[n, j]] for k, v in p.items()}, frozen, g.spec)
                 for j in range(2)]
        torch.testing.assert_close(blended[n], w[n, 0] * parts[0] + w[n, 1] * parts[1], atol=1e-5, rtol=1e-5)
    assert (blended[0] - blended[1]).abs().max() > 1e-3


# -- HiddenKey wiring --------------------------------------------------------------------------------
def task(name, hiddenkey=None) -> TaskSpec:
    return TaskSpec(name=name, hiddenkey=hiddenkey)


def lm_batch(task_ids):
    ids = ids_batch(len(task_ids), 12)
    mask = torch.ones_like(ids)
    mask[0, 9:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "task_ids": torch.tensor(task_ids)}


def test_hiddenkey_loss_affects_only_its_tasks_rows():
    tasks = [task("plain"), task("hk", HiddenKeySpec(key_drop=0.3, hidden_drop=0.3, kl_weight=2.0))]
    mtm = MultiTaskModel(tiny_lm(), tiny_tokenizer(), "tiny", [(t.name, spec("lora")) for t in tasks])
    randomise(mtm)
    mtm.train()
    terms = HiddenKeyLoss(mtm, tasks)
    batch = lm_batch([0, 1, 0, 1])
    torch.manual_seed(0)
    nll, ntok, extra = terms(batch)
    plain_nll, plain_ntok = mtm.row_nll(batch)  # after the call: HiddenKey is cleared, stock model again
    assert torch.equal(ntok, plain_ntok)
    assert torch.equal(nll[[0, 2]], plain_nll[[0, 2]]) and torch.equal(extra[[0, 2]], torch.zeros(2))
    assert (extra[[1, 3]] > 1e-6).all() and torch.isfinite(extra).all()
    assert (nll[[1, 3]] - plain_nll[[1, 3]]).abs().min() > 1e-4  # DropKey + HiddenCut changed those rows


def test_hiddenkey_kl_is_zero_when_both_passes_drop_nothing():
    """With zero rates both passes are the same deterministic forward, so the weighted KL term is 0."""
    tasks = [task("hk", HiddenKeySpec(key_drop=0.0, hidden_drop=0.0, kl_weight=5.0))]
    mtm = MultiTaskModel(tiny_lm(), tiny_tokenizer(), "tiny", [("hk", spec("lora"))])
    randomise(mtm)
    mtm.train()
    nll, _, extra = HiddenKeyLoss(mtm, tasks)(lm_batch([0, 0]))
    assert extra.abs().max() < 1e-6
    torch.testing.assert_close(nll, mtm.row_nll(lm_batch([0, 0]))[0])


def test_hiddenkey_loss_gives_finite_gradients_through_the_prior():
    tasks = [task("plain"), task("hk", HiddenKeySpec())]
    mtm = MultiTaskModel(tiny_lm(), tiny_tokenizer(), "tiny", [(t.name, spec("moslora")) for t in tasks])
    mtm.train()
    prior = BoraPrior(mtm, 10.0, torch.tensor([5.0, 5.0]), mtm.init_params(0), loss_terms=HiddenKeyLoss(mtm, tasks))
    prior.loss(lm_batch([0, 1, 1])).backward()
    grads = {n.split(".")[-1]: p.grad for n, p in prior.guide.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert grads["delta_0_unconstrained"][1].abs().sum() > 0


def test_hiddenkey_on_a_model_without_mlp_modules_is_a_config_error():
    from transformers import OPTConfig, OPTForCausalLM

    lm = OPTForCausalLM(OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=1, num_attention_heads=2,
                                  vocab_size=64, word_embed_proj_dim=32, max_position_embeddings=64))
    mtm = MultiTaskModel(lm, None, "opt", [("a", AdapterSpec(rank=2, target_modules=["q_proj"]))])
    with pytest.raises(ConfigError, match=r"tasks\(a\)\.hiddenkey"):
        HiddenKeyLoss(mtm, [task("a", HiddenKeySpec())])


# -- PEFT export -------------------------------------------------------------------------------------
@pytest.mark.parametrize("adapter", [spec("lora"), spec("moslora"), spec("svfit"), spec("svfit", energy=0.8)],
                         ids=["lora", "moslora", "svfit", "svfit-energy"])
def test_export_loads_in_peft_with_our_logits(tmp_path, adapter):
    from peft import PeftModel

    mtm = MultiTaskModel(tiny_lm(), tiny_tokenizer(), "tiny", [("other", spec("lora")), ("t", adapter)])
    randomise(mtm, scale=0.3)
    store_mod.write_peft(mtm, 1, tmp_path / "t")
    config = json.loads((tmp_path / "t" / "adapter_config.json").read_text())
    if adapter.energy:  # ranks chosen per matrix: PEFT learns them from rank_pattern / alpha_pattern
        assert config["rank_pattern"] and config["alpha_pattern"]
    peft_model = PeftModel.from_pretrained(tiny_lm(), str(tmp_path / "t")).eval()
    ids = ids_batch()
    ours, theirs = logits(mtm, ids, [1] * 3), logits(peft_model, ids)
    assert (ours - logits(tiny_lm(), ids)).abs().max() > 1e-2  # a nontrivial adapter
    assert (ours - theirs).abs().max() < 1e-4


# -- one registry, three adapter types, one run --------------------------------------------------------
def test_mixed_types_train_jointly_in_one_cli_run(tmp_path, tiny_model_dir, capsys):
    from peft import PeftModel

    path = write_tiny_registry(tmp_path, tiny_model_dir)
    raw = yaml.safe_load(path.read_text())
    cooking, finance, sport = raw["tasks"]
    cooking["adapter"] = {"type": "lora", "rank": 4, "alpha": 8, "target_modules": TARGETS}
    cooking["hiddenkey"] = {"key_drop": 0.2, "hidden_drop": 0.1, "kl_weight": 1.0}
    finance["adapter"] = {"type": "moslora", "rank": 4, "alpha": 8, "target_modules": TARGETS}
    finance["gmt"] = {"keep_ratio": 0.25, "freeze_masked": True}  # centred, masked entries exactly unchanged
    sport["adapter"] = {"type": "svfit", "rank": 4, "target_modules": TARGETS}
    raw["training"].update(steps=1, grad_accum=2)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    init = Workspace(path).new_model().init_params(0)

    assert main(["--config", str(path), "train", "--quiet"]) == 0
    state = json.loads((tmp_path / "store" / "hub.json").read_text())
    assert sorted(g["spec"]["type"] for g in state["groups"]) == ["lora", "moslora", "svfit"]
    mtm, _ = Workspace(path).trained_model()
    trained = mtm.get_params()
    for name in ("cooking", "sport"):  # one Adam step moves every entry with a gradient
        g, slot = mtm.locate(mtm.task_id(name))
        moved = trained[g.key][0][slot] != init[g.key][0][slot]
        assert moved.float().mean() > 0.95, name
    g, slot = mtm.locate(mtm.task_id("finance"))  # GMT: exactly the kept share moved, per tensor slice
    moved = trained[g.key][0][slot] != init[g.key][0][slot]
    for m, p, s in g.slices():
        assert int(moved[s.offset: s.offset + s.numel].sum()) == keep_count(s.numel, 0.25), (m, p)

    ids = ids_batch()
    for name in ("cooking", "finance", "sport", "_global"):  # _global: Theta of the primary group
        out = tmp_path / f"export-{name}"
        assert main(["--config", str(path), "export", name, "--out", str(out)]) == 0
        peft_model = PeftModel.from_pretrained(tiny_lm(), str(out)).eval()
        tid = GLOBAL if name == "_global" else mtm.task_id(name)
        assert (logits(mtm, ids, [tid] * 3) - logits(peft_model, ids)).abs().max() < 1e-4, name
    capsys.readouterr()


def test_hiddenkey_default_rates_on_a_llama():
    mtm = MultiTaskModel(tiny_lm(), tiny_tokenizer(), "tiny", [("a", spec("lora")), ("b", spec("lora"))])
    loss = HiddenKeyLoss(mtm, [task("a", HiddenKeySpec()), task("b", HiddenKeySpec(hidden_drop=0.2))])
    assert loss.key_rate.tolist() == pytest.approx([0.05, 0.05])
    assert loss.hidden_rate.tolist() == pytest.approx([0.0, 0.2])  # the Llama's own hidden dropout: none
