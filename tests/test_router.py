"""The router: fitted at train time, calibrated on validation, stored safely; the route/generate CLI."""
from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import TOPICS, write_tiny_registry

from hub import router as R
from hub.cli import main
from hub.workspace import Workspace


pytestmark = pytest.mark.usefixtures("one_thread")

@pytest.fixture(scope="module")
def hub_cfg(tmp_path_factory, tiny_model_dir):
    cfg = write_tiny_registry(tmp_path_factory.mktemp("hub"), tiny_model_dir)
    Workspace(cfg).train(progress=False)
    return cfg


@pytest.mark.parametrize("budget", [0.02, 0.05, 0.1])
def test_fallback_thresholds_keep_the_budget_on_fresh_inputs(budget):
    """Thresholds set on one sample of in-distribution scores send at most ``budget`` of it to Theta, and
    about ``budget`` of a fresh sample from the same distribution (within 4 binomial standard errors)."""
    gen = torch.Generator().manual_seed(0)

    def scores(n):  # correlated distance and energy, as in practice
        a = torch.randn(n, generator=gen)
        return a + 0.5 * torch.randn(n, generator=gen), a + torch.randn(n, generator=gen)

    dist, energy = scores(2000)
    t_d, t_e = R.fallback_thresholds(dist, energy, budget, far_share=0.2)
    allowed = math.floor(budget * 2001 - 1 + 1e-9)  # the conformal bound: (k + 1) / (n + 1) <= budget
    assert int(((dist > t_d) | (energy > t_e)).sum()) <= allowed
    assert int((dist > t_d).sum()) <= math.floor(0.2 * allowed + 1e-9)
    fresh_d, fresh_e = scores(20000)
    rate = float(((fresh_d > t_d) | (fresh_e > t_e)).float().mean())
    se = math.sqrt(budget * (1 - budget) / 2000) + math.sqrt(budget * (1 - budget) / 20000)
    assert abs(rate - budget) < 4 * se, (rate, budget)


@pytest.mark.parametrize("n", [100, 223, 1000])
def test_a_confident_budget_holds_over_calibration_draws_and_the_average_one_on_average(n):
    """Over many calibration samples of n in-distribution scores (uniform: a threshold's true fallback rate is
    1 - threshold), the average rule keeps the mean rate within the budget and the confident rule keeps the
    rate itself within it in >= 90% of the draws (up to 3 binomial standard errors of the 2000 draws)."""
    budget, draws = 0.05, 2000
    gen = torch.Generator().manual_seed(1)
    rates = {}
    for conf in (0.0, 0.9):
        k = R.allowed_above(n, budget, conf)
        cal = torch.rand(draws, n, generator=gen).sort(1, descending=True).values
        rates[conf] = 1 - cal[:, k]  # k inputs above the (k + 1)-th largest score
    assert float(rates[0.0].mean()) <= budget + 3 * float(rates[0.0].std()) / draws ** 0.5
    over = float((rates[0.9] > budget).float().mean())
    assert over <= 0.1 + 3 * (0.09 / draws) ** 0.5, over
    assert float((rates[0.0] > budget).float().mean()) > 0.25  # the average rule alone exceeds it often
    assert R.allowed_above(n, budget, 0.9) < R.allowed_above(n, budget, 0.0)


def test_short_views_are_openings_of_long_inputs_only():
    long_text = " ".join(f"w{i}" for i in range(60))
    items = [("a", long_text), ("b", "short request of five"), ("c", " ".join(["x"] * 33))]
    views = R.short_views(items, seed=0)
    assert [t for t, _ in views] == ["a", "c"] and views == R.short_views(items, seed=0)
    for (_, text), (_, view) in zip([items[0], items[2]], views):
        assert text.startswith(view) and 8 <= len(view.split()) <= 24


def test_confidence_threshold_is_the_smallest_meeting_the_target():
    maxp = torch.tensor([0.6, 0.9, 0.7, 0.8, 0.5])
    correct = torch.tensor([True, True, False, True, False])
    assert R.confidence_threshold(maxp, correct, 0.9) == pytest.approx(0.8)  # keep 0.9, 0.8
    assert R.confidence_threshold(maxp, correct, 0.75) == pytest.approx(0.6)  # 3 of 4 kept are right
    assert R.confidence_threshold(maxp, correct, 0.5) == 0.0  # 3 of 5: every input may be kept
    assert R.confidence_threshold(maxp, ~correct, 0.9) > 1.0  # never reached: always unsure


def test_train_fits_a_router_calibrated_on_validation(hub_cfg):
    ws = Workspace(hub_cfg)
    mtm, _ = ws.trained_model()
    router = R.Router.load(ws.store, mtm)
    assert router.tasks == ["cooking", "finance", "sport"]
    assert router.layer == 1  # depth 0.25 of 2 layers, at least one
    val = {n: [e.router_text for e in ws.data(n).validation] for n in router.tasks}
    texts = [t for n in router.tasks for t in val[n]]
    y = torch.tensor([i for i, n in enumerate(router.tasks) for _ in val[n]])
    e = R.embed(mtm, texts, router.layers, router.max_tokens)
    ood, energy = router.ood_scores(e), router.energy(e)
    assert router.thresholds["ood"] == pytest.approx(float(ood.max()))  # 9 inputs: 1% of them is none
    fell_back = (ood > router.thresholds["ood"]) | (energy > router.thresholds["energy"])
    cal = router.meta["calibration"]
    assert cal["split"] == "validation" and cal["inputs"] == len(texts) and cal["budget"] == 0.05
    assert cal["false_fallback"] == pytest.approx(float(fell_back.float().mean())) and cal["false_fallback"] <= 0.05
    pred = router.probs(e).argmax(1)
    assert cal["accuracy"] == pytest.approx(float((pred == y).float().mean()))
    # Held-out test inputs go to their own task.
    test = [(n, e.router_text) for n in router.tasks for e in ws.data(n).test]
    routes = router.route(mtm, [t for _, t in test], mode="select")
    assert [r.task for r in routes] == [n for n, _ in test]


def test_modes_select_blend_fallback(hub_cfg):
    ws = Workspace(hub_cfg)
    mtm, _ = ws.trained_model()
    router = R.Router.load(ws.store, mtm)
    router.meta["thresholds"] = {"energy": -2.0, "ood": 1.0, "bayes": None}
    p = torch.tensor([[0.7, 0.2, 0.1], [0.5, 0.3, 0.2], [0.1, 0.1, 0.8]])
    ood, energy = torch.tensor([0.5, 0.5, 2.0]), torch.tensor([-3.0, -1.0, -3.0])
    sel = router.decide(p, ood, "select", energy=energy)
    assert [r.weights for r in sel] == [{"cooking": 1.0}, {"cooking": 1.0}, {"sport": 1.0}]
    blend = router.decide(p, ood, "blend", top_k=2, energy=energy)
    assert blend[1].weights == pytest.approx({"cooking": 0.625, "finance": 0.375})
    fb = router.decide(p, ood, "fallback", energy=energy)
    assert [(r.task, r.fallback, r.reason) for r in fb] == [
        ("cooking", False, "select"), (R.GLOBAL_NAME, True, "unsure"), (R.GLOBAL_NAME, True, "ood")]
    # An uncalibrated Bayesian scorer has no unsure threshold: only OOD inputs fall back.
    assert [r.reason for r in router.decide(p, ood, "fallback", scorer="bayes")] == ["select", "select", "ood"]


def test_bayes_scores_every_candidate_in_one_mixed_batch(hub_cfg):
    ws = Workspace(hub_cfg)
    mtm, _ = ws.trained_model()
    g = mtm.groups[0]
    gen = torch.Generator().manual_seed(0)
    mtm.set_params({g.key: (g.flat[:-1] + 0.3 * torch.randn(g.flat[:-1].shape, generator=gen), g.flat[-1])})
    texts = ["the bank raised rates", "stir the soup add salt bake bread"]
    ids = torch.tensor([[0, 1, 2], [2, 0, 1]])
    ll = R.log_likelihoods(mtm, texts, ids, max_tokens=64)
    for i, text in enumerate(texts):  # each (prompt, task) alone, through the model's own NLL
        enc = mtm.tokenizer([text], return_tensors="pt")
        for c in range(3):
            batch = {**enc, "labels": enc["input_ids"], "task_ids": ids[i, c:c + 1]}
            with torch.no_grad():
                nll, _ = mtm.row_nll(batch)
            assert ll[i, c].item() == pytest.approx(-nll.item(), rel=1e-5)
    assert ll.std() > 0.01  # the adapters really score differently
    router = R.Router.load(ws.store, mtm)
    post = router.bayes_probs(mtm, texts, torch.full((2, 3), 1 / 3))
    ref = torch.softmax(ll + router.log_prior()[ids], -1)
    torch.testing.assert_close(post.gather(1, ids), ref)


def test_router_files_are_checked_on_load(hub_cfg, tmp_path):
    import shutil

    ws = Workspace(hub_cfg)
    mtm, _ = ws.trained_model()
    router = R.Router.load(ws.store, mtm)
    copy = tmp_path / "store"
    router.save(copy)
    again = R.Router.load(copy, mtm)
    e = torch.randn(4, mtm.lm.config.hidden_size)
    torch.testing.assert_close(again.probs(e), router.probs(e))
    meta = json.loads((copy / R.ROUTER_JSON).read_text())
    (copy / R.ROUTER_JSON).write_text(json.dumps({**meta, "tasks": ["cooking", "gone"]}))
    with pytest.raises(R.RouterError, match=r"lacks \(gone\)"):
        R.Router.load(copy, mtm)
    (copy / R.ROUTER_JSON).write_text(json.dumps(meta))
    (copy / R.ROUTER_WEIGHTS).write_bytes(b"garbage")
    with pytest.raises(R.RouterError, match="not the file router.json was written with"):
        R.Router.load(copy, mtm)
    shutil.rmtree(copy)
    with pytest.raises(R.RouterError, match="no router"):
        R.Router.load(copy, mtm)


def test_taps_concatenate_several_layers_read_in_one_forward(hub_cfg, tmp_path):
    from types import SimpleNamespace

    from hub.embedding import layers_for

    def lm(n):
        return SimpleNamespace(config=SimpleNamespace(num_hidden_layers=n))

    assert layers_for(lm(30), 0.25, (0.5, 0.75, 1.0)) == [4, 6, 8]  # SmolLM2-135M
    assert layers_for(lm(2), 0.25, (0.5, 0.75, 1.0)) == [1]  # repeats collapse
    assert layers_for(lm(24), 1.0, (1.0, 0.0)) == [1, 24]  # at least layer 1
    ws = Workspace(hub_cfg)
    mtm, _ = ws.trained_model()
    texts = ["the bank raised rates", "a pinch of salt in the soup", "the striker scored twice", "rain"]
    norms = []
    hook = mtm.lm.model.norm.register_forward_hook(lambda *a: norms.append(1))
    try:
        both = R.embed(mtm, texts, [1, 2], 16, batch_size=3)  # two batches of different lengths
    finally:
        hook.remove()
    assert norms == []  # the forward stopped after layer 2: the final norm never ran
    assert not any(b._forward_hooks for b in R.decoder_layers(mtm.lm))  # no hook left behind
    enc = mtm.tokenizer(texts[0], return_tensors="pt")
    with torch.no_grad():
        states = mtm.lm(**enc, output_hidden_states=True).hidden_states  # [0]: the embeddings; [k]: after layer k
    d = mtm.lm.config.hidden_size
    torch.testing.assert_close(both[0, :d], states[1][0].mean(0))
    torch.testing.assert_close(both, torch.cat([R.embed(mtm, texts, 1, 16), R.embed(mtm, texts, [2], 16)], 1))
    assert not torch.allclose(both[:, :d], both[:, d:])
    for bad in ([], [0], [3], [True]):
        with pytest.raises(R.RouterError, match="cannot embed after layers"):
            R.embed(mtm, texts, bad, 16)

    router = R.fit_from_workspace(ws, mtm, R.RouterConfig(depth=1.0))
    assert router.layers == [1, 2] and router.layer == 2 and router.t["mean"].numel() == 2 * d
    assert router.t["centroids"].shape == (3, d)  # the distance test reads the deepest layer only
    moved = both.clone()
    moved[:, :d] += 5.0  # move the shallow layer's part only
    torch.testing.assert_close(router.ood_scores(moved), router.ood_scores(both))
    assert not torch.allclose(router.energy(moved), router.energy(both))
    router.save(tmp_path / "taps")
    again = R.Router.load(tmp_path / "taps", mtm)
    assert again.layers == [1, 2]
    assert [r.task for r in again.route(mtm, texts, mode="select")] == \
        [r.task for r in router.route(mtm, texts, mode="select")]
    meta = json.loads((tmp_path / "taps" / R.ROUTER_JSON).read_text())
    for layer, layers in ((2, [2, 1]), (2, [1, 1, 2]), (2, "abc"), (2, None), (2, [True, 2]), (2, [2]), (3, [1, 3]),
                          (2, [])):
        (tmp_path / "taps" / R.ROUTER_JSON).write_text(json.dumps({**meta, "layer": layer, "layers": layers}))
        with pytest.raises(R.RouterError, match="malformed router"):
            R.Router.load(tmp_path / "taps", mtm)
    for text in ("[1]", '{"format": ' + "9" * 5000 + "}"):
        (tmp_path / "taps" / R.ROUTER_JSON).write_text(text)
        with pytest.raises(R.RouterError, match="malformed|not valid JSON"):
            R.Router.load(tmp_path / "taps", mtm)
    # a router fitted before taps (one layer, no "layers" field) still loads and routes as before
    old = R.Router.load(ws.store, mtm)
    old.meta.pop("layers")
    old.save(tmp_path / "old")
    legacy = R.Router.load(tmp_path / "old", mtm)
    assert legacy.layers == [old.layer] == [1]
    assert [r.task for r in legacy.route(mtm, texts, mode="select")] == \
        [r.task for r in R.Router.load(ws.store, mtm).route(mtm, texts, mode="select")]


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_route_cli_handles_empty_long_broken_and_unknown_inputs(hub_cfg, tmp_path, capsys):
    lines = [json.dumps({"text": "the bank raised rates investors sold shares"}).encode(),
             json.dumps({"text": ""}).encode(),
             b"",  # blank lines are skipped
             json.dumps({"text": " ".join([TOPICS["sport"]] * 300)}).encode(),  # 4800 words
             b'{"text": "the team scored \xff\xfe a goal"}',
             json.dumps({"text": "stir the soup", "task": "cooking"}).encode()]
    src = tmp_path / "in.jsonl"
    src.write_bytes(b"\n".join(lines) + b"\n")
    code, out, err = run_cli(capsys, "--config", str(hub_cfg), "route", "--input", str(src), "--mode", "select")
    assert code == 0
    rows = [json.loads(x) for x in out.splitlines()]
    assert [r["input"] for r in rows] == [1, 2, 4, 5, 6]
    assert [r["task"] for r in rows] == ["finance", R.GLOBAL_NAME, "sport", "sport", "cooking"]
    assert rows[1]["fallback"] and rows[1]["reason"] == "empty"
    assert rows[4]["reason"] == "override" and rows[0]["scores"]["finance"] > 0.5
    assert set(rows[0]) == {"input", "task", "weights", "fallback", "reason", "scores", "ood_score"}
    assert err.strip().splitlines() == [f"borahub: warning: {src}:5: bytes that are not UTF-8 replaced by U+FFFD"]

    src.write_text(json.dumps({"text": "the bank", "task": "nope"}) + "\n")
    code, out, err = run_cli(capsys, "--config", str(hub_cfg), "route", "--input", str(src))
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and "unknown task(s) 'nope'" in err
    src.write_text('{"text": "the bank"\n')
    code, _, err = run_cli(capsys, "--config", str(hub_cfg), "route", "--input", str(src))
    assert code == 2 and err.startswith(f"borahub: error: {src}:1: not valid JSON")
    code, _, err = run_cli(capsys, "--config", str(hub_cfg), "route", "--input", str(tmp_path / "missing.jsonl"))
    assert code == 2 and "cannot read" in err


def test_generate_cli_and_router_refit(hub_cfg, capsys):
    ws = Workspace(hub_cfg)
    (ws.store / R.ROUTER_JSON).unlink()
    code, _, err = run_cli(capsys, "--config", str(hub_cfg), "generate", "the bank raised rates")
    assert code == 2 and "no router" in err and "borahub router fit" in err
    code, out, _ = run_cli(capsys, "--config", str(hub_cfg), "generate", "the bank", "--task", "finance",
                           "--max-new-tokens", "3", "--json")
    assert code == 0 and json.loads(out)["weights"] == {"finance": 1.0}  # overrides need no router
    code, out, _ = run_cli(capsys, "--config", str(hub_cfg), "router", "fit", "--quiet", "--bayes-docs", "2")
    assert code == 0 and "router: 3 tasks" in out and "bayes" in out
    meta = json.loads((ws.store / R.ROUTER_JSON).read_text())
    assert meta["thresholds"]["bayes"] is not None and meta["calibration"]["bayes"]["inputs"] == 6
    code, out, _ = run_cli(capsys, "--config", str(hub_cfg), "generate", "the bank raised rates", "the team won",
                           "--mode", "blend", "--top-k", "2", "--max-new-tokens", "3", "--json", "--bayes")
    gens = [json.loads(x) for x in out.splitlines()]
    assert code == 0 and len(gens) == 2 and all(math.isclose(sum(g["weights"].values()), 1.0) for g in gens)
    assert all(len(g["weights"]) == 2 and g["reason"] == "blend" for g in gens)


def test_cli_constants_match_the_router():
    from hub import router_cli

    assert router_cli.MODES == R.MODES and router_cli.GLOBAL_NAME == R.GLOBAL_NAME


def test_a_prompt_template_hub_routes_the_raw_requests(tmp_path, tiny_model_dir):
    """The router is fitted on what users send (the field the template wraps), not on the formatted prompt,
    so plain requests reach their task in the default mode."""
    import random

    import yaml

    rng = random.Random(0)
    cfg = write_tiny_registry(tmp_path, tiny_model_dir)
    raw = yaml.safe_load(cfg.read_text())
    for t in raw["tasks"]:
        words = TOPICS[t["name"]].split()
        rows = [{"question": " ".join(rng.sample(words, 6)), "answer": t["name"]} for _ in range(30)]
        (tmp_path / f"{t['name']}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        t.update(prompt="Customer says : {question} \n Intent :", completion=" {answer}")
    cfg.write_text(yaml.safe_dump(raw, sort_keys=False))
    ws = Workspace(cfg)
    questions = {json.loads(line)["question"] for line in (tmp_path / "cooking.jsonl").read_text().splitlines()}
    assert all(e.router_text in questions for e in ws.data("cooking").train)
    ws.train(progress=False)
    from hub.engine import Engine

    engine = Engine.from_workspace(cfg)
    requests = {n: [" ".join(rng.sample(TOPICS[n].split(), 6)) for _ in range(5)] for n in TOPICS}
    routes = engine.route([x for n in TOPICS for x in requests[n]])  # default mode: fallback
    want = [n for n in TOPICS for _ in range(5)]
    assert all(r.task in (w, R.GLOBAL_NAME) for r, w in zip(routes, want))  # never a wrong task
    # fitted on the formatted prompts (before), most of these fell back as out of distribution
    assert sum(r.task == w for r, w in zip(routes, want)) >= 13, [r.reason for r in routes]


def test_a_document_hub_takes_short_openings_of_its_topics_with_short_views(tiny_model_dir):
    """Fitted on 40-word documents only, the distance test reads length as novelty and sends short openings of
    known topics to Theta; with short views in the fit and the calibration they are routed to their topics."""
    import random

    from models.base import load_base
    from models.multitask import MultiTaskModel
    from tasks.schema import AdapterSpec

    rng = random.Random(0)
    docs = {t: [" ".join(rng.choices(text.split(), k=40)) for _ in range(60)] for t, text in TOPICS.items()}
    train = {t: d[:40] for t, d in docs.items()}
    validation = {t: d[40:50] for t, d in docs.items()}
    test = [(t, " ".join(x.split()[:10])) for t, d in docs.items() for x in d[50:]]
    lm, tok = load_base(str(tiny_model_dir))
    mtm = MultiTaskModel(lm, tok, str(tiny_model_dir), [(t, AdapterSpec(rank=2, target_modules=["q_proj"]))
                                                        for t in TOPICS])
    fell_back = {}
    for views in (False, True):
        router = R.fit(mtm, train, validation, R.RouterConfig(short_views=views))
        routes = router.route(mtm, [x for _, x in test], mode="fallback")
        fell_back[views] = sum(r.fallback for r in routes) / len(routes)
        if views:
            kept = [(t, r.task) for (t, _), r in zip(test, routes) if not r.fallback]
            assert sum(t == task for t, task in kept) >= 0.9 * len(kept)
    assert fell_back[False] > 0.8 and fell_back[True] <= 0.25, fell_back
