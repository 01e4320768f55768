"""Reading what a run left behind: llama_main's "PyTorchObserver {json}" line and the RSS samples.

The observer line is the one ExecuTorch's LLM runner prints (extension/llm/runner/stats.h); the
metrics are computed from its timestamps the way stats.h's own report does, so they mean the
same for ExecuTorch's llama_main on a phone and for ptekit's host runner.
"""

from __future__ import annotations

import json
import re
import signal

from exporter.errors import PtekitError

OBSERVER = "PyTorchObserver "
HOST_RSS_LINE = re.compile(r"ptekit-runner: RSS before model load: ([0-9.]+) MiB"
                           r"(?: \(anonymous ([0-9.]+) MiB, file-backed ([0-9.]+) MiB\))?")
KIB_PER_MIB = 1024


def parse_observer(stdout: str) -> dict:
    """The last observer line's JSON. The generated text is printed before it, sometimes on the
    same line, so the JSON is read from the marker to the end of its object."""
    at = stdout.rfind(OBSERVER + "{")
    if at < 0:
        raise PtekitError("the runner printed no 'PyTorchObserver {...}' stats line; is it ExecuTorch's llama_main "
                          "(or `--runner host`), and did it finish generating?")
    try:
        obs, _ = json.JSONDecoder().raw_decode(stdout, at + len(OBSERVER))
    except json.JSONDecodeError as e:
        raise PtekitError(f"the runner's PyTorchObserver line is not valid JSON ({e.msg}); was its output cut short?") from None
    missing = [k for k in ("prompt_tokens", "generated_tokens", "inference_start_ms", "prompt_eval_end_ms",
                           "first_token_ms", "inference_end_ms") if k not in obs]
    if missing:
        raise PtekitError(f"the runner's PyTorchObserver line lacks {', '.join(missing)}; is it ExecuTorch's llama_main?")
    return obs


def parse_rss(text: str) -> dict:
    """The sampler's "VmHWM_kB VmRSS_kB [RssAnon_kB RssFile_kB]" lines -> peaks in MiB (None when no
    sample was taken). The anonymous/file split is the one of the sample with the largest VmRSS:
    file pages are the mapped .pte (and libraries), anonymous ones what the runtime allocated
    (the delegate's packed weights, the KV cache, activations)."""
    samples = []
    for line in text.splitlines():
        parts = line.split()
        if parts and all(p.isdigit() for p in parts):
            samples.append([int(p) for p in parts])
    mib = lambda kb: round(kb / KIB_PER_MIB, 1)  # noqa: E731
    with_rss = [s for s in samples if len(s) >= 2]
    top = max(with_rss, key=lambda s: s[1]) if with_rss else None
    return {
        "samples": len(samples),
        "peak_rss_mib": mib(max(s[0] for s in samples)) if samples else None,  # VmHWM: the kernel's own peak
        "max_sampled_vmrss_mib": mib(top[1]) if top else None,
        "rss_anon_mib": mib(top[2]) if top and len(top) >= 4 else None,
        "rss_file_mib": mib(top[3]) if top and len(top) >= 4 else None,
    }


def _rate(tokens: int, seconds: float) -> float | None:
    # Timestamps have millisecond resolution; a zero-length window has no meaningful rate.
    return round(tokens / seconds, 2) if seconds > 0 else None


def run_metrics(obs: dict) -> dict:
    """Decode and prefill tokens/s, time to first token and load time, as stats.h computes them."""
    scale = float(obs.get("SCALING_FACTOR_UNITS_PER_SECOND", 1000))
    start, prompt_end = obs["inference_start_ms"], obs["prompt_eval_end_ms"]
    prefill_s = (prompt_end - start) / scale
    decode_s = (obs["inference_end_ms"] - prompt_end) / scale
    out = {
        "prompt_tokens": obs["prompt_tokens"],
        "generated_tokens": obs["generated_tokens"],
        "decode_tok_s": _rate(obs["generated_tokens"], decode_s),
        "ttft_s": round((obs["first_token_ms"] - start) / scale, 4),
        "prefill_tok_s": _rate(obs["prompt_tokens"], prefill_s),
        "prefill_s": round(prefill_s, 4),
        "decode_s": round(decode_s, 4),
    }
    if "model_load_start_ms" in obs and "model_load_end_ms" in obs:
        out["model_load_s"] = round((obs["model_load_end_ms"] - obs["model_load_start_ms"]) / scale, 3)
    return out


def host_rss_before_load(stderr: str) -> dict:
    """ptekit's host runner logs its RSS (Python + libtorch) and its anonymous/file split before it
    loads the model; a phone's llama_main logs nothing (all None)."""
    m = HOST_RSS_LINE.search(stderr)
    vals = [float(g) if g else None for g in m.groups()] if m else [None, None, None]
    return dict(zip(("rss_before_model_load_mib", "rss_anon_before_load_mib", "rss_file_before_load_mib"), vals))


def parse_temps(text: str) -> list[float | None]:
    """Hottest thermal zone before and after a run, in degrees C (sysfs gives millidegrees)."""
    out = []
    for line in text.splitlines()[:2]:
        line = line.strip()
        out.append(round(int(line) / 1000, 1) if line.isdigit() else None)
    return out


def describe_exit(rc: int) -> str:
    """'exit 1', or 'killed by SIGSEGV, exit 139' for the shell's 128+N convention."""
    if rc > 128:
        try:
            return f"killed by {signal.Signals(rc - 128).name}, exit {rc}"
        except ValueError:
            pass
    return f"exit {rc}"


def stderr_tail(stderr: str, lines: int = 3, chars: int = 400) -> str:
    """The last few non-empty lines, joined onto one line for a one-line error."""
    tail = [line.strip() for line in stderr.splitlines() if line.strip()][-lines:]
    text = " | ".join(tail)
    return ("..." + text[-chars:]) if len(text) > chars else (text or "(no stderr)")
