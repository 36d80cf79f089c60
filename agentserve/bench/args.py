"""Flag parsing shared by the bench subcommands: errors name the flag (never a traceback)."""

from __future__ import annotations

import argparse
from typing import Iterable


def positive_int(value: str) -> int:
    """argparse type for counts and token limits: argparse names the flag in its error."""
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer (got {value!r})")
    return n


def non_negative_float(value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        x = -1.0
    if not x >= 0:
        raise argparse.ArgumentTypeError(f"expected seconds >= 0 (got {value!r})")
    return x


def parse_list(ap: argparse.ArgumentParser, flag: str, value: str, kind: type) -> list:
    """A comma list flag, or a usage error naming the flag."""
    try:
        out = [kind(x) for x in value.split(",") if x.strip()]
    except ValueError:
        out = []
    if not out or (kind is int and min(out) < 1):
        ap.error(f"{flag}: expected {'positive integers' if kind is int else 'numbers'} separated by commas (got {value!r})")
    return out


def parse_systems(ap: argparse.ArgumentParser, value: str, known: Iterable[str]) -> list[str]:
    systems = [s.strip() for s in value.split(",") if s.strip()]
    unknown = [s for s in systems if s.split("@")[0].partition("#")[0] not in set(known)]  # NAME[#run][@field=value...]
    if unknown or not systems:
        ap.error(f"--systems: unknown {unknown}; choose from {sorted(known)}")
    return systems


def add_warmup(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--warmup-s", type=non_negative_float, default=0.0,
                    help="warm mode: send warm-up traffic (prompts no measured phase uses) to each fresh server for "
                         "this many seconds before measuring; 0 = cold (one warm-up request)")


def expand_rounds(systems: list[str], rounds: int) -> list[str]:
    """['plain', 'hybrid'] x 2 -> ['plain', 'hybrid', 'plain#2', 'hybrid#2']: interleaved, so a
    machine that drifts during the run drifts under every system alike."""
    def tagged(s: str, k: int) -> str:
        name, at, rest = s.partition("@")  # the tag names the system, before its overrides
        return s if k == 1 else f"{name}#{k}{at}{rest}"

    return [tagged(s, k) for k in range(1, rounds + 1) for s in systems]
