"""Processors are found through entry points (group `session_pipeline.processors`), the way
datasette finds plugins: a package that declares one is picked up when installed.

The registry is read afresh on every call. The old system cached it at first use, so a
processor whose configuration was broken at that moment stayed missing until a restart.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

from processors.base import Processor, Table, unavailable_reason

GROUP = "session_pipeline.processors"
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,39}$")


class UnknownProcessorError(LookupError):
    """Asked for a processor that is not registered, or that cannot run; one line for users."""


@dataclass(frozen=True)
class Entry:
    """One registered processor: loaded, or the reason it could not be loaded or enabled."""

    name: str
    processor: Processor | None
    problem: str | None  # why it cannot run (load failure or configuration)

    @property
    def enabled(self) -> bool:
        return self.processor is not None and self.problem is None


def _check(name: str, obj: Any) -> str | None:
    missing = [
        a
        for a in ("name", "version", "cadence_seconds", "tables", "process")
        if not hasattr(obj, a)
    ]
    if missing:
        return f"not a processor (missing {', '.join(missing)})"
    if obj.name != name:
        return f"entry point {name!r} loads a processor named {obj.name!r}"
    if not _NAME.match(name):
        return "name must be lowercase letters, digits and underscores"
    if not isinstance(obj.cadence_seconds, int) or obj.cadence_seconds <= 0:
        return "cadence_seconds must be a positive integer"
    if not all(isinstance(t, Table) for t in obj.tables):
        return "tables must be processors.base.Table objects"
    return None


def _load(ep: Any) -> Entry:
    try:
        target = ep.load()
        obj = (
            target()
            if isinstance(target, type) or (callable(target) and not hasattr(target, "process"))
            else target
        )
    except Exception as error:
        return Entry(ep.name, None, f"failed to load: {type(error).__name__}: {error}")
    problem = _check(ep.name, obj)
    if problem:
        return Entry(ep.name, None, problem)
    try:
        reason = unavailable_reason(obj)
    except Exception as error:
        reason = f"configuration check failed: {type(error).__name__}: {error}"
    return Entry(ep.name, obj, reason)


def entries() -> list[Entry]:
    """Every registered processor, sorted by name, each loaded afresh."""
    seen: dict[str, Entry] = {}
    for ep in entry_points(group=GROUP):
        if ep.name in seen:
            continue  # the first distribution on sys.path wins, as importlib does
        seen[ep.name] = _load(ep)
    return [seen[name] for name in sorted(seen)]


def get(name: str) -> Processor:
    """The named processor, ready to run; otherwise UnknownProcessorError in the old wording.
    Only that one is loaded and has its configuration checked: a run of one processor neither
    waits for nor depends on the others."""
    for ep in entry_points(group=GROUP, name=name):  # the first on sys.path wins, as above
        entry = _load(ep)
        if entry.processor is None or entry.problem:
            raise UnknownProcessorError(f"Processor '{name}' is disabled: {entry.problem}")
        return entry.processor
    known = ", ".join(e.name for e in entries() if e.enabled) or "none"
    raise UnknownProcessorError(f"Unknown processor '{name}'. Known: {known}")
