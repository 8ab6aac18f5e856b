"""The benchmark suite still runs: its smallest sizes, as CI's smoke check."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_benchmark_smoke_run_reports_identical_plans(tmp_path):
    out = tmp_path / "SMOKE.md"
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench", "--smoke", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    text = out.read_text()
    print(text)
    assert "| 10,000 |" in text and "| yes |" in text  # the two implementations agree
    assert "## Incremental run" in text
    assert "## Initial sync over HTTP" in text
