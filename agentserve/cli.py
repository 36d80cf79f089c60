"""`agentserve` command line: launch, profile check, model prepare, demo, and the tools built
on them. Every user error ends in a one-paragraph message and exit code 2, never a traceback."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from agentserve.profile import ProfileError, load_profile

DEFAULT_PROFILE = Path(__file__).resolve().parent.parent / "profiles" / "cpu-demo.yaml"


def _cmd_launch(a: argparse.Namespace) -> int:
    from agentserve.server.launcher import build_plan, launch

    prof = load_profile(a.profile)
    if a.dry_run:
        plan = build_plan(prof, a.port)
        import shlex

        # every variable, the served profile's path included: pasted into a shell, these lines
        # start the same server as `agentserve launch` would
        for k, v in sorted(plan.env.items()):
            print(f"export {k}={shlex.quote(v)}")
        print(shlex.join(plan.argv))
        return 0
    return launch(prof, a.profile, a.port, drain_timeout_s=a.drain_timeout)


def _cmd_profile_check(a: argparse.Namespace) -> int:
    from agentserve.server.launcher import check_ready

    prof = load_profile(a.file)
    problems = check_ready(prof)
    if problems:
        raise ProfileError(problems, a.file)
    tiers = ", ".join(
        f"{t.name}({t.target_tokens_per_s:g} tok/s)" if t.target_tokens_per_s else f"{t.name}(best effort)"
        for t in prof.interactivity_tiers
    )
    print(f"{a.file}: ok — model {prof.model.path}, drafter {prof.drafter.algorithm}, tiers: {tiers or 'none'}")
    return 0


def _cmd_model_prepare(a: argparse.Namespace) -> int:
    from agentserve.model import prepare

    prepare(Path(a.out) if a.out else None, dtype=a.dtype, force=a.force)
    return 0


def _cmd_demo(a: argparse.Namespace) -> int:
    from agentserve.demo import run_demo

    return run_demo(profile_path=a.profile, url=a.url)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="agentserve", description="SGLang serving for LLM agents, with DSpark speculative decoding")
    sub = p.add_subparsers(dest="cmd", required=True)

    lp = sub.add_parser("launch", help="start an SGLang server from a profile")
    lp.add_argument("--profile", default=str(DEFAULT_PROFILE), help="profile YAML (default: profiles/cpu-demo.yaml)")
    lp.add_argument("--port", type=int, default=None, help="override server.port")
    lp.add_argument("--dry-run", action="store_true", help="print the SGLang command and environment, start nothing")
    lp.add_argument("--drain-timeout", type=float, default=30.0, metavar="S",
                    help="on SIGTERM/Ctrl-C, seconds in-flight requests get to finish before they are aborted (default 30)")
    lp.set_defaults(fn=_cmd_launch)

    pp = sub.add_parser("profile", help="profile tools")
    psub = pp.add_subparsers(dest="profile_cmd", required=True)
    pc = psub.add_parser("check", help="validate a profile; every problem names its field")
    pc.add_argument("file")
    pc.set_defaults(fn=_cmd_profile_check)

    mp = sub.add_parser("model", help="bundled model tools")
    msub = mp.add_subparsers(dest="model_cmd", required=True)
    mpp = msub.add_parser("prepare", help="convert the bundled SmolLM2-135M-Instruct to an HF directory (offline)")
    mpp.add_argument("--out", default=None, help="output directory (default: models/smollm2-135m-instruct)")
    mpp.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    mpp.add_argument("--force", action="store_true")
    mpp.set_defaults(fn=_cmd_model_prepare)

    dp = sub.add_parser("demo", help="a short multi-turn agent conversation with one tool call")
    dp.add_argument("--profile", default=str(DEFAULT_PROFILE), help="profile to start a server from (ignored with --url)")
    dp.add_argument("--url", default=None, help="use a running server instead of starting one")
    dp.set_defaults(fn=_cmd_demo)

    for name, _module, helptext in _PLUGGABLE:
        sub.add_parser(name, help=helptext, add_help=False)  # listed in --help; dispatched in main()
    return p


# Subcommands whose modules own their own argparse (they take the remaining argv).
_PLUGGABLE: list[tuple[str, str, str]] = [
    ("bench", "agentserve.bench.cli", "benchmark serving systems: serve | replay | tiers (latency, TTFT, throughput vs plain)"),
    ("train-draft", "sglang_ext.dspark.train", "train a DSpark drafter for a target model (CPU or GPU)"),
    ("calibrate-draft", "sglang_ext.dspark.calibrate", "fit STS on held-out rollouts; ship it only if it lowers held-out ECE"),
    ("corpus", "sglang_ext.dspark.corpus", "build the self-distilled drafter corpus through the real server (resumable)"),
    ("console", "console.app", "the live operator console (Textual)"),
    ("soak", "agentserve.soak", "load/soak test: simulated agents on loopback, accounting of every request, JSON + PNG"),
    ("audit", "agentserve.audit", "where speculative greedy answers leave plain ones, and whether each is a near-tie"),
]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    modules = {name: module for name, module, _ in _PLUGGABLE}
    try:
        if argv and argv[0] in modules:
            import importlib

            return int(importlib.import_module(modules[argv[0]]).main(argv[1:]) or 0)
        args = build_parser().parse_args(argv)
        return int(args.fn(args) or 0)
    except ProfileError as e:
        print(f"agentserve: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # connection problems are user-facing, not bugs
        if type(e).__name__ in ("APIConnectionError", "ConnectionError", "ConnectError"):
            print(f"agentserve: cannot reach the server ({e}); is it running? start one with 'agentserve launch'", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
