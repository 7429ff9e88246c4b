"""A small synchronous LLM client over httpx: the Anthropic Messages API, or any
OpenAI-compatible `/v1/chat/completions` endpoint (vLLM, llama.cpp, Ollama, a gateway) for
self-hosted models. Configured from the environment only, read on every use, so configuring
it needs no code change and no restart.

One `LLMSession` serves one transcript. It owns the per-session time budget: a long session
once held the old app for over an hour, so every request's timeout, every retry and every
wait for `Retry-After` must fit in what is left of the budget, and a watchdog shuts the
connection down under a request still in flight when the budget ends (a read timeout alone
restarts on every byte, so a server trickling its headers or body would run forever).
Errors are `LLMError`s with a one-line message; the pipeline records it, retries the session
on later runs and quarantines it in the end.
"""

from __future__ import annotations

import contextlib
import email.utils
import functools
import os
import random
import re
import socket
import ssl
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx
import orjson

Provider = Literal["anthropic", "openai"]
Message = Mapping[str, str]  # {"role": "user" | "assistant", "content": text}

DEFAULT_MODEL = "claude-haiku-4-5"
DEFAULT_ANTHROPIC_BASE_URL = "https://api.anthropic.com"
ANTHROPIC_VERSION = "2023-06-01"
DEFAULT_SESSION_BUDGET_SECONDS = 300.0
MAX_REQUEST_SECONDS = 120.0
MAX_OUTPUT_TOKENS = 4096
MAX_RESPONSE_BYTES = 8 << 20
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504, 529})
MAX_RETRIES = 5
BACKOFF_BASE_SECONDS = 0.5
BACKOFF_CAP_SECONDS = 30.0

NOT_CONFIGURED = (
    "no LLM configured: set ANTHROPIC_API_KEY (or SESSION_PIPELINE_LLM_API_KEY), or "
    "SESSION_PIPELINE_LLM_PROVIDER=openai with SESSION_PIPELINE_LLM_BASE_URL"
)


class LLMError(Exception):
    """The model could not give an answer; the message is one line for the state table."""


class LLMConfigError(LLMError):
    """The environment does not configure a usable LLM."""


class LLMBudgetError(LLMError):
    """The session's time budget ran out before an answer arrived."""


class _Transient(Exception):
    """A failure worth retrying: rate limit, overload, server error, timeout, bad body."""

    def __init__(self, problem: str, retry_after: float | None = None) -> None:
        super().__init__(problem)
        self.retry_after = retry_after


def _one_line(text: str, limit: int = 300) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def _env(env: Mapping[str, str], name: str) -> str | None:
    """A string setting; empty means unset."""
    value = env.get(name, "").strip()
    return value or None


def _http_url(name: str, value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise LLMConfigError(f"{name} must be an http(s) URL, got {value!r}")
    return value.rstrip("/")


@dataclass(frozen=True)
class LLMConfig:
    """Where and how to ask. Built from the environment by `from_env`."""

    provider: Provider
    url: str  # the full endpoint
    model: str
    api_key: str | None = field(repr=False)
    session_budget_seconds: float = DEFAULT_SESSION_BUDGET_SECONDS
    max_output_tokens: int = MAX_OUTPUT_TOKENS

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> LLMConfig:
        """The configuration in `env` (default `os.environ`); `LLMConfigError` says what is
        missing or wrong."""
        env = os.environ if env is None else env
        budget = _budget(env)
        model = _env(env, "SESSION_PIPELINE_LLM_MODEL")
        key = _env(env, "SESSION_PIPELINE_LLM_API_KEY")
        provider = _env(env, "SESSION_PIPELINE_LLM_PROVIDER")
        if provider is not None and provider.lower() not in ("anthropic", "openai"):
            raise LLMConfigError(
                f"SESSION_PIPELINE_LLM_PROVIDER must be anthropic or openai, got {provider!r}"
            )
        base = _env(env, "SESSION_PIPELINE_LLM_BASE_URL")
        if base is not None and (provider is None or provider.lower() != "openai"):
            # Never fall back to the public API: the key and the transcripts were meant for
            # the host named here.
            raise LLMConfigError(
                "SESSION_PIPELINE_LLM_BASE_URL is set but SESSION_PIPELINE_LLM_PROVIDER is "
                f"{provider or 'not'}: set SESSION_PIPELINE_LLM_PROVIDER=openai to use it, or "
                "unset it (for Anthropic's API through a gateway, set ANTHROPIC_BASE_URL)"
            )
        if provider is not None and provider.lower() == "openai":
            if base is None:
                raise LLMConfigError(
                    "SESSION_PIPELINE_LLM_PROVIDER=openai needs SESSION_PIPELINE_LLM_BASE_URL "
                    "(e.g. http://host:8000/v1)"
                )
            if model is None:
                raise LLMConfigError(
                    "SESSION_PIPELINE_LLM_PROVIDER=openai needs SESSION_PIPELINE_LLM_MODEL "
                    "(the model name the server serves)"
                )
            url = _http_url("SESSION_PIPELINE_LLM_BASE_URL", base)
            if not url.endswith("/chat/completions"):
                url += "/chat/completions"
            return cls("openai", url, model, key, budget)
        key = key or _env(env, "ANTHROPIC_API_KEY")
        if key is None:
            if provider is None:
                raise LLMConfigError(NOT_CONFIGURED)
            raise LLMConfigError(
                "SESSION_PIPELINE_LLM_PROVIDER=anthropic needs ANTHROPIC_API_KEY "
                "(or SESSION_PIPELINE_LLM_API_KEY)"
            )
        base = _env(env, "ANTHROPIC_BASE_URL") or DEFAULT_ANTHROPIC_BASE_URL
        url = _http_url("ANTHROPIC_BASE_URL", base) + "/v1/messages"
        return cls("anthropic", url, model or DEFAULT_MODEL, key, budget)


def _budget(env: Mapping[str, str]) -> float:
    """Seconds per session: unset means the default; anything but a positive number is an
    error, never silently the default."""
    raw = env.get("SESSION_PIPELINE_LLM_SESSION_BUDGET")
    if raw is None:
        return DEFAULT_SESSION_BUDGET_SECONDS
    try:
        value = float(raw.strip())
    except ValueError:
        value = 0.0
    if not value > 0 or value == float("inf"):
        raise LLMConfigError(
            f"SESSION_PIPELINE_LLM_SESSION_BUDGET must be a positive number of seconds, got {raw!r}"
        )
    return value


def unavailable_reason(env: Mapping[str, str] | None = None) -> str | None:
    """Why no LLM can be used with this environment, or None when one can."""
    try:
        LLMConfig.from_env(env)
    except LLMConfigError as error:
        return str(error)
    return None


@dataclass(frozen=True)
class Completion:
    """One answer: its text, the model that wrote it and what it cost."""

    text: str
    model: str
    input_tokens: int
    output_tokens: int
    stop_reason: str | None

    @property
    def truncated(self) -> bool:
        """The answer hit the output token limit and is probably cut off."""
        return self.stop_reason in ("max_tokens", "length")


def retry_after_seconds(headers: Mapping[str, str], now: datetime | None = None) -> float | None:
    """The server's requested wait: `retry-after-ms`, `retry-after` in seconds, or an HTTP
    date; None when absent or unreadable."""
    raw_ms = headers.get("retry-after-ms")
    if raw_ms is not None:
        try:
            return max(0.0, float(raw_ms) / 1000)
        except ValueError:
            pass
    raw = headers.get("retry-after")
    if raw is None:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _error_message(raw: bytes) -> str:
    """The human part of an error body: Anthropic `{"type":"error","error":{...}}` or
    OpenAI `{"error":{"message"...}}`; else the body's start."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return _one_line(raw.decode("utf-8", "replace"), 200) or "(empty body)"
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict):
        kind = error.get("type") or error.get("code")
        message = error.get("message")
        text = ": ".join(str(part) for part in (kind, message) if part)
        return _one_line(text, 200) or "(no message)"
    if isinstance(error, str):
        return _one_line(error, 200)
    return _one_line(raw.decode("utf-8", "replace"), 200)


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise _Transient("the API answered with a body that is not JSON") from None
    if not isinstance(data, dict):
        raise _Transient("the API answered with JSON that is not an object")
    return data


def _parse_anthropic(raw: bytes, default_model: str) -> Completion:
    data = _json_object(raw)
    content = data.get("content")
    if not isinstance(content, list):
        raise _Transient("the Messages API answer has no content list")
    text = "".join(
        block["text"]
        for block in content
        if isinstance(block, dict)
        and block.get("type") == "text"
        and isinstance(block.get("text"), str)
    )
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    model = data.get("model")
    stop = data.get("stop_reason")
    return Completion(
        text=text,
        model=model if isinstance(model, str) and model else default_model,
        input_tokens=_int(usage.get("input_tokens")),
        output_tokens=_int(usage.get("output_tokens")),
        stop_reason=stop if isinstance(stop, str) else None,
    )


def _parse_openai(raw: bytes, default_model: str) -> Completion:
    data = _json_object(raw)
    choices = data.get("choices")
    first = choices[0] if isinstance(choices, list) and choices else None
    message = first.get("message") if isinstance(first, dict) else None
    if not isinstance(message, dict):
        raise _Transient("the chat completions answer has no choices[0].message")
    content = message.get("content")
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    model = data.get("model")
    finish = first.get("finish_reason") if isinstance(first, dict) else None
    return Completion(
        text=content if isinstance(content, str) else "",
        model=model if isinstance(model, str) and model else default_model,
        input_tokens=_int(usage.get("prompt_tokens")),
        output_tokens=_int(usage.get("completion_tokens")),
        stop_reason=finish if isinstance(finish, str) else None,
    )


def tls_context() -> ssl.SSLContext:
    """The TLS context every session's client uses: one per CA setting (SSL_CERT_FILE /
    SSL_CERT_DIR, read on every use as httpx's default does, else certifi's bundle). Building
    one loads the CA bundle, 30-50 ms of CPU: built per session it was three quarters of a
    verification run's CPU, even against `http://` servers (httpx builds it either way)."""
    return _tls_context(os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR"))


@functools.cache
def _tls_context(cert_file: str | None, cert_dir: str | None) -> ssl.SSLContext:
    if cert_file:
        return ssl.create_default_context(cafile=cert_file)
    if cert_dir:
        return ssl.create_default_context(capath=cert_dir)
    return httpx.create_ssl_context(trust_env=False)


class LLMSession:
    """The conversation with the model about one transcript: one connection pool, one time
    budget, and the tally of requests and tokens."""

    def __init__(self, config: LLMConfig) -> None:
        self.config = config
        self.deadline = time.monotonic() + config.session_budget_seconds
        self.requests = 0
        self.input_tokens = 0
        self.output_tokens = 0
        self._client = httpx.Client(follow_redirects=False, verify=tls_context())
        # The watchdog's view of the request in flight: the socket it uses (reported by
        # httpcore's trace hook as it connects) and whether the budget ran out under it.
        self._watch = threading.Lock()
        self._socket: socket.socket | None = None
        self._expired = False

    def __enter__(self) -> LLMSession:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._client.close()

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    @property
    def _host(self) -> str:
        return urlsplit(self.config.url).netloc

    def _budget_error(self, problem: str) -> LLMBudgetError:
        return LLMBudgetError(
            f"LLM time budget of {self.config.session_budget_seconds:g}s per session "
            f"exhausted after {self.requests} request(s) ({problem})"
        )

    def _request(
        self, system: str, messages: Sequence[Message]
    ) -> tuple[dict[str, Any], dict[str, str]]:
        cfg = self.config
        if cfg.provider == "anthropic":
            headers = {"x-api-key": cfg.api_key or "", "anthropic-version": ANTHROPIC_VERSION}
            body: dict[str, Any] = {
                "model": cfg.model,
                "max_tokens": cfg.max_output_tokens,
                "temperature": 0,
                "system": system,
                "messages": [dict(m) for m in messages],
            }
            return body, headers
        headers = {"authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
        body = {
            "model": cfg.model,
            "messages": [{"role": "system", "content": system}, *(dict(m) for m in messages)],
            "temperature": 0,
            "max_tokens": cfg.max_output_tokens,
            "response_format": {"type": "json_object"},
        }
        return body, headers

    def _trace(self, event: str, info: Mapping[str, Any]) -> None:
        """httpcore's trace hook: remember the socket of each new connection (TCP, then the
        TLS one wrapping it), so the watchdog can cut the request it carries."""
        if event not in ("connection.connect_tcp.complete", "connection.start_tls.complete"):
            return
        stream = info.get("return_value")
        sock = stream.get_extra_info("socket") if stream is not None else None
        if not isinstance(sock, socket.socket):
            return
        with self._watch:
            self._socket = sock
            expired = self._expired
        if expired:  # the budget ran out while connecting
            _shut(sock)

    def _expire(self) -> None:
        """The watchdog: the budget ran out with a request in flight. Shutting the socket
        down wakes a read blocked in any phase (headers, body, TLS handshake) at once."""
        with self._watch:
            self._expired = True
            sock = self._socket
        if sock is not None:
            _shut(sock)

    def _send(self, body: dict[str, Any], headers: dict[str, str]) -> Completion:
        """One HTTP request; `_Transient` for what a retry may fix, `LLMError` otherwise.

        httpx's timeouts bound each socket operation, not the request: a server sending a
        header byte every half second never trips a 5 s read timeout. A watchdog timer set
        to the budget's end shuts the connection down under the request instead."""
        timeout = min(self.remaining(), MAX_REQUEST_SECONDS)
        if timeout <= 0:
            raise _Transient("no time left for a request")
        self.requests += 1
        with self._watch:
            self._expired = False
        watchdog = threading.Timer(self.remaining(), self._expire)
        watchdog.daemon = True
        watchdog.start()
        try:
            return self._exchange(body, headers, timeout)
        except _Transient:
            if self._expired:
                raise self._budget_error(
                    f"cut off {self.config.session_budget_seconds:g}s into the session with "
                    f"the answer from {self._host} still arriving"
                ) from None
            raise
        finally:
            watchdog.cancel()

    def _exchange(
        self, body: dict[str, Any], headers: dict[str, str], timeout: float
    ) -> Completion:
        """The request and its answer, read whole (within `MAX_RESPONSE_BYTES`)."""
        try:
            with self._client.stream(
                "POST",
                self.config.url,
                content=orjson.dumps(body),
                headers={"content-type": "application/json", **headers},
                timeout=httpx.Timeout(timeout),
                extensions={"trace": self._trace},
            ) as response:
                raw = bytearray()
                for chunk in response.iter_bytes():
                    raw += chunk
                    if len(raw) > MAX_RESPONSE_BYTES:
                        raise LLMError(
                            f"LLM answer from {self._host} exceeds {MAX_RESPONSE_BYTES} bytes"
                        )
                    if self.remaining() <= 0:
                        raise _Transient("the answer was still arriving when time ran out")
                status, response_headers = response.status_code, response.headers
        except httpx.TimeoutException:
            raise _Transient(f"no answer from {self._host} within {timeout:.1f}s") from None
        except httpx.TransportError as error:
            raise _Transient(
                f"cannot reach {self._host}: {type(error).__name__}: {_one_line(str(error), 120)}"
            ) from None
        if status == 200:
            parse = _parse_anthropic if self.config.provider == "anthropic" else _parse_openai
            completion = parse(bytes(raw), self.config.model)
            self.input_tokens += completion.input_tokens
            self.output_tokens += completion.output_tokens
            return completion
        message = _error_message(bytes(raw))
        if status in RETRY_STATUSES:
            raise _Transient(f"HTTP {status}: {message}", retry_after_seconds(response_headers))
        if status in (401, 403):
            raise LLMError(f"LLM API key rejected by {self._host} (HTTP {status}: {message})")
        raise LLMError(f"LLM request rejected by {self._host} (HTTP {status}: {message})")

    def complete(self, system: str, messages: Sequence[Message]) -> Completion:
        """Ask once, retrying rate limits, overloads, server errors, timeouts and garbled
        bodies with exponential backoff and jitter (or the server's `Retry-After`), all
        within the session's budget."""
        body, headers = self._request(system, messages)
        retries = 0
        while True:
            try:
                return self._send(body, headers)
            except _Transient as transient:
                problem, retry_after = str(transient), transient.retry_after
            if self.remaining() <= 0:
                raise self._budget_error(f"last: {problem}")
            retries += 1
            if retries > MAX_RETRIES:
                raise LLMError(
                    f"LLM at {self._host} still failing after {self.requests} request(s): {problem}"
                )
            if retry_after is None:
                backoff = BACKOFF_BASE_SECONDS * 2 ** (retries - 1)
                delay = min(BACKOFF_CAP_SECONDS, backoff) * (1 + random.random() / 2)
            else:
                delay = retry_after
            if delay >= self.remaining():
                raise self._budget_error(f"{problem}; a retry in {delay:.1f}s would not fit")
            time.sleep(delay)


def _shut(sock: socket.socket) -> None:
    """Shut a socket down from another thread; a socket already closed is fine. The base
    class's method, so a TLS socket's state is left to the thread using it."""
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


_FENCE = re.compile(r"^```[a-zA-Z]*\s*\n(.*?)\n?```\s*$", re.DOTALL)


def strip_code_fence(text: str) -> str:
    """Models asked for bare JSON still sometimes wrap it in a ```json fence."""
    stripped = text.strip()
    match = _FENCE.match(stripped)
    return match.group(1).strip() if match else stripped
