"""Processors installed for tests through a real entry-point distribution (this folder is put
on sys.path / PYTHONPATH; importlib.metadata finds the .dist-info beside it)."""

from __future__ import annotations

import os
import time

from processors.base import ProcessResult, Table
from processors.session import Session


class LineCount:
    """One row per parsed line. `SP_TEST_SLEEP` seconds of sleep per session make runs slow
    enough to overlap in concurrency tests; a line `{"poison": true}` makes it raise."""

    name = "linecount"
    version = os.environ.get("SP_TEST_LINECOUNT_VERSION", "1")
    cadence_seconds = 300
    uncapped = True  # local and cheap, like usage: SESSION_PROCESSOR_MAX_PER_RUN does not apply
    tables = (
        Table(
            "linecount_lines",
            (
                ("session_file", "VARCHAR NOT NULL"),
                ("username", "VARCHAR"),
                ("line_no", "INTEGER"),
                ("line_type", "VARCHAR"),
            ),
        ),
    )
    views = ()

    def process(self, session: Session) -> ProcessResult:
        delay = float(os.environ.get("SP_TEST_SLEEP", "0"))
        if delay:
            time.sleep(delay)
        rows = []
        for number, line in enumerate(session.lines(), 1):
            if line.get("poison"):
                raise ValueError(f"poison line {number}")
            rows.append(
                {
                    "session_file": session.key,
                    "username": session.username,
                    "line_no": number,
                    "line_type": line.get("type") if isinstance(line.get("type"), str) else None,
                }
            )
        return ProcessResult({"linecount_lines": rows}, items=len(rows))


class _Disabled(LineCount):
    name = "disabled"
    tables = ()

    def unavailable_reason(self) -> str | None:
        return (
            "SP_TEST_DISABLED_KEY is not set"
            if not os.environ.get("SP_TEST_DISABLED_KEY")
            else None
        )


def make_disabled() -> _Disabled:
    return _Disabled()
