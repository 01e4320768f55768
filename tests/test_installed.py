"""ptekit as a user gets it from `pip install`: a wheel in a fresh virtual environment, every command
run from a directory outside the checkout, data found through the documented data directory."""

from __future__ import annotations

import ast
import importlib.metadata as md
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from exporter import defaults

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
OWN = {"exporter", "quant", "android_runner", "benchmarks"}


def _run(cmd, cwd, env, timeout=1800):
    p = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    print(f"$ {' '.join(str(c) for c in cmd)}  (rc {p.returncode})\n{p.stdout}{p.stderr}")
    return p


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A venv holding the ptekit wheel; its dependencies come from this environment through a .pth file
    (already installed, and no network), never the checkout's own sources."""
    tmp = tmp_path_factory.mktemp("installed")
    # Built from a copy of the sources, so setuptools' build/ never lands in the checkout or the wheel.
    src = tmp / "src"
    for pkg in OWN:
        shutil.copytree(REPO / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", tmp / "dist", src], check=True, capture_output=True)
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    wheel = next((tmp / "dist").glob("ptekit-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "-q",
                    "--no-deps", "--no-index", wheel], check=True, capture_output=True)
    site = next((venv / "lib").glob("python3.*/site-packages"))
    deps = [p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()]
    (site / "zz-deps.pth").write_text("\n".join(deps) + "\n")
    home = tmp / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", defaults.DATA_ENV, "XDG_CACHE_HOME")}
    env.update(HOME=str(home), PATH=f"{venv / 'bin'}:{env['PATH']}")
    work = tmp / "work"
    work.mkdir()
    return venv, work, env


def test_installed_cli_runs_outside_the_checkout(installed, tiny_hf):
    venv, work, env = installed
    where = _run([venv / "bin" / "python", "-c", "import exporter; print(exporter.__file__)"], work, env)
    assert str(venv) in where.stdout and str(REPO) not in where.stdout, where.stdout

    exp = _run(["ptekit", "export", tiny_hf, "-o", "out", "--method", "ptq", "--max-seq-len", "128"], work, env)
    assert exp.returncode == 0, exp.stderr
    assert (work / "out" / "model.pte").is_file()
    assert "\r" not in exp.stderr and re.search(r"^lower: 3/3 phase", exp.stderr, re.M), exp.stderr

    gen = _run(["ptekit", "generate", "out/model.pte", "--prompt", "Hi", "-n", "4"], work, env)
    assert gen.returncode == 0 and gen.stdout.strip() and gen.stderr == "", gen.stderr

    # No data anywhere: one line that says how to get WikiText-2 and where to put it.
    evaluate = ["ptekit", "eval", "out/model.pte", "--seq-len", "64", "--max-tokens", "192", "-q"]
    missing = _run(evaluate, work, env)
    assert missing.returncode == 2, missing.stderr
    assert missing.stderr.count("\n") == 1 and "--data" in missing.stderr \
        and defaults.DATA_ENV in missing.stderr, missing.stderr

    # The data directory from the environment variable, and an explicit file.
    found = _run(evaluate, work, {**env, defaults.DATA_ENV: str(SHARED_DATA)})
    assert found.returncode == 0 and "ppl" in found.stdout.lower(), found.stderr
    text = work / "text.txt"
    text.write_text((SHARED_DATA / "wikitext-2-raw-test.txt").read_text()[:20000])
    explicit = _run([*evaluate, "--data", text], work, env)
    assert explicit.returncode == 0 and "ppl" in explicit.stdout.lower(), explicit.stderr


def test_data_directories_in_order(tmp_path, monkeypatch):
    monkeypatch.delenv(defaults.DATA_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    name = "wikitext-2-raw-test.txt"
    assert defaults.data_file(name) == SHARED_DATA / name  # the checkout's default (tests, CI)
    cached = tmp_path / "cache" / "ptekit" / "data"
    cached.mkdir(parents=True)
    (cached / name).write_text("x")
    assert defaults.data_file(name) == cached / name  # the user's cache comes first
    monkeypatch.setenv(defaults.DATA_ENV, str(tmp_path / "elsewhere"))
    with pytest.raises(defaults.PtekitError, match=defaults.DATA_ENV):
        defaults.data_file(name)  # $PTEKIT_DATA, when set, is the only place


def _rows_raw(text: str) -> list[str]:
    """The parquet's rows back from the raw test file (one line each, "" for a blank line)."""
    text, rows, p = text.replace("\r\n", "\n"), [], 0
    while True:
        if p == len(text) or text.startswith("\n\n", p):
            rows.append("")
        else:
            q = text.index("\n", p) + 1
            rows.append(text[p:q])
            p = q
        if p == len(text):
            return rows
        assert text.startswith("\n\n", p)
        p += 2


def test_the_workflows_wikitext2_download_writes_the_measured_bytes(tmp_path):
    """The export workflow's download (.ci/fetch_wikitext2.py): rows as Hugging Face's parquet holds them
    (4358 test, 3760 validation, the split sizes) give back the shared files byte for byte; any other
    bytes are refused and nothing is written."""
    spec = importlib.util.spec_from_file_location("fetch_wikitext2", REPO / ".ci" / "fetch_wikitext2.py")
    fetch_wikitext2 = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fetch_wikitext2)
    raw = (SHARED_DATA / "wikitext-2-raw-test.txt").read_bytes().decode()
    valid = (SHARED_DATA / "wikitext-2-valid-tokens.txt").read_bytes().decode()
    rows = {"wikitext-2-raw-test.txt": _rows_raw(raw),
            "wikitext-2-valid-tokens.txt": ["" if r == " \n" else r for r in valid[1:].splitlines(keepends=True)]}
    assert [len(r) for r in rows.values()] == [4358, 3760]
    for name, r in rows.items():
        path = fetch_wikitext2.write_checked(tmp_path, name, fetch_wikitext2.file_bytes(name, r))
        assert path.read_bytes() == (SHARED_DATA / name).read_bytes()
    with pytest.raises(defaults.PtekitError, match="sha256"):
        fetch_wikitext2.write_checked(tmp_path / "x", "wikitext-2-raw-test.txt", b"other text")
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())


def _imports() -> set[str]:
    """Top-level modules the packages import, and those they locate with find_spec("...")."""
    found = set()
    for pkg in OWN:
        for f in (REPO / pkg).rglob("*.py"):
            for n in ast.walk(ast.parse(f.read_text())):
                if isinstance(n, ast.Import):
                    found |= {a.name.split(".")[0] for a in n.names}
                elif isinstance(n, ast.ImportFrom) and n.level == 0 and n.module:
                    found.add(n.module.split(".")[0])
                elif isinstance(n, ast.Call) and getattr(n.func, "attr", None) == "find_spec" and n.args \
                        and isinstance(n.args[0], ast.Constant):
                    found.add(n.args[0].value.split(".")[0])
    return {m for m in found if m not in OWN and m not in sys.stdlib_module_names}


def test_every_import_is_a_declared_dependency():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = set()
    for req in project["dependencies"] + sum(project["optional-dependencies"].values(), []):
        name = re.split(r"[ ;<>=!~\[]", req, maxsplit=1)[0]
        declared.add(name.lower().replace("_", "-"))
    dists = md.packages_distributions()
    undeclared = {m: dists.get(m) for m in _imports()
                  if not {d.lower().replace("_", "-") for d in dists.get(m, [m])} & declared}
    assert not undeclared, f"imported but not in pyproject.toml: {undeclared}"
