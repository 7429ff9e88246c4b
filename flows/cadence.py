"""How often each processor runs: its deployment's interval.

The old environment names keep working for the built-ins; any other processor reads
`SESSION_PIPELINE_<NAME>_INTERVAL`. Unset means the processor's default cadence; empty,
non-integer or <= 0 is a configuration error, never silently the default.
"""

from __future__ import annotations

from datetime import UTC, datetime

from processors.base import Processor
from state.config import positive_int

LEGACY_ENV = {
    "usage": "SCHEDULER_USAGE_PROCESSOR_INTERVAL",
    "verification": "SCHEDULER_VERIFICATION_DETECTOR_INTERVAL",
}
# Interval schedules count from a fixed anchor, so restarting `serve` never shifts the cadence.
ANCHOR = datetime(2026, 1, 1, tzinfo=UTC)


def interval_env(processor_name: str) -> str:
    return LEGACY_ENV.get(processor_name, f"SESSION_PIPELINE_{processor_name.upper()}_INTERVAL")


def interval_seconds(processor: Processor) -> int:
    return positive_int(interval_env(processor.name), processor.cadence_seconds)
