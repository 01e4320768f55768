"""Fixtures that build real artefacts once and keep them in a cache.

The cache lives in $PTEKIT_TEST_CACHE (default: <repo>/.cache/test-artifacts). An entry's key
hashes everything that shapes it: the sources of exporter/ and quant/, this file (the fixtures'
configs), the arguments of its build, and the versions of the packages that make it; a change to
any of them builds a new entry instead of reusing a stale one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
FAKE_ADB = REPO / "android_runner" / "fake_adb" / "adb"  # an emulated adb whose device is a directory
CACHE = Path(os.environ.get("PTEKIT_TEST_CACHE", REPO / ".cache" / "test-artifacts"))
SHARED_DATA = REPO.parent / "shared" / "data"


# The packages whose versions change what an export writes.
KEY_PACKAGES = ("torch", "executorch", "torchao", "pytorch-tokenizers", "safetensors", "gguf", "numpy")


def cache_key(*parts) -> str:
    """A hash of the sources, this file, the package versions and parts (a build's own arguments)."""
    from importlib import metadata

    h = hashlib.sha256()
    files = [Path(__file__).resolve()] + [f for pkg in ("exporter", "quant") for f in sorted((REPO / pkg).rglob("*.py"))]
    for f in files:
        h.update(str(f.relative_to(REPO)).encode() + b"\0" + f.read_bytes())
    for pkg in KEY_PACKAGES:
        try:
            version = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            version = "absent"
        h.update(f"{pkg}={version}\0".encode())
    h.update(repr(parts).encode())
    return h.hexdigest()[:12]


# The suite runs in pytest-xdist's worker processes (addopts in pyproject.toml), a file to a worker.
WORKER_PEAK_BYTES = 4 * 2**30  # the most one worker was measured to hold (SmolLM2's real exports): 3.5 GB


def pytest_xdist_auto_num_workers(config) -> int:
    """-n auto: a worker per core, as many as the available memory holds at a worker's peak."""
    with open("/proc/meminfo") as fh:
        available = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("MemAvailable:"))
    return max(1, min(os.cpu_count() or 1, available // WORKER_PEAK_BYTES))


if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    # Each worker's torch takes its share of the cores, so that two workers on two cores run two threads, not four.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


# ptekit's own cache (the GGUF import behind the smollm2_hf fixture) is keyed the same way.
os.environ.setdefault("PTEKIT_CACHE", str(CACHE / f"ptekit-cache-{cache_key()}"))


def cached_dir(name: str, build, *key_parts) -> Path:
    """CACHE/name-<cache key>, built by build(tmp_dir) if absent; atomic so a killed run leaves nothing.
    key_parts: whatever else shapes the build (its arguments), in a stable repr. The calling file
    is hashed too, since a test module's fixture configs (sizes, seeds) shape what it builds."""
    from exporter.atomic import atomic_dir, shared_dir

    caller = Path(sys._getframe(1).f_code.co_filename)
    out = CACHE / f"{name}-{cache_key(name, caller.name, hashlib.sha256(caller.read_bytes()).hexdigest(), *key_parts)}"

    def build_whole():
        with atomic_dir(out) as tmp:
            build(tmp)

    return shared_dir(out, build_whole)  # xdist workers: one builds it, the others wait and reuse it


@pytest.fixture
def fake_adb(tmp_path, monkeypatch):
    """$ADB -> the emulated adb, its devices under tmp_path; returns the device root of 'emulator-5554'."""
    monkeypatch.setenv("ADB", str(FAKE_ADB))
    monkeypatch.setenv("FAKE_ADB_ROOT", str(tmp_path / "devices"))
    monkeypatch.setenv("FAKE_ADB_LOG", str(tmp_path / "adb.log"))
    for var in [v for v in os.environ if v.startswith("FAKE_ADB_") and v not in ("FAKE_ADB_ROOT", "FAKE_ADB_LOG")]:
        monkeypatch.delenv(var)
    monkeypatch.delenv("ANDROID_SERIAL", raising=False)
    return tmp_path / "devices" / "emulator-5554"


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    from exporter.defaults import embedded_gguf

    return embedded_gguf()


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_gguf) -> Path:
    from exporter.gguf_import import import_gguf_cached

    return import_gguf_cached(smollm2_gguf)  # one import, however many workers ask for it at once


TINY_CONFIG = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, vocab_size=49152)


def write_tiny_hf(d: Path, smollm2_hf: Path, seed: int = 0, tie: bool = True, **overrides) -> Path:
    """A random-weight Llama in the HF layout, with SmolLM2's real tokenizer."""
    from safetensors.torch import save_file

    from exporter.checkpoint import meta_to_hf_tensor, random_checkpoint
    from exporter.config import ModelConfig, to_hf_config

    cfg = ModelConfig(**{**TINY_CONFIG, **overrides}, rope_theta=100000.0, tie_embeddings=tie)
    sd = random_checkpoint(cfg, seed=seed)
    hf = {name: v.contiguous() for name, v in (meta_to_hf_tensor(k, v, cfg) for k, v in sd.items())}
    d.mkdir(parents=True, exist_ok=True)
    save_file(hf, d / "model.safetensors")
    (d / "config.json").write_text(json.dumps(to_hf_config(cfg, 1, 2)))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2_hf / name, d / name)
    return d


@pytest.fixture(scope="session")
def tiny_hf(smollm2_hf) -> Path:
    return cached_dir("tiny-hf", lambda d: write_tiny_hf(d, smollm2_hf), str(smollm2_hf), TINY_CONFIG)


def exported(name: str, checkpoint: Path, method: str, **kw) -> Path:
    from exporter.pipeline import export

    return cached_dir(name, lambda d: export(checkpoint, d, method, **kw), str(checkpoint), method, sorted(kw.items())) / "model.pte"


def relowered_with_every_xnnpack_pass(done: Path, checkpoint: Path, method: str, tmp: Path, monkeypatch,
                                      **kw) -> bytes:
    """The .pte that export `done` (a finished export directory) gives with all of XNNPACK's preprocess
    passes, including those exporter.lower leaves out. A copy of the directory is exported again, so a
    method's saved work (rotations, trained weights) is reused and only the lowering runs."""
    import exporter.lower

    monkeypatch.setattr(exporter.lower, "_passes_without_effect_on_llms", lambda: ())
    return _exported_again(done, checkpoint, method, tmp / "every-pass", **kw).read_bytes()


def relowered_unfused(done: Path, checkpoint: Path, method: str, tmp: Path, monkeypatch, **kw) -> Path:
    """The .pte of export `done` lowered again without fusing wq/wk/wv (quant.fuse)."""
    import quant.fuse

    monkeypatch.setattr(quant.fuse, "fuse_qkv", lambda model: model)
    return _exported_again(done, checkpoint, method, tmp / "unfused", **kw)


def _exported_again(done: Path, checkpoint: Path, method: str, again: Path, **kw) -> Path:
    from exporter.pipeline import export

    shutil.copytree(done, again)
    return export(checkpoint, again, method, **kw).pte


def same_logits(a: Path, b: Path, prompt_len: int = 12, steps: int = 6) -> None:
    """Asserts that two .pte files give bit-identical logits for a prompt and greedy steps after it
    (benchmarks.tools.same_logits, the comparison the benchmarks use)."""
    from benchmarks.tools.same_logits import compare

    same, worst = compare(a, b, prompt_len, steps)
    assert same, f"logits differ: largest absolute difference {worst}"


@pytest.fixture(scope="session")
def tiny_ptq_pte(tiny_hf) -> Path:
    """A small real .pte (2 layers, SmolLM2 tokenizer) for harness and runtime tests."""
    return exported("tiny-ptq", tiny_hf, "ptq", max_seq_len=256, eval_method=True)


@pytest.fixture(scope="session")
def tiny_kv8_pte(tiny_hf) -> Path:
    """tiny_ptq_pte's model exported with --kv-cache int8."""
    return exported("tiny-ptq-kv8", tiny_hf, "ptq", max_seq_len=256, eval_method=True, kv_cache="int8")


@pytest.fixture(scope="session")
def smollm2_ptq_pte(smollm2_hf) -> Path:
    """The embedded default model, ptq, exported as a user would (the default flags but a 512-token
    cache; several minutes, cached)."""
    return exported("smollm2-ptq", smollm2_hf, "ptq", max_seq_len=512)


@pytest.fixture(scope="session")
def wikitext_test() -> Path:
    p = SHARED_DATA / "wikitext-2-raw-test.txt"
    if not p.exists():
        pytest.fail(f"{p} missing: tests expect ../shared/data beside the checkout")
    return p


@pytest.fixture(scope="session")
def wikitext_valid() -> Path:
    return SHARED_DATA / "wikitext-2-valid-tokens.txt"


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
