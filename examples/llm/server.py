"""An OpenAI-compatible LLM server as a Ray Serve application, with a real engine loop per replica.

    POST /v1/completions        prompt: text or a list of token ids
    POST /v1/chat/completions   messages: [{role, content}, ...]
    GET  /v1/models             the one model this server serves
    GET  /health                200 while the engine loop runs (and its counters)

`stream: true` answers with server-sent events, one `data:` chunk per token as the engine makes
it, a last chunk with `usage`, then `data: [DONE]`; without it, one JSON object with `usage`.
`max_tokens` tokens are generated exactly: the toy model has no end-of-sequence token. Errors
use OpenAI's shape (`{"error": {"message", "type", "param", "code"}}`), 400 for bad input.

Each replica runs one `Engine` (examples/llm/engine.py) with the `torch` or the `profile`
backend (`auto`: torch where it sees a GPU, else profile). A version's arguments set its load
time, warm-up and seed (its weights), so two versions answer measurably differently.

(No `from __future__ import annotations` here: FastAPI must see the request models as classes
in the handlers' signatures, not as strings.)
"""

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict
from ray import serve

from examples.llm.backends import (
    ProfileBackend,
    ProfileConfig,
    TorchBackend,
    TorchConfig,
    torch_cuda_available,
)
from examples.llm.engine import Engine, EngineConfig
from examples.llm.tokenizer import Tokenizer

api = FastAPI()


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param

    def response(self) -> JSONResponse:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        code = "model_not_found" if self.status == 404 else None
        body = {"message": self.message, "type": kind, "param": self.param, "code": code}
        return JSONResponse({"error": body}, status_code=self.status)


@api.exception_handler(ApiError)
async def _api_error(_: Request, e: ApiError) -> JSONResponse:
    return e.response()


@api.exception_handler(RequestValidationError)
async def _bad_body(_: Request, e: RequestValidationError) -> JSONResponse:
    first = e.errors()[0] if e.errors() else {}
    where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
    return ApiError(
        400, f"{where or 'body'}: {first.get('msg', 'invalid request')}", where
    ).response()


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")  # other OpenAI fields are accepted and ignored

    model: str | None = None
    max_tokens: int | None = None
    stream: bool = False
    temperature: float | None = None
    n: int = 1


class CompletionRequest(_Request):
    prompt: str | list[int] | list[str] | list[list[int]]


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(_Request):
    messages: list[Message]
    max_completion_tokens: int | None = None


@dataclass(frozen=True)
class ServerConfig:
    version: str = "v1"
    model: str = "toy-llm"
    backend: Literal["auto", "torch", "profile"] = "auto"
    seed: int = 1  # the version's weights
    load_delay_s: float = 0.0  # stands in for pulling the image and the weights
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 16384
    warmup_iterations: int = 0
    warmup_factor: float = 1.0
    default_max_tokens: int = 16
    profile: dict[str, Any] = field(default_factory=dict)
    torch: dict[str, Any] = field(default_factory=dict)


def make_backend(cfg: ServerConfig) -> ProfileBackend | TorchBackend:
    kind = cfg.backend
    if kind == "auto":
        kind = "torch" if torch_cuda_available() else "profile"
    if kind == "torch":
        tc = TorchConfig(**{"max_num_seqs": cfg.max_num_seqs, **cfg.torch})
        return TorchBackend(tc, cfg.seed)
    return ProfileBackend(ProfileConfig(**cfg.profile), cfg.seed)


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


@serve.deployment(
    ray_actor_options={"num_cpus": 0.2}, max_ongoing_requests=256, health_check_period_s=2
)
@serve.ingress(api)
class LLMServer:
    async def __init__(self, **args: Any) -> None:
        started = time.monotonic()
        self.cfg = ServerConfig(**args)
        await asyncio.sleep(self.cfg.load_delay_s)
        self.backend = await asyncio.to_thread(make_backend, self.cfg)
        self.tokenizer = Tokenizer(self.backend.vocab_size)
        config = EngineConfig(
            max_num_seqs=self.cfg.max_num_seqs,
            max_num_batched_tokens=self.cfg.max_num_batched_tokens,
            warmup_iterations=self.cfg.warmup_iterations,
            warmup_factor=self.cfg.warmup_factor,
        )
        self.engine = Engine(self.backend, config)
        self.engine.start()
        self.loaded_s = round(time.monotonic() - started, 3)
        self.created = int(time.time())

    def check_health(self) -> None:
        if not self.engine.alive:
            raise RuntimeError(f"the engine loop is not running ({self.engine.error!r})")

    # ---- endpoints -------------------------------------------------------------------------

    @api.get("/health")
    def health(self) -> JSONResponse:
        body = {
            "status": "ok" if self.engine.alive else "failed",
            "version": self.cfg.version,
            "backend": type(self.backend).__name__,
            "device": self.backend.device,
            "loaded_s": self.loaded_s,
            "running": len(self.engine.running),
            "waiting": len(self.engine.waiting),
            **asdict(self.engine.stats),
        }
        return JSONResponse(body, status_code=200 if self.engine.alive else 503)

    @api.get("/v1/models")
    def models(self) -> dict[str, Any]:
        card = {"id": self.cfg.model, "object": "model", "created": self.created,
                "owned_by": f"rollout example {self.cfg.version}",
                "max_model_len": self.backend.max_model_len}  # fmt: skip
        return {"object": "list", "data": [card]}

    @api.post("/v1/completions")
    async def completions(self, body: CompletionRequest) -> Any:
        prompt = self._prompt(body.prompt)
        max_tokens = self._check(body, prompt, body.max_tokens)
        rid = f"cmpl-{uuid.uuid4().hex}"
        if body.stream:
            return self._stream(rid, "text_completion", prompt, max_tokens, body, chat=False)
        text = "".join([t async for t in self._texts(prompt, max_tokens, body)])
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": "length"}
        return self._envelope(rid, "text_completion", [choice], len(prompt), max_tokens)

    @api.post("/v1/chat/completions")
    async def chat(self, body: ChatRequest) -> Any:
        lines = []
        for m in body.messages:
            content = m.content if isinstance(m.content, str) else ""
            if isinstance(m.content, list):  # content parts: keep the text ones
                content = " ".join(str(p.get("text", "")) for p in m.content)
            lines.append(f"{m.role}: {content}")
        prompt = self.tokenizer.encode("\n".join(lines) + "\nassistant:")
        max_tokens = self._check(body, prompt, body.max_completion_tokens or body.max_tokens)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        if body.stream:
            return self._stream(rid, "chat.completion.chunk", prompt, max_tokens, body, chat=True)
        text = "".join([t async for t in self._texts(prompt, max_tokens, body)])
        message = {"role": "assistant", "content": text}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": "length"}
        return self._envelope(rid, "chat.completion", [choice], len(prompt), max_tokens)

    # ---- helpers ---------------------------------------------------------------------------

    def _prompt(self, prompt: Any) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        if prompt and all(isinstance(t, int) for t in prompt):
            bad = next((t for t in prompt if not 0 <= t < self.backend.vocab_size), None)
            if bad is not None:
                raise ApiError(
                    400, f"token id {bad} is outside the vocabulary (0-"
                    f"{self.backend.vocab_size - 1})", "prompt"
                )  # fmt: skip
            return list(prompt)
        if not prompt:
            raise ApiError(400, "the prompt is empty", "prompt")
        raise ApiError(400, "one prompt per request: a string or a list of token ids", "prompt")

    def _check(self, body: _Request, prompt: list[int], max_tokens: int | None) -> int:
        if body.model is not None and body.model != self.cfg.model:
            raise ApiError(404, f"The model `{body.model}` does not exist.", "model")
        if body.n != 1:
            raise ApiError(400, "only n=1 is supported", "n")
        if not prompt:
            raise ApiError(400, "the prompt is empty", "prompt")
        n = self.cfg.default_max_tokens if max_tokens is None else max_tokens
        if n < 1:
            raise ApiError(400, "max_tokens must be at least 1", "max_tokens")
        limit = self.backend.max_model_len
        if len(prompt) + n > limit:
            raise ApiError(
                400, f"This model's maximum context length is {limit} tokens. However, you "
                f"requested {len(prompt) + n} tokens ({len(prompt)} in the prompt, {n} in the "
                "completion).", "max_tokens"
            )  # fmt: skip
        if len(prompt) > self.cfg.max_num_batched_tokens:
            raise ApiError(400, f"the prompt is longer than {self.cfg.max_num_batched_tokens} "
                           "tokens, the most one iteration takes", "prompt")  # fmt: skip
        return n

    async def _texts(
        self, prompt: list[int], max_tokens: int, body: _Request
    ) -> AsyncIterator[str]:
        temperature = 1.0 if body.temperature is None else body.temperature  # OpenAI's default
        async for token in self.engine.generate(prompt, max_tokens, temperature):
            yield self.tokenizer.decode(token)

    def _envelope(self, rid: str, kind: str, choices: list[Any], prompt: int, done: int) -> dict:
        return {
            "id": rid,
            "object": kind,
            "created": int(time.time()),
            "model": self.cfg.model,
            "system_fingerprint": self.cfg.version,
            "choices": choices,
            "usage": {"prompt_tokens": prompt, "completion_tokens": done,
                      "total_tokens": prompt + done},
        }  # fmt: skip

    def _stream(
        self, rid: str, kind: str, prompt: list[int], max_tokens: int, body: _Request, chat: bool
    ) -> StreamingResponse:
        async def events() -> AsyncIterator[str]:
            if chat:
                delta = {"index": 0, "delta": {"role": "assistant", "content": ""},
                         "logprobs": None, "finish_reason": None}  # fmt: skip
                yield _sse(self._envelope(rid, kind, [delta], len(prompt), 0) | {"usage": None})
            made = 0
            async for text in self._texts(prompt, max_tokens, body):
                made += 1
                finish = "length" if made == max_tokens else None
                if chat:
                    choice = {"index": 0, "delta": {"content": text}, "logprobs": None,
                              "finish_reason": finish}  # fmt: skip
                else:
                    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
                yield _sse(self._envelope(rid, kind, [choice], len(prompt), made) | {"usage": None})
            yield _sse(self._envelope(rid, kind, [], len(prompt), made))
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")


def app(args: dict[str, Any]) -> serve.Application:
    """The builder deploy files name as `examples.llm.server:app`."""
    return LLMServer.bind(**args)
