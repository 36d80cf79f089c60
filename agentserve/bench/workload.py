"""Prompts the benches send: held-out single-turn prompts per domain, agent traces cut before
an assistant turn, disjoint prompt slices per phase, and warm-up prompts no phase uses."""

from __future__ import annotations

import json
from typing import Any

from agentserve.bench.systems import REPO

DATA = REPO.parent / "shared" / "data" / "prompts"
DOMAIN_FILES = {"code": ["humaneval.jsonl", "mbpp.jsonl"], "math": ["gsm8k.jsonl"], "chat": ["mt-bench.jsonl"]}
WARMUP_IDS = [1, 9690, 198, 31530, 15, 44, 339, 2]  # a prompt no workload uses
WARMUP_SEED = 1_000_003  # agent traces of this seed are warm-up only


def _rows(dom: str) -> list[list[str]]:
    """Each of the domain's files as its list of first-turn prompts."""
    files: list[list[str]] = []
    for f in DOMAIN_FILES[dom]:
        p = DATA / f
        if p.is_file():
            files.append([json.loads(x)["turns"][0] for x in p.read_text().splitlines() if x.strip()])
    return files


def load_prompts(per_domain: int, tokenizer: Any, seed: int = 0, max_agent_prompt: int | None = None) -> dict[str, list[list[int]]]:
    """Held-out prompts as token ids: the last `per_domain` lines of each domain's files
    (drafter training uses the head), plus multi-turn agent traces cut before their last
    assistant turn (tool calls with JSON arguments, tool outputs echoed, file edits, retries)."""
    out: dict[str, list[list[int]]] = {}
    for dom in DOMAIN_FILES:
        lines = [t for rows in _rows(dom) for t in rows[-per_domain:]]
        if lines:
            out[dom] = [chat_ids(tokenizer, t) for t in lines[:per_domain]]
    out["agent"] = agent_prompts(per_domain, tokenizer, seed, max_agent_prompt)
    return out


def warmup_prompts(n: int, tokenizer: Any, domains: list[str], held_out: int, max_agent_prompt: int | None = 1024
                   ) -> list[list[int]]:
    """Up to `n` prompts per domain that no measured phase sends: the head of each file (never
    in its last `held_out` lines) and agent traces of a seed no phase uses."""
    out: list[list[int]] = []
    for dom in domains:
        if dom == "agent":
            out += agent_prompts(n, tokenizer, WARMUP_SEED, max_agent_prompt)
        elif dom in DOMAIN_FILES:
            out += [chat_ids(tokenizer, t) for rows in _rows(dom) for t in rows[: max(0, min(n, len(rows) - held_out))]][:n]
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
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False).input_ids


def phase_slices(temperatures: list[float], concurrencies: list[int], per_domain: int) -> dict[tuple[float, int], slice]:
    """Each (temperature, concurrency) phase gets its own max(concurrency, per_domain) prompts
    per domain. Reusing a prompt would let every cache-aware system (SGLang's n-gram corpus,
    our radix-tree copies) replay the earlier phase's output, which measures the cache rather
    than decoding."""
    out, start = {}, 0
    for temp in temperatures:
        for conc in concurrencies:
            n = max(conc, per_domain)
            out[(temp, conc)] = slice(start, start + n)
            start += n
    return out


def prompts_needed(temperatures: list[float], concurrencies: list[int], per_domain: int) -> int:
    return max(s.stop for s in phase_slices(temperatures, concurrencies, per_domain).values())
