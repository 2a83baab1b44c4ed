"""`borahub serve --backend URL`: route here, generate elsewhere.

The request goes on to an OpenAI-compatible server that serves the exported task adapters by name (vLLM
``--lora-modules``, SGLang, LoRAX, or another `borahub serve`), with ``model`` set to the routed adapter
("_global" for Theta: serve Theta's export under that name). A completion prompt for a task trained with a
prompt template is sent already wrapped in it (the backend knows nothing of templates); a chat request is
sent as it came, and the backend applies its own chat template. The backend's answer (stream or not) comes
back unchanged, plus the ``route`` field (non-streamed) and the ``x-borahub-route`` header.
"""
from __future__ import annotations

import httpx2 as httpx
from fastapi.responses import JSONResponse, Response, StreamingResponse

from .openai_schema import error_body
from tasks.data import fill_template

from .prompting import Prompter
from .route import Route


class Backend:
    def __init__(self, url: str, prompter: Prompter, timeout: float = 600.0):
        self.url = url.rstrip("/")
        if not self.url.endswith("/v1"):
            self.url += "/v1"
        self.prompter = prompter
        self.client = httpx.AsyncClient(timeout=timeout)

    async def close(self) -> None:
        await self.client.aclose()

    def body(self, kind: str, request, route: Route) -> dict:
        body = request.model_dump(exclude_none=True, exclude={"mode", "raw_prompt"})
        body["model"] = route.task
        template = self.prompter.templates.get(route.task)
        if kind == "text" and template is not None and not request.raw_prompt:
            # wrapped here; raw_prompt tells a borahub backend not to wrap it again (vLLM ignores the field)
            body["prompt"], body["raw_prompt"] = fill_template(template, request.prompt), True
        return body

    async def forward(self, kind: str, request, route: Route, headers: dict) -> Response:
        path = "/chat/completions" if kind == "chat" else "/completions"
        body = self.body(kind, request, route)
        try:
            if not request.stream:
                r = await self.client.post(self.url + path, json=body)
                try:
                    data = r.json()
                except ValueError:
                    return _unreachable(f"the backend answered {r.status_code} without JSON", headers)
                if r.status_code == 200 and isinstance(data, dict):
                    data["route"] = route.to_json()
                return JSONResponse(data, status_code=r.status_code, headers=headers)
            upstream = await self.client.send(self.client.build_request("POST", self.url + path, json=body),
                                              stream=True)
        except httpx.HTTPError as e:
            return _unreachable(f"the backend {self.url} failed: {type(e).__name__}: {e}", headers)

        async def relay():
            try:
                async for part in upstream.aiter_raw():
                    yield part
            finally:
                await upstream.aclose()

        media = upstream.headers.get("content-type", "text/event-stream")
        return StreamingResponse(relay(), status_code=upstream.status_code, media_type=media, headers=headers)


def _unreachable(message: str, headers: dict) -> JSONResponse:
    return JSONResponse(error_body(message, "backend_error", code="bad_gateway"), status_code=502, headers=headers)
