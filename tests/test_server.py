"""`borahub serve` through the real `openai` client: routing, parity with the CLI, streaming, continuous
batching across adapters, bad input, disconnects, the proxy backend."""
from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx2 as httpx
import openai
import pytest
import yaml
from conftest import write_tiny_registry

from hub.engine import Engine
from hub.server import create_app

pytestmark = pytest.mark.usefixtures("one_thread")

TEMPLATE = "ask: {q} label:"
PROMPTS = {"cooking": "stir the soup add salt", "finance": "the bank raised rates stocks fell",
           "sport": "the team scored a goal in the final"}


@pytest.fixture(scope="module")
def hub_config(tmp_path_factory, tiny_model_dir):
    """The tiny registry plus a task trained with a prompt template; trained long enough that adapters differ."""
    root = tmp_path_factory.mktemp("served")
    cfg = write_tiny_registry(root, tiny_model_dir, training={"steps": 20, "batch_size": 6, "max_length": 16,
                                                              "lr": 0.05, "checkpoint_every": 10, "eval_docs": 4,
                                                              "seed": 0})
    pairs = [("the coach", "goal"), ("a goal", "goal"), ("the bread", "soup"), ("add salt", "soup")] * 6
    rows = [{"q": q, "label": label} for q, label in pairs]
    (root / "intent.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    reg = yaml.safe_load(cfg.read_text())
    reg["tasks"].append({"name": "intent", "data": {"path": "intent.jsonl"}, "prompt": TEMPLATE,
                         "completion": " {label}"})
    cfg.write_text(yaml.safe_dump(reg, sort_keys=False))
    from hub.workspace import Workspace

    Workspace(cfg).train(progress=False)
    return cfg


@contextmanager
def serving(app):
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def engine(hub_config):
    return Engine.from_workspace(hub_config)


@pytest.fixture(scope="module")
def url(engine):
    with serving(create_app(engine, max_rows=8)) as u:
        yield u


@pytest.fixture
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


def httpx_route(client, text: str) -> str:
    r = httpx.post(str(client.base_url) + "route", json={"input": text, "mode": "select"})
    return r.json()["data"][0]["task"]


def chat(client, model, text, **kw):
    kw = {"max_tokens": 8, "temperature": 0, **kw}
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": text}], **kw)


def test_models_list_every_task_auto_and_global(client):
    assert [m.id for m in client.models.list()] == ["auto", "cooking", "finance", "sport", "intent", "_global"]


def test_a_routed_chat_completion_names_its_adapter(client, engine):
    raw = client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": PROMPTS["finance"]}], max_tokens=8, temperature=0,
        extra_body={"mode": "select"})
    out = raw.parse()
    assert out.model == "finance" and json.loads(raw.headers["x-borahub-route"])["task"] == "finance"
    assert out.route["weights"] == {"finance": 1.0} and out.route["reason"] == "select"
    alone = engine.generate([PROMPTS["finance"]], task="finance", max_new_tokens=8)[0]
    assert out.choices[0].message.content == alone.text != ""
    assert out.usage.completion_tokens == alone.completion_tokens and out.usage.prompt_tokens == alone.prompt_tokens


def test_streamed_text_equals_the_non_streamed_greedy_text(client):
    for model in ("sport", "auto"):
        full = chat(client, model, PROMPTS["sport"], max_tokens=12).choices[0].message.content
        chunks = list(chat(client, model, PROMPTS["sport"], max_tokens=12, stream=True,
                           stream_options={"include_usage": True}))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == full and len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1
        assert chunks[-1].usage.completion_tokens == 12 and chunks[-2].choices[0].finish_reason == "length"
        assert {c.model for c in chunks} == {"sport"}


def test_an_explicit_task_completion_equals_borahub_generate(client, hub_config, capsys):
    from hub.cli import main

    for endpoint, flags in (("completions", ["--no-chat"]), ("chat", [])):
        assert main(["--config", str(hub_config), "generate", "--task", "cooking", "--max-new-tokens", "10",
                     "--json", *flags, PROMPTS["cooking"]]) == 0
        cli = json.loads(capsys.readouterr().out)["text"]
        if endpoint == "completions":
            got = client.completions.create(model="cooking", prompt=PROMPTS["cooking"], max_tokens=10, temperature=0)
            text = got.choices[0].text
        else:
            text = chat(client, "cooking", PROMPTS["cooking"], max_tokens=10).choices[0].message.content
        assert text == cli != ""


def test_a_template_task_is_served_with_its_template_and_routed_on_the_raw_input(client, engine):
    out = client.completions.create(model="intent", prompt="the coach", max_tokens=3, temperature=0)
    ids = engine.tok(TEMPLATE.format(q="the coach"), add_special_tokens=False)["input_ids"]
    assert out.usage.prompt_tokens == len(ids)  # the training text: template, no special tokens
    assert out.choices[0].text == engine.generate(["the coach"], task="intent", max_new_tokens=3)[0].text
    via_chat = chat(client, "intent", "the coach", max_tokens=3)  # a one-turn chat gets the template too
    assert via_chat.usage.prompt_tokens == len(ids) and via_chat.choices[0].message.content == out.choices[0].text
    raw = client.completions.create(model="intent", prompt="the coach", max_tokens=3, temperature=0,
                                    extra_body={"raw_prompt": True})
    assert raw.usage.prompt_tokens == len(engine.tok("the coach")["input_ids"])
    two_turns = [{"role": "user", "content": "the coach"}, {"role": "assistant", "content": "goal"},
                 {"role": "user", "content": "the coach"}]
    chatted = client.chat.completions.create(model="intent", messages=two_turns, max_tokens=2, temperature=0)
    assert chatted.usage.prompt_tokens == len(engine.tok("the coach\ngoal\nthe coach")["input_ids"])
    routed = httpx_route(client, "the coach")
    assert routed == "intent"  # the raw input routes to the template task


def test_concurrent_requests_share_forwards_and_equal_their_sequential_results(client, url):
    models = ["cooking", "finance", "sport", "_global"]
    jobs = [(models[i % 4], list(PROMPTS.values())[i % 3] + " " + "and " * (i % 5)) for i in range(16)]
    alone = [chat(client, m, p, max_tokens=10).choices[0].message.content for m, p in jobs]
    before = httpx.get(url + "/health").json()
    assert before["peak_rows"] <= 1  # requests one at a time so far
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda j: chat(client, j[0], j[1], max_tokens=10), jobs))
    assert [r.choices[0].message.content for r in together] == alone
    assert [r.model for r in together] == [m for m, _ in jobs]
    health = httpx.get(url + "/health").json()
    assert health["peak_rows"] > 1  # they shared forwards
    assert health["prefills"] - before["prefills"] < len(jobs)  # new rows were prefilled together, not one by one
    assert health["worker"] == "borahub-scheduler"  # create_app without a scheduler runs its own loop thread
    busy = health["busy_s"]  # the worker's time by phase: a decode step costs more than routing named adapters
    assert set(busy) == {"route", "prefill", "decode"} and busy["decode"] > busy["route"] >= 0 and busy["prefill"] > 0


def test_bad_input_answers_4xx_with_an_error_body_and_the_server_keeps_answering(client, url):
    post = lambda body, path="/v1/chat/completions": httpx.post(url + path, content=body,  # noqa: E731
                                                                headers={"content-type": "application/json"})
    msgs = [{"role": "user", "content": "hi"}]
    cases = [
        (b"{not json", 400, "not valid JSON"),
        (b"[1, 2]", 400, "JSON object"),
        (json.dumps({"model": "auto"}).encode(), 400, "messages"),
        (json.dumps({"model": "auto", "messages": [{"role": "system", "content": "x"}]}).encode(), 400, "user"),
        (json.dumps({"model": "nope", "messages": msgs}).encode(), 404, "model 'nope' not found"),
        (json.dumps({"model": "auto", "messages": msgs, "temperature": -1}).encode(), 400, "temperature"),
        (json.dumps({"model": "auto", "messages": msgs, "top_p": 0}).encode(), 400, "top_p"),
        (json.dumps({"model": "auto", "messages": msgs, "n": 2}).encode(), 400, "n"),
        (json.dumps({"model": "auto", "messages": msgs, "max_tokens": 0}).encode(), 400, "max_tokens"),
        (json.dumps({"model": "sport", "messages": msgs, "max_tokens": 5000}).encode(), 400, "context holds 256"),
        (json.dumps({"model": "auto", "messages": msgs, "stop": ["a"] * 5}).encode(), 400, "stop"),
        (json.dumps({"model": "auto", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}).encode(),
         400, "text content"),
        (b'{"model": "auto", "messages": [{"role": "user", "content": "\\udcff"}], "max_tokens": 2}', 200, None),
    ]
    for body, status, words in cases:
        r = post(body)
        assert r.status_code == status, (body, r.text)
        if words:
            err = r.json()["error"]
            assert words in err["message"] and err["type"] == "invalid_request_error", (body, err)
    r = post(json.dumps({"model": "auto", "prompt": ["a", "b"]}).encode(), "/v1/completions")
    assert r.status_code == 400 and "one prompt per request" in r.json()["error"]["message"]
    assert httpx.get(url + "/v1/nowhere").json()["error"]["code"] == "not_found"
    with pytest.raises(openai.NotFoundError):
        chat(client, "nope", "hi")
    with pytest.raises(openai.BadRequestError):
        chat(client, "auto", "hi", temperature=3)
    assert chat(client, "sport", PROMPTS["sport"]).model == "sport"  # still answering


@pytest.fixture
def slow_steps(monkeypatch):
    """Decode steps of 20 ms: a 200-token request lasts seconds, whatever the machine."""
    from hub.decode import DecodeBatch

    step = DecodeBatch.step
    monkeypatch.setattr(DecodeBatch, "step", lambda self: (time.sleep(0.02), step(self))[1])


def test_a_client_that_disconnects_mid_stream_frees_its_row(url, slow_steps):
    body = {"model": "sport", "messages": [{"role": "user", "content": "the team"}], "max_tokens": 200,
            "temperature": 0, "stream": True}
    cancelled = httpx.get(url + "/health").json()["cancelled"]
    with httpx.stream("POST", url + "/v1/chat/completions", json=body) as r:
        lines = (line for line in r.iter_lines() if line)
        next(lines), next(lines)  # the role chunk, then text: the row is decoding
        assert httpx.get(url + "/health").json()["running"] == 1
    deadline = time.monotonic() + 3  # the whole request would take 4 s
    while httpx.get(url + "/health").json()["running"]:
        assert time.monotonic() < deadline, "the disconnected row kept decoding"
        time.sleep(0.05)
    assert httpx.get(url + "/health").json()["cancelled"] == cancelled + 1


def test_a_full_queue_answers_429_and_a_slow_request_504(engine, slow_steps):
    with serving(create_app(engine, max_rows=1, max_queue=1, timeout=30)) as u:
        client = openai.OpenAI(base_url=u + "/v1", api_key="unused", max_retries=0, timeout=60)
        with ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(chat, client, "sport", "the team", max_tokens=20) for _ in range(6)]
            errors = [f.exception() for f in futures]
        assert any(isinstance(e, openai.RateLimitError) for e in errors)
        assert any(e is None for e in errors)
    with serving(create_app(engine, timeout=0.05)) as u:
        r = httpx.post(u + "/v1/chat/completions", json={"model": "sport", "max_tokens": 200, "temperature": 0,
                                                         "messages": [{"role": "user", "content": "the team"}]})
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
        assert httpx.get(u + "/health").json()["status"] == "ok"


def test_route_endpoint(url):
    r = httpx.post(url + "/v1/route", json={"input": [PROMPTS["sport"], PROMPTS["cooking"]], "mode": "select"})
    assert [d["task"] for d in r.json()["data"]] == ["sport", "cooking"]
    assert httpx.post(url + "/v1/route", json={"input": []}).status_code == 400


def test_the_proxy_routes_here_and_generates_on_the_backend(engine, url):
    with serving(create_app(engine, backend=url)) as front:
        client = openai.OpenAI(base_url=front + "/v1", api_key="unused", max_retries=0, timeout=60)
        direct = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        raw = client.chat.completions.with_raw_response.create(
            model="auto", messages=[{"role": "user", "content": PROMPTS["cooking"]}], max_tokens=8, temperature=0,
            extra_body={"mode": "select"})
        out = raw.parse()
        assert out.model == "cooking" and json.loads(raw.headers["x-borahub-route"])["task"] == "cooking"
        assert out.choices[0].message.content == chat(direct, "cooking", PROMPTS["cooking"]).choices[0].message.content
        streamed = "".join(c.choices[0].delta.content or "" for c in
                           chat(client, "cooking", PROMPTS["cooking"], stream=True) if c.choices)
        assert streamed == out.choices[0].message.content
        templ = client.completions.create(model="intent", prompt="the coach", max_tokens=3, temperature=0)
        assert templ.choices[0].text == direct.completions.create(model="intent", prompt="the coach", max_tokens=3,
                                                                  temperature=0).choices[0].text
    with serving(create_app(engine, backend="http://127.0.0.1:9")) as front:  # nothing listens there
        r = httpx.post(front + "/v1/completions", json={"model": "sport", "prompt": "x", "max_tokens": 2})
        assert r.status_code == 502 and r.json()["error"]["code"] == "bad_gateway"


def test_serve_cli_rejects_bad_arguments_in_one_line(capsys):
    from hub.cli import main

    for argv, words in ((["serve", "--port", "70000"], "a port number"), (["serve", "--timeout", "0"], "seconds"),
                        (["serve", "--max-batch", "0"], "an integer >= 1")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and words in err and len(err.splitlines()) == 1
