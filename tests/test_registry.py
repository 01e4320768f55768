"""The method registry: a method is one module and one record, and every place that names methods
(the pipeline, `ptekit export --help`, the bench's labels, the report, the suite) reads the record."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from quant import registry

REPO = Path(__file__).resolve().parent.parent
TOY_MODULE = "def quantize(model, inputs):\n    return model\n"
TOY = registry.Method("toy", "ptekit_toy_method", "ToyQuant", trains=True,
                      help="a toy method that leaves the model as it is.")


@pytest.fixture
def toy(tmp_path, monkeypatch):
    (tmp_path / "ptekit_toy_method.py").write_text(TOY_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(registry.METHODS, TOY.name, TOY)
    return TOY


def test_the_four_methods_are_registered_with_their_modules():
    assert list(registry.METHODS) == ["bf16", "ptq", "spinquant", "qlora"]
    for m in registry.METHODS.values():
        assert callable(m.quantize())
        assert (m.settings_class() is None) == (not m.trains)
        assert set(m.preset_table()) == ({"cpu", "paper"} if m.trains else set())


def test_a_registered_method_is_in_export_help(tmp_path):
    (tmp_path / "ptekit_toy_method.py").write_text(TOY_MODULE)
    script = ("import sys\nfrom quant import registry\n"
              f"registry.register(registry.Method({TOY.name!r}, {TOY.module!r}, {TOY.label!r}, help={TOY.help!r}))\n"
              "from exporter.cli import main\nsys.argv = ['ptekit', 'export', '--help']\nmain()\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)]), "COLUMNS": "4000"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"toy: {TOY.help}" in " ".join(proc.stdout.split())


def test_a_registered_method_is_labelled_by_bench_and_report_and_run_by_the_suite(toy, tmp_path):
    from android_runner.bench import describe_model
    from benchmarks.suite import SuiteOptions, export_cmd
    from exporter.manifest import write_manifest
    from exporter.pipeline import load_for_method  # noqa: F401  (the pipeline imports with the toy registered)

    d = tmp_path / "toy-out"
    d.mkdir()
    (d / "model.pte").write_bytes(b"\0" * 16)
    (d / "tokenizer.json").write_text(json.dumps({}))
    write_manifest(d, {"pte": "model.pte", "tokenizer": "tokenizer.json", "method": "toy",
                       "model": {"parameters": 135_000_000}})
    assert describe_model(d / "model.pte")["label"] == "135M ToyQuant"
    assert registry.label("toy") == "ToyQuant" and registry.get("toy").quantize()(42, None) == 42

    opts = SuiteOptions(steps=3)
    assert "toy" in opts.methods
    SuiteOptions(methods=("toy",)).check()
    cmd = export_cmd("smollm2-135m", tmp_path / "o", "toy", opts)
    assert cmd[cmd.index("--method") + 1] == "toy" and cmd[cmd.index("--steps") + 1] == "3"  # it trains


def test_an_unknown_method_names_the_registered_ones():
    from exporter.errors import PtekitError

    with pytest.raises(PtekitError, match="unknown method 'awq'; choose one of bf16, ptq, spinquant, qlora"):
        registry.get("awq")
