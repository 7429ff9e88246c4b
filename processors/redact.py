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
never touched because it has no `=`/`:` assignment of a single value. Context makes a secret
of what has no shape of its own: the credentials of an `Authorization:` header, the value
of a quoted header with a secret-looking name (`-H 'X-API-Key: abc'`), a 40-character AWS
secret on or next to the line of its access key id.
"""

from __future__ import annotations

import re
from collections.abc import Callable

MARKER = "[REDACTED:{kind}]"
_ALREADY = r"(?!\[REDACTED:)"


def _marker(kind: str) -> str:
    return MARKER.format(kind=kind)


# Header credentials: one token, not a placeholder (`$TOKEN`, `<token>`, `{{ t }}`), without
# the punctuation ending a sentence; `_is_credential` then wants 8+ characters that are not a
# plain word, so "use Authorization: Basic authentication." is prose.
_CREDENTIALS = r"(?P<cred>(?![$<{*])[^\s\"',;]{0,500}[^\s\"',;.!?:)])"
_PLAIN_WORD = re.compile(r"[A-Za-z][a-z]*")


def _is_credential(value: str) -> bool:
    return len(value) >= 8 and not _PLAIN_WORD.fullmatch(value)


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
    # Stripe secret and restricted keys, live and test (`pk_` publishable keys are public).
    ("stripe_key", re.compile(r"(?P<keep>)\b(?:[sr]k_(?:live|test)|whsec)_[A-Za-z0-9]{10,}")),
    ("google_api_key", re.compile(r"(?P<keep>)\bAIza[0-9A-Za-z_-]{35}(?![0-9A-Za-z_-])")),
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
    # An Authorization header's credentials, whatever the scheme: in a header a token
    # needs no digit to be one. Prose naming the header ("use Authorization: Basic auth")
    # has a short or plain word there, which is left alone (see `_is_credential`).
    (
        "bearer_token",
        re.compile(
            r"(?P<keep>\b(?i:authorization)[\"']?[ \t]*[:=][ \t]*[\"']?(?i:bearer)[ \t]+)"
            + _ALREADY
            + _CREDENTIALS
        ),
    ),
    (
        "authorization",
        re.compile(
            r"(?P<keep>\b(?i:authorization)[\"']?[ \t]*[:=][ \t]*[\"']?(?>[A-Za-z][\w-]*[ \t]+)?)"
            + _ALREADY
            + _CREDENTIALS
        ),
    ),
    # scheme://user:password@host: the user (possibly empty, as in `redis://:pw@host`)
    # stays, the password goes; `$VAR`, `{{x}}` and `<password>` placeholders are not secrets.
    (
        "url_password",
        re.compile(
            r"(?P<keep>\b[a-zA-Z][a-zA-Z0-9+.-]{0,30}://(?!\[REDACTED:)[^\s:/@]{0,200}:)"
            + _ALREADY
            + r"(?![$<{])[^\s@/]{1,200}(?=@)"
        ),
    ),
)

# A key that names a secret, matched on its words after splitting camelCase and separators.
# PASS and PWD only as the last word (`DB_PASS`, `MYSQL_PWD`): `PWD`/`OLDPWD` are the
# shell's directories, `PASS_THROUGH` or `BYPASS` are no passwords.
_SECRET_WORDS = re.compile(
    r"(?:^|_)(?:\w*(?:SECRET|PASSWORD|PASSWD|PASSPHRASE|CREDENTIAL)S?|\w*TOKEN|API_?KEY|APIKEY|"
    r"PRIVATE_?KEY|ACCESS_?KEY)(?:_|$)|(?:^|_)PASS$|_PWD$"
)
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")

# `KEY=value` anywhere (shell, env files, `docker -e`), `KEY: value` / `"key": "value"` as a
# whole line or a JSON/YAML pair. The value is one token (quoted or bare).
_VALUE = r"(?P<value>\"[^\"\n]+\"|'[^'\n]+'|[^\s\"'`,;&|)]+)"
_ASSIGNMENTS: tuple[re.Pattern[str], ...] = (
    re.compile(r"(?P<keep>(?<![\w.-])(?P<key>[A-Za-z_][\w.-]{0,100})\s*=\s*)" + _VALUE),
    re.compile(
        r"(?P<keep>^[ \t]*[-<>]?[ \t]*(?:export[ \t]+)?[\"']?"
        r"(?P<key>[A-Za-z_][\w.-]{0,100})[\"']?[ \t]*:[ \t]*)" + _VALUE + r"(?=[ \t]*,?[ \t]*$)",
        re.MULTILINE,
    ),
    re.compile(r"(?P<keep>[\"'](?P<key>[A-Za-z_][\w.-]{0,100})[\"']\s*:\s*)" + _VALUE),
    # A header inside quotes, as curl takes it: `-H 'X-API-Key: abc'`.
    re.compile(
        r"(?P<keep>[\"'](?P<key>[A-Za-z][\w-]{0,100})[ \t]*:[ \t]*)"
        r"(?P<value>[^\s\"']+)(?=[ \t]*[\"'])"
    ),
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


# An AWS secret access key has no prefix of its own: 40 characters of base64 (both cases),
# taken as one when it is on the line of an access key id (`AKIA…,wJalr…` in the console's
# CSV) or on the line before or after it. Lines, not distances: replacing changes lengths but
# never lines, so one pass finds every one.
_AWS_ID_MARKER = _marker("aws_access_key_id")
_AWS_SECRET = re.compile(
    r"(?<![A-Za-z0-9/+=])(?=[A-Za-z0-9/+]{0,39}[A-Z])(?=[A-Za-z0-9/+]{0,39}[a-z])"
    r"[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])"
)


def _aws_secrets_beside_ids(text: str) -> tuple[str, int]:
    if _AWS_ID_MARKER not in text:
        return text, 0
    lines = text.split("\n")
    near = [_AWS_ID_MARKER in line for line in lines]
    total = 0
    for index, line in enumerate(lines):
        if any(near[max(0, index - 1) : index + 2]):
            lines[index], n = _AWS_SECRET.subn(_marker("aws_secret_access_key"), line)
            total += n
    return "\n".join(lines), total


def redact(text: str) -> tuple[str, int]:
    """`text` with every secret found replaced by `[REDACTED:<kind>]`, and how many."""
    total = 0

    def token(match: re.Match[str], kind: str) -> str | None:
        credential = match.groupdict().get("cred")
        if credential is not None and not _is_credential(credential):
            return None
        return match.group("keep") + _marker(kind)

    for kind, pattern in _TOKEN_PATTERNS:
        text, n = _sub(pattern, text, lambda m, kind=kind: token(m, kind))
        total += n
    text, n = _aws_secrets_beside_ids(text)
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
