"""Start a profile's SGLang server as a child process, wait for health, stop it and its children.

Used by `agentserve demo`, the benchmarks and the test fixtures. Stopping sends SIGTERM to
SGLang's HTTP process (it drains and stops its scheduler/detokenizer children), then kills
whatever of the tree is left.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import psutil
import requests

from agentserve.server.launcher import build_plan, check_ready
from agentserve.profile import Profile, ProfileError

log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def kill_tree(pid: int, timeout: float = 10.0) -> None:
    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    procs = root.children(recursive=True) + [root]
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=timeout)


class ServerProcess:
    """A running SGLang server for one profile, on 127.0.0.1 and a free port."""

    def __init__(self, profile: Profile, log_path: str | Path | None = None, port: int | None = None,
                 extra_env: dict[str, str] | None = None):
        problems = check_ready(profile)
        if problems:
            raise ProfileError(problems)
        self.profile = profile
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.plan = build_plan(profile, port=self.port)
        self.log_path = Path(log_path) if log_path else None
        self._extra_env = extra_env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self._temp_log: Path | None = None
        self.start_seconds: float | None = None

    def _log_tail(self, lines: int = 25) -> str:
        """The end of the server's log, so a start-up failure says why where it is reported."""
        if self.log_path is None or not self.log_path.is_file():
            return ""
        tail = self.log_path.read_bytes().decode("utf-8", "replace").splitlines()[-lines:]
        return "\n--- last lines of the log ---\n" + "\n".join(tail)

    def start(self, timeout: float = 600.0, attempts: int = 3) -> ServerProcess:
        """Start and wait for /health. SGLang's own processes take ports of their own after we
        picked ours, so now and then one of them holds it first and the HTTP server cannot bind
        (uvicorn logs it and the process lives on, never healthy): then start again on a new
        port rather than wait out the timeout."""
        for _ in range(attempts):
            if self._start_once(timeout):
                return self
            taken, self.port = self.port, free_port()
            log.warning("port %d was taken before SGLang's HTTP server could bind it; starting again on %d",
                        taken, self.port)
            self.url = f"http://127.0.0.1:{self.port}"
            self.plan = build_plan(self.profile, port=self.port)
        raise RuntimeError(f"SGLang's HTTP server found its port taken {attempts} times; log: {self.log_path}")

    def _start_once(self, timeout: float) -> bool:
        """True when healthy; False when the HTTP port was taken (stopped, to be retried)."""
        env = {**os.environ, **self.plan.env, **self._extra_env}
        if self.log_path is None:  # the bind check reads the log; removed again by stop()
            fd, name = tempfile.mkstemp(prefix="agentserve-server-", suffix=".log")
            os.close(fd)
            self.log_path = self._temp_log = Path(name)
        t0 = time.monotonic()
        with open(self.log_path, "wb") as out:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(self.plan.argv, env=env, stdout=out, stderr=subprocess.STDOUT)
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                kill_tree(self.proc.pid)  # SGLang's own children, if any outlived it
                if self._port_taken():
                    self.stop(graceful_s=0.0)
                    return False
                raise RuntimeError(f"SGLang server exited with {self.proc.returncode} during start-up; log: {self.log_path}"
                                   f"{self._log_tail()}")
            try:
                if requests.get(self.url + "/health", timeout=5).status_code == 200:
                    self.start_seconds = time.monotonic() - t0
                    return True
            except requests.RequestException:
                pass
            if self._port_taken():
                self.stop(graceful_s=5.0)
                return False
            time.sleep(1.0)
        self.stop()
        raise TimeoutError(f"SGLang server not healthy after {timeout:.0f}s; log: {self.log_path}")

    def _port_taken(self) -> bool:
        assert self.log_path is not None
        try:
            text = self.log_path.read_bytes()
        except OSError:
            return False
        # uvicorn: "error while attempting to bind on address ('127.0.0.1', PORT): address already in use"
        return b"error while attempting to bind on address" in text and f"', {self.port})".encode() in text

    def peak_rss_bytes(self) -> int:
        """Resident memory of the server and its children now (a lower bound on the peak)."""
        if self.proc is None:
            return 0
        try:
            root = psutil.Process(self.proc.pid)
            return sum(p.memory_info().rss for p in [root] + root.children(recursive=True))
        except psutil.NoSuchProcess:
            return 0

    def stop(self, graceful_s: float = 20.0) -> None:
        """SIGTERM to SGLang's HTTP process only: it drains and stops its own children (a
        signal to the whole tree kills the scheduler first, which SGLang logs as a crash).
        Whatever is left after `graceful_s` is killed."""
        if self.proc is None:
            return
        try:
            tree = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            tree = []
        if graceful_s > 0 and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=graceful_s)
            except subprocess.TimeoutExpired:
                pass
        kill_tree(self.proc.pid)
        for p in tree:  # children orphaned when the HTTP process exited
            if p.is_running():
                kill_tree(p.pid, timeout=5.0)
        self.proc.wait()
        self.proc = None
        if self._temp_log is not None:
            self._temp_log.unlink(missing_ok=True)
            self.log_path = self._temp_log = None

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
