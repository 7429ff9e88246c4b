"""The LLM client against a real HTTP server on loopback: configuration from the environment,
both APIs' request shapes, retries (429 with Retry-After, 5xx, garbled bodies, timeouts) and
the per-session time budget."""

from __future__ import annotations

import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from processors import llm
from processors.llm import (
    NOT_CONFIGURED,
    LLMBudgetError,
    LLMConfig,
    LLMConfigError,
    LLMError,
    LLMSession,
    retry_after_seconds,
    strip_code_fence,
    unavailable_reason,
)
from tests.fake_llm import (
    FakeLLM,
    answer,
    clear_llm_env,
    error,
    malformed_body,
    slow,
    trickled,
)

HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    clear_llm_env(monkeypatch)


@pytest.fixture(autouse=True)
def _quick_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """Backoff without a Retry-After is not what these tests measure: keep it short."""
    monkeypatch.setattr(llm, "BACKOFF_BASE_SECONDS", 0.05)


@pytest.fixture
def server() -> Iterator[FakeLLM]:
    with FakeLLM() as fake:
        yield fake


def anthropic(server: FakeLLM, budget: float = 300, key: str = "test-key") -> LLMSession:
    env = {
        "ANTHROPIC_API_KEY": key,
        "ANTHROPIC_BASE_URL": server.base_url,
        "SESSION_PIPELINE_LLM_SESSION_BUDGET": str(budget),
    }
    return LLMSession(LLMConfig.from_env(env))


# --- configuration ---------------------------------------------------------------------------


def test_anthropic_defaults() -> None:
    config = LLMConfig.from_env({"ANTHROPIC_API_KEY": "sk-ant-xyz"})
    assert config.provider == "anthropic"
    assert config.url == "https://api.anthropic.com/v1/messages"
    assert config.model == "claude-haiku-4-5"
    assert config.session_budget_seconds == 300
    assert "sk-ant-xyz" not in repr(config)


def test_pipeline_key_and_model_override() -> None:
    config = LLMConfig.from_env(
        {
            "ANTHROPIC_API_KEY": "sk-ant-general",
            "SESSION_PIPELINE_LLM_API_KEY": "sk-ant-pipeline",
            "SESSION_PIPELINE_LLM_MODEL": "claude-sonnet-4-5",
            "ANTHROPIC_BASE_URL": "https://gateway.internal/anthropic/",
        }
    )
    assert config.api_key == "sk-ant-pipeline"
    assert config.model == "claude-sonnet-4-5"
    assert config.url == "https://gateway.internal/anthropic/v1/messages"


def test_openai_compatible_config() -> None:
    config = LLMConfig.from_env(
        {
            "SESSION_PIPELINE_LLM_PROVIDER": "openai",
            "SESSION_PIPELINE_LLM_BASE_URL": "http://gpu-box:8000/v1/",
            "SESSION_PIPELINE_LLM_MODEL": "Qwen/Qwen2.5-7B-Instruct",
            "SESSION_PIPELINE_LLM_SESSION_BUDGET": "45.5",
        }
    )
    assert config.provider == "openai"
    assert config.url == "http://gpu-box:8000/v1/chat/completions"
    assert config.api_key is None
    assert config.session_budget_seconds == 45.5


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, NOT_CONFIGURED),
        ({"ANTHROPIC_API_KEY": ""}, NOT_CONFIGURED),
        ({"SESSION_PIPELINE_LLM_PROVIDER": "openai"}, "needs SESSION_PIPELINE_LLM_BASE_URL"),
        (
            {
                "SESSION_PIPELINE_LLM_PROVIDER": "openai",
                "SESSION_PIPELINE_LLM_BASE_URL": "http://h/v1",
            },
            "needs SESSION_PIPELINE_LLM_MODEL",
        ),
        (
            {
                "SESSION_PIPELINE_LLM_PROVIDER": "openai",
                "SESSION_PIPELINE_LLM_BASE_URL": "gpu-box:8000",
                "SESSION_PIPELINE_LLM_MODEL": "m",
            },
            "SESSION_PIPELINE_LLM_BASE_URL must be an http(s) URL",
        ),
        (
            {"SESSION_PIPELINE_LLM_PROVIDER": "bedrock"},
            "must be anthropic or openai, got 'bedrock'",
        ),
        ({"SESSION_PIPELINE_LLM_PROVIDER": "anthropic"}, "needs ANTHROPIC_API_KEY"),
        # a base URL without the provider that uses it: never the public API instead
        (
            {
                "ANTHROPIC_API_KEY": "sk-ant-for-the-gateway",
                "SESSION_PIPELINE_LLM_BASE_URL": "https://llm-gateway.internal/v1",
            },
            "SESSION_PIPELINE_LLM_BASE_URL is set but SESSION_PIPELINE_LLM_PROVIDER is not",
        ),
        (
            {
                "SESSION_PIPELINE_LLM_API_KEY": "k",
                "SESSION_PIPELINE_LLM_BASE_URL": "http://gpu-box:8000/v1",
                "SESSION_PIPELINE_LLM_MODEL": "qwen",
            },
            "set SESSION_PIPELINE_LLM_PROVIDER=openai to use it",
        ),
        (
            {
                "SESSION_PIPELINE_LLM_PROVIDER": "anthropic",
                "ANTHROPIC_API_KEY": "k",
                "SESSION_PIPELINE_LLM_BASE_URL": "https://llm-gateway.internal/v1",
            },
            "SESSION_PIPELINE_LLM_PROVIDER is anthropic",
        ),
        ({"ANTHROPIC_API_KEY": "k", "SESSION_PIPELINE_LLM_SESSION_BUDGET": "0"}, "positive number"),
        ({"ANTHROPIC_API_KEY": "k", "SESSION_PIPELINE_LLM_SESSION_BUDGET": ""}, "positive number"),
        ({"ANTHROPIC_API_KEY": "k", "SESSION_PIPELINE_LLM_SESSION_BUDGET": "5m"}, "got '5m'"),
        (
            {"ANTHROPIC_API_KEY": "k", "SESSION_PIPELINE_LLM_SESSION_BUDGET": "inf"},
            "positive number",
        ),
    ],
)
def test_configuration_problems_are_one_clear_line(env: dict[str, str], message: str) -> None:
    with pytest.raises(LLMConfigError) as caught:
        LLMConfig.from_env(env)
    assert message in str(caught.value) and "\n" not in str(caught.value)
    assert unavailable_reason(env) == str(caught.value)


def test_configured_means_available() -> None:
    assert unavailable_reason({"ANTHROPIC_API_KEY": "k"}) is None


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        ({"retry-after": "1"}, 1.0),
        ({"retry-after": "2.5"}, 2.5),
        ({"retry-after-ms": "750", "retry-after": "9"}, 0.75),
        ({"retry-after": "Wed, 21 Oct 2026 07:28:30 GMT"}, 30.0),
        ({"retry-after": "soon"}, None),
        ({}, None),
    ],
)
def test_retry_after(headers: dict[str, str], seconds: float | None) -> None:
    now = datetime(2026, 10, 21, 7, 28, tzinfo=UTC)
    assert retry_after_seconds(headers, now) == seconds


def test_code_fences_are_tolerated() -> None:
    assert strip_code_fence('```json\n{"items": []}\n```') == '{"items": []}'
    assert strip_code_fence('  {"items": []} ') == '{"items": []}'


# --- requests --------------------------------------------------------------------------------


def test_anthropic_request_and_answer(server: FakeLLM) -> None:
    server.queue(answer('{"items": []}', input_tokens=321, output_tokens=12))
    with anthropic(server) as llm:
        completion = llm.complete("be brief", HI)
    assert completion.text == '{"items": []}'
    assert (completion.input_tokens, completion.output_tokens) == (321, 12)
    assert completion.model == "claude-haiku-4-5" and not completion.truncated
    (request,) = server.received
    assert request.path == "/v1/messages"
    assert request.headers["x-api-key"] == "test-key"
    assert request.headers["anthropic-version"] == "2023-06-01"
    assert request.body["model"] == "claude-haiku-4-5"
    assert request.body["system"] == "be brief"
    assert request.body["messages"] == HI
    assert request.body["max_tokens"] > 0
    assert "authorization" not in request.headers


def test_openai_request_and_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    with FakeLLM(api_key=None) as server:  # a self-hosted server without auth
        server.queue(answer('{"items": []}', input_tokens=50, output_tokens=7))
        config = LLMConfig.from_env(
            {
                "SESSION_PIPELINE_LLM_PROVIDER": "openai",
                "SESSION_PIPELINE_LLM_BASE_URL": f"{server.base_url}/v1",
                "SESSION_PIPELINE_LLM_MODEL": "llama-3.1-8b-instruct",
            }
        )
        with LLMSession(config) as llm:
            completion = llm.complete("be brief", HI)
    assert completion.text == '{"items": []}' and completion.model == "llama-3.1-8b-instruct"
    assert (llm.input_tokens, llm.output_tokens, llm.requests) == (50, 7, 1)
    (request,) = server.received
    assert request.path == "/v1/chat/completions"
    assert "authorization" not in request.headers
    assert request.body["messages"] == [{"role": "system", "content": "be brief"}, *HI]
    assert request.body["response_format"] == {"type": "json_object"}
    assert request.body["temperature"] == 0


def test_429_waits_for_retry_after(server: FakeLLM) -> None:
    server.queue(error(429, "Number of request tokens has exceeded your rate limit", retry_after=1))
    server.queue(answer("ok"))
    with anthropic(server) as llm:
        assert llm.complete("s", HI).text == "ok"
    first, second = server.received
    assert second.at - first.at >= 0.9
    assert llm.requests == 2


def test_overloaded_and_garbled_answers_are_retried(server: FakeLLM) -> None:
    server.queue(error(529, "Overloaded"), malformed_body(), answer("ok", output_tokens=3))
    with anthropic(server) as llm:
        assert llm.complete("s", HI).text == "ok"
    assert llm.requests == 3 and llm.output_tokens == 3


def test_a_retry_after_beyond_the_budget_fails_at_once(server: FakeLLM) -> None:
    server.queue(error(429, "rate limited", retry_after=30))
    started = time.monotonic()
    with anthropic(server, budget=5) as llm, pytest.raises(LLMBudgetError) as caught:
        llm.complete("s", HI)
    assert time.monotonic() - started < 1
    assert "time budget of 5s" in str(caught.value) and "retry in 30.0s" in str(caught.value)


def test_a_slow_answer_past_the_budget_is_not_waited_for(server: FakeLLM) -> None:
    server.queue(slow(3))
    started = time.monotonic()
    with anthropic(server, budget=1) as llm, pytest.raises(LLMBudgetError) as caught:
        llm.complete("s", HI)
    assert time.monotonic() - started < 2
    assert str(caught.value).startswith("LLM time budget of 1s per session exhausted")


@pytest.mark.parametrize("provider", ["anthropic", "openai"])
def test_headers_trickling_past_the_budget_are_cut_off(server: FakeLLM, provider: str) -> None:
    """A read timeout restarts on every byte: headers sent a byte every 0.2 s (about 30 s in
    all) would hold the run that long. The watchdog ends the request when the budget does."""
    server.queue(trickled(0.2, answer("ok", headers={"x-padding": "p" * 40})))
    env = {
        "SESSION_PIPELINE_LLM_API_KEY": "test-key",
        "SESSION_PIPELINE_LLM_SESSION_BUDGET": "1",
    }
    if provider == "anthropic":
        env["ANTHROPIC_BASE_URL"] = server.base_url
    else:
        env["SESSION_PIPELINE_LLM_PROVIDER"] = "openai"
        env["SESSION_PIPELINE_LLM_BASE_URL"] = f"{server.base_url}/v1"
        env["SESSION_PIPELINE_LLM_MODEL"] = "m"
    started = time.monotonic()
    with LLMSession(LLMConfig.from_env(env)) as llm, pytest.raises(LLMBudgetError) as caught:
        llm.complete("s", HI)
    assert time.monotonic() - started < 10
    assert str(caught.value).startswith("LLM time budget of 1s per session exhausted")
    assert len(server.received) == 1


def test_a_session_goes_on_after_a_request_that_fit(server: FakeLLM) -> None:
    """The watchdog of a finished request never cuts the next one's connection."""
    server.queue(answer("one"), answer("two"))
    with anthropic(server, budget=2) as llm:
        assert llm.complete("s", HI).text == "one"
        time.sleep(0.2)
        assert llm.complete("s", HI).text == "two"
    assert llm.requests == 2


def test_client_errors_fail_at_once_with_the_servers_reason(server: FakeLLM) -> None:
    server.queue(error(400, "prompt is too long: 212000 tokens > 200000 maximum"))
    with anthropic(server) as llm, pytest.raises(LLMError) as caught:
        llm.complete("s", HI)
    assert "HTTP 400: invalid_request_error: prompt is too long" in str(caught.value)
    assert len(server.received) == 1


def test_a_wrong_key_is_reported_as_rejected(server: FakeLLM) -> None:
    with anthropic(server, key="sk-ant-wrong") as llm, pytest.raises(LLMError) as caught:
        llm.complete("s", HI)
    assert str(caught.value).startswith("LLM API key rejected")
    assert "sk-ant-wrong" not in str(caught.value)
    assert len(server.received) == 1


def test_an_unreachable_server_fails_within_the_budget() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {
        "ANTHROPIC_API_KEY": "k",
        "ANTHROPIC_BASE_URL": f"http://127.0.0.1:{port}",
        "SESSION_PIPELINE_LLM_SESSION_BUDGET": "1.5",
    }
    started = time.monotonic()
    with LLMSession(LLMConfig.from_env(env)) as llm, pytest.raises(LLMError) as caught:
        llm.complete("s", HI)
    assert time.monotonic() - started < 2
    assert f"cannot reach 127.0.0.1:{port}" in str(caught.value)
    assert llm.requests >= 2


# --- TLS -------------------------------------------------------------------------------------


def test_https_trusts_the_ca_setting_of_the_moment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sessions share one TLS context (building one per session cost 30-50 ms of CPU), yet a
    CA given by SSL_CERT_FILE is honoured from the next session on, as httpx's default is."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    serving = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    serving.load_cert_chain(cert, key)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    with FakeLLM(tls=serving) as server:
        assert server.base_url.startswith("https://")
        with anthropic(server, budget=1) as untrusting, pytest.raises(LLMError) as caught:
            untrusting.complete("s", HI)
        assert "CERTIFICATE_VERIFY_FAILED" in str(caught.value)
        assert not server.received

        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        server.queue(answer("hello"), answer("again"))
        with anthropic(server) as first, anthropic(server) as second:
            assert first.complete("s", HI).text == "hello"
            assert second.complete("s", HI).text == "again"
            assert first._client._transport._pool._ssl_context is llm.tls_context()  # type: ignore[attr-defined]
            assert second._client._transport._pool._ssl_context is llm.tls_context()  # type: ignore[attr-defined]
