"""Figure 5's child process: one `run_direct` of the usage processor, reporting its peak RSS.

    python -m bench.peak_memory DATA_DIR DB [--tracemalloc]

Prints one JSON object: the RSS after the imports a run needs (the interpreter baseline),
the peak RSS of the whole process (VmHWM, the same as `ru_maxrss`), the run's figures and
time, how many reads raised `WholeReadNeeded` (the run then read the file whole: figure 5
measures that fallback too), and where the main thread was each time the RSS reached a new
high (a sampling thread reads /proc/self/status every 20 ms). With `--tracemalloc` (slow: use
a smaller session) the peak of Python's own allocations is reported too, and the biggest
Python heap seen at an RSS high is listed by line: what is left of the RSS is native memory
(DuckDB) or allocator slack.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any


def status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class Sampler(threading.Thread):
    """Remembers where the main thread was when the RSS reached each new high."""

    def __init__(self, main_id: int, snapshots: bool) -> None:
        super().__init__(daemon=True)
        self.main_id = main_id
        self.snapshots = snapshots
        self.stop = threading.Event()
        self.highs: list[tuple[int, list[str]]] = []
        self.snapshot: Any = None
        self.snapshot_rss = 0
        self.snapshot_traced = 0

    def run(self) -> None:
        best = 0
        while not self.stop.wait(0.02):
            rss = status_kb("VmRSS")
            if rss <= best * 1.05:
                continue
            best = rss
            frame = sys._current_frames().get(self.main_id)
            stack = [
                f"{Path(fs.filename).parent.name}/{Path(fs.filename).name}:{fs.lineno} {fs.name}"
                for fs in traceback.extract_stack(frame)[-8:]
            ]
            self.highs.append((rss, stack))
            if self.snapshots and rss > self.snapshot_rss * 1.1:
                import tracemalloc

                traced = tracemalloc.get_traced_memory()[0]
                if traced > self.snapshot_traced:  # keep the biggest Python heap seen
                    self.snapshot, self.snapshot_traced = tracemalloc.take_snapshot(), traced
                self.snapshot_rss = rss


def watch(steps: list[dict[str, Any]]) -> None:
    """Record the RSS and the peak so far after each step of a run (reading a batch,
    committing it), by wrapping the pipeline's step functions where `run_direct` finds them.
    A step that has been renamed is simply not recorded."""
    import flows.pipeline
    import state.store

    def wrap(module: Any, name: str, step: str) -> None:
        original = getattr(module, name, None)
        if original is None:
            return

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            result = original(*args, **kwargs)
            steps.append({"step": step, "rss_kb": status_kb("VmRSS"), "hwm_kb": status_kb("VmHWM")})
            return result

        setattr(module, name, wrapper)

    wrap(flows.pipeline, "begin", "plan")
    wrap(flows.pipeline, "process_batch", "read")  # (as run_direct imported it)
    wrap(state.store, "apply_batch", "commit")


def count_whole_reads(processor: Any, raised: list[str]) -> None:
    """Record every `WholeReadNeeded` the processor raises (the pipeline then reads whole)."""
    from processors.base import WholeReadNeeded

    original = processor.process_increment

    def process_increment(session: Any, checkpoint: Any) -> Any:
        try:
            return original(session, checkpoint)
        except WholeReadNeeded as error:
            raised.append(str(error))
            raise

    processor.process_increment = process_increment


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("db", type=Path)
    parser.add_argument("--tracemalloc", action="store_true")
    args = parser.parse_args()

    import duckdb  # noqa: F401  (part of what any run imports)

    from flows.pipeline import run_direct
    from processors import registry

    processor = registry.get("usage")
    baseline_kb = status_kb("VmRSS")
    import_peak_kb = status_kb("VmHWM")
    if args.tracemalloc:
        import tracemalloc

        tracemalloc.start(12)
    steps: list[dict[str, Any]] = []
    watch(steps)
    whole_reads: list[str] = []
    count_whole_reads(processor, whole_reads)
    sampler = Sampler(threading.get_ident(), args.tracemalloc)
    sampler.start()
    started = time.perf_counter()
    figures = run_direct(processor, args.data_dir, args.db, max_attempts=5)
    seconds = time.perf_counter() - started
    sampler.stop.set()
    sampler.join()
    out: dict[str, Any] = {
        "baseline_rss_kb": baseline_kb,
        "import_peak_kb": import_peak_kb,
        "peak_rss_kb": status_kb("VmHWM"),
        "seconds": seconds,
        "figures": {k: v for k, v in figures.as_dict().items() if k != "errors_detail"},
        "errors_detail": figures.errors_detail[:3],
        "phases": steps,
        "whole_reads_needed": whole_reads,
        "highs": sampler.highs[-4:],
        "pid": os.getpid(),
    }
    if args.tracemalloc:
        current, peak = tracemalloc.get_traced_memory()
        out["python_traced_peak_kb"] = peak // 1024
        out["python_traced_at_end_kb"] = current // 1024
    if sampler.snapshot is not None:
        stats = sampler.snapshot.statistics("lineno")[:12]
        out["tracemalloc_rss_kb"] = sampler.snapshot_rss
        out["tracemalloc_top"] = [
            f"{s.size / 2**20:8.1f} MB {s.count:>9} blocks "
            f"{Path(s.traceback[0].filename).name}:{s.traceback[0].lineno}"
            for s in stats
        ]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
