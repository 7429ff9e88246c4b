"""Secrets never reach the LLM: realistic samples of each kind are redacted, and ordinary prose
and code that merely mention tokens or passwords come through untouched."""

from __future__ import annotations

import pytest

from processors.redact import is_secret_key, redact

# Realistic shapes (fake values) as they appear in pasted shells, configs and logs.
ANTHROPIC = (
    "sk-ant-api03-Xq3vTz8LrWbN5mKc2HdYf7GpJs0aEuQi9oVx4nRtZyB1lCwPe6SgDhMkUj-_AbCdEfGhIj-kLmNoPQAA"
)
OPENAI_PROJECT = "sk-proj-4fJ9kLmN2pQrS7tUvW1xYz3aBcD5eFgH8iJkL0mNoPqR6sTuVwXyZ"
OPENAI_LEGACY = "sk-3kT9vLwX2mQ8rN5pZ7yB1cD4fG6hJ0aE9sU2iO5lK8nM3bV7"
AWS_KEY_ID = "AKIAIOSFODNN7EXAMPLE"
AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
GITHUB_PAT = "ghp_16C7e42F292c6912E7710c838347Ae178B4a"
GITHUB_FINE = "github_pat_11ABCDEFG0aBcDeFgHiJkL_mNoPqRsTuVwXyZ0123456789aBcDeFgHiJkLmNoPqRsTuVw"
SLACK_BOT = "xoxb-2048123456789-4096123456789-Zx9Yw8Vu7Ts6Rq5Po4Nm3Lk2"
SLACK_HOOK = "https://hooks.slack.com/services/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"
JWT = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c"
PEM = """-----BEGIN RSA PRIVATE KEY-----
MIIEowIBAAKCAQEAu1SU1LfVLPHCozMxH2Mo4lgOEePzNm0tRgeLezV6ffAt0gun
VTLw7onLRnrq0/IzW7yWR7QkrmBL7jTKEn5u+qKhbwKfBstIs+bMY2Zkp18gnTxK
-----END RSA PRIVATE KEY-----"""


@pytest.mark.parametrize(
    ("text", "secret", "kind"),
    [
        (f"export ANTHROPIC_API_KEY={ANTHROPIC}", ANTHROPIC, "anthropic_key"),
        (f"client = OpenAI(api_key='{OPENAI_PROJECT}')", OPENAI_PROJECT, "openai_key"),
        (f"the old key {OPENAI_LEGACY} still works", OPENAI_LEGACY, "openai_key"),
        (f"[default]\naws_access_key_id = {AWS_KEY_ID}", AWS_KEY_ID, "aws_access_key_id"),
        (f"aws_secret_access_key = {AWS_SECRET}", AWS_SECRET, "aws_secret_access_key"),
        (
            f"git remote set-url origin https://{GITHUB_PAT}@github.com/acme/api",
            GITHUB_PAT,
            "github_token",
        ),
        (f"GH token: {GITHUB_FINE}", GITHUB_FINE, "github_token"),
        (f"SLACK_BOT_TOKEN={SLACK_BOT}", SLACK_BOT, "slack_token"),
        (f"post alerts to {SLACK_HOOK}", SLACK_HOOK, "slack_webhook"),
        (f'curl -H "Authorization: Bearer {JWT}" https://api.acme.dev/v2/me', JWT, "bearer_token"),
        (
            f"here is the deploy key:\n{PEM}\nuse it on bastion",
            "MIIEowIBAAKCAQEAu1SU1LfVLPHCozMxH2Mo4lgOEePzNm0tRgeLezV6ffAt0gun",
            "private_key",
        ),
        (
            "DATABASE_URL=postgres://analytics:Tr0ub4dor&3@db.internal:5432/ledger",
            "Tr0ub4dor&3",
            "url_password",
        ),
        ("redis://default:9f8e7d6c5b4a@cache.internal:6379/0", "9f8e7d6c5b4a", "url_password"),
        ("DB_PASSWORD=hunter2-correct-horse", "hunter2-correct-horse", "secret_value"),
        (
            "export STRIPE_SECRET_KEY='sk_live_51HxYzAbCdEfGh'",
            "sk_live_51HxYzAbCdEfGh",
            "secret_value",
        ),
        ("  client_secret: 8a7b6c5d4e3f2a1b", "8a7b6c5d4e3f2a1b", "secret_value"),
        ('{"accessToken": "eyJraWQiOiJ4", "user": "bob"}', "eyJraWQiOiJ4", "secret_value"),
        ("docker run -e SENTRY_AUTH_TOKEN=sntrys_abc123 app", "sntrys_abc123", "secret_value"),
        ("X-Api-Key: 3f9a8b7c6d5e4f3a2b1c", "3f9a8b7c6d5e4f3a2b1c", "secret_value"),
        (
            "https://api.acme.dev/export?format=csv&access_token=a1b2c3d4e5",
            "a1b2c3d4e5",
            "secret_value",
        ),
    ],
)
def test_secrets_are_redacted_with_their_kind(text: str, secret: str, kind: str) -> None:
    redacted, count = redact(text)
    assert secret not in redacted
    assert f"[REDACTED:{kind}]" in redacted
    assert count >= 1


def test_context_around_a_secret_is_kept() -> None:
    redacted, count = redact("postgres://analytics:Tr0ub4dor@db.internal:5432/ledger is the DSN")
    assert (
        redacted
        == "postgres://analytics:[REDACTED:url_password]@db.internal:5432/ledger is the DSN"
    )
    assert count == 1
    redacted, _ = redact(f"Authorization: Bearer {JWT}")
    assert redacted == "Authorization: Bearer [REDACTED:bearer_token]"


def test_a_key_inside_an_assignment_is_counted_once() -> None:
    redacted, count = redact(f"ANTHROPIC_API_KEY={ANTHROPIC}\nGITHUB_TOKEN={GITHUB_PAT}")
    assert (
        redacted
        == "ANTHROPIC_API_KEY=[REDACTED:anthropic_key]\nGITHUB_TOKEN=[REDACTED:github_token]"
    )
    assert count == 2


def test_redaction_is_idempotent() -> None:
    once, _ = redact(f"export OPENAI_API_KEY={OPENAI_PROJECT}\npassword: hunter2\n{PEM}")
    twice, count = redact(once)
    assert twice == once and count == 0


def test_a_truncated_private_key_is_redacted_to_the_end() -> None:
    redacted, count = redact(
        "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9u"
    )
    assert redacted == "[REDACTED:private_key]" and count == 1


@pytest.mark.parametrize(
    "text",
    [
        "We have a token budget of 200k per request, so trim the prompt.",
        "The password policy says 12 characters minimum and no reuse of the last 5.",
        "Password: must be at least 12 characters long",
        "MAX_TOKENS=4096\nTOKENIZER_PATH=/models/tok.json",
        "password = getpass.getpass()\napi_key = os.environ['ANTHROPIC_API_KEY']",
        'API_KEY="$ANTHROPIC_API_KEY" make deploy',
        "token=${GITHUB_TOKEN} and secret=<your-secret-here> and password: ********",
        "if token == expected_token: return True",
        "postgres://app:${DB_PASSWORD}@db:5432/app",
        "the bearer of bad news; use Bearer authentication for the API",
        "git checkout task-management-system-2024 and risk-assessment-v2",
        "sk-learn is not a package name, scikit-learn is",
        "refund_amount = round(amount * 0.5, 2)",
        "https://github.com/acme/web-dashboard/issues/57",
    ],
)
def test_ordinary_text_survives(text: str) -> None:
    assert redact(text) == (text, 0)


@pytest.mark.parametrize(
    ("key", "secret"),
    [
        ("GITHUB_TOKEN", True),
        ("accessToken", True),
        ("db-password", True),
        ("AWS_SECRET_ACCESS_KEY", True),
        ("OPENAI_API_KEY", True),
        ("apikey", True),
        ("GOOGLE_APPLICATION_CREDENTIALS", True),
        ("private_key", True),
        ("MAX_TOKENS", False),
        ("TOKENIZER", False),
        ("SECRETARY_NAME", False),
        ("PRIMARY_KEY", False),
        ("HOME", False),
    ],
)
def test_secret_key_names(key: str, secret: bool) -> None:
    assert is_secret_key(key) is secret
