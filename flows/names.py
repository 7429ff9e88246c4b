"""What a processor is called in Prefect: kept apart from the flow module so light callers
(the webhook, doctor) need not import the Prefect engine."""

from __future__ import annotations


def flow_name(processor_name: str) -> str:
    """`usage` -> flow `usage-processor`; its deployment is named after the processor."""
    return f"{processor_name}-processor"


def flow_attribute(processor_name: str) -> str:
    """The module attribute a processor's flow is reachable as: `flows/processor_flow.py:
    usage_processor` is the entrypoint deployments and the runner's subprocesses load."""
    return f"{processor_name}_processor"


def limit_name(processor_name: str) -> str:
    """The global concurrency limit that serialises a processor's runs."""
    return f"session-pipeline-{processor_name}"


def trigger_limit_name(processor_name: str) -> str:
    """A short lease that serialises webhook triggers of one processor across processes."""
    return f"session-pipeline-trigger-{processor_name}"


def new_run_name(processor_name: str) -> str:
    """`usage-20260501-101500`: a run's name, given when it is created (the webhook) or when
    it starts (a scheduled run, `session-pipeline run`)."""
    from datetime import UTC, datetime

    return f"{processor_name}-{datetime.now(UTC):%Y%m%d-%H%M%S}"
