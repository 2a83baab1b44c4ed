"""The OpenAI API's request bodies as the server accepts them, and its response and error shapes.

Fields the server does not use are ignored, as OpenAI-compatible servers do; fields it uses are checked
(a bad one answers 400 naming it). Extra fields of ours: ``mode`` (select | blend | fallback) for ``auto``, and
``raw_prompt`` on completions (hub/proxy.py sends prompts it already wrapped in a task's template).
"""
from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .route import Route

MAX_STOP = 4


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: str = Field(min_length=1, max_length=200)
    max_tokens: int | None = Field(None, ge=1, le=1_000_000)
    max_completion_tokens: int | None = Field(None, ge=1, le=1_000_000)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict | None = None
    n: int = Field(1, ge=1, le=1)
    mode: Literal["select", "blend", "fallback"] | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > MAX_STOP or any(not s or len(s) > 200 for s in stops):
            raise ValueError(f"at most {MAX_STOP} stop strings, each 1-200 characters")
        return stops

    @property
    def new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict] | None = None

    @field_validator("content")
    @classmethod
    def _text(cls, v):
        """Text parts joined; other parts (images, audio) are not supported by a text model."""
        if isinstance(v, list):
            if any(p.get("type") != "text" or not isinstance(p.get("text"), str) for p in v):
                raise ValueError("only text content parts are supported")
            return "".join(p["text"] for p in v)
        return v or ""


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1, max_length=1000)

    @model_validator(mode="after")
    def _user(self) -> "ChatRequest":
        if not any(m.role == "user" for m in self.messages):
            raise ValueError("messages: at least one message with role 'user' is needed")
        return self

    @property
    def text(self) -> str:
        """What routing sees: the last user message."""
        return next(m.content for m in reversed(self.messages) if m.role == "user")

    def turns(self) -> list[dict]:
        role = {"developer": "system"}
        return [{"role": role.get(m.role, m.role), "content": m.content} for m in self.messages]


class CompletionRequest(_Request):
    prompt: str | list[str]
    raw_prompt: bool = False  # the prompt is already the model's text: no task template (set by a borahub proxy)

    @field_validator("prompt")
    @classmethod
    def _one(cls, v):
        if isinstance(v, list):
            if len(v) != 1:
                raise ValueError("one prompt per request (send several requests: they are batched together)")
            return v[0]
        return v


class RouteRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    input: str | list[str]
    mode: Literal["select", "blend", "fallback"] = "fallback"

    @field_validator("input")
    @classmethod
    def _many(cls, v):
        v = [v] if isinstance(v, str) else v
        if not 1 <= len(v) <= 256:
            raise ValueError("1 to 256 inputs")
        return v


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def route_header(route: Route) -> str:
    """The route, compact, for the x-borahub-route header."""
    import json

    return json.dumps({"task": route.task, "weights": {k: round(v, 4) for k, v in route.weights.items()},
                       "fallback": route.fallback, "reason": route.reason}, separators=(",", ":"))


def completion_body(kind: str, rid: str, route: Route, text: str, finish: str, prompt_tokens: int,
                    completion_tokens: int) -> dict:
    choice = {"index": 0, "finish_reason": finish, "logprobs": None}
    if kind == "chat":
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    return {"id": rid, "object": "chat.completion" if kind == "chat" else "text_completion",
            "created": int(time.time()), "model": route.task, "choices": [choice],
            "usage": usage(prompt_tokens, completion_tokens), "route": route.to_json()}


def chunk_body(kind: str, rid: str, route: Route, text: str | None = None, finish: str | None = None,
               role: bool = False) -> dict:
    choice: dict = {"index": 0, "finish_reason": finish, "logprobs": None}
    if kind == "chat":
        delta: dict = {"role": "assistant"} if role else {}
        if text:
            delta["content"] = text
        choice["delta"] = delta
    else:
        choice["text"] = text or ""
    return {"id": rid, "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
            "created": int(time.time()), "model": route.task, "choices": [choice]}

