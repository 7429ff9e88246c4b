"""ccusage, the tool users would otherwise run, installed and run beside the project.

ccusage keeps no state: every call reads every transcript. It is installed with npm into a
folder of its own under the bench dir (version 20.0.24: 20.0.26 has no linux-x64 build) and
given the corpus as `$CLAUDE_CONFIG_DIR/projects/<user>/` (hard links to the user folders). Where
node or npm is missing, or the install fails, `ccusage()` says why and the figures that need it
are skipped, never estimated.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.corpus import bench_dir

CCUSAGE_VERSION = "20.0.24"


class Unavailable(Exception):
    """ccusage cannot run here; the message says why, in one line."""


def ccusage() -> Path:
    """The ccusage executable, installed on first use."""
    folder = bench_dir() / f"ccusage-{CCUSAGE_VERSION}"
    exe = folder / "node_modules" / ".bin" / "ccusage"
    if exe.exists():
        return exe
    npm = shutil.which("npm")
    if npm is None or shutil.which("node") is None:
        raise Unavailable("node or npm is not installed")
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [
            npm,
            "install",
            "--no-audit",
            "--no-fund",
            "--prefix",
            str(folder),
            f"ccusage@{CCUSAGE_VERSION}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if done.returncode != 0 or not exe.exists():
        last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise Unavailable(f"npm install ccusage@{CCUSAGE_VERSION} failed: {last[0][:200]}")
    return exe


def claude_config(corpus: Path) -> Path:
    """A `CLAUDE_CONFIG_DIR` whose `projects/<user>` hold the corpus's user folders, as hard
    links (ccusage does not follow a linked folder; hard links cost no copy)."""
    config = bench_dir() / f"claude-config-{corpus.name}"
    projects = config / "projects"
    if not projects.exists():
        staging = config / "projects.partial"
        shutil.rmtree(staging, ignore_errors=True)
        for user in corpus.iterdir():
            if user.is_dir():
                shutil.copytree(user, staging / user.name, copy_function=os.link)
        staging.rename(projects)
    return config


def ccusage_daily(corpus: Path, *extra: str) -> tuple[float, Any]:
    """Seconds for `ccusage daily --offline --json` over the corpus, and its answer."""
    exe = ccusage()
    env = {**os.environ, "CLAUDE_CONFIG_DIR": str(claude_config(corpus)), "TZ": "UTC"}
    started = time.perf_counter()
    done = subprocess.run(
        [str(exe), "daily", "--offline", "--json", *extra],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"ccusage failed: {done.stderr.strip()[-300:]}")
    return elapsed, json.loads(done.stdout)


def pipeline_command(*argv: str, env: dict[str, str] | None = None) -> tuple[float, str]:
    """Seconds for `session-pipeline ARGV` as a user runs it (a new interpreter, its imports
    included), without a Prefect server: the command line runs in its own process."""
    exe = Path(sys.executable).with_name("session-pipeline")
    run_env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    run_env.update(env or {})
    started = time.perf_counter()
    done = subprocess.run(
        [str(exe), *argv], capture_output=True, text=True, env=run_env, timeout=1800
    )
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(
            f"session-pipeline {' '.join(argv)} failed: {done.stderr.strip()[-300:]}"
        )
    if argv[:1] == ("run",) and "ran in this process" not in done.stderr:
        raise RuntimeError(  # a Prefect profile or a local serve would make it a flow run
            f"session-pipeline {' '.join(argv)} did not run in its own process: "
            f"{done.stderr.strip()[-300:]}"
        )
    return elapsed, done.stdout
