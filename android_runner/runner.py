"""A stand-in for ExecuTorch's `llama_main` that runs on this machine.

Same flags (gflags style: --flag=value or --flag value, --warmup / --nowarmup), same behaviour
(optional warm-up generation, then one generation that echoes the prompt and streams tokens) and
the same "PyTorchObserver {json}" stats line, because both are ExecuTorch's own C++ LLM runner:
this file only parses flags and calls it through its Python bindings
(executorch.extension.llm.runner.TextLLMRunner). The benchmark harness therefore reads a phone's
llama_main and this runner with one parser.

One difference a reader of its numbers must know: this process also holds the Python
interpreter and libtorch, so its RSS is higher than llama_main's; it logs that overhead
("ptekit-runner: RSS before model load") so the harness can report it.

    python -m android_runner.runner --model_path=model.pte --tokenizer_path=tokenizer.json --prompt="Hi"
"""

from __future__ import annotations

import sys
from pathlib import Path

from exporter import log

_log = log.get(__name__)

# name -> (type, default, help), as in executorch/examples/models/llama/main.cpp.
FLAGS = {
    "model_path": (str, "llama2.pte", "Model serialized in flatbuffer format."),
    "data_paths": (str, "", "Data files for the model, comma separated."),
    "tokenizer_path": (str, "tokenizer.bin", "Tokenizer stuff."),
    "prompt": (str, "The answer to the ultimate question is", "Prompt."),
    "temperature": (float, 0.8, "Temperature; 0 = greedy argmax sampling (deterministic)."),
    "seq_len": (int, 128, "Total number of tokens to generate (prompt + output)."),
    "cpu_threads": (int, -1, "Number of CPU threads for inference; -1 keeps the runtime's default."),
    "num_bos": (int, 0, "Number of BOS tokens to prepend to the prompt."),
    "num_eos": (int, 0, "Number of EOS tokens to append to the prompt."),
    "warmup": (bool, False, "Whether to run a warmup run."),
    # Accepted for llama_main's command line; ExecuTorch 1.5.1's Python GenerationConfig has no
    # ignore_eos, so an early end token shows in generated_tokens, which the harness checks.
    "ignore_eos": (bool, False, "Whether to ignore EOS and continue generating until the length is reached."),
}
TRUE, FALSE = {"true", "1", "yes", "t", "y"}, {"false", "0", "no", "f", "n"}


class FlagError(Exception):
    pass


def parse_flags(argv: list[str]) -> dict:
    """gflags' syntax: -flag or --flag, =value or a separate value, bools bare or --noflag."""
    out = {name: default for name, (_, default, _) in FLAGS.items()}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("-") or arg in ("-", "--"):
            raise FlagError(f"unexpected argument '{arg}'")
        body = arg.lstrip("-")
        name, eq, value = body.partition("=")
        if name in ("help", "helpfull"):
            raise FlagError("help")
        if name not in FLAGS and name.startswith("no") and FLAGS.get(name[2:], (None,))[0] is bool and not eq:
            out[name[2:]] = False
            i += 1
            continue
        if name not in FLAGS:
            raise FlagError(f"unknown command line flag '{name}'")
        typ = FLAGS[name][0]
        if typ is bool:
            if eq and value.lower() not in TRUE | FALSE:
                raise FlagError(f"illegal value '{value}' specified for bool flag '{name}'")
            out[name] = value.lower() in TRUE if eq else True
            i += 1
            continue
        if not eq:
            if i + 1 >= len(argv):
                raise FlagError(f"flag '{name}' is missing its argument")
            value = argv[i + 1]
            i += 1
        try:
            out[name] = typ(value)
        except ValueError:
            raise FlagError(f"illegal value '{value}' specified for {typ.__name__} flag '{name}'") from None
        i += 1
    return out


def usage() -> str:
    lines = ["llama_main (ptekit host runner): ExecuTorch's LLM runner through its Python bindings", "flags:"]
    lines += [f"  --{n}  ({t.__name__}, default {d!r})  {h}" for n, (t, d, h) in FLAGS.items()]
    return "\n".join(lines)


def rss_mib(field: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def main(argv: list[str] | None = None) -> int:
    # Its lines go to stderr, as llama_main's do, where the harness reads them (android_runner.stats).
    log.setup()
    try:
        flags = parse_flags(sys.argv[1:] if argv is None else argv)
    except FlagError as e:
        if str(e) == "help":
            print(usage())
            return 0
        _log.error(f"ERROR: {e}")
        return 1

    from exporter.lower import load_executorch_ops

    load_executorch_ops()  # the LLM .pte uses ExecuTorch's custom SDPA/KV-cache and quantized kernels
    from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner

    from exporter.runtime import runtime_threads, set_runtime_threads

    if flags["cpu_threads"] > 0:
        _log.info(f"Resetting threadpool with num threads = {flags['cpu_threads']}")
        set_runtime_threads(flags["cpu_threads"])
    _log.info(f"ptekit-runner: threads = {runtime_threads()}")
    _log.info(f"ptekit-runner: RSS before model load: {rss_mib():.1f} MiB (anonymous {rss_mib('RssAnon'):.1f} MiB, "
        f"file-backed {rss_mib('RssFile'):.1f} MiB)")

    data = [p for p in flags["data_paths"].split(",") if p]
    if len(data) > 1:
        _log.error("ERROR: the host runner takes one --data_paths file (ExecuTorch's Python TextLLMRunner takes one)")
        return 1
    try:
        runner = TextLLMRunner(flags["model_path"], flags["tokenizer_path"], data[0] if data else None)
        if flags["warmup"]:
            # What llama_main's runner->warmup(prompt, seq_len) does: a silent generation, then reset.
            runner.generate(flags["prompt"], GenerationConfig(echo=False, max_new_tokens=flags["seq_len"], warming=True))
            runner.reset()
        config = GenerationConfig(seq_len=flags["seq_len"], temperature=flags["temperature"],
                                  num_bos=flags["num_bos"], num_eos=flags["num_eos"])
        runner.generate(flags["prompt"], config)
    except RuntimeError as e:
        _log.error(f"Failed to run llama runner: {e}")
        return 1
    sys.stdout.flush()
    return 0


HOST_RUNNER_TEMPLATE = """#!{python}
# ptekit's host stand-in for ExecuTorch's llama_main (same flags, same PyTorchObserver line).
import sys
sys.path.insert(0, {repo!r})
from exporter import openmp
openmp.runtime_process()  # before torch loads libgomp
from android_runner.runner import main
sys.exit(main())
"""


def write_host_runner(path: Path) -> Path:
    """An executable file named like llama_main that runs this module with this interpreter, so it
    can be pushed and started exactly like the real binary (on this machine or an emulated adb
    device)."""
    path = Path(path)
    repo = str(Path(__file__).resolve().parent.parent)
    path.write_text(HOST_RUNNER_TEMPLATE.format(python=sys.executable, repo=repo))
    path.chmod(0o755)
    return path


if __name__ == "__main__":
    sys.exit(main())
