"""benchmarks/bench_engine_process.py as a smoke test: both engine paths (thread, process) serve the
no-op pipeline and the tiny Qwen-Image, every figure is measured, and the four e2e paths give the same
pixels. (The bench broke silently once: the no-op pipeline had no dtype when outputs began to carry it.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_engine_process.py"


def test_bench_engine_process_smoke(tmp_path):
    proc = subprocess.run([sys.executable, str(BENCH), "--repeat", "1", "--requests", "20", "--events", "4"],
                          env={**os.environ, "OUT": str(tmp_path)}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "bench_engine_process.json").read_text())
    assert set(result["client"]) == {"engine thread (old)", "engine process (new)"}
    for costs in result["client"].values():
        assert all(costs[k] > 0 for k in ("request_rtt_ms", "resolve_ms", "requests_per_s")), costs
    assert len(result["e2e"]["median_s"]) == 4 and all(s > 0 for s in result["e2e"]["median_s"].values())
    assert result["e2e"]["identical_pixels"] is True
    assert proc.stdout.rstrip().splitlines()[-1].startswith("served over offline:")
