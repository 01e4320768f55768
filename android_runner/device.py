"""Where a benchmark runs: a phone over adb, or this machine, behind one interface.

A device has a work directory; files go in with push, commands run with shell (an argv whose
every element is shell-quoted, because `adb shell` hands one string to the phone's sh), results
come back with pull, and close removes the work directory. Nothing else differs between the two,
so the same scripts measure both.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from exporter.errors import PtekitError

REMOTE_DIR = "/data/local/tmp/ptekit"
EXIT_MARKER = "__ptekit_exit_status="
_EXIT_LINE = re.compile(re.escape(EXIT_MARKER) + r"(\d+)\r?\n?$")
RECONNECT_WAIT_S = 10.0


def shell_join(argv: list) -> str:
    """One command line in which every argument survives the remote sh unchanged."""
    return " ".join(shlex.quote(str(a)) for a in argv)


@dataclass
class ShellResult:
    rc: int
    stdout: str
    stderr: str


class Device:
    kind = "device"
    name = "device"
    workdir = ""

    def open(self) -> None:
        """Checks the device and makes an empty work directory."""
        raise NotImplementedError

    def push(self, local: Path, name: str | None = None) -> str:
        """Copies a local file into the work directory; returns its path there."""
        raise NotImplementedError

    def shell(self, argv: list, timeout: float | None = None, what: str = "a command") -> ShellResult:
        """Runs argv in the device's sh. A transport failure raises; the command's own exit status
        is returned, so the caller can fetch its output before judging it."""
        raise NotImplementedError

    def pull(self, remote: str, local_dir: Path) -> Path:
        """Copies a file or directory from the device into local_dir; returns the local path."""
        raise NotImplementedError

    def close(self) -> str | None:
        """Removes the work directory; returns a note when it could not."""
        raise NotImplementedError

    def path(self, name: str) -> str:
        return f"{self.workdir}/{name}"


class LocalDevice(Device):
    """This machine: a temporary work directory, commands through sh -c."""

    kind = "local"
    name = "local"

    def open(self) -> None:
        self.workdir = tempfile.mkdtemp(prefix="ptekit-bench-")

    def push(self, local: Path, name: str | None = None) -> str:
        dest = self.path(name or Path(local).name)
        try:
            # A symlink, not a copy: the runtime opens the same file either way, and a bf16 .pte
            # is large.
            os.symlink(Path(local).resolve(), dest)
        except OSError:
            shutil.copy(local, dest)
        return dest

    def shell(self, argv: list, timeout: float | None = None, what: str = "a command") -> ShellResult:
        # Its own session, so a timeout stops the whole command, not only the sh in front of it.
        p = subprocess.Popen(["sh", "-c", shell_join(argv)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, errors="replace", start_new_session=True)
        try:
            out, err = p.communicate(timeout=timeout)
        except BaseException as e:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            if isinstance(e, subprocess.TimeoutExpired):
                raise PtekitError(f"{what} did not finish within {timeout:.0f} s on this machine; raise --timeout") from None
            raise
        return ShellResult(p.returncode, out, err)

    def pull(self, remote: str, local_dir: Path) -> Path:
        src, dest = Path(remote), Path(local_dir) / Path(remote).name
        if not src.exists():
            raise PtekitError(f"{remote}: not found in the work directory")
        shutil.copytree(src, dest) if src.is_dir() else shutil.copy(src, dest)
        return dest

    def close(self) -> str | None:
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        return None


def find_adb() -> str:
    """$ADB, else adb on PATH."""
    env = os.environ.get("ADB")
    if env:
        if not (os.path.isfile(env) and os.access(env, os.X_OK)):
            raise PtekitError(f"$ADB={env}: not an executable file; point ADB at platform-tools' adb or unset it")
        return env
    found = shutil.which("adb")
    if not found:
        raise PtekitError("adb not found: install Android platform-tools and put adb on PATH (or set ADB=/path/to/adb), "
                          "or bench this machine with --device local")
    return found


# `adb devices -l` appends these key:value fields after the state.
_LONG_FIELDS = re.compile(r"\s+((?:usb|product|model|device|transport_id|features):\S*)$")


def parse_devices(text: str) -> dict[str, dict]:
    """`adb devices` or `adb devices -l` -> {serial: {"state": ..., and -l's usb/product/model/device/
    transport_id}}. The state is all the text after the serial (minus -l's fields): adb's
    "no permissions (...)" holds spaces and adb's own reason."""
    out = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("List of devices", "*", "adb server", "adb:")):
            continue
        serial, _, rest = line.partition("\t") if "\t" in line else line.partition(" ")
        rest, fields = rest.strip(), {}
        while m := _LONG_FIELDS.search(" " + rest):
            key, _, value = m.group(1).partition(":")
            fields[key] = value
            rest = (" " + rest)[: m.start()].strip()
        if serial and rest:
            out[serial.strip()] = {"state": rest, **fields}
    return out


def state_kind(state: str) -> str:
    """The state's name without adb's explanation: 'no permissions (user in plugdev ...)' -> 'no permissions'."""
    return "no permissions" if state.startswith("no permissions") else state.split(" ", 1)[0]


def _remedies(serial: str, state: str) -> dict[str, str]:
    m = re.match(r"no permissions \((.*?)\)", state)  # adb's guess at the cause, in parentheses
    reason = m.group(1) if m else "adb gave no reason"
    reboot = f"reboot it into Android (`adb -s {serial} reboot`) with USB debugging on, then re-run"
    return {
        "unauthorized": f"device {serial} is unauthorized: unlock the phone and accept the 'Allow USB debugging?' "
                        "prompt, then re-run",
        "authorizing": f"device {serial} is still authorizing this computer's key: unlock the phone, accept the "
                       "'Allow USB debugging?' prompt if it shows, wait a few seconds and re-run",
        "offline": f"device {serial} is offline: unplug and replug it (or run `adb reconnect`), then re-run",
        "connecting": f"device {serial} is still connecting: wait a few seconds and re-run; if it stays so, "
                      "unplug and replug it",
        "no permissions": f"device {serial} has no permissions: this user may not open its USB device (adb: {reason}); "
                          "add a udev rule for the phone's vendor id (developer.android.com/studio/run/device), "
                          "replug it and re-run",
        "recovery": f"device {serial} is in recovery mode: {reboot}",
        "rescue": f"device {serial} is in rescue mode: {reboot}",
        "sideload": f"device {serial} is in sideload mode (waiting for an update package): finish or cancel the "
                    f"sideload, {reboot}",
        "bootloader": f"device {serial} is in the bootloader: reboot it into Android (`fastboot reboot`) with USB "
                      "debugging on, then re-run",
        "host": f"{serial} is an adb host, not a phone (state 'host'): choose a phone's serial with --device",
        "detached": f"device {serial} is detached from adb: run `adb -s {serial} attach`, then re-run",
    }


def state_problem(serial: str, state: str | None, attached: dict[str, str]) -> str | None:
    """A one-line reason why this device cannot be used and what to do, or None when it can."""
    others = ", ".join(f"{s} ({state_kind(st)})" for s, st in attached.items()) or "none"
    if state is None:
        return f"device {serial} not found (attached: {others}); check the serial in `adb devices`"
    kind = state_kind(state)
    if kind == "device":
        return None
    return _remedies(serial, state).get(kind) or (
        f"device {serial} is in state '{state}', not 'device'; boot it normally with USB debugging on")


class AdbDevice(Device):
    """An Android phone over adb; the work directory is /data/local/tmp/ptekit."""

    kind = "adb"

    def __init__(self, serial: str | None = None, adb: str | None = None, workdir: str = REMOTE_DIR,
                 reconnect_wait_s: float = RECONNECT_WAIT_S):
        self.adb = adb or find_adb()
        self.serial = serial
        self.workdir = workdir
        self.reconnect_wait_s = reconnect_wait_s
        self.lost = False
        self.touched = False  # whether anything may have been written to the device
        self.attached: dict[str, dict] = {}  # the last `adb devices -l`

    @property
    def name(self) -> str:
        return f"adb:{self.serial}" if self.serial else "adb"

    def _run(self, args: list[str], timeout: float | None = 60, serial: bool = True) -> subprocess.CompletedProcess:
        cmd = [self.adb] + (["-s", self.serial] if serial and self.serial else []) + args
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, errors="replace")
        except FileNotFoundError:
            raise PtekitError(f"{self.adb}: cannot run adb; reinstall platform-tools or set ADB=/path/to/adb") from None

    def devices(self) -> dict[str, str]:
        """{serial: state} from `adb devices -l`; the long listing's fields go to self.attached."""
        p = self._run(["devices", "-l"], serial=False)
        if p.returncode != 0:
            raise PtekitError(f"`adb devices` failed ({_last_line(p)}); try `adb kill-server` and re-run")
        self.attached = parse_devices(p.stdout)
        return {serial: d["state"] for serial, d in self.attached.items()}

    def open(self) -> None:
        attached = self.devices()
        if self.serial is None:
            if not attached:
                raise PtekitError("no Android device attached (`adb devices` lists none): connect the phone over USB "
                                  "with USB debugging on (Settings > Developer options), or use --device local")
            if len(attached) > 1:
                named = ", ".join(s + (f" ({self.attached[s]['model']})" if self.attached[s].get("model") else "")
                                  for s in attached)
                raise PtekitError(f"several devices attached ({named}): choose one with --device SERIAL")
            self.serial = next(iter(attached))
        problem = state_problem(self.serial, attached.get(self.serial), attached)
        if problem:
            raise PtekitError(problem)
        # Whatever an interrupted earlier run left behind goes first.
        self.touched = True
        self.shell(["rm", "-rf", self.workdir], what="cleaning the work directory")
        self._check(self.shell(["mkdir", "-p", self.workdir], what="creating the work directory"), "creating the work directory")

    def _why_failed(self, what: str, p) -> PtekitError:
        """Classifies an adb failure: the device's state first (gone, offline, unauthorized), then
        the message (storage full), then the message itself."""
        text = (p.stderr or "") + (p.stdout or "")
        try:
            attached = self.devices()
        except PtekitError:
            attached = {}
        state = attached.get(self.serial)
        if state is None:
            self.lost = True
            return PtekitError(f"device {self.serial} disconnected during {what}: reconnect it and re-run")
        if state_kind(state) != "device":
            self.lost = True
            return PtekitError(f"during {what}: " + state_problem(self.serial, state, attached))
        if "No space left on device" in text:
            return PtekitError(f"device {self.serial}: storage full during {what} into {self.workdir}; "
                               "free space on the phone (Settings > Storage) and re-run")
        return PtekitError(f"adb failed during {what} on {self.serial}: {_last_line(p)}")

    def _check(self, r: ShellResult, what: str) -> ShellResult:
        if r.rc != 0:
            raise self._why_failed(what, r)
        return r

    def push(self, local: Path, name: str | None = None) -> str:
        local = Path(local)
        dest = self.path(name or local.name)
        what = f"pushing {local.name} ({local.stat().st_size / 1e6:.1f} MB)"
        p = self._run(["push", str(local), dest], timeout=None)
        if p.returncode != 0:
            raise self._why_failed(what, p)
        return dest

    def _shell(self, argv: list, timeout: float | None) -> tuple[subprocess.CompletedProcess, int | None]:
        """Runs argv in the device's sh; returns adb's result (the marker taken out of its stdout) and
        the command's exit status as the command line itself printed it, None when it printed none.

        Devices before Android 7 (no shell_v2) make `adb shell` return 0 whatever the command did,
        so the status adb returns is not trusted for the command, only the one printed after it."""
        line = f"{shell_join(argv)}; printf '%s%s\\n' {EXIT_MARKER} \"$?\""
        p = self._run(["shell", line], timeout=timeout)
        m = _EXIT_LINE.search(p.stdout or "")
        if m is None:
            return p, None
        p.stdout = p.stdout[: m.start()]
        return p, int(m.group(1))

    def shell(self, argv: list, timeout: float | None = None, what: str = "a command") -> ShellResult:
        try:
            p, rc = self._shell(argv, timeout)
        except subprocess.TimeoutExpired:
            err = self._why_failed(what, subprocess.CompletedProcess([], 1, "", ""))
            if self.lost:
                raise err from None
            raise PtekitError(f"{what} did not finish within {timeout:.0f} s on {self.serial}; raise --timeout") from None
        if rc is None:
            # The command line did not get to print its status: adb lost the device, or the remote
            # shell was killed. Asking adb about the device tells the two apart.
            if self._quiet_devices().get(self.serial) != "device":
                raise self._why_failed(what, p)
            rc = p.returncode or 255  # an old device's adb said 0, but the shell died before the end
        return ShellResult(rc, p.stdout, p.stderr)

    def _quiet_devices(self) -> dict[str, str]:
        try:
            return self.devices()
        except PtekitError:
            return {}

    def pull(self, remote: str, local_dir: Path) -> Path:
        p = self._run(["pull", remote, str(local_dir)], timeout=300)
        if p.returncode != 0:
            raise self._why_failed(f"pulling {remote}", p)
        return Path(local_dir) / Path(remote).name

    def close(self) -> str | None:
        if not self.touched:
            return None
        if self.lost:
            # A phone that dropped off the bus usually comes back within seconds.
            try:
                self._run(["wait-for-device"], timeout=self.reconnect_wait_s)
            except subprocess.TimeoutExpired:
                pass
            if self._quiet_devices().get(self.serial) != "device":
                return (f"{self.workdir} may remain on {self.serial} (it did not come back within "
                        f"{self.reconnect_wait_s:.0f} s); the next `ptekit bench` removes it")
            self.lost = False
        try:
            p, rc = self._shell(["rm", "-rf", self.workdir], timeout=60)
        except subprocess.TimeoutExpired:
            return f"removing {self.workdir} on {self.serial} timed out; the next `ptekit bench` removes it"
        if rc != 0:
            return f"could not remove {self.workdir} on {self.serial} ({_last_line(p)}); the next `ptekit bench` removes it"
        self.touched = False
        return None


def _last_line(p) -> str:
    lines = [line.strip() for line in ((p.stderr or "") + "\n" + (p.stdout or "")).splitlines() if line.strip()]
    return lines[-1] if lines else f"exit {p.returncode}"

