"""Shared fixtures. Real SGLang servers are started lazily, only when a test asks for one, on
127.0.0.1 and free ports. The two that many modules share (plain, agentspark) live for the
session; the others end with their module, so at most four are alive at once."""

from __future__ import annotations

import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Iterator

import pytest

REPO = Path(__file__).resolve().parents[1]
PROFILES = REPO / "tests" / "profiles"
LOGS = REPO / ".pytest_cache" / "server-logs"
FEATURE_DUMP = LOGS / "agentspark-first-prefill-features.pt"

# What one run's servers learn (the step-cost table, the served profile) must not steer the next
# run's: a table cached by an earlier, busier run once made admission serialize every request.
os.environ.setdefault("AGENTSERVE_CACHE", tempfile.mkdtemp(prefix="agentserve-test-cache-"))

# Importing SGLang in this process (unit tests of our hooks) needs what a CPU server gets from
# the launcher: the CPU engine switch and, where no real sgl_kernel exists, our stand-in.
os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")
from sglang_ext.cpu.kernels import SHIM_DIR, shim_needed  # noqa: E402

if shim_needed() and str(SHIM_DIR) not in sys.path:
    sys.path.insert(0, str(SHIM_DIR))


_STARTED: dict[str, int] = {}


def _server(profile_name: str, extra_env: dict[str, str] | None = None, **overrides: object) -> Iterator["ServerProcess"]:  # noqa: F821
    from agentserve.server.procs import ServerProcess
    from agentserve.profile import load_profile

    LOGS.mkdir(parents=True, exist_ok=True)
    prof = load_profile(PROFILES / profile_name)
    if overrides:
        prof = prof.model_copy(update=overrides)
    for attempt in (1, 2):
        # one log per server started: a later server of the same profile must not overwrite it
        _STARTED[prof.name] = _STARTED.get(prof.name, 0) + 1
        n = _STARTED[prof.name]
        srv = ServerProcess(prof, log_path=LOGS / (f"{prof.name}.log" if n == 1 else f"{prof.name}-{n}.log"),
                            extra_env=extra_env)
        try:
            srv.start(timeout=900)
            break
        except RuntimeError as e:
            # A server killed while starting (seen once in CI: exit -9, the cause lost with an
            # overwritten log) is started once more on a fresh port; a real start-up bug fails
            # the second time too, and both logs are kept.
            if attempt == 2:
                raise
            warnings.warn(f"server start-up failed, starting it once more: {e}")
    try:
        yield srv
    finally:
        srv.stop()


def bf16_pair(name: str, field: str, values: tuple[str, str]) -> Iterator[tuple]:
    """Two plain servers of the bundled model in bf16 that differ only in `server.<field>`
    (one value each), started one after the other; yields them in `values` order."""
    from agentserve.profile import load_profile

    base = load_profile(PROFILES / "plain-fp32.yaml")
    gens = [_server("plain-fp32.yaml", name=f"{name}-{v}", model=base.model.model_copy(update={"dtype": "bfloat16"}),
                    server=base.server.model_copy(update={field: v})) for v in values]
    servers = []
    try:
        for g in gens:
            servers.append(next(g))
        yield tuple(servers)
    finally:
        for g in reversed(gens[:len(servers)]):
            next(g, None)


@pytest.fixture(scope="module")
def start_server() -> Iterator:
    """Factory for extra servers (profile file name + field overrides), stopped at the end of the
    module that asked: each SGLang server holds 2-3 GB here, and CI's 24 GB machine ran out of
    memory (a server killed at start-up) when every server lived to the end of the session."""
    gens: list[Iterator] = []

    def start(profile_name: str, **overrides: object) -> "ServerProcess":  # noqa: F821
        g = _server(profile_name, **overrides)
        gens.append(g)
        return next(g)

    yield start
    for g in gens:
        next(g, None)


@pytest.fixture(scope="session")
def plain_server() -> Iterator["ServerProcess"]:  # noqa: F821
    """The bundled model, fp32, no speculation."""
    yield from _server("plain-fp32.yaml")


@pytest.fixture(scope="module")
def agent_ngram_server() -> Iterator["ServerProcess"]:  # noqa: F821
    """The bundled model, fp32, with our plugin-registered AGENT_NGRAM worker."""
    yield from _server("agent-ngram-fp32.yaml")


@pytest.fixture(scope="session")
def agentspark_server() -> Iterator["ServerProcess"]:  # noqa: F821
    """The bundled model, fp32, with our DSpark worker (AGENTSPARK) and the shipped drafter.
    Its first prefill's captured target features are dumped to FEATURE_DUMP (see test_agentspark)."""
    FEATURE_DUMP.unlink(missing_ok=True)
    yield from _server("agentspark-fp32.yaml", extra_env={"AGENTSERVE_DUMP_FEATURES": str(FEATURE_DUMP)})


@pytest.fixture(scope="session")
def model_dir() -> Path:
    p = REPO / "models" / "smollm2-135m-instruct"
    if not (p / "config.json").is_file():
        pytest.fail(f"bundled model missing at {p}: run 'agentserve model prepare' (scripts/setup.sh does)")
    return p


@pytest.fixture()
def serve_profile(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """Make a profile (a dict of fields; name and model are filled in) the served one, as the
    launcher does: written to a file whose path goes in AGENTSERVE_PROFILE."""
    import json

    from sglang_ext import config

    def serve(fields: dict) -> Path:
        data = {"name": "test", "model": {"path": "/nonexistent-model"}, **fields}
        path = tmp_path / "served-profile.json"
        path.write_text(json.dumps(data))
        monkeypatch.setenv(config.ENV, str(path))
        config.reset()
        return path

    yield serve
    config.reset()
