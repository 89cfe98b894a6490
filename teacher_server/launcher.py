"""Starting and stopping a `teacher-server serve` child process: the one launcher of the demo, the experiments, the
benchmarks, the scripts and the tests.

The child says that it serves with one JSON line on stdout (`Ready`, printed by `serve_until_signalled`). Stdout
is the machine's channel because nothing else is printed there: the logs, and the line for people
("teacher-server: serving MODEL on HOST:PORT; ..."), go to stderr. `ServerProcess` waits for that line and drains
both streams into one log file, so a full pipe never blocks the server.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Self

READY_EVENT = "ready"
LOG_TAIL_LINES = 20
TlsMode = Literal["off", "tls", "mtls"]


@dataclass(frozen=True)
class Ready:
    """What `teacher-server serve` announces, as one JSON line on stdout, once it serves."""

    address: str  # HOST:PORT of the gRPC service (the port it listens on, also after --port 0)
    models: tuple[str, ...]  # the served model names
    metrics_url: str | None  # Prometheus /metrics; None with --no-metrics
    dashboard_url: str | None  # None without --dashboard-port
    tls: TlsMode  # mtls: clients need a certificate of --tls-client-ca
    pid: int  # the server's process id

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    def to_line(self) -> str:
        return json.dumps({"event": READY_EVENT, **asdict(self)})

    @classmethod
    def from_line(cls, line: str) -> Ready | None:
        """The announcement `line` holds; None for any other line."""
        try:
            data = json.loads(line)
            if not isinstance(data, dict) or data.get("event") != READY_EVENT:
                return None
            return cls(
                address=str(data["address"]),
                models=tuple(str(m) for m in data["models"]),
                metrics_url=data["metrics_url"],
                dashboard_url=data["dashboard_url"],
                tls=data["tls"],
                pid=int(data["pid"]),
            )
        except (ValueError, KeyError, TypeError):
            return None


class LaunchError(RuntimeError):
    """The child exited, or did not announce that it serves in time. The message ends with its log's last lines."""

    def __init__(self, reason: str, log: Path, tail: list[str]) -> None:
        super().__init__("\n".join([f"{reason} (log: {log})", *(f"  {line}" for line in tail)]))
        self.reason = reason
        self.log = log
        self.tail = tail


def teacher_server_command() -> list[str]:
    """The `teacher-server` console script beside this interpreter (the venv's), else `python -m teacher_server.cli`."""
    script = Path(sys.executable).with_name("teacher-server")
    return [str(script)] if script.exists() else [sys.executable, "-m", "teacher_server.cli"]


def serve_argv(*flags: str) -> list[str]:
    """`teacher-server serve FLAGS...`."""
    return [*teacher_server_command(), "serve", *flags]


def settings_flags(settings: Mapping[str, Any]) -> list[str]:
    """`serve` flags for ServerSettings field values, e.g. {"port": 0, "model_kwargs": {...}, "metrics_port": None}
    -> ["--port", "0", "--model-kwargs", "{...}", "--no-metrics"]. None leaves a setting at its default (or the
    environment's), a bool is `--x` or `--no-x`; secrets are no flags (pass them in the environment)."""
    from maskedkd.settings_cli import flag_of
    from teacher_server.cli.settings_flags import SECRET_FIELDS
    from teacher_server.settings import ServerSettings

    flags: list[str] = []
    for name, value in settings.items():
        if name not in ServerSettings.model_fields or name in SECRET_FIELDS:
            raise ValueError(f"{name!r} is not a `teacher-server serve` flag")
        flag = flag_of(ServerSettings, name)
        if name == "metrics_port" and value is None:
            flags.append("--no-metrics")
        elif isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag.removeprefix("--"))
        elif value is not None:
            if isinstance(value, dict):
                text = json.dumps(value)
            elif name == "compile_shapes":
                text = ",".join(f"{images}:{kept}" for images, kept in value)
            else:
                text = str(value)
            flags += [flag, text]
    return flags


def stop_gracefully(proc: subprocess.Popen, *, timeout_s: float, process_group: bool = False) -> None:
    """SIGTERM (the server drains: health NOT_SERVING, in-flight requests finish and are billed, the ledger is
    flushed), wait up to `timeout_s`, then SIGKILL. `process_group`: signal the child's whole group (its own
    session, e.g. `start_new_session=True`)."""
    if proc.poll() is not None:
        return
    _signal(proc, signal.SIGTERM, process_group)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _signal(proc, signal.SIGKILL, process_group)
        proc.wait()


def _signal(proc: subprocess.Popen, sig: int, process_group: bool) -> None:
    try:
        if process_group:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
    except ProcessLookupError:  # it exited in the meantime
        pass


class _Announcement:
    """One launch's ready line, filled in by the thread that drains the child's stdout."""

    def __init__(self) -> None:
        self.ready: Ready | None = None
        self.done = threading.Event()  # set on the ready line, or when stdout closed (the child exited)


class ServerProcess:
    """A `teacher-server serve` child: `start()` returns its `Ready` (or raises LaunchError with its log's tail),
    `stop()` stops it gracefully, `kill()` at once, `restart()` both ways round; `with ServerProcess(...) as server`
    starts and stops it. `launch()` + `wait_ready()` start several at once. Every launch appends to `log`."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        log: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        new_session: bool = False,
        name: str = "teacher-server",
        start_timeout_s: float = 300.0,
        stop_timeout_s: float = 30.0,
    ) -> None:
        self.argv = list(argv)
        self.name = name  # in error messages
        self.log = log
        self.env = dict(env) if env is not None else None  # None: this process's environment
        self.cwd = cwd
        self.new_session = new_session  # own process group: a Ctrl-C meant for the parent does not reach it
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.proc: subprocess.Popen[str] | None = None
        self._announcement = _Announcement()
        self._drain: threading.Thread | None = None

    # ---------------------------------------------------------------------------------------------------- start

    def launch(self) -> Self:
        """Start the child without waiting for it to serve."""
        if self.alive:
            raise RuntimeError(f"{self.name} is already running (pid {self.pid})")
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("a") as log:
            log.write(f"$ {shlex.join(self.argv)}\n")
        announcement = self._announcement = _Announcement()
        with self.log.open("ab") as stderr:  # append mode: the child's stderr and the drained stdout interleave whole
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                errors="replace",
                env=self.env,
                cwd=self.cwd,
                start_new_session=self.new_session,
            )
        self._drain = threading.Thread(
            target=self._drain_stdout, args=(self.proc, announcement), daemon=True, name=f"drain-{self.proc.pid}"
        )
        self._drain.start()
        return self

    def wait_ready(self, timeout_s: float | None = None) -> Ready:
        """Block until the child announced that it serves; LaunchError (the child stopped) if it exits first or
        `timeout_s` runs out."""
        if self.proc is None:
            raise RuntimeError("launch() first")
        timeout_s = self.start_timeout_s if timeout_s is None else timeout_s
        if not self._announcement.done.wait(timeout_s):
            self.stop()
            raise LaunchError(
                f"{self.name} did not announce that it serves within {timeout_s:.0f} s", self.log, self.log_tail()
            )
        if self._announcement.ready is None:  # stdout closed before the line: the child is exiting
            try:
                code: int | str = self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()
                code = "unknown"
            self._join_drain()
            raise LaunchError(f"{self.name} exited with status {code} before serving", self.log, self.log_tail())
        return self._announcement.ready

    def start(self, timeout_s: float | None = None) -> Ready:
        """`launch()` and `wait_ready()`."""
        return self.launch().wait_ready(timeout_s)

    def restart(self, timeout_s: float | None = None) -> Ready:
        self.stop()
        return self.start(timeout_s)

    # ----------------------------------------------------------------------------------------------------- stop

    def stop(self, timeout_s: float | None = None) -> int | None:
        """SIGTERM, then SIGKILL after `timeout_s` (default stop_timeout_s); the exit status (None: never started)."""
        if self.proc is None:
            return None
        stop_gracefully(
            self.proc, timeout_s=self.stop_timeout_s if timeout_s is None else timeout_s, process_group=self.new_session
        )
        self._join_drain()
        return self.proc.returncode

    def kill(self) -> int | None:
        """SIGKILL: no drain, no graceful shutdown."""
        if self.proc is None:
            return None
        _signal(self.proc, signal.SIGKILL, self.new_session)
        self.proc.wait()
        self._join_drain()
        return self.proc.returncode

    def send_signal(self, sig: int) -> None:
        assert self.proc is not None, "launch() first"
        self.proc.send_signal(sig)

    def wait(self, timeout_s: float | None = None) -> int:
        """Block until the child exits (subprocess.TimeoutExpired after `timeout_s`); its exit status."""
        assert self.proc is not None, "launch() first"
        return self.proc.wait(timeout_s)

    # ---------------------------------------------------------------------------------------------------- state

    @property
    def ready(self) -> Ready | None:
        """The current launch's announcement (None until it came)."""
        return self._announcement.ready

    @property
    def address(self) -> str:
        if self.ready is None:
            raise RuntimeError(f"{self.name} has not announced that it serves: start() first")
        return self.ready.address

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> list[str]:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return text.rstrip("\n").splitlines()[-lines:]

    def __enter__(self) -> Self:
        if not self.alive:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------------------------------------ internals

    def _drain_stdout(self, proc: subprocess.Popen[str], announcement: _Announcement) -> None:
        assert proc.stdout is not None
        try:
            with self.log.open("a") as log:
                for line in proc.stdout:
                    log.write(line)
                    log.flush()
                    if announcement.ready is None:
                        announcement.ready = Ready.from_line(line)
                        if announcement.ready is not None:
                            announcement.done.set()
        finally:
            proc.stdout.close()
            announcement.done.set()

    def _join_drain(self) -> None:
        if self._drain is not None:
            self._drain.join(timeout=10)
