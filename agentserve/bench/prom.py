"""The worker's Prometheus counters around one workload: conditional acceptance per draft
position, verify budget, and the share of accepted drafts that were copied."""

from __future__ import annotations

import requests

PREFIXES = ("agentserve:spec_", "agentserve:verify_budget", "agentserve:agent_spec_accepted_drafts", "agentserve:draft_index")


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """Samples of our worker's counters as {(name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(url + "/metrics", timeout=60).text
    out: dict[tuple[str, tuple], float] = {}
    for fam in text_string_to_metric_families(text):
        for smp in fam.samples:
            if smp.name.startswith(PREFIXES):
                out[(smp.name, tuple(sorted(smp.labels.items())))] = smp.value
    return out


def spec_delta(before: dict, after: dict) -> dict:
    """Per-position conditional acceptance, verify budget and copy share of one workload."""
    def d(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    positions = {}
    for pos in range(1, 65):
        reached = d("agentserve:spec_reached_drafts_total", position=str(pos))
        if reached <= 0:
            break
        positions[pos] = {"reached": reached, "accepted": d("agentserve:spec_accepted_drafts_total", position=str(pos))}
    steps = d("agentserve:verify_budget_tokens_count")
    batch = d("agentserve:spec_batch_size_sum")
    by_source: dict[str, float] = {}
    for (name, labels), value in after.items():
        if name == "agentserve:agent_spec_accepted_drafts_total":
            src = dict(labels).get("source", "?")
            by_source[src] = by_source.get(src, 0.0) + value - before.get((name, labels), 0.0)
    accepted = sum(by_source.values())
    copied = accepted - by_source.get("model", 0.0)  # session index, shared index or radix tree
    return {"positions": positions, "steps": steps,
            "budget_per_step": d("agentserve:verify_budget_tokens_sum") / steps if steps else None,
            "budget_per_request": d("agentserve:verify_budget_tokens_sum") / batch if batch else None,
            "batch_per_step": batch / steps if steps else None,
            "copy_share": copied / accepted if accepted else None}
