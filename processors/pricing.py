"""What an API request costs: Anthropic's published per-model prices, and the SQL that applies
them to the token counts stored by `usage`.

Costs are computed by SQL views, not stored: the usage tables keep the raw token counts and
the model's price id (`price_model`), and `usage_requests` / `usage_sessions` price them
through `usage_prices` (this module's table, overridden row by row by the operator's
`usage_price_overrides`). A new or corrected price therefore applies to every request at the
next query and reprocesses nothing. `cost_usd` below is the same rule in Python, for tests
and for callers without a database.

Prices are USD per million tokens, from Anthropic's published list. A cache write is priced at
the 5-minute rate unless the request reports the 5m/1h split. Requests to a model with a
long-context tier (1M-token context) whose input (input plus cache writes and reads) exceeds
200k tokens are billed whole at the long-context rates, as Anthropic documents ("requests that
exceed 200K input tokens are automatically charged at premium long context rates"); ccusage
instead charges only the tokens above 200k at the higher rate, so its figure for such a
request is lower. An unknown model has no cost (NULL): a zero would silently understate
spending.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

PER_MILLION = 1_000_000
LONG_CONTEXT_TOKENS = 200_000
# A cache write costs these multiples of the input rate, a cache read this fraction: the rule
# of every current model, and the defaults of an override that leaves its cache rates out.
WRITE_5M, WRITE_1H, READ = 1.25, 2.0, 0.1


@dataclass(frozen=True)
class Rates:
    """USD per million tokens."""

    input: float
    cache_write_5m: float
    cache_write_1h: float
    cache_read: float
    output: float

    @classmethod
    def of(cls, input: float, output: float, write_5m: float | None = None) -> Rates:
        """The usual shape: cache rates as multiples of the input rate."""
        return cls(
            input,
            write_5m if write_5m is not None else input * WRITE_5M,
            input * WRITE_1H,
            input * READ,
            output,
        )


@dataclass(frozen=True)
class Price:
    """A model's rates, and its long-context rates when it has a 1M-token context."""

    base: Rates
    long_context: Rates | None = None


OPUS_5 = Price(Rates.of(5.0, 25.0))  # also Opus 4.5 to 4.8
OPUS_4 = Price(Rates.of(15.0, 75.0))  # Opus 4 and 4.1
SONNET_5 = Price(Rates.of(2.0, 10.0))
SONNET_4 = Price(Rates.of(3.0, 15.0), Rates.of(6.0, 22.5))  # 4 and 4.5 with the 1M context
SONNET = Price(Rates.of(3.0, 15.0))  # 4.6 (1M context at the standard rates), 3.7, 3.5, 3
HAIKU_4_5 = Price(Rates.of(1.0, 5.0))
HAIKU_3_5 = Price(Rates.of(0.80, 4.0))
HAIKU_3 = Price(Rates(0.25, 0.30, 0.50, 0.03, 1.25))  # its cache rates break the usual rule
OPUS_3 = Price(Rates.of(15.0, 75.0))
FABLE_5 = Price(Rates.of(10.0, 50.0))  # also Mythos 5
FABLE_5_1 = Price(Rates(10.0, 12.5, 20.0, 0.25, 50.0))  # also Mythos 5.1

# Normalised model id (see normalize_model) -> price: every model on Anthropic's published
# list, with the ids it has been served under (`claude-4-opus` was an early spelling).
PRICES: dict[str, Price] = {
    "claude-opus-5": OPUS_5,
    "claude-opus-4-8": OPUS_5,
    "claude-opus-4-7": OPUS_5,
    "claude-opus-4-6": OPUS_5,
    "claude-opus-4-5": OPUS_5,
    "claude-opus-4-1": OPUS_4,
    "claude-opus-4": OPUS_4,
    "claude-opus-4-0": OPUS_4,
    "claude-4-opus": OPUS_4,
    "claude-sonnet-5": SONNET_5,
    "claude-sonnet-4-6": SONNET,
    "claude-sonnet-4-5": SONNET_4,
    "claude-sonnet-4": SONNET_4,
    "claude-sonnet-4-0": SONNET_4,
    "claude-4-sonnet": SONNET_4,
    "claude-3-7-sonnet": SONNET,
    "claude-3-5-sonnet": SONNET,
    "claude-3-sonnet": SONNET,
    "claude-haiku-4-5": HAIKU_4_5,
    "claude-3-5-haiku": HAIKU_3_5,
    "claude-3-haiku": HAIKU_3,
    "claude-3-opus": OPUS_3,
    "claude-fable-5": FABLE_5,
    "claude-mythos-5": FABLE_5,
    "claude-mythos-5-preview": FABLE_5,
    "claude-fable-5-1": FABLE_5_1,
    "claude-mythos-5-1": FABLE_5_1,
}

# Provider wrappers around the Anthropic id: Bedrock (`us.anthropic.…-v1:0`), Vertex
# (`…@20250514`), gateways (`anthropic/…`, `openrouter/anthropic/…`), context tags (`…[1m]`),
# dates (`-20250514`) and aliases (`-latest`).
_PATH_PREFIX = re.compile(r"^.*/")
_BEDROCK_PREFIX = re.compile(r"^(?:[a-z]{2,6}\.)?anthropic\.")
_BEDROCK_SUFFIX = re.compile(r"-v\d+(?::\d+)?$")
_VERTEX_SUFFIX = re.compile(r"@.*$")
_BRACKET_SUFFIX = re.compile(r"\[[^\]]*\]$")
_DATE_SUFFIX = re.compile(r"-(?:\d{8}|latest)$")
_DOTTED_VERSION = re.compile(r"(?<=\d)\.(?=\d)")


@lru_cache(maxsize=1024)
def normalize_model(model: str) -> str:
    """The bare Anthropic model id (`claude-sonnet-4`) behind a dated or provider-wrapped id,
    so one price covers every spelling of a model. Stored as `price_model`: the id an
    operator's price override names. (Cached: a transcript names a handful of models.)"""
    name = model.strip().lower()
    name = _PATH_PREFIX.sub("", name)
    name = _BEDROCK_PREFIX.sub("", name)
    name = _VERTEX_SUFFIX.sub("", name)
    name = _BRACKET_SUFFIX.sub("", name)
    name = _BEDROCK_SUFFIX.sub("", name)
    name = _DATE_SUFFIX.sub("", name)
    return _DOTTED_VERSION.sub("-", name)


_LATER_OPUS_4 = re.compile(r"claude-opus-4-(\d+)")


def price_model(model: str | None) -> str | None:
    """The id a request is priced under, or None without a model. An Opus 4.x later than the
    list is priced as Opus 4.5, the tier every later 4.x has had so far."""
    if not isinstance(model, str) or not model.strip():
        return None
    name = normalize_model(model)
    if name not in PRICES:
        later = _LATER_OPUS_4.fullmatch(name)
        if later is not None and int(later.group(1)) >= 5:
            return "claude-opus-4-5"
    return name


def price_for(model: str | None) -> Price | None:
    """The published price of a model, or None when it is not on the list."""
    key = price_model(model)
    return PRICES.get(key) if key is not None else None


def cost_usd(
    model: str | None,
    input_tokens: int | None,
    output_tokens: int | None,
    cache_write_5m_tokens: int | None = 0,
    cache_write_1h_tokens: int | None = 0,
    cache_read_tokens: int | None = 0,
) -> float | None:
    """Estimated USD cost of one request with the published prices (the views' rule), or
    None for a model without a price or a request without any token count."""
    price = price_for(model)
    counts = (
        input_tokens,
        output_tokens,
        cache_write_5m_tokens,
        cache_write_1h_tokens,
        cache_read_tokens,
    )
    if price is None or all(n is None for n in counts):
        return None
    n_in, n_out, n_5m, n_1h, n_read = (n or 0 for n in counts)
    long = price.long_context is not None and n_in + n_5m + n_1h + n_read > LONG_CONTEXT_TOKENS
    rates = price.long_context if long and price.long_context is not None else price.base
    return (
        n_in * rates.input
        + n_out * rates.output
        + n_5m * rates.cache_write_5m
        + n_1h * rates.cache_write_1h
        + n_read * rates.cache_read
    ) / PER_MILLION


# --- SQL --------------------------------------------------------------------------------------

PRICE_OVERRIDES_DDL = """CREATE TABLE IF NOT EXISTS usage_price_overrides (
    model VARCHAR PRIMARY KEY,
    input_per_mtok DOUBLE NOT NULL,
    output_per_mtok DOUBLE NOT NULL,
    cache_write_5m_per_mtok DOUBLE,
    cache_write_1h_per_mtok DOUBLE,
    cache_read_per_mtok DOUBLE,
    long_input_per_mtok DOUBLE,
    long_output_per_mtok DOUBLE,
    note VARCHAR
)"""

_RATE_COLUMNS = ("input", "output", "cache_write_5m", "cache_write_1h", "cache_read")


def _rates_sql(rates: Rates | None) -> list[str]:
    if rates is None:
        return ["CAST(NULL AS DOUBLE PRECISION)"] * len(_RATE_COLUMNS)
    return [repr(float(getattr(rates, name))) for name in _RATE_COLUMNS]


def _builtin_rows() -> str:
    rows = []
    for model, price in sorted(PRICES.items()):
        values = [f"'{model}'", *_rates_sql(price.base), *_rates_sql(price.long_context)]
        rows.append(f"({', '.join(values)})")
    return ",\n        ".join(rows)


_COLUMNS = [f"{name}_per_mtok" for name in _RATE_COLUMNS]
_LONG_COLUMNS = [f"long_{name}_per_mtok" for name in _RATE_COLUMNS]

# One row per model: the operator's override, else the published price. An override's missing
# cache rates follow the usual multiples of its input rate (long-context ones of its
# long-context input rate); without a long-context input rate the model has no such tier.
PRICES_VIEW = f"""CREATE OR REPLACE VIEW usage_prices AS
SELECT model, {", ".join(_COLUMNS)}, {", ".join(_LONG_COLUMNS)}, 'override' AS source, note
FROM (
    SELECT model, input_per_mtok, output_per_mtok,
        coalesce(cache_write_5m_per_mtok, input_per_mtok * {WRITE_5M}) AS cache_write_5m_per_mtok,
        coalesce(cache_write_1h_per_mtok, input_per_mtok * {WRITE_1H}) AS cache_write_1h_per_mtok,
        coalesce(cache_read_per_mtok, input_per_mtok * {READ}) AS cache_read_per_mtok,
        long_input_per_mtok,
        CASE WHEN long_input_per_mtok IS NOT NULL
            THEN coalesce(long_output_per_mtok, output_per_mtok) END AS long_output_per_mtok,
        long_input_per_mtok * {WRITE_5M} AS long_cache_write_5m_per_mtok,
        long_input_per_mtok * {WRITE_1H} AS long_cache_write_1h_per_mtok,
        long_input_per_mtok * {READ} AS long_cache_read_per_mtok,
        note
    FROM usage_price_overrides
) overrides
UNION ALL
SELECT model, {", ".join(_COLUMNS)}, {", ".join(_LONG_COLUMNS)}, 'published' AS source,
    NULL AS note
FROM (VALUES
        {_builtin_rows()}
    ) AS published(model, {", ".join(_COLUMNS)}, {", ".join(_LONG_COLUMNS)})
WHERE model NOT IN (SELECT model FROM usage_price_overrides)"""


def cost_sql(r: str, p: str) -> str:
    """The SQL cost of request row `r` priced by `usage_prices` row `p` (NULL without a price
    or without any token count): `cost_usd` above, in SQL."""
    n_in = f"coalesce({r}.input_tokens, 0)"
    n_out = f"coalesce({r}.output_tokens, 0)"
    split = (
        f"({r}.cache_creation_5m_input_tokens IS NOT NULL "
        f"OR {r}.cache_creation_1h_input_tokens IS NOT NULL)"
    )
    n_5m = (
        f"(CASE WHEN {split} THEN coalesce({r}.cache_creation_5m_input_tokens, 0) "
        f"ELSE coalesce({r}.cache_creation_input_tokens, 0) END)"
    )
    n_1h = f"coalesce({r}.cache_creation_1h_input_tokens, 0)"
    n_read = f"coalesce({r}.cache_read_input_tokens, 0)"
    long = (
        f"({p}.long_input_per_mtok IS NOT NULL "
        f"AND {n_in} + {n_5m} + {n_1h} + {n_read} > {LONG_CONTEXT_TOKENS})"
    )

    def rate(name: str) -> str:
        return f"(CASE WHEN {long} THEN {p}.long_{name}_per_mtok ELSE {p}.{name}_per_mtok END)"

    no_tokens = " AND ".join(
        f"{r}.{c} IS NULL"
        for c in (
            "input_tokens",
            "output_tokens",
            "cache_creation_input_tokens",
            "cache_read_input_tokens",
        )
    )
    total = (
        f"{n_in} * {rate('input')} + {n_out} * {rate('output')} "
        f"+ {n_5m} * {rate('cache_write_5m')} + {n_1h} * {rate('cache_write_1h')} "
        f"+ {n_read} * {rate('cache_read')}"
    )
    return f"CASE WHEN {p}.model IS NULL OR ({no_tokens}) THEN NULL ELSE ({total}) / 1e6 END"
