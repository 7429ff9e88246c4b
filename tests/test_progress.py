"""Progress of a long run: what it counts and how it says it."""

from __future__ import annotations

import io
from datetime import UTC, datetime

from flows.progress import Progress, Snapshot, terminal_sink
from state.plan import Candidate
from state.store import Outcome

MB = 1 << 20
NOW = datetime(2026, 1, 1, tzinfo=UTC)


def test_counts_sessions_and_bytes_segments_included() -> None:
    candidates = [
        Candidate("a/small.jsonl", "/x", 2 * MB, 0, "new"),
        Candidate("a/big.jsonl", "/y", 8 * MB, 0, "new"),
    ]
    seen: list[tuple[Snapshot, bool]] = []
    progress = Progress(
        "usage", candidates, [lambda snap, final: seen.append((snap, final))], every=0
    )
    progress.advance([Outcome("a/small.jsonl", "processed", NOW)])
    progress.advance(
        [Outcome("a/big.jsonl", "processed", NOW, partial=True, complete_offset=3 * MB)]
    )
    progress.advance([Outcome("a/big.jsonl", "processed", NOW)])  # its last segment
    progress.finish()
    done = [(s.files_done, s.bytes_done // MB, round(s.percent)) for s, _ in seen]
    assert done == [(1, 2, 20), (1, 5, 50), (2, 10, 100), (2, 10, 100)]
    assert [final for _, final in seen] == [False, False, False, True]


def test_a_short_run_says_nothing() -> None:
    seen: list[object] = []
    progress = Progress(
        "usage", [Candidate("a/s.jsonl", "/x", 10, 0, "new")], [lambda *a: seen.append(a)]
    )
    progress.advance([Outcome("a/s.jsonl", "processed", NOW)])
    progress.finish()
    assert seen == []


def test_the_line_people_read() -> None:
    snap = Snapshot("usage", 1_234, 4_673, 80 * MB, 172 * MB, 2.0)
    assert snap.line() == "usage:  46.5%  1,234/4,673 sessions, 80/172 MB, 40.0 MB/s, 2 s left"
    out = io.StringIO()  # not a terminal: one plain line per report
    terminal_sink(out)(snap, False)
    assert out.getvalue() == snap.line() + "\n"
    assert Snapshot("usage", 2, 2, 0, 0, 0.0).line().endswith("done")
