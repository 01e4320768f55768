"""What reaches the user's terminal: ptekit's own lines only, unless --verbose; progress bars only on a
terminal, one line per step in a log."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

from exporter import progress

PTEKIT = str(Path(sys.executable).parent / "ptekit")


def _generate(pte: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([PTEKIT, *flags, "generate", str(pte), "--prompt", "Hi", "-n", "4"],
                          capture_output=True, text=True, timeout=300)


def test_generate_prints_only_the_answer(tiny_ptq_pte):
    quiet = _generate(tiny_ptq_pte)
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stderr == "", quiet.stderr  # no ExecuTorch/tokenizer C++ logging, no library warnings
    assert quiet.stdout.strip(), "no answer on stdout"
    loud = _generate(tiny_ptq_pte, "--verbose")
    assert loud.returncode == 0, loud.stderr
    assert loud.stdout == quiet.stdout  # the libraries' lines never land in the answer
    assert loud.stderr.strip(), "--verbose shows the libraries' own logging"


class _Log(io.StringIO):
    def isatty(self):
        return False


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_in_a_log_is_one_line():
    log = _Log()
    with progress.bar(total=3, desc="GPTQ", unit="group", file=log) as b:
        for _ in range(3):
            b.update(1)
    assert log.getvalue().count("\n") == 1 and "\r" not in log.getvalue(), log.getvalue()
    assert log.getvalue().startswith("GPTQ: 3/3 group in "), log.getvalue()


def test_progress_bar_on_a_terminal_redraws():
    term = _Terminal()
    with progress.bar(total=3, desc="GPTQ", unit="group", file=term, mininterval=0) as b:
        for _ in range(3):
            b.update(1)
    assert "\r" in term.getvalue() and "3/3" in term.getvalue()


def test_quiet_reaches_every_bar():
    log = _Log()
    progress.set_quiet(True)
    try:
        with progress.bar(total=3, desc="qat", unit="step", file=log) as b:  # as deep in a method's loop
            b.update(3)
        with progress.phases("lower", 2) as advance:
            advance("a")
            advance("b")
    finally:
        progress.set_quiet(False)
    assert log.getvalue() == ""
