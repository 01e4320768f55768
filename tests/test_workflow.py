"""The export workflow (.github/workflows/export.yml) cannot rot: its job is .ci/export-job, rehearsed here
on the 2-layer model with the real data check, the real suite and the real runtime."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
WORKFLOW = REPO / ".github" / "workflows" / "export.yml"


def test_workflow_runs_the_rehearsed_job():
    job = yaml.safe_load(WORKFLOW.read_text())["jobs"]["export"]
    runs = [s["run"] for s in job["steps"] if "run" in s]
    assert any(r.startswith(".ci/export-job smollm2 ") for r in runs), runs
    # Installs go into the venv (PEP 668 refuses the runner's system Python); Python is pinned.
    assert all(line.strip().startswith((".venv/", "bash bootstrap.sh", "python -m venv", "echo", "exit", ".ci/"))
               for r in runs for line in r.strip().splitlines()), runs
    setup = next(s for s in job["steps"] if s.get("uses", "").startswith("actions/setup-python"))
    assert setup["with"]["python-version"] == "3.11"


def test_export_job_rehearsal(tiny_hf, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([str(REPO / ".ci" / "export-job"), str(tiny_hf), "bf16", str(out), "--peers", "",
                           "--max-seq-len", "128", "--gen", "8", "--runs", "1", "--warmup", "0",
                           "--eval-seq-len", "64", "--eval-max-tokens", "256", "--quiet"],
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # .ci/fetch_wikitext2.py verified the shared files' hashes and printed them, downloading nothing.
    assert "wikitext-2-raw-test.txt" in proc.stdout and "downloading" not in proc.stderr
    record = json.loads((out / "benchmarks.json").read_text())
    assert record["methods"]["bf16"]["bench"]["complete"]
    assert (out / "stdout.md").read_text().strip()
