"""Report views of the `usage` processor: usage per day and month, 5-hour billing blocks, and
tool use, as SQL anyone can query (and the `session-pipeline report` command runs).

Every figure counts a request once across files (resumed sessions copy earlier lines into a
new file): the rows are those of `usage_requests_unique`, found by `UNIQUE_REQUESTS` below
without ranking every request. `usage_requests_unique` ranks all requests with a window
function (1.2 s for 2M requests here) to keep one copy of the few that have several; here a
hash aggregate finds the keys with copies (0.2 s), and only their copies are ranked, by the
same order, and the losing copies left out. The rows are the same (tested).

Days, months and blocks are cut in UTC in the views; the report's SQL takes a time zone.
Timestamps are converted explicitly (`timezone(zone, t)`) and block arithmetic is done on
epoch microseconds, so nothing depends on the connection's `TimeZone` setting.

The SQL runs on DuckDB and on PostgreSQL (state/postgres_backend.py): it keeps to what both
parse (aliased subqueries, NOT EXISTS, grouping by position, `array_agg`, `COLLATE "C"` where
text order decides a result, so a PostgreSQL database's collation cannot change it); the few
DuckDB functions it uses (`epoch_us`, `make_timestamptz(µs)`, `strftime`, `round(DOUBLE, n)`)
are defined there with DuckDB's results, and its integer division `//` is PostgreSQL's `/` on
integers (`dialect`).
"""

from __future__ import annotations

from processors.pricing import LONG_CONTEXT_TOKENS

HOUR_US = 3_600_000_000
BLOCK_HOURS = 5
BLOCK_US = BLOCK_HOURS * HOUR_US

# --- retention -------------------------------------------------------------------------------
#
# `USAGE_EVENTS_RETENTION_DAYS` (flows/retention.py) deletes requests and events older than a
# cutoff. Before it does, their figures go to `usage_rollup_archive`: one row per 15-minute
# bucket (UTC), session file, model and context tier, with token sums split as prices need
# them, so the archived rows are priced at query time like live ones and cut into days and
# months in any time zone (every zone's offset is a multiple of 15 minutes). The cutoff is
# stored (`usage_retention`) and only moves forward: live rows older than it are left out of
# every report view (a processor version bump that reads old files again cannot count them
# twice), and the end of each usage run deletes them again.
ARCHIVE_BUCKET_US = 15 * 60 * 1_000_000

RETENTION_DDL = """CREATE TABLE IF NOT EXISTS usage_retention (
    id INTEGER PRIMARY KEY,
    cutoff TIMESTAMPTZ NOT NULL,
    days INTEGER,
    applied_at TIMESTAMPTZ NOT NULL
)"""

ARCHIVE_DDL = """CREATE TABLE IF NOT EXISTS usage_rollup_archive (
    bucket_start TIMESTAMPTZ NOT NULL,
    session_file VARCHAR,
    username VARCHAR,
    session_id VARCHAR,
    model VARCHAR,
    price_model VARCHAR,
    long_context BOOLEAN,
    requests BIGINT,
    tokenless_requests BIGINT,
    input_tokens BIGINT,
    output_tokens BIGINT,
    cache_creation_input_tokens BIGINT,
    cache_read_input_tokens BIGINT,
    cache_write_5m_tokens BIGINT,
    cache_write_1h_tokens BIGINT,
    archived_at TIMESTAMPTZ
)"""

CUTOFF = "(SELECT max(cutoff) FROM usage_retention)"


def live(column: str = "occurred_at") -> str:
    """SQL: the row at `column` is not older than the retention cutoff (a row without a time,
    or any row while nothing was pruned, is live)."""
    return f"NOT coalesce({column} < {CUTOFF}, false)"


# The order `usage_requests_unique` keeps a request's copies in (processors/usage.py): the
# first is kept.
_COPY_ORDER = (
    "CASE WHEN stop_reason IS NULL THEN 1 ELSE 0 END, output_tokens DESC NULLS LAST, "
    'session_file COLLATE "C"'
)

# The copies of a request that are not kept, among the requests whose (message_id, request_id)
# `{keys}` selects: ranked by _COPY_ORDER, all but the first.
_LOSING_COPIES = f"""SELECT session_file, message_id, request_id FROM (
    SELECT session_file, message_id, request_id,
        row_number() OVER (PARTITION BY message_id, request_id ORDER BY {_COPY_ORDER})
            AS copy_rank
    FROM usage_requests_raw r
    WHERE {{keys}}
) ranked WHERE copy_rank > 1"""

# `usage_request_copies`: the copies not kept, kept up to date by each usage commit for the
# requests of the sessions it writes (flows/request_copies.py). Filled from every request the
# first time (a state from before it; only keys with several rows are ranked).
COPIES_DDL = "CREATE TABLE IF NOT EXISTS usage_request_copies AS " + _LOSING_COPIES.format(
    keys="EXISTS (SELECT 1 FROM (SELECT message_id, request_id FROM usage_requests_raw "
    "GROUP BY message_id, request_id HAVING count(*) > 1) copied "
    "WHERE r.message_id IS NOT DISTINCT FROM copied.message_id "
    "AND r.request_id IS NOT DISTINCT FROM copied.request_id)"
)
# The same for the keys in the temporary table `{touched}` (a commit's): `{{touched}}` filled in
# by flows/request_copies.py.
COPIES_OF_TOUCHED = _LOSING_COPIES.format(
    keys="EXISTS (SELECT 1 FROM {touched} t WHERE r.message_id IS NOT DISTINCT FROM t.message_id "
    "AND r.request_id IS NOT DISTINCT FROM t.request_id)"
)


def same_request(a: str, b: str) -> str:
    """SQL: rows `a` and `b` have the same (message_id, request_id), NULLs equal, written as
    equalities PostgreSQL can hash or look up in an index (`IS NOT DISTINCT FROM` it can only
    compare row by row); DuckDB hashes either."""
    return " AND ".join(
        [
            *(f"coalesce({a}.{c}, '') = coalesce({b}.{c}, '')" for c in _KEY),
            *(f"({a}.{c} IS NULL) = ({b}.{c} IS NULL)" for c in _KEY),
        ]
    )


_KEY = ("message_id", "request_id")
# COPIES_OF_TOUCHED as PostgreSQL runs it well: each touched key looked up by the index of
# usage_requests_raw on the same coalesced expressions (state/postgres_backend.py).
COPIES_OF_TOUCHED_BY_INDEX = _LOSING_COPIES.format(
    keys=f"EXISTS (SELECT 1 FROM {{touched}} t WHERE {same_request('r', 't')})"
)

# The rows of usage_requests_unique (priced, every column of usage_requests) not older than the
# retention cutoff.
NOT_A_LOSING_COPY = """NOT EXISTS (
        SELECT 1 FROM usage_request_copies losing
        WHERE r.session_file = losing.session_file
            AND r.message_id IS NOT DISTINCT FROM losing.message_id
            AND r.request_id IS NOT DISTINCT FROM losing.request_id)"""
UNIQUE_REQUESTS = f"""(
    SELECT r.* FROM usage_requests r
    WHERE {NOT_A_LOSING_COPY}
        AND {live("r.occurred_at")}
)"""

TOKEN_COLUMNS = (
    "input_tokens",
    "output_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
)


def sql_string(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def unique_requests(where: str = "") -> str:
    """The rows of usage_requests_unique, those matching `where` (SQL on its columns)."""
    return f"(SELECT * FROM {UNIQUE_REQUESTS} requests WHERE {where})" if where else UNIQUE_REQUESTS


def _period(grain: str, zone: str) -> str:
    if grain not in ("day", "month"):
        raise ValueError(f"grain must be day or month, not {grain!r}")
    local = f"timezone({sql_string(zone)}, occurred_at)"
    return f"CAST(date_trunc('month', {local}) AS DATE)" if grain == "month" else local


# Per request, the token counts its price applies to (as processors/pricing.py cost_sql reads
# them): cache writes at the 5-minute and 1-hour rates, and whether it is long-context.
_TOKENLESS = " AND ".join(f"{c} IS NULL" for c in TOKEN_COLUMNS)
_WRITE_5M = """CASE WHEN cache_creation_5m_input_tokens IS NOT NULL
        OR cache_creation_1h_input_tokens IS NOT NULL
    THEN coalesce(cache_creation_5m_input_tokens, 0)
    ELSE coalesce(cache_creation_input_tokens, 0) END"""
_WRITE_1H = "coalesce(cache_creation_1h_input_tokens, 0)"


def archive_sql() -> str:
    """INSERT the rollup parts of the live requests older than `?` (the new cutoff) into
    usage_rollup_archive; the second `?` is the time they are archived at."""
    q = ARCHIVE_BUCKET_US
    return f"""INSERT INTO usage_rollup_archive
SELECT make_timestamptz((epoch_us(occurred_at) // {q}) * {q}) AS bucket_start,
    session_file, username, session_id, model, price_model,
    coalesce(input_tokens, 0) + n_5m + n_1h + coalesce(cache_read_input_tokens, 0)
        > {LONG_CONTEXT_TOKENS} AS long_context,
    count(*) AS requests,
    count(*) FILTER (WHERE tokenless) AS tokenless_requests,
    {", ".join(f"coalesce(sum({c}), 0) AS {c}" for c in TOKEN_COLUMNS)},
    coalesce(sum(n_5m) FILTER (WHERE NOT tokenless), 0) AS cache_write_5m_tokens,
    coalesce(sum(n_1h) FILTER (WHERE NOT tokenless), 0) AS cache_write_1h_tokens,
    CAST(? AS TIMESTAMPTZ) AS archived_at
FROM (
    SELECT *, {_WRITE_5M} AS n_5m, {_WRITE_1H} AS n_1h, ({_TOKENLESS}) AS tokenless
    FROM {UNIQUE_REQUESTS} requests
    WHERE occurred_at < ?
) parts
GROUP BY 1, 2, 3, 4, 5, 6, 7"""


def _archived_cost() -> str:
    """The cost of an archive row `a` at today's prices `p` (cost_sql's sum over its
    requests; NULL when its model has no price or none of its requests has tokens)."""

    def rate(name: str) -> str:
        return (
            f"(CASE WHEN a.long_context AND p.long_input_per_mtok IS NOT NULL "
            f"THEN p.long_{name}_per_mtok ELSE p.{name}_per_mtok END)"
        )

    total = (
        f"a.input_tokens * {rate('input')} + a.output_tokens * {rate('output')} "
        f"+ a.cache_write_5m_tokens * {rate('cache_write_5m')} "
        f"+ a.cache_write_1h_tokens * {rate('cache_write_1h')} "
        f"+ a.cache_read_input_tokens * {rate('cache_read')}"
    )
    return (
        "CASE WHEN p.model IS NULL OR a.requests = a.tokenless_requests THEN NULL "
        f"ELSE ({total}) / 1e6 END"
    )


# The rows every day and month figure is summed from: live requests (one each) and archived
# parts (a bucket's requests of a session file and model), with the same columns; an
# archived part's `occurred_at` is its bucket's start.
_ROLLUP_COLUMNS = (
    "occurred_at, username, model, session, requests, "
    + ", ".join(TOKEN_COLUMNS)
    + ", cost_usd, unpriced_requests"
)
ROLLUP_ROWS = f"""(
    SELECT {_ROLLUP_COLUMNS} FROM (
        SELECT occurred_at, username, model, coalesce(session_id, session_file) AS session,
            1 AS requests, {", ".join(TOKEN_COLUMNS)}, cost_usd,
            CASE WHEN cost_usd IS NULL THEN 1 ELSE 0 END AS unpriced_requests
        FROM {UNIQUE_REQUESTS} requests
    ) live_rows
    UNION ALL
    SELECT {_ROLLUP_COLUMNS} FROM (
        SELECT a.bucket_start AS occurred_at, a.username, a.model,
            coalesce(a.session_id, a.session_file) AS session, a.requests,
            {", ".join(f"a.{c}" for c in TOKEN_COLUMNS)},
            {_archived_cost()} AS cost_usd,
            CASE WHEN p.model IS NULL THEN a.requests ELSE a.tokenless_requests END
                AS unpriced_requests
        FROM usage_rollup_archive a LEFT JOIN usage_prices p ON p.model = a.price_model
    ) archived_rows
)"""


def rollup_rows(where: str = "") -> str:
    """The rows of ROLLUP_ROWS matching `where` (SQL on occurred_at, username, model)."""
    return f"(SELECT * FROM {ROLLUP_ROWS} rows WHERE {where})" if where else ROLLUP_ROWS


# Per group of rollup rows: the figures every usage report shows.
_ROLLUP_FIGURES = ",\n    ".join(
    [
        "count(DISTINCT session) AS sessions",
        "CAST(sum(requests) AS BIGINT) AS requests",
        *(f"CAST(coalesce(sum({c}), 0) AS BIGINT) AS {c}" for c in TOKEN_COLUMNS),
        "CAST(" + " + ".join(f"coalesce(sum({c}), 0)" for c in TOKEN_COLUMNS) + " AS BIGINT)"
        " AS total_tokens",
        "sum(cost_usd) AS cost_usd",
        "CAST(sum(unpriced_requests) AS BIGINT) AS unpriced_requests",
    ]
)


def period_sql(grain: str, zone: str = "UTC", where: str = "") -> str:
    """Requests per `grain` ('day' or 'month', as a DATE: a month is its first day) in time
    zone `zone`, user and model; archived (pruned) requests included."""
    return f"""SELECT CAST({_period(grain, zone)} AS DATE) AS {grain}, username, model,
    {_ROLLUP_FIGURES}
FROM {rollup_rows(where)} requests
GROUP BY 1, 2, 3"""


# Per group of requests, summed from `_PARTS` rows (one per session, model and period):
# distinct counts then run over far fewer rows than requests.
_PARTS = ",\n    ".join(
    [
        "count(*) AS requests",
        *(f"coalesce(sum({c}), 0) AS {c}" for c in TOKEN_COLUMNS),
        "sum(cost_usd) AS cost_usd",
        "count(*) FILTER (WHERE cost_usd IS NULL) AS unpriced_requests",
    ]
)
_ROLLUP_PARTS = ",\n    ".join(
    [
        "sum(requests) AS requests",
        *(f"coalesce(sum({c}), 0) AS {c}" for c in TOKEN_COLUMNS),
        "sum(cost_usd) AS cost_usd",
        "sum(unpriced_requests) AS unpriced_requests",
    ]
)
_SUMMED = ",\n    ".join(
    [
        "CAST(sum(requests) AS BIGINT) AS requests",
        *(f"CAST(sum({c}) AS BIGINT) AS {c}" for c in TOKEN_COLUMNS),
        "CAST(" + " + ".join(f"sum({c})" for c in TOKEN_COLUMNS) + " AS BIGINT) AS total_tokens",
        "sum(cost_usd) AS cost_usd",
        "CAST(sum(unpriced_requests) AS BIGINT) AS unpriced_requests",
    ]
)


def report_period_sql(grain: str, zone: str, where: str = "") -> str:
    """The `report daily|monthly` rows: per period and model (`level` 2), per period
    (`level` 1, with its users and sessions counted once) and the total (`level` 0);
    archived (pruned) requests included."""
    return f"""WITH parts AS (
    SELECT CAST({_period(grain, zone)} AS DATE) AS period, model, username, session,
        {_ROLLUP_PARTS}
    FROM {rollup_rows(where)} requests
    GROUP BY 1, 2, 3, 4
)
SELECT period, model, 2 - GROUPING(period) - GROUPING(model) AS level,
    count(DISTINCT username) AS users,
    count(DISTINCT session) AS sessions,
    {_SUMMED}
FROM parts
GROUP BY GROUPING SETS ((period, model), (period), ())
ORDER BY level, period, model COLLATE "C"
"""


def report_sessions_sql(zone: str, where: str = "") -> str:
    """Per session (its subagents' requests included) and user, by last request; times as
    ISO text in UTC, and the last one in `zone` too (text: made here, 100k sessions are
    printed in a fraction of the time Python takes to make and format their datetimes)."""
    iso = "'%Y-%m-%dT%H:%M:%S.%gZ'"
    return f"""WITH parts AS (
    SELECT coalesce(session_id, session_file) AS session, username, model,
        min(occurred_at) AS first_request_at, max(occurred_at) AS last_request_at,
        {_PARTS}
    FROM {unique_requests(where)} requests
    GROUP BY 1, 2, 3
)
SELECT session, username,
    strftime(timezone('UTC', min(first_request_at)), {iso}) AS first_request_at,
    strftime(timezone('UTC', max(last_request_at)), {iso}) AS last_request_at,
    strftime(timezone({sql_string(zone)}, max(last_request_at)), '%Y-%m-%d %H:%M') AS last_local,
    array_agg(model ORDER BY model COLLATE "C") FILTER (WHERE model IS NOT NULL) AS models,
    {_SUMMED}
FROM parts
GROUP BY session, username
ORDER BY max(parts.last_request_at), session COLLATE "C"
"""


USAGE_DAILY_VIEW = "CREATE OR REPLACE VIEW usage_daily AS\n" + period_sql("day")
USAGE_MONTHLY_VIEW = "CREATE OR REPLACE VIEW usage_monthly AS\n" + period_sql("month")


def hourly_buckets_sql(where: str = "") -> str:
    """Requests per user and hour, as blocks need them: bucket `k` holds the requests in
    ((k-1) h, k h] (epoch hours), so a request exactly on an hour goes with the hour before,
    and no bucket straddles a block's end (always on the hour: a block ends at its start,
    floored to the hour, plus 5 h, and a request exactly at the end is still in the block).
    `first_us`/`last_us` are epoch microseconds."""
    return f"""SELECT username,
    (epoch_us(occurred_at) + {HOUR_US - 1}) // {HOUR_US} AS k,
    min(epoch_us(occurred_at)) AS first_us, max(epoch_us(occurred_at)) AS last_us,
    count(*) AS requests,
    {", ".join(f"CAST(coalesce(sum({c}), 0) AS BIGINT) AS {c}" for c in TOKEN_COLUMNS)},
    sum(cost_usd) AS cost_usd,
    count(*) FILTER (WHERE cost_usd IS NULL) AS unpriced_requests
FROM {unique_requests(where)} requests
WHERE occurred_at IS NOT NULL AND username IS NOT NULL
GROUP BY 1, 2"""


# ccusage's 5-hour blocks, per user: requests in time order; a block starts at its first
# request floored to the UTC hour and ends 5 h later; a request more than 5 h after the
# block's start, or more than 5 h after the request before it, starts a new block.
#
# From hourly buckets (above): `island`s are runs of buckets with no gap over 5 h between
# them (a gap always starts a block). Within an island, the block started by bucket k (at
# hour s, its first request floored) is followed by the one started by the first bucket
# k' >= s + 6 (requests after s + 5 h): found for every bucket at once by window functions
# (s is k - 1 or, for a first request exactly on the hour, k, so the next start is the first
# bucket at least 5 or 6 hours on, over a RANGE frame; buckets are unique and in time order
# within an island, so the smallest k' and the smallest first request of that frame are the
# same bucket's). The recursion then only walks from each island's first block to the next,
# one block per step for every island at once, over one row per bucket. A block is named by
# the bucket that starts it (two blocks may floor to the same hour's candidates: a request
# exactly at 05:00 ends the block of 00:00, one at 05:01 starts the next, at 05:00).
def blocks_sql(where: str = "") -> str:
    """The blocks of the requests matching `where` (only a filter on whole users keeps the
    blocks as they are)."""

    def after(hours: int, column: str) -> str:
        return (
            f"min({column}) OVER (PARTITION BY username, island ORDER BY k "
            f"RANGE BETWEEN CAST({hours} AS BIGINT) FOLLOWING AND UNBOUNDED FOLLOWING)"
        )

    on_the_hour = f"k = (first_us // {HOUR_US})"  # else k is the floored hour + 1
    return f"""WITH RECURSIVE buckets AS MATERIALIZED (
    SELECT *, sum(CASE WHEN first_us - previous_last_us <= {BLOCK_US} THEN 0 ELSE 1 END)
            OVER (PARTITION BY username ORDER BY k) AS island
    FROM (
        SELECT *, lag(last_us) OVER (PARTITION BY username ORDER BY k) AS previous_last_us
        FROM ({hourly_buckets_sql(where)}) hourly
    ) gaps
),
links AS MATERIALIZED (  -- a block started by bucket k, and the bucket starting the next
    SELECT username, k,
        CASE WHEN {on_the_hour} THEN next_k_6 ELSE next_k_5 END AS next_k,
        (CASE WHEN {on_the_hour} THEN next_first_6 ELSE next_first_5 END) // {HOUR_US}
            AS next_s
    FROM (
        SELECT username, k, first_us,
            {after(BLOCK_HOURS, "k")} AS next_k_5,
            {after(BLOCK_HOURS, "first_us")} AS next_first_5,
            {after(BLOCK_HOURS + 1, "k")} AS next_k_6,
            {after(BLOCK_HOURS + 1, "first_us")} AS next_first_6
        FROM buckets
    ) later
),
chain(username, island, k, s) AS (
    SELECT username, island, min(k), min(first_us) // {HOUR_US}
    FROM buckets GROUP BY username, island
    UNION ALL
    SELECT c.username, c.island, l.next_k, l.next_s
    FROM chain c JOIN links l ON l.username = c.username AND l.k = c.k
    WHERE l.next_k IS NOT NULL
),
blocks AS MATERIALIZED (SELECT * FROM chain),
assigned AS (  -- every bucket with the block it starts, or else the last one started before
    SELECT max(bl.s) OVER (PARTITION BY b.username, b.island ORDER BY b.k
            ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW) AS s, b.*
    FROM buckets b
    LEFT JOIN blocks bl ON bl.username = b.username AND bl.island = b.island AND bl.k = b.k
)
SELECT username,
    make_timestamptz(s * {HOUR_US}) AS block_start,
    make_timestamptz((s + {BLOCK_HOURS}) * {HOUR_US}) AS block_end,
    make_timestamptz(max(last_us)) AS last_request_at,
    CAST(sum(requests) AS BIGINT) AS requests,
    {", ".join(f"CAST(sum({c}) AS BIGINT) AS {c}" for c in TOKEN_COLUMNS)},
    CAST({" + ".join(f"sum({c})" for c in TOKEN_COLUMNS)} AS BIGINT) AS total_tokens,
    sum(cost_usd) AS cost_usd,
    CAST(sum(unpriced_requests) AS BIGINT) AS unpriced_requests,
    (epoch_us(now()) - max(last_us) < {BLOCK_US}
        AND epoch_us(now()) < (s + {BLOCK_HOURS}) * {HOUR_US}) AS is_active
FROM assigned
GROUP BY username, s"""


USAGE_BLOCKS_VIEW = "CREATE OR REPLACE VIEW usage_blocks AS\n" + blocks_sql()


def tool_name_sql() -> str:
    """The name a usage event is reported by: the tool, skill, subagent type, `server/tool`
    of an MCP call, or the slash command."""
    return """CASE event_type
        WHEN 'skill' THEN skill_name
        WHEN 'subagent' THEN subagent_type
        WHEN 'mcp' THEN mcp_server || '/' || mcp_tool
        WHEN 'slash_command' THEN '/' || command_name
        ELSE tool_name END"""


def tools_sql(where: str = "") -> str:
    """Per event type and name; `where` filters the events. One event per call across files
    (a resumed session copies earlier tool calls): keyed by event_id (the tool_use_id; a
    slash command's line uuid), or per file for ids made up from the line number (`line:…`);
    a call is an error if any copy says so, and counts for the session of its first file."""
    return f"""WITH events AS (
    SELECT CASE WHEN event_id LIKE 'line:%' THEN session_file || '#' || event_id
            ELSE event_id END AS call_key,
        session_file, event_type, {tool_name_sql()} AS name, username,
        coalesce(session_id, session_file) AS session,
        coalesce(is_error, false) AS is_error, occurred_at
    FROM usage_events
    WHERE {live()}{" AND (" + where + ")" if where else ""}
),
firsts AS (
    SELECT call_key, min(session_file COLLATE "C") AS first_file,
        bool_or(is_error) AS is_error, min(occurred_at) AS occurred_at
    FROM events
    GROUP BY call_key
),
calls AS (  -- each call as its first file has it, an error if any copy is one
    SELECT e.event_type, e.name, e.username, e.session, f.is_error, f.occurred_at
    FROM firsts f
    JOIN events e ON e.session_file = f.first_file
        AND coalesce(e.call_key, '') = coalesce(f.call_key, '')
        AND (e.call_key IS NULL) = (f.call_key IS NULL)  -- (equalities PostgreSQL hashes)
)
SELECT event_type, name, calls, errors,
    round(CAST(errors AS DOUBLE PRECISION) / calls, 4) AS error_rate, users,
    sessions, first_used_at, last_used_at
FROM (
    SELECT event_type, name, count(*) AS calls,
        count(*) FILTER (WHERE is_error) AS errors,
        count(DISTINCT username) AS users,
        count(DISTINCT session) AS sessions,
        min(occurred_at) AS first_used_at,
        max(occurred_at) AS last_used_at
    FROM calls
    GROUP BY 1, 2
) tools"""


USAGE_TOOLS_VIEW = "CREATE OR REPLACE VIEW usage_tools AS\n" + tools_sql()

REPORT_VIEWS: tuple[str, ...] = (
    ARCHIVE_DDL,
    RETENTION_DDL,
    USAGE_DAILY_VIEW,
    USAGE_MONTHLY_VIEW,
    USAGE_BLOCKS_VIEW,
    USAGE_TOOLS_VIEW,
)
