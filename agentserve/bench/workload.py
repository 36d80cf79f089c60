"""Prompts the benches send: held-out prompts per domain, agent traces cut before an assistant
turn, disjoint prompt slices per phase, and warm-up prompts no phase uses.

Held out means held out from the shipped drafter: the corpus it trained on answered every line of
the shared prompt sets and keeps 1 in 10 prompt keys as its eval split (`corpus.is_eval`), so the
benches send only eval-split lines (and MT-Bench's eval second turns, on the target's own first
answer from the corpus); warm-up traffic uses train-split lines."""

from __future__ import annotations

import json
from typing import Any

from agentserve.bench.systems import REPO

DATA = REPO.parent / "shared" / "data" / "prompts"
DOMAIN_FILES = {"code": ["humaneval.jsonl", "mbpp.jsonl"], "math": ["gsm8k.jsonl"], "chat": ["mt-bench.jsonl"]}
WARMUP_IDS = [1, 9690, 198, 31530, 15, 44, 339, 2]  # a prompt no workload uses
WARMUP_SEED = 1_000_003  # agent traces of this seed are warm-up only


def _rows(dom: str, held_out: bool) -> list[list[str]]:
    """Each of the domain's files as its list of first-turn prompts in the drafter corpus' eval
    split (held_out) or train split, in file order."""
    from sglang_ext.dspark.corpus import is_eval

    files: list[list[str]] = []
    for f in DOMAIN_FILES[dom]:
        p = DATA / f
        if p.is_file():
            lines = [x for x in p.read_text().splitlines() if x.strip()]
            files.append([json.loads(x)["turns"][0] for i, x in enumerate(lines) if is_eval(f"{f}:{i}") == held_out])
    return files


def _interleave(files: list[list[Any]]) -> list[Any]:
    """One from each file in turn, each file from its end (code: HumanEval and MBPP alternate)."""
    tails = [list(reversed(rows)) for rows in files]
    return [row[i] for i in range(max(map(len, tails), default=0)) for row in tails if i < len(row)]


def _second_turns(tokenizer: Any) -> list[list[int]]:
    """MT-Bench second turns of eval-split conversations, after the target's own greedy first
    answer from the corpus (how the corpus built its own second turns, none of them trained on)."""
    from sglang_ext.dspark.corpus import followup_prompts, is_eval

    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    ps = [p for p in followup_prompts(str(DATA), REPO / "corpus", decode) if is_eval(p.key)]
    return [_template_ids(tokenizer, p.messages) for p in reversed(ps)]


def load_prompts(per_domain: int, tokenizer: Any, seed: int = 0, max_agent_prompt: int | None = None) -> dict[str, list[list[int]]]:
    """Up to `per_domain` held-out prompts per domain as token ids (module docstring: none in the
    drafter's training split; chat has 9 first turns and 9 second turns, so it may return fewer),
    plus multi-turn agent traces cut before their last assistant turn (tool calls with JSON
    arguments, tool outputs echoed, file edits, retries)."""
    out: dict[str, list[list[int]]] = {}
    for dom in DOMAIN_FILES:
        lines = _interleave(_rows(dom, held_out=True))
        ids = [chat_ids(tokenizer, t) for t in lines[:per_domain]]
        if dom == "chat" and len(ids) < per_domain:
            ids += _second_turns(tokenizer)[: per_domain - len(ids)]
        if ids:
            out[dom] = ids
    out["agent"] = agent_prompts(per_domain, tokenizer, seed, max_agent_prompt)
    return out


def warmup_prompts(n: int, tokenizer: Any, domains: list[str], held_out: int, max_agent_prompt: int | None = 1024
                   ) -> list[list[int]]:
    """Up to `n` prompts per domain that no measured phase sends: train-split lines from the head
    of each file (`held_out` is kept for callers; the splits are disjoint) and agent traces of a
    seed no phase uses."""
    out: list[list[int]] = []
    for dom in domains:
        if dom == "agent":
            out += agent_prompts(n, tokenizer, WARMUP_SEED, max_agent_prompt)
        elif dom in DOMAIN_FILES:
            out += [chat_ids(tokenizer, t) for rows in _rows(dom, held_out=False) for t in rows[:n]][:n]
    return out


def agent_prompts(n: int, tokenizer: Any, seed: int = 0, max_prompt_tokens: int | None = None) -> list[list[int]]:
    """Each trace cut before its last assistant turn, or before the last one that starts
    within `max_prompt_tokens` (prefill of a whole 2-3k-token trace takes ~40 s on 2 cores)."""
    from agentserve.bench.traces import TRACE_KINDS, build_trace, tokenize_trace

    prompts = []
    for i in range(n):
        tt = tokenize_trace(build_trace(TRACE_KINDS[i % len(TRACE_KINDS)], seed + i), tokenizer)
        starts = [a for a, _ in tt.spans]
        fit = [a for a in starts if max_prompt_tokens is None or a <= max_prompt_tokens]
        prompts.append(tt.tokens[: (fit or starts[:1])[-1]])  # ends with "<|im_start|>assistant\n"
    return prompts


def chat_ids(tokenizer: Any, prompt: str) -> list[int]:
    return _template_ids(tokenizer, [{"role": "user", "content": prompt}])


def _template_ids(tokenizer: Any, messages: list[dict[str, Any]]) -> list[int]:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False).input_ids


def phase_slices(temperatures: list[float], concurrencies: list[int], per_domain: int,
                 available: int | None = None) -> dict[tuple[float, int], slice]:
    """Each (temperature, concurrency) phase gets its own max(concurrency, per_domain) prompts
    per domain. Reusing a prompt would let every cache-aware system (SGLang's n-gram corpus,
    our radix-tree copies) replay the earlier phase's output, which measures the cache rather
    than decoding. With only `available` prompts (chat's held-out set is small) `per_domain`
    shrinks until they suffice, never below one prompt per client (else ValueError)."""
    phases = [(t, c) for t in temperatures for c in concurrencies]
    k = per_domain
    while available is not None and k > 1 and sum(max(c, k) for _, c in phases) > available:
        k -= 1
    if available is not None and sum(max(c, k) for _, c in phases) > available:
        raise ValueError(f"{sum(max(c, k) for _, c in phases)} distinct prompts needed, {available} held out")
    out, start = {}, 0
    for temp, conc in phases:
        n = max(conc, k)
        out[(temp, conc)] = slice(start, start + n)
        start += n
    return out


def prompts_needed(temperatures: list[float], concurrencies: list[int], per_domain: int) -> int:
    return max(s.stop for s in phase_slices(temperatures, concurrencies, per_domain).values())
