"""Offline price table: costs worked out by hand from the published per-million prices."""

from __future__ import annotations

import pytest

from processors.pricing import cost_usd, normalize_model, price_for


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("claude-sonnet-4-20250514", "claude-sonnet-4"),
        ("claude-sonnet-4-5-20250929", "claude-sonnet-4-5"),
        ("us.anthropic.claude-sonnet-4-20250514-v1:0", "claude-sonnet-4"),
        ("global.anthropic.claude-opus-4-5-20251101-v1:0", "claude-opus-4-5"),
        ("anthropic.claude-3-5-haiku-20241022-v1:0", "claude-3-5-haiku"),
        ("claude-opus-4-1@20250805", "claude-opus-4-1"),
        ("anthropic/claude-sonnet-4.5", "claude-sonnet-4-5"),
        ("claude-sonnet-4-5[1m]", "claude-sonnet-4-5"),
        ("  Claude-Haiku-4-5-20251001 ", "claude-haiku-4-5"),
        ("claude-3-5-haiku-latest", "claude-3-5-haiku"),
    ],
)
def test_normalize_model_strips_dates_and_provider_wrappers(model: str, expected: str) -> None:
    assert normalize_model(model) == expected


def test_known_prices_by_hand() -> None:
    million = 1_000_000
    # Sonnet 4: 1M input = $3, 1M output = $15.
    assert cost_usd("claude-sonnet-4-20250514", million, million) == pytest.approx(18.0)
    # Opus 4.1: 1000 in, 500 out, 2000 5m writes, 100 1h writes, 10000 reads.
    expected = (1000 * 15 + 500 * 75 + 2000 * 18.75 + 100 * 30 + 10000 * 1.5) / million
    assert cost_usd("claude-opus-4-1-20250805", 1000, 500, 2000, 100, 10000) == pytest.approx(
        expected
    )
    assert expected == pytest.approx(0.108)
    # Opus 4.5 and later 4.x are the cheaper tier.
    for opus in ("claude-opus-4-5-20251101", "claude-opus-4-6", "us.anthropic.claude-opus-4-7"):
        assert cost_usd(opus, 0, million) == pytest.approx(25.0)
    assert cost_usd("claude-opus-4-20250514", 0, 0, 0, 0, million) == pytest.approx(1.50)
    # Haiku 4.5: 1M 1h writes = $2; Haiku 3.5: 1M 5m writes = $1, 1M reads = $0.08.
    assert cost_usd("claude-haiku-4-5-20251001", 0, 0, 0, million) == pytest.approx(2.0)
    assert cost_usd("claude-3-5-haiku-20241022", 0, 0, million, 0, million) == pytest.approx(1.08)
    assert cost_usd("claude-sonnet-4-5", 0, 0) == 0.0


@pytest.mark.parametrize(
    "model",
    [
        None,
        "",
        "<synthetic>",
        "gpt-4o",
        "claude-3-opus-20240229",
        "claude-opus-3",
        "claude-opus-4-x",
    ],
)
def test_unknown_models_have_no_price(model: str | None) -> None:
    assert price_for(model) is None
    assert cost_usd(model, 1000, 1000) is None
