"""Steps `prefect deploy` runs from prefect.yaml (`build:`), so the deployments take their
cadence from the same validated settings as `serve`: one rule for defaults and errors.

Prefect validates a schedule's `interval` as a duration before build steps run, so a step's
output cannot be templated into it (PrefectHQ/prefect#14976). String fields can: an interval
or a cron schedule is expressed as the equivalent RRULE, as `serve` uses.
"""

from __future__ import annotations

from flows.cadence import cadence
from processors import registry


def processor_settings(processor: str) -> dict[str, object]:
    """Outputs for prefect.yaml: `{{ <id>.rrule }}`, `{{ <id>.interval }}` (the longest gap
    between runs, seconds), `{{ <id>.time_budget }}` (seconds, or empty for none) and
    `{{ <id>.active }}`: a processor that is registered but disabled (say, no LLM key on the
    machine running `prefect deploy`) is deployed with its schedule switched off."""
    entry = next((e for e in registry.entries() if e.name == processor), None)
    if entry is None or entry.processor is None:
        registry.get(processor)  # raises the one-line reason: unknown, or failed to load
        raise AssertionError("unreachable")
    schedule = cadence(entry.processor)
    return {
        "interval": schedule.gap_seconds,
        "rrule": schedule.rrule,
        "active": "true" if entry.enabled else "false",
    }
