"""Offline Anthropic price table: estimated cost of one API request from its token counts.

Offline on purpose: processing must be reproducible and must not depend on a network call.
Costs are estimates (transcripts under-report some token fields), so the raw token counts are
stored beside the cost and a price change only needs a processor version bump.
An unknown model has no cost (None): a zero would silently understate spending.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

PER_MILLION = 1_000_000


@dataclass(frozen=True)
class Price:
    """USD per million tokens for one model family."""

    input: float
    cache_write_5m: float
    cache_write_1h: float
    cache_read: float
    output: float


OPUS_4 = Price(input=15.0, cache_write_5m=18.75, cache_write_1h=30.0, cache_read=1.50, output=75.0)
OPUS_4_5 = Price(input=5.0, cache_write_5m=6.25, cache_write_1h=10.0, cache_read=0.50, output=25.0)
SONNET_4 = Price(input=3.0, cache_write_5m=3.75, cache_write_1h=6.0, cache_read=0.30, output=15.0)
HAIKU_4_5 = Price(input=1.0, cache_write_5m=1.25, cache_write_1h=2.0, cache_read=0.10, output=5.0)
HAIKU_3_5 = Price(input=0.80, cache_write_5m=1.0, cache_write_1h=1.6, cache_read=0.08, output=4.0)

# Normalised model id -> price. Opus 4.5 and every later Opus 4.x is matched by `_OPUS_4_X`.
PRICES: dict[str, Price] = {
    "claude-opus-4": OPUS_4,
    "claude-opus-4-0": OPUS_4,
    "claude-opus-4-1": OPUS_4,
    "claude-sonnet-4": SONNET_4,
    "claude-sonnet-4-0": SONNET_4,
    "claude-sonnet-4-5": SONNET_4,
    "claude-haiku-4-5": HAIKU_4_5,
    "claude-3-5-haiku": HAIKU_3_5,
}
_OPUS_4_X = re.compile(r"claude-opus-4-(\d+)")

# Provider wrappers around the Anthropic id: Bedrock (`us.anthropic.…-v1:0`), Vertex
# (`…@20250514`), gateways (`anthropic/…`, `openrouter/anthropic/…`), context tags (`…[1m]`).
_PATH_PREFIX = re.compile(r"^.*/")
_BEDROCK_PREFIX = re.compile(r"^(?:[a-z]{2,6}\.)?anthropic\.")
_BEDROCK_SUFFIX = re.compile(r"-v\d+(?::\d+)?$")
_VERTEX_SUFFIX = re.compile(r"@.*$")
_BRACKET_SUFFIX = re.compile(r"\[[^\]]*\]$")
_DATE_SUFFIX = re.compile(r"-(?:\d{8}|latest)$")
_DOTTED_VERSION = re.compile(r"(?<=\d)\.(?=\d)")


def normalize_model(model: str) -> str:
    """The bare Anthropic model id (`claude-sonnet-4`) behind a dated or provider-wrapped id,
    so one price entry covers every spelling of a model."""
    name = model.strip().lower()
    name = _PATH_PREFIX.sub("", name)
    name = _BEDROCK_PREFIX.sub("", name)
    name = _VERTEX_SUFFIX.sub("", name)
    name = _BRACKET_SUFFIX.sub("", name)
    name = _BEDROCK_SUFFIX.sub("", name)
    name = _DATE_SUFFIX.sub("", name)
    return _DOTTED_VERSION.sub("-", name)


@lru_cache(maxsize=512)
def price_for(model: str | None) -> Price | None:
    """The price of a model, or None when it is not in the table (cached: a transcript names
    a handful of models over thousands of lines)."""
    if not isinstance(model, str) or not model.strip():
        return None
    name = normalize_model(model)
    price = PRICES.get(name)
    if price is not None:
        return price
    match = _OPUS_4_X.fullmatch(name)
    if match and int(match.group(1)) >= 5:
        return OPUS_4_5
    return None


def cost_usd(
    model: str | None,
    input_tokens: int,
    output_tokens: int,
    cache_write_5m_tokens: int = 0,
    cache_write_1h_tokens: int = 0,
    cache_read_tokens: int = 0,
) -> float | None:
    """Estimated USD cost of one request, or None for a model without a known price."""
    price = price_for(model)
    if price is None:
        return None
    total = (
        input_tokens * price.input
        + output_tokens * price.output
        + cache_write_5m_tokens * price.cache_write_5m
        + cache_write_1h_tokens * price.cache_write_1h
        + cache_read_tokens * price.cache_read
    )
    return total / PER_MILLION
