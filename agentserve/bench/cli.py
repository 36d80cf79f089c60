"""`agentserve bench serve|replay|tiers`: the dispatcher. The old spellings stay as aliases:
`agentserve bench [flags]` is `serve`, `--tiers` is `tiers`, `--replay` is `replay`."""

from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {
    "serve": ("agentserve.bench.serve", "the same prompts against several systems (headline vs plain, JSON, PNG)"),
    "replay": ("agentserve.bench.replay", "multi-turn agent traces replayed turn by turn, with sessions"),
    "tiers": ("agentserve.bench.tiers", "interactivity tiers under rising load, with admission"),
    "agents": ("agentserve.bench.agents", "public agent traces (ComplexFuncBench) replayed closed-loop, 1/4/8 agents"),
}
ALIASES = {"--tiers": "tiers", "--replay": "replay"}


def usage() -> str:
    lines = ["usage: agentserve bench {serve,replay,tiers,agents} [flags]   (agentserve bench SUBCOMMAND --help)", ""]
    lines += [f"  {name:7s} {text}" for name, (_, text) in SUBCOMMANDS.items()]
    lines += ["", "metrics (agentserve/bench/metrics.py): end-to-end latency and time to first token (mean, p95, "
              "ratio to plain), total tok/s over the makespan (ratio to plain); decode-only per-user tok/s is secondary.",
              "agentserve bench [flags] (no subcommand) runs serve; --tiers and --replay are the old spellings."]
    return "\n".join(lines)


def resolve(argv: list[str]) -> tuple[str, list[str]]:
    """(subcommand, its argv) for a bench command line."""
    if argv and argv[0] in SUBCOMMANDS:
        return argv[0], argv[1:]
    for flag, name in ALIASES.items():
        if flag in argv:
            return name, [x for x in argv if x != flag]
    return "serve", argv


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv in (["-h"], ["--help"], ["help"]):
        print(usage())
        return 0
    name, rest = resolve(argv)
    return int(importlib.import_module(SUBCOMMANDS[name][0]).main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
