"""Processors come from entry points, are loaded afresh each time, and fail one by one."""

from __future__ import annotations

from pathlib import Path

import pytest

from processors import registry


def test_builtin_usage_is_registered() -> None:
    entry = {e.name: e for e in registry.entries()}["usage"]
    assert entry.enabled and entry.processor is not None
    assert entry.processor.cadence_seconds == 600


def test_a_broken_plugin_is_reported_and_hides_no_other(test_plugins: Path) -> None:
    found = {e.name: e for e in registry.entries()}
    assert {"usage", "linecount", "broken", "disabled"} <= set(found)
    assert not found["broken"].enabled
    assert found["broken"].problem is not None
    assert "failed to load: ModuleNotFoundError" in found["broken"].problem
    assert found["linecount"].enabled and found["usage"].enabled


def test_disabled_processor_says_why_and_is_not_cached(
    test_plugins: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SP_TEST_DISABLED_KEY", raising=False)
    with pytest.raises(registry.UnknownProcessorError, match="disabled: SP_TEST_DISABLED_KEY"):
        registry.get("disabled")
    monkeypatch.setenv("SP_TEST_DISABLED_KEY", "now set")  # fixed without a restart
    assert registry.get("disabled").name == "disabled"


def test_unknown_processor_message_keeps_the_old_shape(test_plugins: Path) -> None:
    with pytest.raises(registry.UnknownProcessorError) as error:
        registry.get("nope")
    assert str(error.value) == "Unknown processor 'nope'. Known: linecount, usage"
