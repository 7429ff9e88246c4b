"""A real HTTP server on 127.0.0.1 that speaks the Anthropic Messages API (`/v1/messages`)
and the OpenAI chat completions API (`/v1/chat/completions`), for tests that must never reach
the internet.

Answers are protocol-true: the JSON shapes, error bodies, status codes and headers the real
services send. Each test scripts what comes next (an answer, a 429 with `Retry-After`, a 500,
a body that is not JSON, a slow answer) or installs a responder that answers from the request;
every request is recorded (path, headers, parsed body) so a test can assert what was sent.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import orjson
import pytest

ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}
_ids = itertools.count(1)


@dataclass(frozen=True)
class Reply:
    """One scripted answer. `text` is the model's text for a 200; `raw` replaces the whole
    body (e.g. malformed JSON); `delay` holds the answer back that many seconds; `trickle`
    sends the status line and headers one byte every that many seconds (a read timeout,
    which restarts on every byte, never fires)."""

    status: int = 200
    text: str = ""
    message: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    raw: bytes | None = None
    delay: float = 0.0
    trickle: float = 0.0
    input_tokens: int = 1200
    output_tokens: int = 150
    stop_reason: str = "end_turn"


def answer(text: str, **fields: Any) -> Reply:
    """A successful answer whose text is `text`."""
    return Reply(text=text, **fields)


def items_answer(*items: dict[str, Any], **fields: Any) -> Reply:
    """A successful answer holding `{"items": [...]}`."""
    return Reply(text=orjson.dumps({"items": list(items)}).decode(), **fields)


def error(status: int, message: str = "", retry_after: float | None = None) -> Reply:
    headers = {"retry-after": f"{retry_after:g}"} if retry_after is not None else {}
    return Reply(status=status, message=message or f"scripted error {status}", headers=headers)


def malformed_body() -> Reply:
    """A 200 whose body is cut off mid-JSON (a broken proxy, a crashed worker)."""
    return Reply(raw=b'{"id": "msg_01", "type": "message", "content": [{"type": "te')


def slow(seconds: float, reply: Reply | None = None) -> Reply:
    return dataclasses.replace(reply or items_answer(), delay=seconds)


def trickled(seconds_per_byte: float, reply: Reply | None = None) -> Reply:
    """An answer whose headers arrive one byte every `seconds_per_byte` (a slowloris server,
    a proxy stuck mid-response)."""
    return dataclasses.replace(reply or items_answer(), trickle=seconds_per_byte)


@dataclass(frozen=True)
class Received:
    """A request as the server saw it."""

    path: str
    headers: dict[str, str]
    body: Any
    at: float


Responder = Callable[[Received], Reply]


class FakeLLM:
    """The server. Use as a context manager; `base_url` is `http://127.0.0.1:<port>`
    (`https://` when given a server-side `tls` context).

    `api_key` is the key it accepts (`x-api-key` for Anthropic, `Authorization: Bearer` for
    OpenAI); None accepts any request, as a self-hosted server without auth does.
    """

    def __init__(self, api_key: str | None = "test-key", tls: ssl.SSLContext | None = None) -> None:
        self.api_key = api_key
        self.tls = tls
        self.script: deque[Reply] = deque()
        self.responder: Responder | None = None
        self.received: list[Received] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._server.block_on_close = False
        if tls is not None:  # HTTPS: every accepted connection does the handshake first
            self._server.socket = tls.wrap_socket(self._server.socket, server_side=True)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"{'https' if self.tls else 'http'}://{host}:{port}"

    def queue(self, *replies: Reply) -> None:
        with self._lock:
            self.script.extend(replies)

    def bodies(self) -> list[Any]:
        return [r.body for r in self.received]

    def __enter__(self) -> FakeLLM:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stopping.set()  # releases slow answers still waiting
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    # --- serving -----------------------------------------------------------------------------

    def _next(self, request: Received) -> Reply:
        with self._lock:
            if self.script:
                return self.script.popleft()
        if self.responder is not None:
            return self.responder(request)
        return error(400, "fake LLM: no scripted answer left for this request")

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                # the client may have given up (a timeout under test): nothing to answer then
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    fake._serve(self)

        return Handler

    def _serve(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("content-length") or 0)
        raw = handler.rfile.read(length)
        headers = {k.lower(): v for k, v in handler.headers.items()}
        try:
            body: Any = orjson.loads(raw)
        except orjson.JSONDecodeError:
            body = None
        request = Received(handler.path, headers, body, time.monotonic())
        with self._lock:
            self.received.append(request)
        if handler.path == "/v1/messages":
            api = "anthropic"
            problem = self._check_anthropic(headers, body)
        elif handler.path == "/v1/chat/completions":
            api = "openai"
            problem = self._check_openai(headers, body)
        else:
            self._send(handler, "anthropic", error(404, f"no route for {handler.path}"))
            return
        reply = problem or self._next(request)
        if reply.delay and self._stopping.wait(reply.delay):
            return
        self._send(handler, api, reply, body)

    def _check_anthropic(self, headers: dict[str, str], body: Any) -> Reply | None:
        if self.api_key is not None and headers.get("x-api-key") != self.api_key:
            return error(401, "invalid x-api-key")
        if not headers.get("anthropic-version"):
            return error(400, "anthropic-version: header is required")
        if not isinstance(body, dict):
            return error(400, "The request body is not valid JSON.")
        for name, kind in (("model", str), ("max_tokens", int), ("messages", list)):
            if not isinstance(body.get(name), kind):
                return error(400, f"{name}: Field required")
        roles = [m.get("role") for m in body["messages"] if isinstance(m, dict)]
        expected = ["user" if i % 2 == 0 else "assistant" for i in range(len(roles))]
        if not roles or roles != expected or roles[-1] != "user":
            return error(400, "messages: roles must alternate, starting and ending with user")
        if any(not m.get("content") for m in body["messages"]):
            return error(400, "messages: all messages must have non-empty content")
        return None

    def _check_openai(self, headers: dict[str, str], body: Any) -> Reply | None:
        if self.api_key is not None and headers.get("authorization") != f"Bearer {self.api_key}":
            return error(401, "Incorrect API key provided")
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            return error(400, "messages is required")
        if not isinstance(body.get("model"), str):
            return error(400, "model is required")
        return None

    def _send(
        self, handler: BaseHTTPRequestHandler, api: str, reply: Reply, body: Any = None
    ) -> None:
        model = body.get("model") if isinstance(body, dict) else None
        if reply.raw is not None:
            payload = reply.raw
        elif reply.status != 200:
            payload = orjson.dumps(_error_body(api, reply.status, reply.message))
        elif api == "anthropic":
            payload = orjson.dumps(_anthropic_message(reply, model or "claude-haiku-4-5"))
        else:
            payload = orjson.dumps(_openai_completion(reply, model or "local-model"))
        headers = {
            "content-type": "application/json",
            "content-length": str(len(payload)),
            "request-id": f"req_fake{next(_ids):08d}",
            **reply.headers,
        }
        if reply.trickle:
            head = f"HTTP/1.1 {reply.status} {HTTPStatus(reply.status).phrase}\r\n"
            head += "".join(f"{name}: {value}\r\n" for name, value in headers.items())
            for byte in (head + "\r\n").encode():
                handler.wfile.write(bytes([byte]))
                handler.wfile.flush()
                if self._stopping.wait(reply.trickle):
                    return
        else:
            handler.send_response(reply.status)
            for name, value in headers.items():
                handler.send_header(name, value)
            handler.end_headers()
        handler.wfile.write(payload)
        handler.wfile.flush()


def _error_body(api: str, status: int, message: str) -> dict[str, Any]:
    kind = ANTHROPIC_ERROR_TYPES.get(status, "api_error")
    if api == "anthropic":
        return {"type": "error", "error": {"type": kind, "message": message}}
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


def _anthropic_message(reply: Reply, model: str) -> dict[str, Any]:
    return {
        "id": f"msg_fake{next(_ids):020d}",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": reply.text}],
        "stop_reason": reply.stop_reason,
        "stop_sequence": None,
        "usage": {
            "input_tokens": reply.input_tokens,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "output_tokens": reply.output_tokens,
        },
    }


def _openai_completion(reply: Reply, model: str) -> dict[str, Any]:
    finish = {"end_turn": "stop", "max_tokens": "length"}.get(reply.stop_reason, "stop")
    return {
        "id": f"chatcmpl-fake{next(_ids):08d}",
        "object": "chat.completion",
        "created": 1767225600,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": reply.text},
                "logprobs": None,
                "finish_reason": finish,
            }
        ],
        "usage": {
            "prompt_tokens": reply.input_tokens,
            "completion_tokens": reply.output_tokens,
            "total_tokens": reply.input_tokens + reply.output_tokens,
        },
    }


# --- environment -----------------------------------------------------------------------------

LLM_ENV = (
    "ANTHROPIC_API_KEY",
    "ANTHROPIC_BASE_URL",
    "SESSION_PIPELINE_LLM_PROVIDER",
    "SESSION_PIPELINE_LLM_BASE_URL",
    "SESSION_PIPELINE_LLM_MODEL",
    "SESSION_PIPELINE_LLM_API_KEY",
    "SESSION_PIPELINE_LLM_SESSION_BUDGET",
)
PROXY_ENV = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")


def clear_llm_env(monkeypatch: pytest.MonkeyPatch, extra: Iterable[str] = ()) -> None:
    """No LLM configured and no proxy in the way of the loopback server."""
    for name in (*LLM_ENV, *PROXY_ENV, *extra):
        monkeypatch.delenv(name, raising=False)


def use_anthropic(monkeypatch: pytest.MonkeyPatch, server: FakeLLM, key: str = "test-key") -> None:
    clear_llm_env(monkeypatch)
    monkeypatch.setenv("ANTHROPIC_API_KEY", key)
    monkeypatch.setenv("ANTHROPIC_BASE_URL", server.base_url)


def use_openai(
    monkeypatch: pytest.MonkeyPatch,
    server: FakeLLM,
    *,
    model: str = "qwen2.5-7b-instruct",
    key: str | None = None,
) -> None:
    clear_llm_env(monkeypatch)
    monkeypatch.setenv("SESSION_PIPELINE_LLM_PROVIDER", "openai")
    monkeypatch.setenv("SESSION_PIPELINE_LLM_BASE_URL", f"{server.base_url}/v1")
    monkeypatch.setenv("SESSION_PIPELINE_LLM_MODEL", model)
    if key is not None:
        monkeypatch.setenv("SESSION_PIPELINE_LLM_API_KEY", key)
