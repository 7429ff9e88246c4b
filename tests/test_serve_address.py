"""Where `serve` listens, and how `doctor` and `run` find the `serve` of a state database."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from flows.prefect_api import PrefectUnavailable, api_url
from flows.prefect_target import local_serve_api_url, serve_file
from flows.serve import _remove_serve_file, _write_serve_file, server_address
from state.config import ConfigError


def test_server_address_flags_then_prefects_variables_then_defaults(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("PREFECT_SERVER_API_HOST", raising=False)
    monkeypatch.delenv("PREFECT_SERVER_API_PORT", raising=False)
    assert server_address(None, None) == ("127.0.0.1", 4200)
    monkeypatch.setenv("PREFECT_SERVER_API_HOST", "0.0.0.0")
    monkeypatch.setenv("PREFECT_SERVER_API_PORT", "4310")
    assert server_address(None, None) == ("0.0.0.0", 4310)
    assert server_address("127.0.0.2", 4400) == ("127.0.0.2", 4400)
    for bad in ("", "http", "0", "70000"):
        monkeypatch.setenv("PREFECT_SERVER_API_PORT", bad)
        with pytest.raises(ConfigError, match="PREFECT_SERVER_API_PORT must be a port"):
            server_address(None, None)


def test_the_serve_file_names_a_live_serve_only(tmp_path: Path) -> None:
    db = tmp_path / "state" / "pipeline.duckdb"
    db.parent.mkdir()
    assert local_serve_api_url(db) is None  # no file
    path = _write_serve_file(db, "http://127.0.0.1:4310/api", None, "http://127.0.0.1:8787")
    assert path == serve_file(db) == db.with_name("pipeline.duckdb.serve.json")
    assert local_serve_api_url(db) == "http://127.0.0.1:4310/api"  # this process is alive
    assert local_serve_api_url(str(db)) == "http://127.0.0.1:4310/api"

    # a file left by a serve that was killed: its pid is gone
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    record = json.loads(path.read_text())
    path.write_text(json.dumps({**record, "pid": dead.pid}))
    assert local_serve_api_url(db) is None
    _remove_serve_file(db)  # not ours: left alone
    assert path.exists()

    # a live pid that started long after the file was written is a reused pid
    old = datetime(2020, 1, 1, tzinfo=UTC).isoformat()
    path.write_text(json.dumps({**record, "started_at": old}))
    assert local_serve_api_url(db) is None

    path.write_text("{not json")
    assert local_serve_api_url(db) is None

    _write_serve_file(db, "http://127.0.0.1:4310/api", None, "http://127.0.0.1:8787")
    _remove_serve_file(db)
    assert not path.exists()


def test_api_url_finds_the_local_serve_or_says_what_to_export(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))  # no profile's URL either
    db = tmp_path / "pipeline.duckdb"
    # (nor one a test server earlier in this process left in Prefect's settings)
    with temporary_settings({PREFECT_API_URL: None}):
        with pytest.raises(PrefectUnavailable) as error:
            api_url(db)
        assert "export PREFECT_API_URL=http://" in str(error.value)
        assert str(db) in str(error.value)
        _write_serve_file(db, "http://127.0.0.1:4310/api", None, "http://127.0.0.1:8787")
        try:
            assert api_url(db) == "http://127.0.0.1:4310/api"
            monkeypatch.setenv("PREFECT_API_URL", "http://prefect.internal:4200/api/")
            assert api_url(db) == "http://prefect.internal:4200/api"  # the variable wins
        finally:
            _remove_serve_file(db)
    assert os.environ.get("PREFECT_API_URL")
