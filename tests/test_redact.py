"""Secrets never reach the LLM: realistic samples of each kind are redacted, and ordinary prose
and code that merely mention tokens or passwords come through untouched."""

from __future__ import annotations

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

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
            "stripe_key",
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
        # within what the README promises: an empty URL user, PASS/PWD names, a bearer
        # token without digits in an Authorization header
        ("redis://:s3cr3t-Pa55@cache.internal:6379/0", "s3cr3t-Pa55", "url_password"),
        ("REDIS_URL=redis://:hunter2@cache:6379", "hunter2", "url_password"),
        ("DB_PASS=correct-horse", "correct-horse", "secret_value"),
        ("MYSQL_PWD=correct-horse mysql -u root", "correct-horse", "secret_value"),
        ("export SMTP_PASS='correct horse'", "correct horse", "secret_value"),
        ("  dbPwd: correct-horse", "correct-horse", "secret_value"),
        (
            'curl -H "Authorization: Bearer abcDEFghiJKLmnoPQR_st-uv" https://api.acme.dev',
            "abcDEFghiJKLmnoPQR_st-uv",
            "bearer_token",
        ),
        # what users paste daily
        (
            "curl -H 'Authorization: Basic YWxpY2U6aHVudGVyMg==' https://jenkins.internal",
            "YWxpY2U6aHVudGVyMg==",
            "authorization",
        ),
        ('headers = {"Authorization": "Token deadBEEFcafe"}', "deadBEEFcafe", "authorization"),
        ("> Authorization: Bearer abcDEFghiJKLmnop", "abcDEFghiJKLmnop", "bearer_token"),
        ("curl -H 'X-API-Key: abc' https://api.acme.dev/v1", "abc", "secret_value"),
        ('curl --header "x-auth-token:Zx9Yw8Vu7T" $URL', "Zx9Yw8Vu7T", "secret_value"),
        (
            "stripe.api_key = sk_live_4eC39HqLyjWDarjtT1zdp7dc",
            "4eC39HqLyjWDarjtT1zdp7dc",
            "stripe_key",
        ),
        (
            "the test key sk_test_4eC39HqLyjWDarjtT1zdp7dc works",
            "4eC39HqLyjWDarjtT1zdp7dc",
            "stripe_key",
        ),
        ("restricted: rk_live_51HxYzAbCdEfGhIjKl", "51HxYzAbCdEfGhIjKl", "stripe_key"),
        ("rk_test_51HxYzAbCdEfGhIjKl", "51HxYzAbCdEfGhIjKl", "stripe_key"),
        (
            "maps key AIzaSyA-1234567890abcdefghijklmnopqrstu",
            "SyA-1234567890abcdefghijklmnopqrstu",
            "google_api_key",
        ),
        (f"{AWS_KEY_ID} {AWS_SECRET}", AWS_SECRET, "aws_secret_access_key"),
        (
            f"Access key ID,Secret access key\n{AWS_KEY_ID},{AWS_SECRET}",
            AWS_SECRET,
            "aws_secret_access_key",
        ),
        (f"key id: {AWS_KEY_ID}\nsecret: {AWS_SECRET}", AWS_SECRET, "aws_secret_access_key"),
        (f"{AWS_SECRET} is the secret for {AWS_KEY_ID}", AWS_SECRET, "aws_secret_access_key"),
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
        "PWD=/home/alice/src OLDPWD=/tmp PASSES=3",
        "Set the Authorization: Bearer header on every call; use Authorization: Basic auth there.",
        "--- PASS: TestRefunds (0.00s)",
        "BYPASS_CACHE=1 COMPASS_URL=https://compass.internal",
        'print("note: done") and "Tokens: 500"',
        "a commit 3f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f1a, not near any AWS key",
        "sk_test_helper and rk_testing_utils are function names",
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
        ("DB_PASS", True),
        ("MYSQL_PWD", True),
        ("dbPwd", True),
        ("SSH_PASSPHRASE", True),
        ("X-API-Key", True),
        ("PWD", False),
        ("OLDPWD", False),
        ("PASS_THROUGH", False),
        ("BYPASS", False),
        ("MAX_TOKENS", False),
        ("TOKENIZER", False),
        ("SECRETARY_NAME", False),
        ("PRIMARY_KEY", False),
        ("HOME", False),
    ],
)
def test_secret_key_names(key: str, secret: bool) -> None:
    assert is_secret_key(key) is secret


# --- property: a planted secret never survives, whatever surrounds it ------------------------

_B64 = "[A-Za-z0-9+/]"
# (template, strategy for the secret): the template is how the secret is pasted.
_PLANTED = st.one_of(
    st.tuples(
        st.just("redis://:{}@cache.internal:6379/0"),
        st.from_regex(r"[A-Za-z0-9!%^&*_+-]{6,24}", fullmatch=True),
    ),
    st.tuples(
        st.just("postgres://app:{}@db:5432/app"),
        st.from_regex(r"[A-Za-z0-9!%^&*_+-]{6,24}", fullmatch=True),
    ),
    st.tuples(
        st.sampled_from(
            [
                "DB_PASS={}",
                "export MYSQL_PWD={}",
                "SMTP_PASS='{}'",
                "PGPASSWORD={}",
                "SSH_PASSPHRASE={}",
            ]
        ),
        # a masked `***` value is no secret
        st.from_regex(r"[A-Za-z0-9!%^_+-][A-Za-z0-9!%^*_+-]{5,23}", fullmatch=True),
    ),
    st.tuples(
        st.sampled_from(
            [
                "Authorization: Bearer {}",
                "curl -H 'Authorization: Bearer {}' https://api.acme.dev",
                '-H "authorization: Basic {}"',
                '{{"Authorization": "Token {}"}}',
            ]
        ),
        # base64url without digits, a capital inside, no sentence punctuation at the end:
        # what the header rule promises
        st.from_regex(
            r"[A-Za-z._~+/-]{4,20}[A-Z][A-Za-z._~+/-]{2,30}[A-Za-z_~+/-]={0,2}", fullmatch=True
        ),
    ),
    st.tuples(
        st.sampled_from(
            ["-H 'X-API-Key: {}'", '--header "x-auth-token: {}"', "-H 'Private-Token:{}'"]
        ),
        st.from_regex(r"[A-Za-z0-9_.~-]{3,40}", fullmatch=True),
    ),
    st.tuples(
        st.sampled_from(["sk_live_{}", "rk_live_{}", "sk_test_{}", "rk_test_{}"]),
        st.from_regex(r"[A-Za-z0-9]{10,40}", fullmatch=True),
    ),
    st.tuples(st.just("AIza{}"), st.from_regex(r"[0-9A-Za-z_-]{35}", fullmatch=True)),
    st.tuples(
        st.sampled_from(
            [
                "AKIAIOSFODNN7EXAMPLE {}",
                "AKIAIOSFODNN7EXAMPLE,{}",
                "aws_access_key_id = AKIAIOSFODNN7EXAMPLE\naws_secret_access_key = {}",
                "key: ASIAIOSFODNN7EXAMPLE\nsecret: {}",
                "{} (secret) for AKIAIOSFODNN7EXAMPLE",
            ]
        ),
        st.from_regex(rf"[A-Z][a-z]{_B64}{{38}}", fullmatch=True),
    ),
    st.tuples(st.just("{}"), st.from_regex(r"sk-ant-[A-Za-z0-9_-]{16,40}", fullmatch=True)),
    st.tuples(st.just("{}"), st.from_regex(r"gh[pousr]_[A-Za-z0-9]{36}", fullmatch=True)),
    st.tuples(
        st.just("{}"), st.from_regex(r"xox[abprs]-[0-9]{6,12}-[A-Za-z0-9]{8,24}", fullmatch=True)
    ),
)
_SEPARATORS = st.sampled_from([" ", "\n", "\t", ": ", ". ", " (", ") ", "\n\n", " -- "])


@settings(max_examples=400, deadline=None)
@given(
    planted=_PLANTED,
    before=st.text(max_size=80),
    after=st.text(max_size=80),
    seps=st.tuples(_SEPARATORS, _SEPARATORS),
)
def test_a_planted_secret_never_survives_redaction(
    planted: tuple[str, str], before: str, after: str, seps: tuple[str, str]
) -> None:
    template, secret = planted
    assume(secret not in before and secret not in after)
    text = before + seps[0] + template.format(secret) + seps[1] + after
    redacted, count = redact(text)
    assert secret not in redacted and count >= 1
    assert redact(redacted) == (redacted, 0)


@settings(max_examples=200, deadline=None)
@given(
    words=st.lists(
        st.from_regex(r"[A-Za-z][a-z]{0,14}[.,;:!?]?", fullmatch=True) | st.just("Authorization:"),
        min_size=3,
        max_size=40,
    )
)
def test_prose_is_never_redacted(words: list[str]) -> None:
    """Words and punctuation, however they fall (`Authorization: Bearer header`, `Password:
    required by policy`), are never a secret. (A line that is only `Password: word` is an
    assignment, redacted on purpose.)"""
    text = " ".join(words)
    assert redact(text) == (text, 0)
