"""The one definition of each benchmark metric, over `client.RequestRecord`s.

Headline (what a user and an operator feel), per group of requests:
  end-to-end latency  t_end - t_send of each request: mean and p95
  time to first token t_first - t_send (queue + prefill + the first token): mean and p95
  total throughput    tokens of the group / its makespan (last end - first send)
each with its ratio to `plain` run in the same invocation (latency: system ÷ plain, lower is
better; throughput: system ÷ plain, higher is better).
Secondary: decode-only per-user tok/s = (tokens - 1) / (t_end - t_first), the speed of a
stream once it started (it leaves out queueing and prefill, so it flatters a system that
makes requests wait), and τ = tokens / verify steps.
"""

from __future__ import annotations

import re
import statistics
from typing import Any, Callable, Iterable, Sequence

from agentserve.bench.client import RequestRecord

HEADLINE = ("e2e_mean", "e2e_p95", "e2e_ratio", "ttft_mean", "ttft_p95", "ttft_ratio", "total_tps", "total_ratio")
SECONDARY = ("user_tps", "user_ratio", "tau", "copy_share", "n", "refused")


def e2e_s(r: RequestRecord) -> float:
    return r.t_end - r.t_send


def ttft_s(r: RequestRecord) -> float | None:
    return None if r.t_first is None else r.t_first - r.t_send


def decode_tps(r: RequestRecord) -> float | None:
    """Decode-only per-user tok/s: the tokens after the first over the time after the first."""
    if r.t_first is None or r.tokens < 2 or r.t_end <= r.t_first:
        return None
    return (r.tokens - 1) / (r.t_end - r.t_first)


def percentile(xs: Iterable[float], q: float) -> float | None:
    """Nearest rank on the sorted values: index round(q * (n - 1))."""
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))] if s else None


def mean(xs: Iterable[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return statistics.mean(vals) if vals else None


def makespan(records: Sequence[RequestRecord]) -> float:
    return max(r.t_end for r in records) - min(r.t_send for r in records) if records else 0.0


def total_tps(records: Sequence[RequestRecord]) -> float | None:
    """Tokens of the group over its makespan (refused requests count in the span, not the tokens)."""
    span = makespan(records)
    return sum(r.tokens for r in records) / span if span > 0 else None


def window_tokens(records: Iterable[RequestRecord], w0: float, w1: float) -> float:
    """Tokens generated within [w0, w1] (perf_counter seconds): the first token at t_first, the
    rest spread evenly over (t_first, t_end]; a request straddling an edge counts its share."""
    total = 0.0
    for r in records:
        if r.tokens <= 0:
            continue
        first = r.t_first if r.t_first is not None else r.t_end
        total += 1.0 if w0 <= first <= w1 else 0.0
        if r.tokens > 1 and r.t_end > first:
            total += (r.tokens - 1) * max(0.0, min(r.t_end, w1) - max(first, w0)) / (r.t_end - first)
        elif r.tokens > 1 and w0 <= r.t_end <= w1:  # no decode span: all at once
            total += r.tokens - 1
    return total


def tau(records: Iterable[RequestRecord]) -> float:
    """Tokens per verify step over the group (1.0 without speculation)."""
    rs = [r for r in records if r.verify_ct]
    steps = sum(r.verify_ct or 0 for r in rs)
    return sum(r.tokens for r in rs) / steps if steps else 1.0


def summary(records: Sequence[RequestRecord], window: tuple[float, float] | None = None) -> dict[str, Any]:
    """Headline and secondary numbers of one group. `window` (steady load, perf_counter
    seconds): total throughput is the tokens generated inside it over its length."""
    done = [r for r in records if r.ok]
    e2e = [e2e_s(r) for r in done]
    ttft = [t for t in (ttft_s(r) for r in done) if t is not None]
    if window:
        tput = window_tokens(done, *window) / (window[1] - window[0])
    else:
        tput = total_tps(records)
    return {"e2e_mean": mean(e2e), "e2e_p95": percentile(e2e, 0.95), "ttft_mean": mean(ttft),
            "ttft_p95": percentile(ttft, 0.95), "total_tps": tput, "user_tps": mean(decode_tps(r) for r in done),
            "tau": tau(done), "copy_share": mean(r.copy_share for r in done), "n": len(done),
            "refused": len(records) - len(done), "tokens": sum(r.tokens for r in done), "makespan_s": makespan(records)}


def is_plain(system: str) -> bool:
    """Plain decoding with no overrides: 'plain', or 'plain#2' (plain run again later in the
    same invocation: on a machine whose speed drifts, the faster of the two is the baseline)."""
    return system.partition("#")[0] == "plain" and "@" not in system


def drift(rows: list[dict[str, Any]], keys: Sequence[str], first: str = "plain", again: str = "plain#2"
          ) -> list[dict[str, Any]]:
    """Per cell (`keys`), the second plain run against the first: total tok/s and mean
    end-to-end latency of `again` ÷ `first`. 1.0 means the machine ran at the same speed at the
    end of the run as at its start; every other system's ratio is uncertain by about as much."""
    by = {(tuple(r[k] for k in keys), r["system"]): r for r in rows}
    out = []
    for (cell, system), r in by.items():
        if system != first or (cell, again) not in by:
            continue
        b = by[(cell, again)]
        out.append({**dict(zip(keys, cell)), "total_ratio": _ratio(b["total_tps"], r["total_tps"]),
                    "e2e_ratio": _ratio(b["e2e_mean"], r["e2e_mean"])})
    return out


POOLED = ("e2e_mean", "e2e_p95", "ttft_mean", "ttft_p95", "total_tps", "user_tps", "tau", "copy_share")


def round_of(system: str) -> str:
    """The system a round's process ran: 'hybrid#2@drafter.x=1' -> 'hybrid@drafter.x=1' (the
    round tag sits before the overrides, args.expand_rounds)."""
    return re.sub(r"#\d+(?=@|$)", "", system, count=1)


def pool(rows: list[dict[str, Any]], keys: Sequence[str]) -> list[dict[str, Any]]:
    """One row per (keys..., system) over the processes a system ran in ('hybrid', 'hybrid#2',
    ...): each headline value the mean of the processes' values (a process's total tok/s is over
    its own makespan, so processes are averaged, never their requests merged), `n` and
    `refused` summed, `processes` counted; ratios against plain's pooled row."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((*(r[k] for k in keys), round_of(r["system"])), []).append(r)
    out = []
    for k, rs in groups.items():
        row: dict[str, Any] = {**dict(zip((*keys, "system"), k)), "processes": len(rs)}
        for c in POOLED:
            xs = [r[c] for r in rs if isinstance(r.get(c), (int, float))]  # agents' copy_share is a dict
            row[c] = sum(xs) / len(xs) if xs else None
        row["n"] = sum(r.get("n") or 0 for r in rs)
        row["refused"] = sum(r.get("refused") or 0 for r in rs)
        out.append(row)
    return add_ratios(out, keys)


def _ratio(x: float | None, base: float | None) -> float | None:
    return x / base if x is not None and base else None


def add_ratios(rows: list[dict[str, Any]], keys: Sequence[str], is_base: Callable[[str], bool] = is_plain
               ) -> list[dict[str, Any]]:
    """Each row's ratios to the base system's row with the same `keys` (where several systems
    are base, e.g. plain and plain+mixed, the one with the highest total throughput)."""
    bases: dict[tuple, dict[str, Any]] = {}
    for row in rows:
        if is_base(row["system"]):
            k = tuple(row[x] for x in keys)
            if k not in bases or (row["total_tps"] or 0) > (bases[k]["total_tps"] or 0):
                bases[k] = row
    for row in rows:
        b = bases.get(tuple(row[x] for x in keys), {})
        row["e2e_ratio"] = _ratio(row["e2e_mean"], b.get("e2e_mean"))
        row["ttft_ratio"] = _ratio(row["ttft_mean"], b.get("ttft_mean"))
        row["total_ratio"] = _ratio(row["total_tps"], b.get("total_tps"))
        row["user_ratio"] = _ratio(row["user_tps"], b.get("user_tps"))
    return rows


def group_rows(records: Sequence[RequestRecord], keys: Sequence[str], is_base: Callable[[str], bool] = is_plain
               ) -> list[dict[str, Any]]:
    """One row per distinct (keys..., system) of the records' labels, in first-seen order of
    systems, with the headline first, then the secondary columns, and ratios to the base."""
    groups: dict[tuple, list[RequestRecord]] = {}
    for r in records:
        groups.setdefault(tuple(r.labels[k] for k in (*keys, "system")), []).append(r)
    order = list(dict.fromkeys(r.labels["system"] for r in records))
    rows = []
    for k in sorted(groups, key=lambda k: (k[:-1], order.index(k[-1]))):
        s = summary(groups[k])
        rows.append({**dict(zip((*keys, "system"), k)), **{c: None for c in HEADLINE}, **s})
    add_ratios(rows, keys, is_base)
    return [_ordered(row, keys) for row in rows]


def _ordered(row: dict[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    """The JSON's column order: labels, headline, secondary, the rest."""
    first = [*keys, "system", *HEADLINE, *SECONDARY]
    return {**{k: row.get(k) for k in first}, **{k: v for k, v in row.items() if k not in first}}
