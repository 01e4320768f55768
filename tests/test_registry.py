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


# --- what every method shares (quant/method.py) ---------------------------------------------------


@pytest.mark.parametrize("name", ["spinquant", "qlora"])
def test_every_method_reads_options_by_one_rule(name, tmp_path):
    from exporter.errors import PtekitError
    from quant.method import MethodInputs, option_values

    cls = registry.get(name).settings_class()
    flag = "r4" if name == "spinquant" else "recompute_activations"
    for word, value in (("yes", True), ("on", True), ("1", True), ("False", False), ("off", False), ("no", False)):
        assert option_values(name, cls, {flag: word}) == {flag: value}
    with pytest.raises(PtekitError, match=rf"^{name}: option {flag}='maybe' is not a boolean"):
        option_values(name, cls, {flag: "maybe"})
    number = "iterations" if name == "spinquant" else "rank"
    assert option_values(name, cls, {number: "7"}) == {number: 7}
    with pytest.raises(PtekitError, match=rf"^{name}: option {number}='x' is not an int$"):
        option_values(name, cls, {number: "x"})
    with pytest.raises(PtekitError, match=rf"^{name}: unknown option 'nope'; known options: preset, "):
        option_values(name, cls, {"nope": "1"})
    presets = registry.get(name).preset_table()
    from quant.method import pop_preset

    assert pop_preset(name, {}, MethodInputs(work_dir=tmp_path, device="cpu").device, presets) == presets["cpu"]
    assert pop_preset(name, {}, "cuda", presets) == presets["paper"]


def test_one_device_rule():
    import torch

    from exporter.errors import PtekitError
    from quant.method import resolve_device
    from quant.train import Dist, process_device

    assert resolve_device("cpu") == "cpu" and process_device("cpu", Dist()) == torch.device("cpu")
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(PtekitError, match="--device tpu: unknown device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        for f in (resolve_device, lambda d: process_device(d, Dist())):
            with pytest.raises(PtekitError, match="--device cuda: no CUDA GPU is visible to torch here"):
                f("cuda")
