"""benchmarks/: the suite end to end on the tiny model (real exports, the real ExecuTorch runner, real
`ptekit eval`), its resume, its one-line errors, and the size arithmetic against a real .pte."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FAST = ["--methods", "bf16,ptq", "--peers", "", "--max-seq-len", "256", "--gen", "16", "--runs", "1", "--warmup", "0",
        "--eval-seq-len", "128", "--eval-max-tokens", "512", "--quiet"]


@dataclass
class SuiteRun:
    out: Path  # the --out directory
    proc: subprocess.CompletedProcess  # its command (proc.args), stdout and stderr


@pytest.fixture(scope="module")
def suite_run(tiny_hf, tmp_path_factory) -> SuiteRun:
    """The CI subset: `python -m benchmarks run` on the tiny model with bf16 and ptq."""
    out = tmp_path_factory.mktemp("bench")
    cmd = [sys.executable, "-m", "benchmarks", "run", "--model", str(tiny_hf), "--out", str(out), *FAST]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return SuiteRun(out, proc)


def test_suite_writes_table_json_and_chart(suite_run):
    out, stdout = suite_run.out, suite_run.proc.stdout
    record = json.loads((out / "benchmarks.json").read_text())
    assert set(record["methods"]) == {"bf16", "ptq"}
    for method, e in record["methods"].items():
        bench = e["bench"]
        assert bench["complete"] and len(bench["runs"]) == 1
        # --gen 16: the runner fills seq_len 80; the first new token comes from the prefill, 15 from decode.
        assert bench["runs"][0]["prompt_tokens"] == 64 and bench["runs"][0]["generated_tokens"] in (15, 16)
        assert bench["summary"]["decode_tok_s"]["median"] > 0
        assert bench["model"]["pte_bytes"] == (out / method / "model.pte").stat().st_size
        q = e["quality"]["metrics"]
        assert e["quality"]["target"]["kind"] == "pte" and e["quality"]["window"]["n_windows"] == 4
        assert q["perplexity"]["value"] > 1 and q["kl"]["mean"] >= 0
    # ptq's 4-bit blocks make it smaller than bf16, and its logits further from the bf16 reference.
    b, p = record["methods"]["bf16"], record["methods"]["ptq"]
    assert p["export"]["pte_bytes"] < b["export"]["pte_bytes"]
    assert p["quality"]["metrics"]["kl"]["mean"] > b["quality"]["metrics"]["kl"]["mean"]
    assert record["bandwidth"]["gb_per_s"] > 0
    assert [r["name"] for r in record["roofline"]] == ["ptekit bf16", "ptekit ptq"]
    # The roofline counts each file's weights but the embedding table, and its cache as its program holds
    # it: bf16 for the bf16 export.
    from benchmarks import sizes
    from benchmarks.roofline import kv_bytes_per_position
    from exporter.config import ModelConfig

    cfg = ModelConfig.from_dict(record["config"])
    kv = {m: kv_bytes_per_position(out / m / "model.pte", cfg.n_kv_heads) for m in ("bf16", "ptq")}
    assert kv["bf16"] * 2 == kv["ptq"]
    mean_pos = record["options"]["prompt_len"] + record["options"]["gen"] / 2
    read = {r["name"]: r["bytes_per_token"] for r in record["roofline"]}
    for m, e in record["methods"].items():
        weights = e["export"]["pte_bytes"] - sizes.embedding_bytes(cfg, m)
        assert read[f"ptekit {m}"] == int(weights + kv[m] * mean_pos)
    # The model card's table with ratios against bf16, as printed and as written.
    report = (out / "report.md").read_text()
    assert report.strip() in stdout
    ptq_row = next(line for line in report.splitlines() if " PTQ |" in line)
    size_ratio = (p["export"]["pte_bytes"] / b["export"]["pte_bytes"] - 1) * 100
    assert f"({size_ratio:+.1f}%)" in ptq_row
    decode = p["bench"]["summary"]["decode_tok_s"]["median"] / b["bench"]["summary"]["decode_tok_s"]["median"]
    assert f"({decode:.1f}x)" in ptq_row
    assert (out / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_suite_output_is_its_own(suite_run):
    """The libraries' logging (ExecuTorch's and the tokenizer's C++ lines, torchao's optional kernels) stays
    out of the suite's output, as it does out of the CLI's; --verbose would keep it."""
    for line in (suite_run.proc.stdout + suite_run.proc.stderr).splitlines():
        assert not any(lib in line for lib in ("cpuinfo_utils", "tokenizers:", "Failed to load", "_pytree.py")), line


def test_rerun_resumes_without_exporting_again(suite_run):
    out = suite_run.out
    before = {m: (out / m / "model.pte").stat().st_mtime_ns for m in ("bf16", "ptq")}
    bench_before = json.loads((out / "ptq" / "bench.json").read_text())["started_at"]
    proc = subprocess.run(suite_run.proc.args, capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert {m: (out / m / "model.pte").stat().st_mtime_ns for m in ("bf16", "ptq")} == before
    assert json.loads((out / "ptq" / "bench.json").read_text())["started_at"] == bench_before


def test_computed_size_matches_the_real_pte(suite_run, tiny_hf):
    """sizes.py's arithmetic (4-bit blocks, bf16 group scales, int8 tables) against the real files:
    what is left over is the program itself, a few tens of KB."""
    from benchmarks.sizes import computed_parts
    from exporter.checkpoint import load_checkpoint

    out = suite_run.out
    cfg = load_checkpoint(tiny_hf).config
    for method in ("bf16", "ptq"):
        measured = (out / method / "model.pte").stat().st_size
        rest = measured - computed_parts(cfg, method, 256).total()
        assert 0 < rest < 200_000, (method, rest)


def test_bad_arguments_are_one_line(tmp_path):
    for args, words in ((["--model", str(tmp_path / "nope")], "neither a known model"),
                        (["--methods", "bf16,awq"], "awq"),
                        (["--peers", "vllm"], "unknown peer")):
        proc = subprocess.run([sys.executable, "-m", "benchmarks", "run", "--out", str(tmp_path / "o"), *args],
                              capture_output=True, text=True, cwd=REPO)
        assert proc.returncode == 2 and words in proc.stderr and "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("shape,parameters,meta_mib", [("llama3.2-1b", 1_235_814_400, 1083),
                                                        ("llama3.2-3b", 3_212_749_824, 2435)])
def test_meta_sizes_are_computed_from_the_exact_shape(shape, parameters, meta_mib):
    from benchmarks.tools.meta_sizes import computed

    r = computed(shape)
    assert r["parameters"] == parameters  # Llama 3.2, tied embeddings
    spin = r["fp32_group_scales"]["spinquant"]["total"] / 2**20
    assert abs(spin - meta_mib) < 1.0  # Meta's SpinQuant .pte, from shape alone with 4-byte group scales


def test_llamacpp_peer_measures_the_embedded_gguf():
    """The llama.cpp peer on the real GGUF, when llama-cpp-python is installed (it builds from
    source in minutes, so bootstrap leaves it out and CI skips this). Its greedy tokens are
    llama.cpp's own greedy generation of the same prompt."""
    pytest.importorskip("llama_cpp")
    import itertools

    from benchmarks import llamacpp_peer
    from conftest import SHARED_DATA
    from exporter.defaults import embedded_gguf

    gguf = embedded_gguf()
    text = (SHARED_DATA / "wikitext-2-raw-test.txt").read_text(encoding="utf-8-sig")[:2000]
    rec = llamacpp_peer.bench(gguf, text, prompt_len=16, gen=6, runs=1, warmup=0, threads=1)
    run = rec["runs"][0]
    assert run["prompt_tokens"] == 16 and run["generated_tokens"] == 6
    assert run["decode_tok_s"] > 0 and run["prefill_tok_s"] > 0
    assert run["peak_rss_mib"] > run["rss_before_model_load_mib"] + 50  # the 98 MB model was loaded
    llm = llamacpp_peer.load_llama(gguf, n_ctx=64, n_threads=1, verbose=False)
    ids = llm.tokenize(text.encode(), add_bos=False, special=False)[:16]
    want = list(itertools.islice(llm.generate(ids, temp=0.0), 6))
    assert run["text"] == llm.detokenize(want).decode(errors="replace")
    parts = llamacpp_peer.gguf_parts(gguf)
    assert 0 < parts["token_embd_bytes"] < parts["tensor_bytes"] <= rec["gguf_bytes"]


def test_decode_profile_sums_the_runtimes_own_events(tiny_ptq_pte):
    """profile_decode reads ExecuTorch's ETDump of real decode steps: the delegate's GEMMs and the
    custom SDPA appear, and the parts fit inside the method's own time."""
    from benchmarks.tools.profile_decode import profile

    (r,) = profile([tiny_ptq_pte], prompt_len=8, steps=4)
    ms = r["ms_per_token"]
    assert ms["Method::execute"] > 0 and ms["DELEGATE_CALL"] > 0 and ms["llama::custom_sdpa.out"] > 0
    assert any(k.startswith("Fully Connected") for k in ms)
    assert ms["DELEGATE_CALL"] + ms.get("OPERATOR_CALL", 0) <= ms["Method::execute"] * 1.01
    assert r["ms_outside_operators"] >= -0.01 * ms["Method::execute"]
    assert r["decode_tok_s_wall"] > 0
    assert r["xnnpack_operators_per_token"] > 0  # the delegate's operators, counted from their events
    # The longest single operator call is one of the summed kinds, and a part of a step.
    big = r["largest_operator"]
    assert big["name"] in ms and big["name"] not in ("Method::execute", "DELEGATE_CALL", "OPERATOR_CALL")
    assert 0 < big["ms"] < 1.5 * ms["Method::execute"]
    # --prefill: the events of whole prompts, under their own key, the parts inside the method's time.
    (p,) = profile([tiny_ptq_pte], prompt_len=8, steps=4, prefill=True)
    pm = p["ms_per_prefill"]
    assert p["phase"] == "prefill" and "ms_per_token" not in p and p["prefill_tok_s_wall"] > 0
    assert p["xnnpack_operators_per_prefill"] > 0 and "xnnpack_operators_per_token" not in p
    assert pm["llama::custom_sdpa.out"] > 0 and any(k.startswith("Fully Connected") for k in pm)
    assert pm["DELEGATE_CALL"] + pm.get("OPERATOR_CALL", 0) <= pm["Method::execute"] * 1.01


def test_rss_stages_split_the_runners_memory(tiny_ptq_pte):
    r = subprocess.run([sys.executable, "-m", "benchmarks.tools.rss_stages", str(tiny_ptq_pte),
                        str(tiny_ptq_pte.parent / "tokenizer.json"), "--prompt-len", "8", "--gen", "4"],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [line for line in r.stdout.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [row.split("|")[1].strip() for row in rows][0] == "before load" and len(rows) == 4
    # Loading the model adds memory: its pages or the delegate's packed weights.
    grew = sum(float(row.split("|")[5]) + float(row.split("|")[6]) for row in rows[1:])
    assert grew > 1, r.stdout


def test_pte_distance_sets_one_file_against_another(tiny_ptq_pte, tiny_kv8_pte):
    """pte_distance runs both files through ExecuTorch's runtime on real text: a file against itself is
    at KL 0 and full agreement; the int8 cache's file is near the fp32 cache's but not at it."""
    def run(a, b):
        r = subprocess.run([sys.executable, "-m", "benchmarks.tools.pte_distance", str(a), str(b), "--seq-len", "128",
                            "--max-tokens", "512"], capture_output=True, text=True, cwd=REPO)
        assert r.returncode == 0, r.stderr[-2000:]
        return json.loads(r.stdout[r.stdout.index("{"):])

    same = run(tiny_ptq_pte, tiny_ptq_pte)
    assert same["windows"] == 4 and same["kl_a_b"]["mean"] == 0 and same["top1_agreement"]["mean"] == 1
    kv8 = run(tiny_ptq_pte, tiny_kv8_pte)
    assert 0 < kv8["kl_a_b"]["mean"] < 0.01 and kv8["top1_agreement"]["mean"] > 0.85


def test_moved_attention_tensors_leave_the_logits_as_they_were(tiny_ptq_pte, tiny_kv8_pte, tmp_path):
    """move_planned_tensors edits only where the attention's tensors lie in the planned memory: every
    moved copy runs in ExecuTorch's runtime with the original's logits bit for bit (same_logits), while
    a file with other numbers (the int8 cache) is reported different, exit status 1."""
    from executorch.exir._serialize._program import deserialize_pte_binary

    from benchmarks.tools.move_planned_tensors import sdpa_calls

    def same(a, b):
        r = subprocess.run([sys.executable, "-m", "benchmarks.tools.same_logits", str(a), str(b), "--prompt-len", "16",
                            "--steps", "8"], capture_output=True, text=True, cwd=REPO)
        assert r.returncode in (0, 1), r.stderr[-2000:]
        return r.returncode == 0, r.stdout

    def sdpa_offsets(path):
        plan = deserialize_pte_binary(path.read_bytes()).program.execution_plan[0]
        return [[plan.values[c[j]].val.allocation_info.memory_offset_low for j in (0, 1, 2, -1)]
                for c in sdpa_calls(plan)]

    before = sdpa_offsets(tiny_ptq_pte)
    for what, offset, moved in (("query", "0x800", 0), ("output", "0x0", 3), ("caches", "0x10000", 1)):
        out = tmp_path / f"{what}.pte"
        r = subprocess.run([sys.executable, "-m", "benchmarks.tools.move_planned_tensors", str(tiny_ptq_pte), str(out),
                            "--what", what, "--offset", offset], capture_output=True, text=True, cwd=REPO)
        assert r.returncode == 0, r.stderr[-2000:]
        after = sdpa_offsets(out)
        assert all(a[moved] != b[moved] for a, b in zip(after, before)), what
        assert same(tiny_ptq_pte, out)[0], what
    identical, report = same(tiny_ptq_pte, tiny_kv8_pte)
    assert not identical and report.startswith("different")


def test_roofline_reads_each_files_kv_cache_from_its_program(tiny_ptq_pte, tiny_kv8_pte):
    """The roofline's cache bytes come from the .pte's own planned buffers (export_llama's files carry no
    manifest): the fp32 and the int8 file's buffers give what the cache layouts' arithmetic says."""
    from benchmarks.roofline import kv_bytes_per_position
    from exporter.config import ModelConfig
    from exporter.manifest import read_manifest
    from exporter.memory import kv_cache_bytes

    shape = read_manifest(tiny_ptq_pte.parent)["model"]
    cfg = ModelConfig.from_dict({k: v for k, v in shape.items() if k != "parameters"})
    fp32, int8 = (kv_bytes_per_position(p, cfg.n_kv_heads) for p in (tiny_ptq_pte, tiny_kv8_pte))
    assert fp32 == kv_cache_bytes(cfg, 1, "fp32") and int8 == kv_cache_bytes(cfg, 1, "int8")
    assert int8 < fp32 / 3
    # A file of another shape is one clear error, not a guess.
    from exporter.errors import PtekitError

    with pytest.raises(PtekitError, match="no KV cache of 256 positions"):
        kv_bytes_per_position(tiny_ptq_pte, cfg.n_kv_heads + 1)


def test_pte_speed_loads_every_file_first_once_and_pools_the_rounds(tiny_ptq_pte, tiny_kv8_pte, tmp_path):
    """Two files are measured in two fresh processes, each loading a different file first, and each
    file's figures pool the rounds of both; --one-load-order measures once in the order given."""
    out = tmp_path / "speed.json"
    files = [sys.executable, "-m", "benchmarks.pte_speed", str(tiny_ptq_pte), str(tiny_kv8_pte), "--labels", "fp32,int8"]
    base = [*files, "--context", "8,16", "--gen", "3", "--rounds", "2"]
    r = subprocess.run([*base, "--json", str(out)], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    record = json.loads(out.read_text())
    assert record["load_orders"] == [["fp32", "int8"], ["int8", "fp32"]]
    assert "load order 2/2: int8, fp32" in r.stderr
    for c in ("8", "16"):
        for label in ("fp32", "int8"):
            decode = record["results"][c][label]["decode"]
            assert len(decode["all"]) == 4 and min(decode["all"]) > 0  # 2 rounds in each of 2 orders
            assert decode["median"] == round(statistics.median(decode["all"]), 2)
    assert "| 16 | int8 |" in r.stdout and "2 load order(s)" in r.stdout
    r = subprocess.run([*base, "--json", str(out), "--one-load-order"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    record = json.loads(out.read_text())
    assert record["load_orders"] == [["fp32", "int8"]] and len(record["results"]["8"]["int8"]["decode"]["all"]) == 2
    # A child's failure (a context the files cannot hold) is the parent's one-line exit, not a traceback.
    r = subprocess.run([*files, "--context", "300"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode != 0 and "holds 256 positions" in r.stderr and "Traceback" not in r.stderr
    assert "failed in load order fp32, int8" in r.stderr


def test_decode_profile_averages_the_load_orders(tiny_ptq_pte, tiny_kv8_pte, tmp_path):
    out = tmp_path / "prof.json"
    r = subprocess.run([sys.executable, "-m", "benchmarks.tools.profile_decode", str(tiny_ptq_pte), str(tiny_kv8_pte),
                        "--prompt-len", "8", "--steps", "3", "--json", str(out)], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    results = json.loads(out.read_text())
    assert [x["pte"] for x in results] == [str(tiny_ptq_pte), str(tiny_kv8_pte)]
    assert all(x["load_orders"] == 2 and x["ms_per_token"]["Method::execute"] > 0 for x in results)
    # Each file's figures are its own in every order: the int8 cache's attention is only in its file.
    fp32, int8 = (x["ms_per_token"] for x in results)
    assert fp32["llama::custom_sdpa.out"] > 0 and "llama::custom_quantized_sdpa.out" not in fp32
    assert int8["llama::custom_quantized_sdpa.out"] > 0 and "llama::custom_sdpa.out" not in int8
