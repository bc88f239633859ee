"""scripts/gpu_check.py --dry-run: the GPU check's code runs on CPU at tiny shapes, so the script cannot rot."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.py"
SECTIONS = {"1 kernels", "2 vs HF", "3 decode", "4 training", "5 loading"}


def test_dry_run_runs_every_row_on_cpu():
    """Every row runs (no fail); rows that prove something only on a GPU say skip-cpu, never pass."""
    pytest.importorskip("peft")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--json"], capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    rows = {row["check"]: row for row in report["rows"]}
    assert {row["section"] for row in rows.values()} == SECTIONS and report["device"] == "CPU (dry run)"
    assert not [row for row in rows.values() if row["status"] == "fail"]
    assert rows["policy, one process: dtypes in forward, grads"]["status"] == "pass"  # not GPU-specific
    passing = {check for check, row in rows.items() if row["status"] == "pass"}
    assert passing == {"policy, one process: dtypes in forward, grads"}
    assert "bfloat16', 'bfloat16', 'bfloat16" in rows["policy, FSDP2 group of one: dtypes, grads, checkpoint"]["figure"]
    assert "round trip equal" in rows["policy, FSDP2 group of one: dtypes, grads, checkpoint"]["figure"]
    assert "3 of 3" in rows["greedy: 3 left-padded rows = each alone (fp32)"]["figure"]
    compiled = [row for row in rows.values() if "compiled" in row["check"]]
    assert len(compiled) == 3 and {row["status"] for row in compiled} == {"skip"}  # --compile adds them on CPU
    assert {row["status"] for row in rows.values()} == {"pass", "skip-cpu", "info", "skip"}


def test_without_a_gpu_it_says_so_in_one_line():
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    if proc.returncode != 2:
        pytest.skip("a CUDA device is present")
    assert proc.stderr.strip().splitlines() == ["gpu_check.py: error: no CUDA device; run with --dry-run to check the "
                                                "code on CPU"]


PROFILE = ROOT / "scripts" / "profile_decode.py"


def test_profile_decode_dry_run_prints_every_table(tmp_path):
    """scripts/profile_decode.py --dry-run runs the decode profile's code on CPU (tiny shapes) and writes its report."""
    out = tmp_path / "profile.md"
    proc = subprocess.run([sys.executable, str(PROFILE), "--dry-run", "--int8", "--out", str(out)], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = out.read_text()
    for heading in ("### bf16: eager decode step", "### int8: eager decode step", "| kernel | us/step |",
                    "| q+k+v fused |", "SDPA + boolean mask over the whole cache, compiled"):
        assert heading in report
    assert report.count("| engine, decode ahead on") == 2
    again = subprocess.run([sys.executable, str(PROFILE), "--dry-run", "--rates-only", "--out", str(out)],
                           capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert again.returncode == 2 and "exists" in again.stderr and out.read_text() == report  # never overwritten
