"""Malformed configs in each layout (config.json, params.json, GGUF metadata) and malformed files: every
one ends in one PtekitError line naming the file, the field and the value, before anything is built.

The property-style tests draw many broken configs from a seeded generator (the same cases on every
run); the CLI tests check that a user sees exit code 2, one line, no traceback, and no output.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from exporter.checkpoint import build_model, load_checkpoint, random_checkpoint, save_meta_checkpoint
from exporter.config import ModelConfig
from exporter.errors import PtekitError

REPO = Path(__file__).resolve().parent.parent

# Values no size, count, epsilon or flag may take; each is wrong for every numeric field.
NOT_A_SIZE = ["64", "", 0, -4, 2.5, 64.0, True, False, [], [64], {}, {"v": 64}, float("nan"), float("inf"), -1e-5]
NOT_A_NUMBER = ["1e-5", 0, 0.0, -1, -1e-5, True, [], {}, float("nan"), float("inf"), float("-inf")]
NOT_A_FLAG = ["true", "yes", 1, 0, 1.0, [], {}]

HF_FIELDS = {
    "hidden_size": NOT_A_SIZE, "num_hidden_layers": NOT_A_SIZE, "num_attention_heads": NOT_A_SIZE,
    "num_key_value_heads": NOT_A_SIZE, "vocab_size": NOT_A_SIZE, "intermediate_size": NOT_A_SIZE,
    "head_dim": NOT_A_SIZE, "rms_norm_eps": NOT_A_NUMBER, "rope_theta": NOT_A_NUMBER,
    "tie_word_embeddings": NOT_A_FLAG,
}
META_FIELDS = {
    "dim": NOT_A_SIZE, "n_layers": NOT_A_SIZE, "n_heads": NOT_A_SIZE, "n_kv_heads": NOT_A_SIZE,
    "vocab_size": NOT_A_SIZE, "hidden_dim": NOT_A_SIZE, "multiple_of": NOT_A_SIZE, "norm_eps": NOT_A_NUMBER,
    "rope_theta": NOT_A_NUMBER, "ffn_dim_multiplier": NOT_A_NUMBER, "use_scaled_rope": NOT_A_FLAG,
    "rope_scale_factor": NOT_A_NUMBER, "tie_embeddings": NOT_A_FLAG,
}
# Values that are each valid alone but not together, or not what ptekit implements.
HF_COMBINATIONS = [
    ({"num_key_value_heads": 3}, "num_attention_heads = 4 is not a multiple of num_key_value_heads = 3"),
    ({"hidden_size": 66, "head_dim": None}, "hidden_size = 66 is not a multiple of num_attention_heads = 4"),
    ({"head_dim": 7}, "head size (head_dim or hidden_size / num_attention_heads) is 7, which is odd"),
    ({"hidden_act": "gelu"}, "hidden_act = 'gelu' is not supported"),
    ({"architectures": "LlamaForCausalLM"}, "architectures = 'LlamaForCausalLM' is not a list"),
    ({"architectures": ["MistralForCausalLM"], "model_type": "mistral"}, "unsupported architecture"),
    ({"rope_scaling": 5}, "rope_scaling = 5 is not an object"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling type 'yarn' is not supported"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": "32"}}, "rope_scaling: factor = '32' is not a positive number"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 32.0}}, "missing key 'low_freq_factor'"),
    ({"hidden_size": None}, "missing key 'hidden_size'"),
    # Valid numbers that disagree with the weights: caught before the weights are reshaped by them.
    ({"num_attention_heads": 8, "head_dim": None}, "weights and config disagree"),
    ({"num_key_value_heads": 4}, "weights and config disagree"),
    ({"hidden_size": 128, "head_dim": None}, "weights and config disagree"),
]
# Whole files that are not a config at all.
BAD_FILES = [b"", b"{", b"[]", b"null", b"42", b'"config"', b"\xff\xfe\x00garbage", b'{"hidden_size": 64,}']


def one_line_error(fn) -> str:
    with pytest.raises(PtekitError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg and msg.strip() == msg and msg, msg
    return msg


@pytest.fixture
def hf_dir(tiny_hf, tmp_path) -> Path:
    d = tmp_path / "hf"
    shutil.copytree(tiny_hf, d)
    return d


def write_hf(d: Path, base: dict, changes: dict) -> None:
    cfg = {**base, **changes}
    cfg = {k: v for k, v in cfg.items() if v is not None}
    (d / "config.json").write_text(json.dumps(cfg))


def drawn_cases(fields: dict, n: int, seed: int):
    """n configs, each with one to three fields set to values wrong for them."""
    rng = random.Random(seed)
    for _ in range(n):
        keys = rng.sample(sorted(fields), rng.randint(1, 3))
        yield {k: rng.choice(fields[k]) for k in keys}


def named(msg: str, changes: dict) -> bool:
    """The message names one of the changed fields together with its value (as Python writes it)."""
    return any(f"{k} = {v!r}" in msg for k, v in changes.items())


def test_every_malformed_hf_field_is_one_line(hf_dir):
    base = json.loads((hf_dir / "config.json").read_text())
    base["head_dim"] = base["hidden_size"] // base["num_attention_heads"]
    cases = [{k: v} for k, values in HF_FIELDS.items() for v in values] + list(drawn_cases(HF_FIELDS, 150, seed=1))
    for changes in cases:
        write_hf(hf_dir, base, changes)
        msg = one_line_error(lambda: load_checkpoint(hf_dir))
        assert msg.startswith(f"{hf_dir / 'config.json'}: ") and named(msg, changes), (changes, msg)


@pytest.mark.parametrize("changes, message", HF_COMBINATIONS)
def test_inconsistent_hf_configs_are_one_line(hf_dir, changes, message):
    base = json.loads((hf_dir / "config.json").read_text())
    write_hf(hf_dir, base, changes)
    msg = one_line_error(lambda: build_model(load_checkpoint(hf_dir)))
    assert message in msg and str(hf_dir) in msg, msg


@pytest.mark.parametrize("name", ["config.json", "params.json"])
def test_files_that_are_not_configs(hf_dir, tmp_path, name):
    d = hf_dir if name == "config.json" else meta_dir(tmp_path)
    for data in BAD_FILES:
        (d / name).write_bytes(data)
        msg = one_line_error(lambda: load_checkpoint(d))
        assert msg.startswith(f"{d / name}: "), msg


SMALL = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, hidden_dim=128)
PARAMS = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 256, "hidden_dim": 128,
          "norm_eps": 1e-5, "rope_theta": 10000.0}


def meta_dir(tmp_path: Path) -> Path:
    d = tmp_path / "meta"
    save_meta_checkpoint(d, SMALL, random_checkpoint(SMALL), PARAMS)
    return d


def test_every_malformed_meta_field_is_one_line(tmp_path):
    d = meta_dir(tmp_path)
    # multiple_of and ffn_dim_multiplier are read only without hidden_dim; rope_scale_factor only with
    # use_scaled_rope: the base below makes every field be read.
    base = {**PARAMS, "use_scaled_rope": True}
    base.pop("hidden_dim")
    cases = [{k: v} for k, values in META_FIELDS.items() for v in values] + list(drawn_cases(META_FIELDS, 150, seed=2))
    for changes in cases:
        (d / "params.json").write_text(json.dumps({**base, **changes}))
        msg = one_line_error(lambda: load_checkpoint(d))
        assert msg.startswith(f"{d / 'params.json'}: ") and named(msg, changes), (changes, msg)
    (d / "params.json").write_text(json.dumps({**PARAMS, "n_kv_heads": 3}))
    assert "n_heads = 4 is not a multiple of n_kv_heads = 3" in one_line_error(lambda: load_checkpoint(d))


# --- GGUF metadata -------------------------------------------------------------------------------

GGUF_FIELDS = {  # key -> (the writer's type, a good value)
    "llama.embedding_length": ("uint32", 64), "llama.block_count": ("uint32", 2),
    "llama.attention.head_count": ("uint32", 4), "llama.attention.head_count_kv": ("uint32", 2),
    "llama.feed_forward_length": ("uint32", 128), "llama.vocab_size": ("uint32", 256),
    "llama.rope.dimension_count": ("uint32", 16), "llama.attention.layer_norm_rms_epsilon": ("float32", 1e-5),
    "llama.rope.freq_base": ("float32", 10000.0),
}


def write_gguf(path: Path, changes: dict) -> Path:
    """Metadata only: the config is read before any tensor."""
    import gguf

    w = gguf.GGUFWriter(path, "llama")
    for key, (kind, good) in GGUF_FIELDS.items():
        value = changes.get(key, good)
        if value is None:
            continue
        if isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, float) or kind == "float32" and not isinstance(value, int):
            w.add_float32(key, value)
        elif value < 0:
            w.add_int32(key, value)
        else:
            getattr(w, f"add_{kind}")(key, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


GGUF_BAD = [
    ({"llama.attention.head_count": 0}, "llama.attention.head_count = 0 is not a positive integer"),
    ({"llama.embedding_length": "64"}, "llama.embedding_length = '64' is not a positive integer"),
    ({"llama.block_count": 2.5}, "llama.block_count = 2.5 is not a positive integer"),
    ({"llama.feed_forward_length": -1}, "llama.feed_forward_length = -1 is not a positive integer"),
    ({"llama.attention.layer_norm_rms_epsilon": 0.0}, "llama.attention.layer_norm_rms_epsilon = 0.0 is not a positive number"),
    ({"llama.rope.freq_base": float("nan")}, "llama.rope.freq_base = nan is not a positive number"),
    ({"llama.attention.head_count_kv": 3}, "llama.attention.head_count = 4 is not a multiple of llama.attention.head_count_kv = 3"),
    ({"llama.block_count": None}, "missing key 'llama.block_count'"),
    ({"llama.vocab_size": None}, "missing key 'llama.vocab_size'"),
]


@pytest.mark.parametrize("changes, message", GGUF_BAD)
def test_malformed_gguf_metadata_is_one_line(tmp_path, changes, message):
    from exporter.gguf_import import import_gguf

    f = write_gguf(tmp_path / "bad.gguf", changes)
    msg = one_line_error(lambda: import_gguf(f, tmp_path / "out"))
    assert msg.startswith(f"{f}: ") and message in msg, msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf"]


# --- through the CLI, as a user meets them ---------------------------------------------------------


def ptekit(*args):
    return subprocess.run([sys.executable, "-m", "exporter.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO)


@pytest.mark.parametrize("layout, changes, message", [
    ("hf", {"hidden_size": "2048"}, "hidden_size = '2048' is not a positive integer"),
    ("hf", {"num_attention_heads": 0}, "num_attention_heads = 0 is not a positive integer"),
    ("hf", {"rms_norm_eps": "tiny"}, "rms_norm_eps = 'tiny' is not a positive number"),
    ("hf", "[1, 2]", "expected a JSON object of settings, found list"),
    ("meta", {"n_heads": 0}, "n_heads = 0 is not a positive integer"),
    ("gguf", {"llama.attention.head_count": 0}, "llama.attention.head_count = 0 is not a positive integer"),
])
def test_cli_answers_a_malformed_config_with_one_line(hf_dir, tmp_path, layout, changes, message):
    if layout == "hf":
        base = json.loads((hf_dir / "config.json").read_text())
        if isinstance(changes, str):
            (hf_dir / "config.json").write_text(changes)
        else:
            write_hf(hf_dir, base, changes)
        src = hf_dir
    elif layout == "meta":
        src = meta_dir(tmp_path)
        (src / "params.json").write_text(json.dumps({**PARAMS, **changes}))
    else:
        src = write_gguf(tmp_path / "bad.gguf", changes)
    out = tmp_path / "out"
    before = sorted(p.name for p in tmp_path.iterdir())
    r = ptekit("export", src, "-o", out, "--method", "ptq")
    assert r.returncode == 2, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], r.stderr
    assert "Traceback" not in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output directory, no temp files



@pytest.mark.parametrize("changes, message", [
    ({"eos_token_id": "2"}, "eos_token_id = '2' is not a token id below the vocab_size 49152"),
    ({"eos_token_id": [2, -1]}, "eos_token_id = [2, -1] is not a token id"),
    ({"eos_token_id": []}, "eos_token_id = [] is not a token id"),
    ({"bos_token_id": 49152}, "bos_token_id = 49152 is not a token id below the vocab_size 49152"),
    ({"bos_token_id": [1]}, "bos_token_id = [1] is not a token id"),
])
def test_special_token_ids_are_checked(hf_dir, changes, message):
    base = json.loads((hf_dir / "config.json").read_text())
    write_hf(hf_dir, base, changes)
    assert message in one_line_error(lambda: load_checkpoint(hf_dir))


def test_eos_list_as_in_llama3_is_accepted(hf_dir):
    base = json.loads((hf_dir / "config.json").read_text())
    write_hf(hf_dir, base, {"eos_token_id": [2, 0]})
    assert load_checkpoint(hf_dir).extra == {"bos_token_id": 1, "eos_token_id": [2, 0]}


@pytest.mark.parametrize("index", [b"[]", b'{"weight_map": []}', b'{"weight_map": {"a": 3}}', b"{}"])
def test_malformed_safetensors_index(hf_dir, index):
    (hf_dir / "model.safetensors.index.json").write_bytes(index)
    assert "model.safetensors.index.json: no weight_map" in one_line_error(lambda: load_checkpoint(hf_dir))
