"""The README's example processor is real code: it runs through the pipeline."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from flows.pipeline import run_direct
from state.db import connect
from tests.conftest import EXAMPLES, ROOT


def test_readme_example_processor_runs(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    (code,) = [
        block for block in re.findall(r"```python\n(.*?)```", readme, re.S) if "class " in block
    ]
    namespace: dict[str, object] = {}
    exec(compile(code, "README.md", "exec"), namespace)
    processor = namespace["PromptLength"]()  # type: ignore[operator]
    data_dir, db = tmp_path / "sessions", tmp_path / "s.duckdb"
    shutil.copytree(EXAMPLES, data_dir)
    figures = run_direct(processor, data_dir, db, max_attempts=5)
    assert figures.processed == 7 and figures.errors == 0 and figures.items_extracted > 0
    with connect(db) as con:
        assert con.execute("SELECT count(*) FROM prompt_lengths").fetchone() == (
            figures.items_extracted,
        )
