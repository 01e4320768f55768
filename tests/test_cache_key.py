"""The test-artefact cache (conftest.cached_dir) must not hand out an entry built from other inputs."""

from __future__ import annotations

from importlib import metadata

import conftest
from conftest import cache_key, cached_dir


def test_key_changes_with_arguments_and_package_versions(monkeypatch):
    base = cache_key("tiny-ptq", "ptq", [("max_seq_len", 256)])
    assert cache_key("tiny-ptq", "ptq", [("max_seq_len", 256)]) == base
    assert cache_key("tiny-ptq", "ptq", [("max_seq_len", 128)]) != base
    real = metadata.version
    for pkg in ("torch", "executorch", "torchao"):
        monkeypatch.setattr(metadata, "version", lambda p, pkg=pkg: "0.0.0+other" if p == pkg else real(p))
        assert cache_key("tiny-ptq", "ptq", [("max_seq_len", 256)]) != base, pkg


def test_a_changed_fixture_config_builds_a_new_entry(tmp_path, monkeypatch):
    monkeypatch.setattr(conftest, "CACHE", tmp_path)
    built = []
    first = cached_dir("tiny", lambda d: built.append("a"), {"dim": 64})
    assert cached_dir("tiny", lambda d: built.append("b"), {"dim": 64}) == first and built == ["a"]
    second = cached_dir("tiny", lambda d: built.append("c"), {"dim": 96})
    assert second != first and built == ["a", "c"]
