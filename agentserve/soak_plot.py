"""The soak's PNG: server memory, KV usage, load and request outcomes over time."""

from __future__ import annotations

from pathlib import Path
from typing import Any

OUTCOME_COLOURS = {"answered": "tab:green", "rejected": "tab:blue", "refused": "tab:orange",
                   "cancelled": "tab:gray", "failed": "tab:red"}


def plot(rep: dict[str, Any], path: Path, bin_s: float = 10.0) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = rep["samples"]
    t = [x["t"] for x in s]
    fig, ax = plt.subplots(4, 1, figsize=(9, 10), sharex=True)
    ax[0].plot(t, [(x.get("rss_bytes") or 0) / 2**20 for x in s], color="tab:purple")
    ax[0].set_ylabel("server RSS (MiB)")
    ax[1].plot(t, [x.get("token_usage") for x in s], color="tab:brown", label="KV token usage")
    ax[1].set_ylabel("KV token usage")
    if any(x.get("draft_index_session_tokens") is not None for x in s):  # AGENTSPARK: copy-index memory
        twin = ax[1].twinx()
        for key, colour in (("draft_index_session_tokens", "tab:olive"), ("draft_index_shared_tokens", "tab:cyan")):
            twin.plot(t, [x.get(key) for x in s], color=colour, label=key.replace("draft_index_", "index ").replace("_", " "))
        twin.set_ylabel("draft index tokens")
        twin.legend(loc="upper left", fontsize=8)
    ax[2].plot(t, [x.get("num_running_reqs") for x in s], label="running")
    ax[2].plot(t, [x.get("num_queue_reqs") for x in s], label="queued")
    ax[2].plot(t, [x.get("open_sessions") for x in s], label="open sessions")
    ax[2].legend(loc="upper right", fontsize=8)
    ax[2].set_ylabel("count")
    reqs = rep["requests"]
    end = max([r["t1"] for r in reqs] + t + [bin_s])
    nb = int(end // bin_s) + 1
    bottom = [0] * nb
    for outcome, colour in OUTCOME_COLOURS.items():
        counts = [0] * nb
        for r in reqs:
            if r["outcome"] == outcome:
                counts[min(nb - 1, int(max(0.0, r["t1"]) // bin_s))] += 1
        ax[3].bar([i * bin_s for i in range(nb)], counts, width=bin_s * 0.9, bottom=bottom, align="edge",
                  color=colour, label=outcome)
        bottom = [b + c for b, c in zip(bottom, counts)]
    ax[3].set_ylabel(f"requests ended / {bin_s:g} s")
    ax[3].set_xlabel("seconds since the soak started")
    ax[3].legend(loc="upper right", fontsize=8, ncol=5)
    c = rep["config"]
    fig.suptitle(f"agentserve soak: {rep.get('profile', '')}, {c['agents']} agents, {c['seconds']:g} s "
                 f"(failed {rep['totals']['failed']}, 5xx {rep['totals']['status_5xx']})")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
