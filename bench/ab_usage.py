"""usage before and after a change, alternated in the same run (not a figure: a check that a
change to `processors/` pays, reported as ratios like the figures).

    python -m bench.ab_usage REV [--rounds 5] [--e2e]

Extracts the repository at HEAD into a temporary folder with `processors/` as it was at REV,
then alternates, round by round (the order rotating): the orjson loop over the same bytes,
usage from that copy, usage from this working tree. Each usage side runs in a child process
that times only its own work. Without `--e2e` the work is `Session.open` + `process` +
`finish` of figure 4's 50 MB session; with it, a `run_direct` over figure 2's corpus into a
fresh database.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

from bench.corpus import MB, cached_big_session, corpus, iter_files

ROOT = Path(__file__).resolve().parent.parent

CHILD = """
import json, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])


def run() -> None:
    from processors.session import Session
    from processors.usage import UsageProcessor

    started = time.perf_counter()
    if sys.argv[2] == "session":
        with Session.open(sys.argv[3]) as session:
            UsageProcessor().process(session)
            session.finish()
    else:
        from flows.pipeline import run_direct

        figures = run_direct(UsageProcessor(), Path(sys.argv[3]), Path(sys.argv[4]), max_attempts=5)
        assert figures.errors == 0, figures.errors_detail[:2]
    print(json.dumps({"seconds": time.perf_counter() - started}))


if __name__ == "__main__":  # (reader processes import this file again)
    run()
"""


def _extract(what: list[str], into: Path) -> None:
    archive = subprocess.run(["git", "archive", *what], cwd=ROOT, capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)


def tree_with_old_processors(rev: str, into: Path) -> Path:
    """HEAD's tree with `processors/` as it was at `rev`."""
    tree = into / "before"
    tree.mkdir()
    _extract(["HEAD"], tree)
    shutil.rmtree(tree / "processors")
    _extract([rev, "processors"], tree)
    return tree


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("rev")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--e2e", action="store_true")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ab-usage-"))
    try:
        before = tree_with_old_processors(args.rev, work)
        child = work / "child.py"
        child.write_text(CHILD)
        if args.e2e:
            c = corpus(5_000, max_bytes=50 * MB)
            files, size, what = list(iter_files(c.path)), c.bytes, ["e2e", str(c.path)]
        else:
            path, meta = cached_big_session(50 * MB)
            files, size, what = [str(path)], meta["bytes"], ["session", str(path)]
        db = work / "ab.duckdb"

        def usage_from(tree: Path) -> float:
            done = subprocess.run(
                [sys.executable, str(child), str(tree), *what, str(db)],
                cwd=tree,
                capture_output=True,
                text=True,
                check=False,
            )
            for leftover in (db, db.with_name(db.name + ".wal")):
                leftover.unlink(missing_ok=True)
            if done.returncode != 0:
                raise RuntimeError(done.stderr[-2000:])
            return float(json.loads(done.stdout.strip().splitlines()[-1])["seconds"])

        def orjson_loop() -> float:
            started = time.perf_counter()
            for name in files:
                with open(name, "rb") as f:
                    for line in f:
                        with contextlib.suppress(orjson.JSONDecodeError):
                            orjson.loads(line)
            return time.perf_counter() - started

        sides = {
            "orjson loop": orjson_loop,
            f"usage at {args.rev}": lambda: usage_from(before),
            "usage now": lambda: usage_from(ROOT),
        }
        names = list(sides)
        times: dict[str, list[float]] = {name: [] for name in names}
        for round_no in range(args.rounds):
            shift = round_no % len(names)
            for name in names[shift:] + names[:shift]:
                times[name].append(sides[name]())
        mb = size / MB
        for name, seconds in times.items():
            rates = ", ".join(f"{mb / s:.0f}" for s in seconds)
            print(f"{name}: {mb / statistics.median(seconds):.1f} MB/s (rounds {rates})")
        base, old, new = (times[name] for name in names)
        for label, against in (("before", old), ("orjson loop", base)):
            ratios = ", ".join(f"{a / n:.2f}×" for a, n in zip(against, new, strict=True))
            print(f"now vs {label}, per round: {ratios}")
        print(f"load average {os.getloadavg()}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
