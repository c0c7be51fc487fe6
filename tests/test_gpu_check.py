"""The GPU check's quick mode runs on CPU, so the script CI keeps is the one a lent GPU runs."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def test_the_quick_cpu_run_writes_every_section_within_tolerance(tmp_path):
    subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--out", str(tmp_path)],
                   check=True, timeout=600, capture_output=True)
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    results = report["results"]
    assert not [key for key in results if key.endswith("failed")], results
    assert results["logits max abs diff (fp32)"] < 1e-4
    assert results["patterns sdpa vs eager max abs diff (fp32)"] < 1e-5
    assert results["capture while generating max abs diff"] < 1e-5
    assert results["lazy patterns at 256 tokens: last row sums to 1 (abs err)"] < 1e-5
    assert results["int8: top-1 agreement with fp32"] > 0.9 and results["int4: weight bytes / fp32"] < 0.5
    assert "| logits max abs diff (fp32) |" in (tmp_path / "gpu_check.md").read_text()
