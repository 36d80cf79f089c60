"""Profile -> SGLang server command line (+ the environment our plugin reads).

The plugin runs inside every SGLang process, so it learns the profile through the
``AGENTSERVE_PROFILE`` environment variable (the path of the served profile, written here)
rather than through SGLang's own arguments.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from agentserve.profile import Profile, ProfileError

# SGLang's spelling of each of our algorithms.
_ALGO_NAME = {"ngram": "NGRAM", "agent_ngram": "AGENT_NGRAM", "agentspark": "AGENTSPARK", "dspark": "DSPARK"}

# What SGLang 0.5.23 needs to serve on a CPU (see shared/docs/sglang-on-cpu.md).
_CPU_DEFAULTS = {
    "--attention-backend": "torch_native",
    "--sampling-backend": "pytorch",
    "--cuda-graph-backend-decode": "disabled",
    "--cuda-graph-backend-prefill": "disabled",
    "--mem-fraction-static": "0.3",
    "--max-total-tokens": "4096",
    "--max-running-requests": "8",
    "--chunked-prefill-size": "1024",
}


@dataclass(frozen=True)
class LaunchPlan:
    argv: list[str]
    env: dict[str, str]  # only what we add to the caller's environment



def build_plan(profile: Profile, port: int | None = None) -> LaunchPlan:
    s, m, d = profile.server, profile.model, profile.drafter
    args: dict[str, str | None] = {
        "--model-path": m.path,
        "--host": s.host,
        "--port": str(port or s.port),
        "--device": s.device,
    }
    if m.dtype != "auto":
        args["--dtype"] = m.dtype
    if m.context_length:
        args["--context-length"] = str(m.context_length)
    if m.chat_template:
        args["--chat-template"] = m.chat_template
    if m.tool_call_parser:
        args["--tool-call-parser"] = m.tool_call_parser
    if s.device == "cpu":
        args.update(_CPU_DEFAULTS)
        # an idle scheduler otherwise busy-polls a whole core
        args["--sleep-on-idle"] = None
    for flag, value in (
        ("--attention-backend", s.attention_backend),
        ("--mem-fraction-static", s.mem_fraction_static),
        ("--max-total-tokens", s.max_total_tokens),
        ("--max-running-requests", s.max_running_requests),
        ("--chunked-prefill-size", s.chunked_prefill_size),
        ("--prefill-decode-interval", s.prefill_decode_interval),
    ):
        if value is not None:
            args[flag] = str(value)

    # usage.prompt_tokens_details.cached_tokens shows agents how much of a turn the cache served
    flags: list[str] = ["--enable-cache-report"]
    if s.enable_metrics:
        flags.append("--enable-metrics")
    if s.deterministic and s.device != "cpu":
        # on a CPU the plugin makes products row-invariant (sglang_ext/cpu/exact.py); on a GPU
        # SGLang's own batch-invariant kernels do it
        flags.append("--enable-deterministic-inference")
    if d.algorithm != "none":
        args["--speculative-algorithm"] = _ALGO_NAME[d.algorithm]
        args["--speculative-num-draft-tokens"] = str(d.num_draft_tokens)
        if d.algorithm in ("agent_ngram", "agentspark"):
            # Our workers run synchronously (the drafter needs the accepted tokens first).
            flags.append("--disable-overlap-schedule")
        # agentspark's drafter path reaches the worker through the served profile: SGLang
        # would treat --speculative-draft-model-path as a model of its own to load.
        if d.algorithm == "dspark":
            # upstream DSPARK loads the same checkpoint format itself; verify width = gamma + 1
            args["--speculative-draft-model-path"] = str(d.path)
            args["--speculative-dspark-block-size"] = str(d.num_draft_tokens - 1)

    argv = [sys.executable, "-m", "sglang.launch_server"]
    for k, v in args.items():
        argv += [k, v] if v is not None else [k]
    argv += flags + list(s.extra_args)

    # the profile as served (paths resolved, the port actually used: the load report is named by
    # it) goes to a file whose path every SGLang process reads once (sglang_ext/config.py)
    served = profile if port is None else profile.model_copy(update={"server": s.model_copy(update={"port": port})})
    env = {"AGENTSERVE_PROFILE": str(write_served(served))}
    if d.algorithm == "agentspark" and d.radix_drafting and d.radix_tree:
        # the worker walks the radix tree for continuations; only the Python tree core has nodes
        env["SGLANG_UNIFIED_RADIX_TREE_CORE_BACKEND"] = "python"
    if m.tool_strict != "off":
        env["SGLANG_TOOL_STRICT_LEVEL"] = {"function": "1", "parameter": "2"}[m.tool_strict]
    if s.device == "cpu":
        env["SGLANG_USE_CPU_ENGINE"] = "1"
        # KV moves after verify use plain indexing (the copy kernel needs a CPU sgl_kernel).
        env["SGLANG_NATIVE_MOVE_KV_CACHE"] = "1"
        from sglang_ext.cpu.kernels import SHIM_DIR, shim_needed

        if shim_needed():
            # SGLang's CPU path imports sgl_kernel, whose CPU build is not on PyPI.
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SHIM_DIR), os.environ.get("PYTHONPATH", "")) if p)
    return LaunchPlan(argv=argv, env=env)


def served_dir() -> Path:
    return Path(os.environ.get("AGENTSERVE_CACHE") or Path.home() / ".cache" / "agentserve") / "served"


def write_served(profile: Profile) -> Path:
    """Write the served profile to a file named by its content (so the path printed by
    --dry-run stays valid, and two servers never share a file that one of them rewrites).
    A cache directory that cannot be written (read-only, full) falls back to the temp
    directory with a warning: serving must not depend on it."""
    text = profile.model_dump_json(indent=1)
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    name = f"{profile.name}-{profile.server.port}-{digest}.json"
    first = served_dir()
    for base in (first, Path(tempfile.gettempdir()) / "agentserve-served"):
        path = base / name
        if path.is_file():
            return path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(text)
            tmp.replace(path)
            return path
        except OSError as e:
            if base != first:
                raise
            print(f"agentserve: warning: cannot write the served profile under {first} ({e}); "
                  "using the temp directory (set AGENTSERVE_CACHE to a writable directory)", file=sys.stderr)
    raise AssertionError("unreachable")


def check_ready(profile: Profile) -> list[str]:
    """Problems that would make a launch fail, found before starting SGLang."""
    problems = []
    mp = Path(profile.model.path)
    if not (mp / "config.json").is_file():
        problems.append(f"model.path: {mp} is not an HF model directory (no config.json); run 'agentserve model prepare' for the bundled model")
    t = profile.model.chat_template
    if t and t.endswith(".jinja") and not Path(t).is_file():
        problems.append(f"model.chat_template: {t} does not exist")
    if profile.drafter.path and not Path(profile.drafter.path).exists():
        problems.append(f"drafter.path: {profile.drafter.path} does not exist")
    return problems


def launch(profile: Profile, profile_path: str | Path | None = None, port: int | None = None,
           drain_timeout_s: float = 30.0) -> int:
    """Serve until SIGTERM/SIGINT (drain, then exit 0) or until an SGLang process dies (exit 1
    naming it); never leaves SGLang processes behind (supervise.py)."""
    from agentserve.server.supervise import Supervisor

    problems = check_ready(profile)
    if problems:
        raise ProfileError(problems, str(profile_path) if profile_path else None)
    plan = build_plan(profile, port)
    env = {**os.environ, **plan.env}
    print(f"agentserve: starting {shlex.join(plan.argv)}", file=sys.stderr, flush=True)
    host = "127.0.0.1" if profile.server.host in ("0.0.0.0", "::") else profile.server.host
    url = f"http://{host}:{port or profile.server.port}"
    return Supervisor(plan.argv, env, url, drain_timeout_s=drain_timeout_s).run()
