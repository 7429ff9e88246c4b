"""Steps `prefect deploy` runs from prefect.yaml (`build:`), so the deployments take their
cadence from the same validated settings as `serve`: one rule for defaults and errors.

Prefect validates a schedule's `interval` as a duration before build steps run, so a step's
output cannot be templated into it (PrefectHQ/prefect#14976). String fields can: the interval
is expressed as the equivalent RRULE, anchored at the same fixed start as `serve` uses.
"""

from __future__ import annotations

from flows.cadence import ANCHOR, interval_seconds
from processors import registry


def interval_rrule(seconds: int) -> str:
    """An RRULE firing every `seconds` from the fixed anchor (minutes or hours when exact,
    which the Prefect UI shows more readably)."""
    if seconds % 3600 == 0:
        freq, count = "HOURLY", seconds // 3600
    elif seconds % 60 == 0:
        freq, count = "MINUTELY", seconds // 60
    else:
        freq, count = "SECONDLY", seconds
    return f"DTSTART:{ANCHOR:%Y%m%dT%H%M%SZ}\nRRULE:FREQ={freq};INTERVAL={count}"


def processor_settings(processor: str) -> dict[str, object]:
    """Outputs for prefect.yaml: `{{ <id>.rrule }}`, `{{ <id>.interval }}` (seconds) and
    `{{ <id>.active }}`: a processor that is registered but disabled (say, no LLM key on the
    machine running `prefect deploy`) is deployed with its schedule switched off."""
    entry = next((e for e in registry.entries() if e.name == processor), None)
    if entry is None or entry.processor is None:
        registry.get(processor)  # raises the one-line reason: unknown, or failed to load
        raise AssertionError("unreachable")
    seconds = interval_seconds(entry.processor)
    return {
        "interval": seconds,
        "rrule": interval_rrule(seconds),
        "active": "true" if entry.enabled else "false",
    }
