"""Secret redaction for text that leaves the machine (LLM prompts).

Transcripts are full of pasted shells, configs and logs, so keys and passwords end up in user
turns and tool output. Everything sent to an LLM goes through `redact` first; each secret is
replaced by `[REDACTED:<kind>]`, which keeps the sentence readable for the model and keeps
quotes verifiable (the model sees and quotes the redacted text).

Patterns run in order, specific token shapes first, so a key inside a `KEY=value` line is
reported with its precise kind and never counted twice: later patterns skip values that are
already redacted. The `KEY=value` rule matches on the key's *words* (`GITHUB_TOKEN`,
`accessToken`, `db-password`), not on substrings, so `MAX_TOKENS=4096` or
`TOKENIZER_PATH=...` survive, and prose such as "token budget" or "password policy" is
never touched because it has no `=`/`:` assignment of a single value.
"""

from __future__ import annotations

import re
from collections.abc import Callable

MARKER = "[REDACTED:{kind}]"
_ALREADY = r"(?!\[REDACTED:)"


def _marker(kind: str) -> str:
    return MARKER.format(kind=kind)


# (kind, pattern): a match becomes its `keep` group (context such as `Bearer ` or the user
# of a URL) followed by the marker.
_TOKEN_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    # A PEM private key block; a block cut off (truncated paste) is redacted to the end.
    (
        "private_key",
        re.compile(
            r"(?P<keep>)-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----"
            r"(?:.*?-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----|.*\Z)",
            re.DOTALL,
        ),
    ),
    # Before every `\b`-bounded token: the webhook has no `\b` of its own, so a token glued
    # in front of it (`AKIA…https://hooks…`) only gets its trailing `\b` once it is replaced;
    # run later, a second pass would find more and redaction would not be one pass.
    (
        "slack_webhook",
        re.compile(
            r"(?P<keep>)https://hooks\.slack\.com/(?:services|workflows|triggers)/[A-Za-z0-9/_-]+"
        ),
    ),
    ("anthropic_key", re.compile(r"(?P<keep>)\bsk-ant-[A-Za-z0-9_-]{16,}")),
    # OpenAI: sk-…, sk-proj-…, sk-svcacct-…; a digit is required so hyphenated words pass.
    (
        "openai_key",
        re.compile(
            r"(?P<keep>)\bsk-(?:proj-|svcacct-|admin-)?(?=[A-Za-z0-9_-]{0,200}\d)[A-Za-z0-9_-]{20,}"
        ),
    ),
    ("aws_access_key_id", re.compile(r"(?P<keep>)\b(?:AKIA|ASIA)[0-9A-Z]{16}\b")),
    (
        "aws_secret_access_key",
        re.compile(
            r"(?P<keep>\baws_secret_access_key[\"']?\s*[:=]\s*[\"']?)"
            + _ALREADY
            + r"[A-Za-z0-9/+=]{30,}",
            re.IGNORECASE,
        ),
    ),
    ("github_token", re.compile(r"(?P<keep>)\b(?:ghp|gho|ghu|ghs|ghr)_[A-Za-z0-9]{30,}\b")),
    ("github_token", re.compile(r"(?P<keep>)\bgithub_pat_[A-Za-z0-9_]{22,}")),
    ("slack_token", re.compile(r"(?P<keep>)\bxox[abprs]-[A-Za-z0-9-]{10,}")),
    (
        "bearer_token",
        re.compile(
            r"(?P<keep>\bBearer\s+)" + _ALREADY + r"(?=[\w.~+/=-]{0,500}\d)[\w.~+/=-]{16,}",
            re.IGNORECASE,
        ),
    ),
    # scheme://user:password@host: the user stays, the password goes; `$VAR`, `{{x}}` and
    # `<password>` placeholders are not secrets.
    (
        "url_password",
        re.compile(
            r"(?P<keep>\b[a-zA-Z][a-zA-Z0-9+.-]{0,30}://(?!\[REDACTED:)[^\s:/@]{1,200}:)"
            + _ALREADY
            + r"(?![$<{])[^\s@/]{1,200}(?=@)"
        ),
    ),
)

# A key that names a secret, matched on its words after splitting camelCase and separators.
_SECRET_WORDS = re.compile(
    r"(?:^|_)(?:\w*(?:SECRET|PASSWORD|PASSWD|CREDENTIAL)S?|\w*TOKEN|API_?KEY|APIKEY|"
    r"PRIVATE_?KEY|ACCESS_?KEY)(?:_|$)"
)
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")

# `KEY=value` anywhere (shell, env files, `docker -e`), `KEY: value` / `"key": "value"` as a
# whole line or a JSON/YAML pair. The value is one token (quoted or bare).
_VALUE = r"(?P<value>\"[^\"\n]+\"|'[^'\n]+'|[^\s\"'`,;&|)]+)"
_ASSIGNMENTS: tuple[re.Pattern[str], ...] = (
    re.compile(r"(?P<keep>(?<![\w.-])(?P<key>[A-Za-z_][\w.-]{0,100})\s*=\s*)" + _VALUE),
    re.compile(
        r"(?P<keep>^[ \t]*-?[ \t]*(?:export[ \t]+)?[\"']?"
        r"(?P<key>[A-Za-z_][\w.-]{0,100})[\"']?[ \t]*:[ \t]*)" + _VALUE + r"(?=[ \t]*,?[ \t]*$)",
        re.MULTILINE,
    ),
    re.compile(r"(?P<keep>[\"'](?P<key>[A-Za-z_][\w.-]{0,100})[\"']\s*:\s*)" + _VALUE),
)
# Not a secret: empty, a reference (`$VAR`, `${X}`, `<token>`, `{{ t }}`), masked, already
# redacted, `==` comparisons, literals, or code (`os.environ["X"]`, `getpass()`).
_PLACEHOLDER = re.compile(
    r"""^["']?(?:\[REDACTED:|[$<=]|\{\{|\*{3,}|["']?$)|^(?:None|null|true|false|True|False)$"""
    r"|^[^\"'][^(\[]*[(\[]"
)


def is_secret_key(key: str) -> bool:
    """True when a variable or field name says it holds a secret."""
    words = _CAMEL.sub("_", key).upper().replace("-", "_").replace(".", "_")
    return bool(_SECRET_WORDS.search(words))


def _sub(
    pattern: re.Pattern[str], text: str, replace: Callable[[re.Match[str]], str | None]
) -> tuple[str, int]:
    count = 0

    def one(match: re.Match[str]) -> str:
        nonlocal count
        replaced = replace(match)
        if replaced is None:
            return match.group(0)
        count += 1
        return replaced

    return pattern.sub(one, text), count


def redact(text: str) -> tuple[str, int]:
    """`text` with every secret found replaced by `[REDACTED:<kind>]`, and how many."""
    total = 0
    for kind, pattern in _TOKEN_PATTERNS:
        text, n = _sub(pattern, text, lambda m, kind=kind: m.group("keep") + _marker(kind))
        total += n

    def assignment(match: re.Match[str]) -> str | None:
        if not is_secret_key(match.group("key")) or _PLACEHOLDER.match(match.group("value")):
            return None
        value = match.group("value")
        quote = value[0] if value[0] in "\"'" else ""
        return f"{match.group('keep')}{quote}{_marker('secret_value')}{quote}"

    for pattern in _ASSIGNMENTS:
        text, n = _sub(pattern, text, assignment)
        total += n
    return text, total
