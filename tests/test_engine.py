"""The inference engine: mixed-task batched generation equals row-by-row generation, blends, fallback."""
from __future__ import annotations

import logging

import pytest
import torch
from conftest import TOPICS, write_tiny_registry

from hub.decode import Sampling, rows_routing
from hub.engine import Engine
from hub.router import GLOBAL_NAME, Route
from models.stacked import GLOBAL

PROMPTS = {  # one prompt per task, of different lengths (so left padding matters)
    "cooking": "stir the soup add salt bake bread with butter",
    "finance": "the bank raised rates investors sold shares",
    "sport": "the coach praised the striker and keeper in the final match",
}
OOD = "z z z z z z z z z z z z"  # single letters: in the vocabulary, unlike every task


pytestmark = pytest.mark.usefixtures("one_thread")

@pytest.fixture(scope="module")
def engine(tmp_path_factory, tiny_model_dir) -> Engine:
    from hub.workspace import Workspace

    cfg = write_tiny_registry(tmp_path_factory.mktemp("hub"), tiny_model_dir)
    Workspace(cfg).train(progress=False)  # fits and saves the router too
    eng = Engine.from_workspace(cfg)
    # Trained for a few steps only: make the task adapters and Theta clearly different.
    g = eng.mtm.groups[0]
    gen = torch.Generator().manual_seed(0)
    eng.mtm.set_params({g.key: (g.flat[:-1] + 0.3 * torch.randn(g.flat[:-1].shape, generator=gen),
                                g.flat[-1] + 0.3 * torch.randn(g.flat[-1].shape, generator=gen))})
    return eng


def routing_of(eng: Engine, routes: list[Route]):
    """The (N, K) routing the decode loop builds for rows served by ``routes``."""
    return rows_routing([eng.row([0], r, Sampling()) for r in routes])


def last_logits(eng: Engine, prompts: list[str], routes: list[Route]) -> torch.Tensor:
    """Next-token logits per row of one left-padded batch routed by ``routes``."""
    enc = [eng._encode(p, True, 1000, "test")[0] for p in prompts]
    width = max(map(len, enc))
    ids = torch.tensor([[1] * (width - len(e)) + e for e in enc])
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in enc])
    with torch.no_grad(), eng.mtm.routed(routing_of(eng, routes)):
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        return eng.mtm.lm(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1]


def test_mixed_batch_rows_equal_single_rows_with_task_forced(engine):
    names = list(PROMPTS)
    prompts = [PROMPTS[n] for n in names]
    batch = engine.generate(prompts, mode="select", max_new_tokens=8)
    assert [g.route.task for g in batch] == names  # the router sent each prompt to its own task
    assert len({g.prompt_tokens for g in batch}) == 3  # different lengths: rows were left-padded
    alone = [engine.generate([p], task=n, max_new_tokens=8)[0] for p, n in zip(prompts, names)]
    assert [g.text for g in batch] == [g.text for g in alone]
    # The tasks really differ: forcing one task on every row changes some row's continuation.
    forced = engine.generate(prompts, task="cooking", max_new_tokens=8)
    assert [g.text for g in forced] != [g.text for g in batch]


def test_blend_with_one_task_at_weight_one_equals_select(engine):
    prompts = list(PROMPTS.values())
    select = [Route(n, {n: 1.0}) for n in PROMPTS]
    others = ["finance", "sport", "cooking"]
    blend = [Route(n, {n: 1.0, o: 0.0}, reason="blend") for n, o in zip(PROMPTS, others)]
    torch.testing.assert_close(last_logits(engine, prompts, blend), last_logits(engine, prompts, select))
    half = [Route(n, {n: 0.5, o: 0.5}, reason="blend") for n, o in zip(PROMPTS, others)]
    assert not torch.allclose(last_logits(engine, prompts, half), last_logits(engine, prompts, select), atol=1e-4)
    gen_select = engine.generate(prompts, routes=select, max_new_tokens=6)
    gen_top1 = engine.generate(prompts, mode="blend", top_k=1, max_new_tokens=6)
    assert [g.route.weights for g in gen_top1] == [{n: 1.0} for n in PROMPTS]
    assert [g.text for g in gen_top1] == [g.text for g in gen_select]


def test_fallback_rows_use_exactly_theta(engine):
    prompts = [PROMPTS["finance"], OOD]
    routes = engine.route(prompts, mode="fallback")
    assert routes[0].task == "finance" and not routes[0].fallback
    assert routes[1].fallback and routes[1].reason == "ood" and routes[1].weights == {GLOBAL_NAME: 1.0}
    assert routing_of(engine, routes).ids[1].tolist() == [GLOBAL]
    mixed = last_logits(engine, prompts, routes)
    # Reference: a copy of Theta put in the finance slot, routed as an ordinary task.
    g = engine.mtm.groups[0]
    saved = g.flat.clone()
    slot = g.task_ids.index(engine.mtm.task_id("finance"))
    try:
        flat = saved.clone()
        flat[slot] = saved[-1]
        engine.mtm.set_params({g.key: (flat[:-1], flat[-1])})
        ref = last_logits(engine, [OOD], [Route("finance", {"finance": 1.0})])
    finally:
        engine.mtm.set_params({g.key: (saved[:-1], saved[-1])})
    torch.testing.assert_close(mixed[1:], ref)
    for name in PROMPTS:  # and Theta is not any task's adapter
        other = last_logits(engine, [OOD], [Route(name, {name: 1.0})])
        assert (other - ref).abs().max() > 1e-3
    batch = engine.generate(prompts, max_new_tokens=6)
    alone = engine.generate([OOD], task=GLOBAL_NAME, max_new_tokens=6)
    assert batch[1].route.fallback and batch[1].text == alone[0].text


def test_sampling_is_seeded_and_keeps_routing(engine):
    prompts = list(PROMPTS.values())
    kw = {"mode": "select", "do_sample": True, "temperature": 1.5, "max_new_tokens": 8}
    a, b, c = (engine.generate(prompts, seed=s, **kw) for s in (3, 3, 4))
    assert [g.text for g in a] == [g.text for g in b]
    assert [g.text for g in a] != [g.text for g in c]
    assert [g.route.task for g in a] == list(PROMPTS)


def test_empty_long_and_broken_prompts_are_handled(engine, caplog):
    long = " ".join([TOPICS["sport"]] * 20)  # 320 words
    bad = "the bank \udcff raised rates"  # a lone surrogate, as json.loads makes of "\\udcff"
    engine.max_input_tokens = 40
    try:
        with caplog.at_level(logging.WARNING, logger="borahub"):
            out = engine.generate(["", long, bad], max_new_tokens=4)
    finally:
        engine.max_input_tokens = 1024
    assert out[0].route.fallback and out[0].route.reason == "empty" and out[0].prompt_tokens == 1
    assert out[1].truncated and out[1].prompt_tokens <= 40 and out[1].route.task == "sport"
    assert not out[0].truncated and not out[2].truncated
    assert "\ufffd" in out[2].prompt and "\udcff" not in out[2].prompt
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "prompt 2: 320 tokens, kept the last 40" in messages and "prompt 3: invalid Unicode" in messages


def test_chat_template_is_applied_when_the_tokenizer_has_one(engine):
    tok = engine.tok
    plain = engine._encode("the bank", True, 100, "test")[0]
    tok.chat_template = ("{% for m in messages %}<bos> {{ m['content'] }} <eos>{% endfor %}"
                         "{% if add_generation_prompt %} a{% endif %}")
    try:
        chat = engine._encode("the bank", True, 100, "test")[0]
        assert engine._encode("the bank", False, 100, "test")[0] == plain
        out = engine.generate(["the bank"], task="finance", max_new_tokens=3)
    finally:
        tok.chat_template = None
    assert chat == tok("<bos> the bank <eos> a", add_special_tokens=False)["input_ids"] != plain
    assert out[0].prompt_tokens == len(chat)


def test_unknown_task_override_is_a_user_error(engine):
    from hub.errors import USER_ERRORS

    with pytest.raises(USER_ERRORS, match=r"unknown task\(s\) 'nope' \(tasks: cooking, finance, sport"):
        engine.generate(["the bank"], task="nope")
    with pytest.raises(USER_ERRORS, match="2 for 1 prompts"):
        engine.route(["the bank"], task=["finance", "sport"])
    with pytest.raises(USER_ERRORS, match="unknown task 'gone'"):
        engine.generate(["the bank"], routes=[Route("gone", {"gone": 1.0})])


def test_embedded_smollm2_mixed_chat_batch_equals_single_rows():
    """Integration: the real model, its chat template, left padding, two tasks and Theta in one batch."""
    from models.base import load_base
    from models.multitask import MultiTaskModel
    from tasks.schema import AdapterSpec

    lm, tok = load_base("smollm2-135m")
    spec = AdapterSpec(rank=4, target_modules=["q_proj", "v_proj"])
    mtm = MultiTaskModel(lm, tok, "smollm2-135m", [("news", spec), ("sport", spec)])
    g = mtm.groups[0]
    flat = 0.05 * torch.randn(g.flat.shape, generator=torch.Generator().manual_seed(0))
    mtm.set_params({g.key: (flat[:-1], flat[-1])})
    eng = Engine(mtm)
    prompts = ["Write one sentence about the stock market.", "Who won?", "Name a colour."]
    routes = [Route("news", {"news": 1.0}), Route("sport", {"sport": 1.0}), Route(GLOBAL_NAME, {GLOBAL_NAME: 1.0})]
    batch = eng.generate(prompts, routes=routes, max_new_tokens=6)
    assert tok.chat_template and batch[0].prompt_tokens > len(tok(prompts[0])["input_ids"]) + 5
    alone = [eng.generate([p], routes=[r], max_new_tokens=6)[0].text for p, r in zip(prompts, routes)]
    assert [b.text for b in batch] == alone and all(alone)


def test_rows_joining_a_running_batch_generate_what_they_would_alone(engine):
    """Continuous batching: rows admitted while others decode, and rows leaving early, change nobody's text."""
    from hub.decode import DecodeBatch

    names = list(PROMPTS)
    alone = {n: engine.generate([PROMPTS[n]], task=n, max_new_tokens=10)[0].text for n in names}
    rows = {n: engine.row(engine._encode(PROMPTS[n], True, 100, "t", n)[0], Route(n, {n: 1.0}),
                          Sampling(10 if n != "sport" else 3)) for n in names}
    batch = DecodeBatch(engine.mtm)
    batch.add([rows["cooking"]])
    for _ in range(3):
        batch.step()
    batch.add([rows["finance"], rows["sport"]])  # join mid-way, with other prompt lengths
    while len(batch):
        batch.step()
        batch.drop(batch.finished())  # sport leaves after 3 tokens; the cache is cut to the rest
    assert rows["cooking"].text == alone["cooking"] and rows["finance"].text == alone["finance"]
    assert alone["sport"].startswith(rows["sport"].text) and rows["sport"].finish == "length"


def test_stop_strings_end_a_row_and_streamed_pieces_add_up_to_its_text(engine):
    from hub.decode import DecodeBatch, _safe_end

    full = engine.generate([PROMPTS["sport"]], task="sport", max_new_tokens=12)[0].text
    words = full.split()
    stop = " ".join(words[2:4])
    pieces = []
    row = engine.row(engine._encode(PROMPTS["sport"], True, 100, "t", "sport")[0], Route("sport", {"sport": 1.0}),
                     Sampling(12, stop=(stop, "never said")), on_text=lambda _r, p: pieces.append(p))
    batch = DecodeBatch(engine.mtm)
    batch.add([row])
    while not batch.finished():
        batch.step()
    assert row.finish == "stop" and row.text == full[: full.index(stop)] and "".join(pieces) == row.text
    assert _safe_end("abc sto", ("stop",)) == 4 and _safe_end("abc\ufffd", ()) == 3 and _safe_end("abc", ("x",)) == 3


def test_the_chat_prefix_is_prefilled_once_per_adapter_and_changes_no_text(engine):
    """Rows that start with the chat template's system turn prefill only the rest, on that adapter's cached
    prefix; the generated text equals a full prefill's, and new adapter parameters drop the cached prefixes."""
    from hub.decode import PrefixCache

    tok = engine.tok
    tok.chat_template = ("<bos> the coach said {% for m in messages %} a {{ m['content'] }} <eos>{% endfor %}"
                         "{% if add_generation_prompt %} b{% endif %}")
    saved = engine.prefixes
    try:
        prefix = engine.prompter.chat_prefix()
        assert prefix == tok("<bos> the coach said a", add_special_tokens=False)["input_ids"]
        prompts = [PROMPTS[n] for n in PROMPTS] + ["the bank"]
        kw = {"task": [*PROMPTS, GLOBAL_NAME], "max_new_tokens": 8}
        engine.prefixes = PrefixCache(engine.mtm, [])
        full = [g.text for g in engine.generate(prompts, **kw)]
        engine.prefixes = PrefixCache(engine.mtm, prefix)
        cached = engine.generate(prompts, **kw)
        assert [g.text for g in cached] == full and len(engine.prefixes.entries) == 4  # 3 tasks and Theta
        assert cached[0].prompt_tokens == len(engine._encode(prompts[0], True, 100, "t")[0])
        blend = engine.generate(["the bank"], routes=[Route("finance", {"finance": 0.5, "sport": 0.5})],
                                max_new_tokens=4)  # a blend prefills in full: no cached prefix of its own
        assert len(engine.prefixes.entries) == 4 and blend[0].completion_tokens > 0
        g = engine.mtm.groups[0]
        engine.mtm.set_params({g.key: (g.flat[:-1].clone(), g.flat[-1].clone())})  # a new tensor: stale
        engine.generate(["the bank"], task="finance", max_new_tokens=2)
        assert list(engine.prefixes.entries) == [engine.mtm.task_id("finance")]
    finally:
        tok.chat_template = None
        engine.prefixes = saved


def test_length_groups_minimise_padded_tokens_plus_a_cost_per_forward():
    from hub.decode import length_groups

    lens = [50, 52, 51, 90, 91, 10]
    groups = length_groups(lens, lambda n: n, overhead=20)
    assert groups == [[10], [50, 51, 52], [90, 91]]  # 20 + 10 + 20 + 156 + 20 + 182 = 408 tokens
    assert length_groups(lens, lambda n: n, overhead=10**6) == [sorted(lens)]  # a forward too dear: one group
    assert length_groups([], len, 0) == [] and length_groups([7], lambda n: n, 0) == [[7]]


def test_rows_prefilled_in_length_groups_generate_what_they_would_alone(engine, monkeypatch):
    """Rows of different prompt lengths admitted together prefill in several forwards (one per length here,
    the cost of a forward set to 0) and still generate what they would alone."""
    from hub.decode import DecodeBatch

    names = list(PROMPTS)
    alone = {n: engine.generate([PROMPTS[n]], task=n, max_new_tokens=8)[0].text for n in names}
    forwards = []
    monkeypatch.setattr(DecodeBatch, "prefill_overhead", 0)
    real = DecodeBatch._prefill
    monkeypatch.setattr(DecodeBatch, "_prefill",
                        lambda self, rows, past: (forwards.append(len(rows)), real(self, rows, past)))
    got = engine.generate([PROMPTS[n] for n in names], task=names, max_new_tokens=8)
    assert len({len(engine._encode(PROMPTS[n], True, 100, "t", n)[0]) for n in names}) == 3
    assert forwards == [1, 1, 1] and [g.text for g in got] == [alone[n] for n in names]
