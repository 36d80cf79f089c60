"""`agentserve audit`: where a speculative server's greedy answers leave the plain server's, and
whether each such place is a near-tie (rounding) or a bug.

Speculative decoding is lossless: greedy answers equal plain decoding's. In fp32 they are equal
token for token; in bf16 a verify forward (a block of positions) and a decode forward (one
position) round differently, so where the plain model's two best tokens are within that
rounding of each other an answer may take the other one and go on differently from there. The
audit tells the two apart. For every prompt it decodes the same greedy request on the
speculative server (profile A) and the plain one (baseline B) at the same concurrency, finds the
first token where the answers differ, and asks the plain server for its log-probabilities at
that position by teacher forcing (prompt + the common prefix as input, one new token, top-2
and both tokens' log-probabilities). The gap between the plain server's token and the
speculative server's token there (`pair_gap`, >= the top-2 gap when plain's token is its top-1)
must be within `bound`: 0.25 nats in bf16/fp16 (a few bf16 rounding steps of a logit; the issue's
near-ties were 0.00-0.13), 0.02 nats in fp32 (verify and decode agree to ~1e-5 there). A larger
gap is flagged: no rounding explains it, so a draft was accepted that the target did not choose.

    agentserve audit --profile profiles/cpu-dspark.yaml --baseline profiles/cpu-demo.yaml --prompts 24

With `--deterministic` both servers run in exact mode (server.deterministic, sglang_ext/cpu/exact.py),
where answers must be identical: every divergence is flagged, whatever its gap.

With `--control` the plain server is also compared with itself, at each concurrency against one
request at a time: the divergences batching alone makes in this dtype, beside which the
speculative server's are read (its flags do not set the exit status).

Exit status 1 when anything is flagged, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import requests

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "prompts"
DOMAIN_FILES = {"chat": "mt-bench.jsonl", "math": "gsm8k.jsonl", "code": "humaneval.jsonl", "mbpp": "mbpp.jsonl"}
BOUNDS = {"bfloat16": 0.25, "float16": 0.25, "float32": 0.02}
SPEC_PAIR = "spec vs plain"  # the audited pair; --control adds "plain@c vs plain@1" rows
EXACT_BOUND = -1.0  # exact mode: |gap| > -1 always, so every divergence is flagged


@dataclass
class Divergence:
    prompt: int  # index into the prompt list
    position: int  # index in the answer of the first differing token
    plain_token: int
    spec_token: int
    top2_gap: float  # plain server, teacher-forced: log p(top-1) - log p(top-2) there
    pair_gap: float  # plain server, teacher-forced: log p(plain's token) - log p(spec's token)
    flagged: bool


@dataclass
class AuditResult:
    dtype: str
    concurrency: int
    prompts: int
    max_new_tokens: int
    bound: float
    identical: int
    divergences: list[Divergence] = field(default_factory=list)
    pair: str = SPEC_PAIR

    @property
    def rate(self) -> float:
        return len(self.divergences) / self.prompts if self.prompts else 0.0

    @property
    def flagged(self) -> list[Divergence]:
        return [d for d in self.divergences if d.flagged]

    def summary(self) -> dict:
        gaps = sorted(d.pair_gap for d in self.divergences)
        return {"pair": self.pair, "dtype": self.dtype, "concurrency": self.concurrency, "prompts": self.prompts,
                "max_new_tokens": self.max_new_tokens, "identical": self.identical,
                "diverged": len(self.divergences), "rate": round(self.rate, 3), "bound": self.bound,
                "flagged": len(self.flagged), "max_pair_gap": round(gaps[-1], 4) if gaps else None,
                "median_pair_gap": round(gaps[len(gaps) // 2], 4) if gaps else None,
                "first_positions": sorted(d.position for d in self.divergences)}


def first_difference(a: Sequence[int], b: Sequence[int]) -> Optional[int]:
    """The first index where two answers differ (one ending early counts: its stop token
    differs from the other's next token); None when they are equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def generate(url: str, ids: list[int], max_new: int, extra: Optional[dict] = None) -> tuple[list[int], Optional[int]]:
    """Greedy answer (output ids) and the stop token that ended it, if one did (SGLang does not
    return a matched stop token among output_ids)."""
    body = {"input_ids": ids, "sampling_params": {"temperature": 0, "max_new_tokens": max_new, **(extra or {})}}
    r = requests.post(url + "/generate", json=body, timeout=1800)
    r.raise_for_status()
    out = r.json()
    fin = out["meta_info"].get("finish_reason") or {}
    stop = fin.get("matched") if fin.get("type") == "stop" and isinstance(fin.get("matched"), int) else None
    return list(out["output_ids"]), stop


def run_all(url: str, prompts: list[list[int]], max_new: int, concurrency: int,
            extra: Optional[dict] = None) -> list[tuple[list[int], Optional[int]]]:
    with cf.ThreadPoolExecutor(concurrency) as ex:
        return list(ex.map(lambda p: generate(url, p, max_new, extra), prompts))


def score(url: str, ids: list[int], tokens: list[int]) -> tuple[list[float], dict[int, float]]:
    """Teacher-forced log-probabilities of the token after `ids` (one prefill): the top two
    values and those of `tokens`."""
    body = {"input_ids": ids, "return_logprob": True, "top_logprobs_num": 2, "token_ids_logprob": tokens,
            "sampling_params": {"temperature": 0, "max_new_tokens": 1}}
    r = requests.post(url + "/generate", json=body, timeout=600)
    r.raise_for_status()
    m = r.json()["meta_info"]
    top = [x[0] for x in m["output_top_logprobs"][0]]
    return top, {int(x[1]): float(x[0]) for x in m["output_token_ids_logprobs"][0]}


def _token_at(answer: tuple[list[int], Optional[int]], i: int) -> Optional[int]:
    ids, stop = answer
    return ids[i] if i < len(ids) else stop


def audit(spec_url: str, plain_url: str, prompts: list[list[int]], dtype: str, concurrency: int = 1,
          max_new: int = 128, bound: Optional[float] = None, spec_extra: Optional[dict] = None,
          plain_concurrency: Optional[int] = None, pair: str = SPEC_PAIR) -> AuditResult:
    """Decode `prompts` greedily on both servers at `concurrency` and score each first divergence on
    the plain server. `spec_extra`: sampling parameters added to the speculative server's requests
    only (a test uses a penalty to make a divergence that is not a tie). `plain_concurrency`: the
    plain answers at another client count (the control: plain against itself, one at a time)."""
    bound = BOUNDS[dtype] if bound is None else bound
    plain = run_all(plain_url, prompts, max_new, plain_concurrency or concurrency)
    spec = run_all(spec_url, prompts, max_new, concurrency, spec_extra)
    res = AuditResult(dtype, concurrency, len(prompts), max_new, bound, identical=0, pair=pair)
    for k, (p, a, b) in enumerate(zip(prompts, plain, spec)):
        i = first_difference(a[0], b[0])
        if i is None:
            res.identical += 1
            continue
        ta, tb = _token_at(a, i), _token_at(b, i)
        if ta is None or tb is None:  # one hit max_new_tokens exactly there: nothing to compare
            res.identical += 1
            continue
        top, lp = score(plain_url, p + a[0][:i], [ta, tb])
        pair = lp[ta] - lp[tb]
        res.divergences.append(Divergence(k, i, ta, tb, top[0] - top[1], pair, flagged=abs(pair) > bound))
    return res


def load_prompts(n: int, tokenizer, domains: Sequence[str] = tuple(DOMAIN_FILES)) -> list[list[int]]:
    """n chat prompts as token ids, taken round-robin over the domains from the end of each file
    (the drafter was trained on their heads)."""
    rows = {}
    for d in domains:
        if d not in DOMAIN_FILES:
            raise ValueError(f"--domains: unknown domain {d!r} (known: {', '.join(DOMAIN_FILES)})")
        lines = [l for l in (DATA / DOMAIN_FILES[d]).read_text().splitlines() if l.strip()]
        rows[d] = [json.loads(l)["turns"][0] for l in reversed(lines)]
    texts = [rows[domains[i % len(domains)]][i // len(domains)] for i in range(n)]
    out = []
    for t in texts:
        s = tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=False)
        out.append(tokenizer(s, add_special_tokens=False).input_ids)
    return out


def print_table(results: list[AuditResult]) -> None:
    print(f"{'pair':20} {'dtype':9} {'conc':>4} {'prompts':>7} {'same':>5} {'diverged':>8} {'rate':>6} {'flagged':>7} "
          f"{'median gap':>10} {'max gap':>8}  bound")
    for r in results:
        s = r.summary()
        med = "-" if s["median_pair_gap"] is None else f"{s['median_pair_gap']:.3f}"
        mx = "-" if s["max_pair_gap"] is None else f"{s['max_pair_gap']:.3f}"
        print(f"{r.pair:20} {r.dtype:9} {r.concurrency:>4} {r.prompts:>7} {r.identical:>5} {len(r.divergences):>8} "
              f"{r.rate:>6.0%} {len(r.flagged):>7} {med:>10} {mx:>8}  {'exact' if r.bound < 0 else f'{r.bound:g} nats'}")
    for r in results:
        for d in r.flagged:
            print(f"FLAGGED {r.pair} {r.dtype} c={r.concurrency}: prompt {d.prompt} token {d.position}: plain {d.plain_token} "
                  f"vs spec {d.spec_token}, plain's log-prob gap {d.pair_gap:.3f} nats (top-2 gap {d.top2_gap:.3f})")


def main(argv: Optional[list[str]] = None) -> int:
    from agentserve.profile import ProfileError, load_profile
    from agentserve.server.procs import ServerProcess

    ap = argparse.ArgumentParser(prog="agentserve audit", description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", required=True, help="the speculative server's profile")
    ap.add_argument("--baseline", required=True, help="the plain server's profile (same model)")
    ap.add_argument("--prompts", type=int, default=24, help="number of prompts (default 24)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--concurrency", default="1,4", help="comma-separated client counts (default 1,4)")
    ap.add_argument("--dtype", choices=sorted(BOUNDS), default=None, help="serve both in this dtype (default: the profile's)")
    ap.add_argument("--deterministic", action="store_true",
                    help="serve both in exact mode (server.deterministic): every divergence is flagged")
    ap.add_argument("--bound", type=float, default=None, help="nats; default 0.25 for bf16/fp16, 0.02 for fp32")
    ap.add_argument("--domains", default=",".join(DOMAIN_FILES), help=f"prompt sets (default {','.join(DOMAIN_FILES)})")
    ap.add_argument("--control", action="store_true",
                    help="also compare the plain server at each concurrency with itself one request at a "
                         "time: the divergences batching alone makes, against which to read the speculative ones")
    ap.add_argument("--json", default=None, help="write every divergence and the summaries here")
    ap.add_argument("--log-dir", default=None, help="server logs here (default: none kept)")
    a = ap.parse_args(argv)
    try:
        concs = [int(c) for c in a.concurrency.split(",") if c.strip()]
    except ValueError:
        ap.error(f"--concurrency: expected comma-separated integers, got {a.concurrency!r}")
    if a.prompts < 1 or a.max_new_tokens < 1 or not concs or min(concs) < 1:
        ap.error("--prompts, --max-new-tokens and --concurrency must be positive")
    try:
        spec_p, plain_p = load_profile(a.profile), load_profile(a.baseline)
    except ProfileError as e:
        print(f"agentserve audit: {e}", file=sys.stderr)
        return 2
    dtype = a.dtype or spec_p.model.dtype
    if dtype not in BOUNDS:
        ap.error(f"--dtype: the profile's model.dtype {dtype!r} has no stated bound; pass --dtype")
    exact = {"deterministic": True} if a.deterministic else {}
    # the tier gate is off: the audit is about numerics, and a refusal would lose an answer
    spec_p, plain_p = (p.model_copy(update={"model": p.model.model_copy(update={"dtype": dtype}), "admission_control": False,
                                            "server": p.server.model_copy(update=exact)}) for p in (spec_p, plain_p))
    bound = EXACT_BOUND if a.deterministic else a.bound
    if Path(spec_p.model.path).resolve() != Path(plain_p.model.path).resolve():
        ap.error(f"--baseline: model.path {plain_p.model.path} differs from the profile's {spec_p.model.path}")
    if plain_p.drafter.algorithm != "none":
        ap.error(f"--baseline: drafter.algorithm must be none (plain decoding), got {plain_p.drafter.algorithm!r}")
    from transformers import AutoTokenizer

    try:
        prompts = load_prompts(a.prompts, AutoTokenizer.from_pretrained(spec_p.model.path), a.domains.split(","))
    except (ValueError, IndexError) as e:
        ap.error(f"--domains/--prompts: {e}")
    logs = Path(a.log_dir) if a.log_dir else None
    if logs:
        logs.mkdir(parents=True, exist_ok=True)
    plain = ServerProcess(plain_p, log_path=logs / f"audit-plain-{dtype}.log" if logs else None)
    spec = ServerProcess(spec_p, log_path=logs / f"audit-spec-{dtype}.log" if logs else None)
    results = []
    try:
        plain.start(timeout=900)
        spec.start(timeout=900)
        for c in concs:
            results.append(audit(spec.url, plain.url, prompts, dtype, c, a.max_new_tokens, bound))
            print(json.dumps(results[-1].summary()), flush=True)
            if a.control and c > 1:
                results.append(audit(plain.url, plain.url, prompts, dtype, c, a.max_new_tokens, bound,
                                     plain_concurrency=1, pair=f"plain@{c} vs plain@1"))
                print(json.dumps(results[-1].summary()), flush=True)
    finally:
        spec.stop()
        plain.stop()
    print_table(results)
    if a.json:
        Path(a.json).write_text(json.dumps([{**r.summary(), "divergences": [asdict(d) for d in r.divergences]}
                                            for r in results], indent=1))
    return 1 if any(r.flagged for r in results if r.pair == SPEC_PAIR) else 0


if __name__ == "__main__":
    sys.exit(main())
