"""`borahub serve`: an OpenAI-compatible endpoint that picks the adapter itself (FastAPI + uvicorn).

    GET  /health                 liveness, load, the worker's busy seconds by phase
    GET  /v1/models              every task, "auto" (route each request) and "_global" (Theta)
    POST /v1/chat/completions    model = a task, "auto" or "_global"; stream, stop, seed, max_tokens, ...
    POST /v1/completions         the same for a plain prompt
    POST /v1/route               routing only: {"input": "..." | [...], "mode": "fallback"}

Every completion names the adapter that served it in ``model`` (the routed task, or "_global"), and carries
the whole route in an extra ``route`` field and the ``x-borahub-route`` header. Requests share forwards
(hub/scheduler.py); what text reaches the model is hub/prompting.py's rule. Bad input answers 400/404 with an
OpenAI-style error body, a full queue 429, a request past its timeout 504; none of them stops the server.
With ``backend``, routing stays here and generation goes to another OpenAI-compatible server (hub/proxy.py).
"""
from __future__ import annotations

import asyncio
import json
import logging
import signal
import threading
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError

from .decode import Sampling
from .engine import Engine
from .errors import USER_ERRORS
from .openai_schema import (ChatRequest, CompletionRequest, RouteRequest, chunk_body, completion_body, error_body,
                            new_id, route_header, usage)
from .route import GLOBAL_NAME, RouterError
from .scheduler import Job, JobTimeout, QueueFull, Scheduler

log = logging.getLogger("borahub")
AUTO = "auto"


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.body = status, error_body(message, type_, param, code)


def _error_for(e: Exception) -> ApiError:
    if isinstance(e, ApiError):
        return e
    if isinstance(e, QueueFull):
        return ApiError(429, str(e), "rate_limit_error", code="queue_full")
    if isinstance(e, JobTimeout):
        return ApiError(504, f"request timed out: {e}", "timeout", code="timeout")
    if isinstance(e, USER_ERRORS):
        return ApiError(400, str(e))
    log.error("request failed: %s: %s", type(e).__name__, e)
    return ApiError(500, "internal error while generating", "server_error")


def create_app(engine: Engine, *, max_rows: int = 16, max_queue: int = 64, timeout: float = 600.0,
               max_tokens: int = 128, mode: str = "fallback", backend: str | None = None,
               scheduler: Scheduler | None = None) -> FastAPI:
    """The app. Without ``scheduler`` its own scheduler thread (``max_rows``, ``max_queue``) starts and stops with
    the app's lifespan; with one (whose loop the caller runs: ``serve``) the app submits to it and leaves it
    running, and ``max_rows`` / ``max_queue`` are the scheduler's own."""
    state: dict = {}

    @asynccontextmanager
    async def lifespan(_app):
        state["scheduler"] = scheduler or Scheduler(engine, max_rows=max_rows, max_queue=max_queue)
        if backend is not None:
            from .proxy import Backend

            state["backend"] = Backend(backend, engine.prompter)
        try:
            yield
        finally:
            if "backend" in state:
                await state["backend"].close()
            if scheduler is None:
                await asyncio.to_thread(state["scheduler"].close)

    app = FastAPI(title="BoRA Hub", lifespan=lifespan)

    @app.exception_handler(ApiError)
    async def _api_error(_request, e: ApiError):
        return JSONResponse(e.body, status_code=e.status)

    @app.exception_handler(Exception)
    async def _internal(_request, e: Exception):
        return JSONResponse(_error_for(e).body, status_code=500)

    @app.exception_handler(404)
    async def _not_found(request, _e):
        return JSONResponse(error_body(f"no route {request.url.path}", code="not_found"), status_code=404)

    @app.exception_handler(405)
    async def _bad_method(request, _e):
        return JSONResponse(error_body(f"{request.method} not allowed on {request.url.path}"), status_code=405)

    async def parse(request: Request, schema):
        raw = await request.body()
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"request body is not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise ApiError(400, "request body must be a JSON object")
        try:
            return schema.model_validate(data)
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(p) for p in err["loc"]) or "body"
            raise ApiError(400, f"{where}: {err['msg']}", param=where) from None

    def adapter(model: str) -> str | None:
        if model == AUTO:
            return None
        if model not in engine.adapters:
            raise ApiError(404, f"model {model!r} not found (models: {', '.join([AUTO, *engine.adapters])})",
                           param="model", code="model_not_found")
        return model

    def submit(job: Job) -> asyncio.Queue:
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        job.on_event = lambda kind, value: loop.call_soon_threadsafe(events.put_nowait, (kind, value))
        try:
            state["scheduler"].submit(job)
        except QueueFull as e:
            raise _error_for(e) from None
        return events

    async def next_event(events: asyncio.Queue, request: Request, job: Job):
        while True:
            try:
                return await asyncio.wait_for(events.get(), 0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    job.cancelled = True
                    raise ApiError(499, "client disconnected") from None

    async def first_route(events, request, job):
        kind, value = await next_event(events, request, job)
        if kind == "error":
            raise _error_for(value)
        return value

    @app.get("/health")
    async def health():
        return {"status": "ok", **state["scheduler"].load}

    @app.get("/v1/models")
    async def models():
        now = int(time.time())
        return {"object": "list", "data": [{"id": m, "object": "model", "created": now, "owned_by": "borahub"}
                                           for m in [AUTO, *engine.adapters]]}

    @app.post("/v1/route")
    async def route(request: Request):
        body = await parse(request, RouteRequest)
        jobs = [Job(text, None, mode=body.mode, generate=False, timeout=timeout) for text in body.input]
        queues = [submit(j) for j in jobs]
        routes = [await first_route(q, request, j) for q, j in zip(queues, jobs)]
        return {"object": "list", "data": [{"input": t, **r.to_json()} for t, r in zip(body.input, routes)]}

    async def complete(request: Request, kind: str):
        body = await parse(request, ChatRequest if kind == "chat" else CompletionRequest)
        task = adapter(body.model)
        new_tokens = body.new_tokens or max_tokens
        try:
            engine.budget(new_tokens)  # a request the context cannot hold fails before any stream starts
        except USER_ERRORS as e:
            raise ApiError(400, str(e), param="max_tokens") from None
        sampling = Sampling(new_tokens, body.temperature > 0, body.temperature or 1.0, body.top_p, body.seed,
                            tuple(body.stop or ()))
        text = body.text if kind == "chat" else body.prompt
        job = Job(text, None, task=task, messages=body.turns() if kind == "chat" else None, chat=kind == "chat",
                  mode=body.mode or mode, sampling=sampling, generate=backend is None, timeout=timeout,
                  template=not getattr(body, "raw_prompt", False), stream=body.stream)
        events = submit(job)
        route = await first_route(events, request, job)
        headers = {"x-borahub-route": route_header(route)}
        if backend is not None:
            return await state["backend"].forward(kind, body, route, headers)
        rid = new_id("chatcmpl" if kind == "chat" else "cmpl")
        if not body.stream:
            while True:
                k, value = await next_event(events, request, job)
                if k == "error":
                    raise _error_for(value)
                if k == "done":
                    finish, n_prompt, n_out, text = value
                    return JSONResponse(completion_body(kind, rid, route, text, finish, n_prompt, n_out),
                                        headers=headers)

        async def chunks():
            ended = False
            try:
                if kind == "chat":
                    yield _sse(chunk_body(kind, rid, route, role=True))
                while True:
                    k, value = await events.get()
                    if k == "text":
                        yield _sse(chunk_body(kind, rid, route, value))
                    elif k == "error":
                        ended = True
                        yield _sse(_error_for(value).body)
                        break
                    elif k == "done":
                        ended = True
                        finish, n_prompt, n_out, _ = value
                        yield _sse(chunk_body(kind, rid, route, finish=finish))
                        if body.include_usage:
                            yield _sse({**chunk_body(kind, rid, route), "choices": [],
                                        "usage": usage(n_prompt, n_out)})
                        break
                yield "data: [DONE]\n\n"
            finally:
                if not ended:  # the client went away mid-stream: free its row
                    job.cancelled = True

        return StreamingResponse(chunks(), media_type="text/event-stream", headers=headers)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await complete(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(request, "text")

    return app


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def serve(config: str = "tasks.yaml", host: str = "127.0.0.1", port: int = 8000, max_rows: int = 16,
          max_queue: int = 64, **kw) -> None:
    """Open the trained hub of a registry and serve it until interrupted (SIGINT or SIGTERM): the scheduler's
    loop on this thread, the one that loaded the model (hub/scheduler.py says why), the HTTP server beside it."""
    import uvicorn

    engine = Engine.from_workspace(config)
    scheduler = Scheduler(engine, max_rows=max_rows, max_queue=max_queue, start=False)
    app = create_app(engine, scheduler=scheduler, **kw)  # the scheduler carries max_rows and max_queue
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    http = threading.Thread(target=server.run, name="borahub-http", daemon=True)  # no signal handlers off main

    def stop(*_):
        server.force_exit = server.should_exit  # a second signal: stop without waiting for the requests in flight
        server.should_exit = True  # uvicorn finishes the requests in flight; the loop serves them meanwhile

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        http.start()
        log.info("serving %d task(s) (%s) and %s on http://%s:%d/v1", len(engine.mtm.task_names),
                 ", ".join(engine.mtm.task_names), GLOBAL_NAME, host, port)
        scheduler.run(until=lambda: not http.is_alive())
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        server.should_exit = True
        http.join(timeout=30)
    if not server.started:
        raise RouterError(f"could not listen on {host}:{port} (in use, or not an address of this machine)")
