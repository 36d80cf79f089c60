"""Greedy identity per replayed turn: every system's answer against plain decoding's.

A replay with recorded history (bench agents) sends each system the same prompt for the same
(agents, trace, turn, pass), so greedy answers must agree token for token: speculative decoding
is lossless. In bf16 a verify forward (a block of positions) and a decode forward (one position)
round differently, so where plain's two best tokens are within that rounding an answer may
take the other one (audit.py says more). Each divergence is therefore scored on a plain
server by teacher forcing: the log-probability gap between plain's token and the other
system's at the first differing position. A gap above the dtype's bound (audit.BOUNDS) is
flagged: no rounding explains it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional, Sequence

from agentserve.audit import first_difference, score
from agentserve.bench.client import RequestRecord
from agentserve.bench.systems import split_system

Key = tuple[Any, ...]


def turn_key(r: RequestRecord) -> Key:
    lab = r.labels
    return (lab.get("agents"), lab.get("trace"), lab.get("turn"), lab.get("pass", 0))


def _token_at(r: RequestRecord, i: int) -> Optional[int]:
    ids = r.output_ids or []
    return ids[i] if i < len(ids) else r.stop_token


@dataclass
class TurnDiff:
    system: str
    agents: int
    trace: str
    turn: int
    pass_: int
    position: int  # first differing token of the answer
    plain_token: int
    other_token: int
    pair_gap: Optional[float] = None  # plain, teacher-forced: log p(plain's) - log p(other's)
    top2_gap: Optional[float] = None
    flagged: Optional[bool] = None


def is_plain(system: str) -> bool:
    return split_system(system)[0] == "plain"


def reference(system: str, plains: Sequence[str]) -> Optional[str]:
    """The plain system a system is compared with: the one run with the same server and model
    overrides (hybrid@server.deterministic=true -> plain@server.deterministic=true), else bare
    plain."""
    want = {k: v for k, v in split_system(system)[1].items() if k.startswith(("server.", "model."))}
    same = [p for p in plains if split_system(p)[1] == want]
    return same[0] if same else ("plain" if "plain" in plains else None)


def compare(records: Sequence[RequestRecord]) -> tuple[dict[str, dict[str, int]], list[TurnDiff]]:
    """Per non-plain system: turns compared and identical (against its `reference` plain
    system); and every divergence (unscored). An answer that stops at max_new where the other
    goes on is not a divergence."""
    ok = [r for r in records if r.ok and r.output_ids is not None]
    base = {(r.labels.get("system", ""),) + turn_key(r): r for r in ok if is_plain(r.labels.get("system", ""))}
    plains = sorted({k[0] for k in base})
    counts: dict[str, dict[str, int]] = {}
    diffs: list[TurnDiff] = []
    for r in records:
        sysname = r.labels.get("system", "")
        b = None if is_plain(sysname) else base.get((reference(sysname, plains),) + turn_key(r))
        if b is None or not r.ok or r.output_ids is None:
            continue
        c = counts.setdefault(sysname, {"compared": 0, "identical": 0})
        c["compared"] += 1
        i = first_difference(b.output_ids or [], r.output_ids)
        ta = tb = None
        if i is not None:
            ta, tb = _token_at(b, i), _token_at(r, i)
        if i is None or ta is None or tb is None:
            c["identical"] += 1
            continue
        agents, trace, turn, p = turn_key(r)
        diffs.append(TurnDiff(sysname, agents, trace, turn, p, i, ta, tb))
    return counts, diffs


def control(records: Sequence[RequestRecord]) -> dict[str, dict[str, int]]:
    """Plain against itself: its answers at each other agent count against those at the lowest,
    same (trace, turn, pass). In bf16 the batch a row decodes in changes its rounding, so
    this is the rate of divergence no lossless method can go below."""
    out: dict[str, dict[str, int]] = {}
    plain = [r for r in records if is_plain(r.labels.get("system", "")) and r.ok and r.output_ids is not None]
    for name in sorted({r.labels.get("system", "") for r in plain}):
        out.update(_control_of(name, [r for r in plain if r.labels.get("system") == name]))
    return out


def _control_of(name: str, plain: list[RequestRecord]) -> dict[str, dict[str, int]]:
    levels = sorted({r.labels.get("agents") for r in plain})
    if len(levels) < 2:
        return {}
    ref = {turn_key(r)[1:]: r for r in plain if r.labels.get("agents") == levels[0]}
    tag = "" if name == "plain" else name[len("plain"):]  # plain@... keeps its overrides in the label
    out: dict[str, dict[str, int]] = {}
    for r in plain:
        b = ref.get(turn_key(r)[1:])
        if r.labels.get("agents") == levels[0] or b is None:
            continue
        c = out.setdefault(f"plain{tag}@{r.labels.get('agents')} vs plain{tag}@{levels[0]}", {"compared": 0, "identical": 0})
        c["compared"] += 1
        i = first_difference(b.output_ids or [], r.output_ids or [])
        c["identical"] += i is None or _token_at(b, i) is None or _token_at(r, i) is None
    return out


def score_all(url: str, diffs: Sequence[TurnDiff], prompt_of: Callable[[str, int], list[int]],
              plain_answer: Callable[[TurnDiff], list[int]], bound: float) -> None:
    """Fill each divergence's gaps from the plain server at `url` (teacher forcing)."""
    for d in diffs:
        ids = prompt_of(d.trace, d.turn) + plain_answer(d)[: d.position]
        top, lp = score(url, ids, [d.plain_token, d.other_token])
        d.pair_gap, d.top2_gap = lp[d.plain_token] - lp[d.other_token], top[0] - top[1]
        d.flagged = abs(d.pair_gap) > bound


def report(counts: dict[str, dict[str, int]], diffs: Sequence[TurnDiff], bound: float,
           plain_control: Optional[dict[str, dict[str, int]]] = None) -> dict[str, Any]:
    out: dict[str, Any] = {"bound_nats": bound, "systems": {}, "divergences": [asdict(d) for d in diffs],
                           "plain_control": plain_control or {}}
    for sysname, c in counts.items():
        mine = [d for d in diffs if d.system == sysname]
        gaps = [abs(d.pair_gap) for d in mine if d.pair_gap is not None]
        out["systems"][sysname] = {**c, "diverged": len(mine), "scored": len(gaps),
                                   "flagged": sum(1 for d in mine if d.flagged),
                                   "max_gap": max(gaps) if gaps else None}
    return out


def lines(rep: dict[str, Any]) -> list[str]:
    out = []
    for sysname, s in rep["systems"].items():
        tail = ""
        if s["diverged"]:
            tail = (f"; {s['diverged']} diverged, {s['scored']} scored on plain, {s['flagged']} above "
                    f"{rep['bound_nats']:g} nats" + (f" (max gap {s['max_gap']:.3f})" if s["max_gap"] is not None else ""))
        out.append(f"greedy identity vs plain: {sysname} {s['identical']}/{s['compared']} turns identical{tail}")
    for name, c in (rep.get("plain_control") or {}).items():
        out.append(f"control, plain against itself at another batch: {name} {c['identical']}/{c['compared']} turns identical")
    return out
