"""`agentserve launch`'s watch over SGLang: a clean stop on SIGTERM/SIGINT, a clear exit when
an SGLang process dies, and no process left behind either way.

Stop (SIGTERM or Ctrl-C): only SGLang's HTTP process gets SIGTERM (signalling the whole tree
kills the scheduler first, which SGLang reports as "Subprocess scheduler_0 crashed with exit
code -15"). SGLang then refuses new generation requests (503 + Retry-After, drain.py), finishes
the ones in flight, stops its scheduler and exits. Past the drain deadline the requests still
running are aborted (SGLang's /abort_request) so the same clean path ends; past a further grace
period, or on a second signal, the tree is killed and the exit code is 1.

Fault: when a named SGLang subprocess (sglang::scheduler, sglang::detokenizer, ...) dies while
no stop was asked for, the launcher says which one, stops what is left and exits 1.

The launcher is a Linux "child subreaper", so SGLang processes whose parent died are
re-parented to it, not to init, and are found and stopped at the end.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

import psutil
import requests

PR_SET_CHILD_SUBREAPER = 36
EXIT_FAULT = 1
POLL_S = 0.25


def _say(msg: str) -> None:
    print(f"agentserve: {msg}", file=sys.stderr, flush=True)


def become_subreaper() -> bool:
    """Orphaned descendants are re-parented to this process (Linux only)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def proc_title(p: psutil.Process) -> str:
    """SGLang names its processes with setproctitle ("sglang::scheduler"); comm is truncated."""
    try:
        cmd = p.cmdline()
        if cmd and cmd[0].startswith("sglang::"):
            return cmd[0].split()[0]
        return p.name()
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return "?"


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def kill_all(procs: list[psutil.Process], timeout: float = 5.0) -> list[psutil.Process]:
    """SIGKILL the given processes (children before parents) and wait; returns those killed."""
    killed = []
    for p in procs:
        try:
            if _alive(p):
                p.kill()
                killed.append(p)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(killed, timeout=timeout)
    return killed


@dataclass
class Supervisor:
    argv: list[str]
    env: dict[str, str]
    url: str  # where SGLang listens, for aborting requests at the drain deadline
    drain_timeout_s: float = 30.0
    # after the deadline: SGLang polls its drain every 5 s and waits 15 s for its scheduler
    grace_s: float = 30.0
    proc: subprocess.Popen | None = None
    known: dict[int, tuple[psutil.Process, str]] = field(default_factory=dict)
    stop_signals: int = 0
    stop_asked_at: float | None = None
    aborted: bool = False
    died: str | None = None

    # ---- signals
    def _on_signal(self, signum: int, _frame: object) -> None:
        self.stop_signals += 1
        if self.stop_signals == 1:
            self.stop_asked_at = time.monotonic()
            _say(f"{signal.Signals(signum).name}: draining (new requests get 503; in-flight requests have "
                 f"{self.drain_timeout_s:g} s); signal again to stop at once")
            if self.proc is not None and self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)

    def install_signals(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)

    # ---- the tree
    def _scan(self) -> None:
        """Remember every SGLang process under ours; note one that died before any stop."""
        assert self.proc is not None
        try:
            kids = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            kids = []
        for p in kids:
            # a new process gets its sglang:: title only after its imports: look again until then
            if _alive(p) and not self.known.get(p.pid, (p, ""))[1].startswith("sglang::"):
                self.known[p.pid] = (p, proc_title(p))
        if self.stop_asked_at is not None or self.died:
            return
        for pid, (p, title) in self.known.items():
            if title.startswith("sglang::") and not _alive(p):
                self.died = f"SGLang's {title.removeprefix('sglang::')} process ({title}, pid {pid}) died"
                _say(f"{self.died}; stopping the server")
                return

    def leftovers(self) -> list[psutil.Process]:
        """SGLang processes still alive after its HTTP process exited: those we saw, and any
        orphan re-parented to us (subreaper)."""
        out = {pid: p for pid, (p, _) in self.known.items() if _alive(p)}
        try:
            for p in psutil.Process().children(recursive=True):
                if _alive(p) and (self.proc is None or p.pid != self.proc.pid):
                    out.setdefault(p.pid, p)
        except psutil.NoSuchProcess:
            pass
        return list(out.values())

    def _kill_tree(self) -> None:
        assert self.proc is not None
        kill_all(self.leftovers() + ([psutil.Process(self.proc.pid)] if self.proc.poll() is None else []))
        self.proc.wait(timeout=10)

    def _abort_in_flight(self) -> None:
        self.aborted = True
        _say(f"drain deadline ({self.drain_timeout_s:g} s) passed with requests in flight: aborting them")
        try:
            requests.post(self.url + "/abort_request", json={"abort_all": True}, timeout=5)
        except requests.RequestException as e:
            _say(f"could not abort requests ({e})")

    # ---- the loop
    def run(self) -> int:
        become_subreaper()
        self.install_signals()
        self.proc = subprocess.Popen(self.argv, env=self.env, start_new_session=True)
        forced = False
        while self.proc.poll() is None:
            self._scan()
            now = time.monotonic()
            if self.died and self.stop_asked_at is None:
                # SGLang's own watchdog tears its tree down on a child's death; give it a moment
                self.stop_asked_at = now
                self.drain_timeout_s, self.grace_s = 0.0, 10.0
                self.aborted = True
            if self.stop_asked_at is not None:
                waited = now - self.stop_asked_at
                if self.stop_signals >= 2 or waited > self.drain_timeout_s + self.grace_s:
                    if not self.died:
                        _say("SGLang did not stop in time: killing it" if self.stop_signals < 2 else "stopping at once")
                    forced = True
                    self._kill_tree()
                    break
                if waited > self.drain_timeout_s and not self.aborted:
                    self._abort_in_flight()
            time.sleep(POLL_S)
        rc = self.proc.wait()
        left = self.leftovers()
        if left:
            kill_all(left)
            _say(f"stopped {len(left)} SGLang process(es) left behind: "
                 + ", ".join(f"{proc_title(p)} (pid {p.pid})" for p in left[:6]))
        self._reap()
        if self.died:
            _say(f"server stopped because {self.died} (SGLang's HTTP process exited with {rc})")
            return EXIT_FAULT
        if self.stop_asked_at is None:
            if rc != 0:
                _say(f"SGLang exited with code {rc} (see its log above)")
            return rc if rc > 0 else (EXIT_FAULT if rc else 0)
        if forced:
            return EXIT_FAULT
        _say("stopped" + (" (requests aborted at the drain deadline)" if self.aborted else " cleanly"))
        return 0

    def _reap(self) -> None:
        """Collect exit statuses of orphans re-parented to us (no zombies left)."""
        for p in psutil.Process().children():
            if self.proc is not None and p.pid == self.proc.pid:
                continue
            try:
                os.waitpid(p.pid, os.WNOHANG)
            except ChildProcessError:
                pass
