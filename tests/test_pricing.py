"""Prices: costs worked out by hand from Anthropic's published per-million prices, the SQL
views agreeing with the Python rule, and an operator's overrides applied without reprocessing."""

from __future__ import annotations

import duckdb
import pytest
from hypothesis import given
from hypothesis import strategies as st

from processors.pricing import PRICES, cost_usd, normalize_model, price_for, price_model
from processors.usage import UsageProcessor

MILLION = 1_000_000


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


# (model as written in transcripts, input $, output $ per million tokens)
PUBLISHED = [
    ("claude-opus-5", 5, 25),
    ("claude-opus-4-8", 5, 25),
    ("claude-opus-4-7-20260101", 5, 25),
    ("claude-opus-4-6", 5, 25),
    ("claude-4-opus-20250514", 15, 75),
    ("claude-4-sonnet-20250514", 3, 15),
    ("claude-sonnet-5", 2, 10),
    ("claude-fable-5", 10, 50),
    ("claude-mythos-5-1", 10, 50),
    ("claude-opus-4-5-20251101", 5, 25),
    ("claude-opus-4-1-20250805", 15, 75),
    ("claude-opus-4-20250514", 15, 75),
    ("claude-opus-4-0", 15, 75),
    ("claude-sonnet-4-6", 3, 15),
    ("claude-sonnet-4-5-20250929", 3, 15),
    ("claude-sonnet-4-20250514", 3, 15),
    ("claude-3-7-sonnet-20250219", 3, 15),
    ("claude-3-7-sonnet-latest", 3, 15),
    ("claude-3-5-sonnet-20241022", 3, 15),
    ("claude-3-5-sonnet-20240620", 3, 15),
    ("claude-3-5-sonnet-latest", 3, 15),
    ("claude-3-sonnet-20240229", 3, 15),
    ("claude-haiku-4-5-20251001", 1, 5),
    ("claude-3-5-haiku-20241022", 0.8, 4),
    ("claude-3-5-haiku-latest", 0.8, 4),
    ("claude-3-haiku-20240307", 0.25, 1.25),
    ("claude-3-opus-20240229", 15, 75),
    ("claude-3-opus-latest", 15, 75),
]


@pytest.mark.parametrize(("model", "input_rate", "output_rate"), PUBLISHED)
def test_every_published_model_is_priced(model: str, input_rate: float, output_rate: float) -> None:
    # (100k input tokens: below every long-context threshold)
    assert cost_usd(model, 100_000, 0) == pytest.approx(input_rate / 10)
    assert cost_usd(model, 0, MILLION) == pytest.approx(output_rate)


def test_cache_rates_by_hand() -> None:
    # Opus 4.1: 1000 in, 500 out, 2000 5m writes, 100 1h writes, 10000 reads.
    expected = (1000 * 15 + 500 * 75 + 2000 * 18.75 + 100 * 30 + 10000 * 1.5) / MILLION
    assert cost_usd("claude-opus-4-1-20250805", 1000, 500, 2000, 100, 10000) == pytest.approx(
        expected
    )
    assert expected == pytest.approx(0.108)
    # Opus 4.5 and later 4.x are the cheaper tier.
    for opus in ("claude-opus-4-5-20251101", "claude-opus-4-6", "us.anthropic.claude-opus-4-9"):
        assert cost_usd(opus, 0, MILLION) == pytest.approx(25.0)
    assert price_model("claude-opus-4-9") == "claude-opus-4-5"
    assert cost_usd("claude-opus-4-20250514", 0, 0, 0, 0, MILLION) == pytest.approx(1.50)
    # Haiku 4.5: 1M 1h writes = $2; Haiku 3.5: 1M 5m writes = $1, 1M reads = $0.08.
    assert cost_usd("claude-haiku-4-5-20251001", 0, 0, 0, MILLION) == pytest.approx(2.0)
    assert cost_usd("claude-3-5-haiku-20241022", 0, 0, MILLION, 0, MILLION) == pytest.approx(1.08)
    # Haiku 3's cache rates are not the usual multiples: $0.30 writes, $0.03 reads.
    assert cost_usd("claude-3-haiku-20240307", 0, 0, MILLION, 0, MILLION) == pytest.approx(0.33)
    assert cost_usd("claude-sonnet-4-5", 0, 0) == 0.0


def test_long_context_bills_the_whole_request_at_the_higher_rates() -> None:
    """Above 200k input tokens (cache writes and reads included) a 1M-context model bills
    every token of the request at its long-context rates; at 200k exactly it does not."""
    assert cost_usd("claude-sonnet-4-5", MILLION, 0) == pytest.approx(6.00)  # ccusage: 5.40
    assert cost_usd("claude-sonnet-4-20250514", 200_000, MILLION) == pytest.approx(0.6 + 15)
    assert cost_usd("claude-sonnet-4-5", 200_001, MILLION) == pytest.approx(
        200_001 * 6 / MILLION + 22.5
    )
    # the input that counts includes cache reads and writes
    assert cost_usd("claude-sonnet-4", 1000, 0, 0, 0, 250_000) == pytest.approx(
        (1000 * 6 + 250_000 * 0.6) / MILLION
    )
    assert cost_usd("claude-sonnet-4-5", 0, 0, 150_000, 60_000, 0) == pytest.approx(
        (150_000 * 7.5 + 60_000 * 12) / MILLION
    )
    # models without a long-context tier (4.6 has a 1M context at the standard rates)
    assert cost_usd("claude-sonnet-4-6", MILLION, MILLION) == pytest.approx(3 + 15)
    assert cost_usd("claude-opus-4-6", MILLION, MILLION) == pytest.approx(5 + 25)
    assert cost_usd("claude-opus-4-1", MILLION, 0) == pytest.approx(15)
    assert cost_usd("claude-haiku-4-5", MILLION, 0) == pytest.approx(1)


@pytest.mark.parametrize(
    "model",
    [None, "", "<synthetic>", "gpt-4o", "claude-opus-3", "claude-opus-4-x", "claude-opus-4-4"],
)
def test_unknown_models_have_no_price(model: str | None) -> None:
    assert price_for(model) is None
    assert cost_usd(model, 1000, 1000) is None


# --- the SQL views ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def con() -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()
    processor = UsageProcessor()
    for table in processor.tables:
        con.execute(table.ddl)
    for view in processor.views:
        con.execute(view)
    return con


def _request(
    con: duckdb.DuckDBPyConnection,
    model: str | None,
    tokens: tuple[int | None, int | None, int | None, int | None, int | None, int | None],
    *,
    session: str = "alice/s.jsonl",
    message: str = "msg_1",
) -> None:
    con.execute(
        "INSERT INTO usage_requests_raw (session_file, username, message_id, request_id, model, "
        "price_model, input_tokens, output_tokens, cache_creation_input_tokens, "
        "cache_read_input_tokens, cache_creation_5m_input_tokens, cache_creation_1h_input_tokens) "
        "VALUES (?, 'alice', ?, 'req', ?, ?, ?, ?, ?, ?, ?, ?)",
        [session, message, model, price_model(model), *tokens],
    )


def _costs(con: duckdb.DuckDBPyConnection) -> list[float | None]:
    rows = con.execute("SELECT cost_usd FROM usage_requests ORDER BY message_id").fetchall()
    return [r[0] for r in rows]


tokens = st.integers(min_value=0, max_value=2_000_000) | st.none()


@given(
    model=st.sampled_from([*sorted(PRICES), "claude-opus-4-9", "gpt-4o", "claude-3-opus-latest"]),
    n_in=tokens,
    n_out=tokens,
    n_read=tokens,
    split=st.none() | st.tuples(tokens, tokens),
    write=tokens,
)
def test_the_views_price_as_the_python_rule(
    con: duckdb.DuckDBPyConnection,
    model: str,
    n_in: int | None,
    n_out: int | None,
    n_read: int | None,
    split: tuple[int | None, int | None] | None,
    write: int | None,
) -> None:
    con.execute("BEGIN")
    try:
        if split is None:
            _request(con, model, (n_in, n_out, write, n_read, None, None))
            expected = cost_usd(model, n_in, n_out, write, 0, n_read)
            if all(n is None for n in (n_in, n_out, write, n_read)):
                expected = None
        else:
            w5, w1 = split
            _request(con, model, (n_in, n_out, write, n_read, w5, w1))
            if w5 is None and w1 is None:  # no split reported: every write at the 5m rate
                w5 = write
            expected = cost_usd(model, n_in, n_out, w5 or 0, w1 or 0, n_read)
            if all(n is None for n in (n_in, n_out, write, n_read)):
                expected = None
        (cost,) = _costs(con)
        assert cost == (pytest.approx(expected, rel=1e-12) if expected is not None else None)
    finally:
        con.execute("ROLLBACK")


def test_a_partial_cost_says_so(con: duckdb.DuckDBPyConnection) -> None:
    con.execute("BEGIN")
    try:
        con.execute(
            "INSERT INTO usage_sessions_raw (session_file, username) VALUES (?, 'alice')",
            ["alice/s.jsonl"],
        )
        con.execute(
            "INSERT INTO usage_sessions_raw (session_file, username) VALUES (?, 'alice')",
            ["alice/empty.jsonl"],
        )
        _request(con, "claude-sonnet-4-5", (1000, 200, 0, 0, None, None), message="m1")
        for n, model in enumerate(("gpt-4o", "mystery-model", "claude-opus-3")):
            _request(con, model, (1000, 200, 0, 0, None, None), message=f"m{n + 2}")
        rows = con.execute(
            "SELECT session_file, cost_usd, unpriced_requests FROM usage_sessions ORDER BY 1"
        ).fetchall()
        assert rows == [
            ("alice/empty.jsonl", None, 0),
            ("alice/s.jsonl", pytest.approx((1000 * 3 + 200 * 15) / MILLION), 3),
        ]
    finally:
        con.execute("ROLLBACK")


def test_an_operator_override_applies_at_once_and_reprocesses_nothing(
    con: duckdb.DuckDBPyConnection,
) -> None:
    con.execute("BEGIN")
    try:
        _request(con, "gateway/Acme-Large", (MILLION, MILLION, 0, 0, None, None), message="m1")
        _request(con, "claude-sonnet-4-5-20250929", (100_000, 0, 0, 0, None, None), message="m2")
        assert _costs(con) == [None, pytest.approx(0.3)]
        assert price_model("gateway/Acme-Large") == "acme-large"  # the id an override names
        # a model the list lacks, by the id `price_model` shows; and a published one replaced
        con.execute(
            "INSERT INTO usage_price_overrides (model, input_per_mtok, output_per_mtok, note) "
            "VALUES ('acme-large', 2, 8, 'contract 2026'), ('claude-sonnet-4-5', 2.5, 12, NULL)"
        )
        assert _costs(con) == [pytest.approx(10.0), pytest.approx(0.25)]
        prices = dict(
            con.execute(
                "SELECT model, source FROM usage_prices WHERE model LIKE '%sonnet-4-5' "
                "OR model = 'acme-large'"
            ).fetchall()
        )
        assert prices == {"acme-large": "override", "claude-sonnet-4-5": "override"}
        # an override's cache rates default to the usual multiples of its input rate
        (row,) = con.execute(
            "SELECT cache_write_5m_per_mtok, cache_write_1h_per_mtok, cache_read_per_mtok, "
            "long_input_per_mtok FROM usage_prices WHERE model = 'acme-large'"
        ).fetchall()
        assert row == (pytest.approx(2.5), pytest.approx(4.0), pytest.approx(0.2), None)
    finally:
        con.execute("ROLLBACK")
