"""Outside-client check: agentic-bench (scripts/agentic_bench.sh) against the bench's systems.

Each system (agentserve/bench/systems.py: plain, ngram, hybrid, ...) is served in turn from the
base profile on a free loopback port, exactly as `agentserve bench` serves it, and agentic-bench
replays its locally generated multi-turn workload against it at each concurrency. Its JSON
lines land in OUT/<system>/abench_c<C>.jsonl; a summary table of its own metrics is printed
and written to OUT/summary.json.

    .venv/bin/python scripts/outside_check.py --systems plain,hybrid --concurrency 4 --out bench_out/abench
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

def columns(res: dict[str, Any]) -> dict[str, Any]:
    """agentic-bench's own metrics (its JSON line's 'metrics' object), under short names."""
    m = res.get("metrics") or {}
    e2e, t1, t2 = m.get("e2e_overall") or {}, m.get("t1_ttft") or {}, m.get("t2plus_ttft") or {}
    return {"turns": m.get("successful_turns"), "of": m.get("total_turns"), "e2e_ms": e2e.get("mean_ms"),
            "e2e_p95_ms": e2e.get("p95_ms"), "ttft1_ms": t1.get("mean_ms"), "ttft2_ms": t2.get("mean_ms"),
            "tpot_ms": m.get("tpot_ms"), "out_tok_s": m.get("output_throughput"),
            "user_tok_s": m.get("per_user_output_tps"), "prefix_cache": m.get("prefix_cache_ratio")}


def main(argv: list[str] | None = None) -> int:
    from agentserve.bench.systems import SYSTEMS, log_name, system_profile
    from agentserve.profile import load_profile
    from agentserve.server.procs import ServerProcess

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default=str(REPO / "profiles" / "cpu-demo.yaml"))
    ap.add_argument("--systems", default="plain,hybrid")
    ap.add_argument("--concurrency", default="4")
    ap.add_argument("--out", default=str(REPO / "bench_out" / "abench"))
    a = ap.parse_args(argv)
    base = load_profile(a.profile)
    out = Path(a.out)
    rows: list[dict[str, Any]] = []
    for name in [s for s in a.systems.split(",") if s]:
        if name.split("@")[0] not in SYSTEMS:
            ap.error(f"--systems: unknown system {name!r}")
        d = out / log_name(name)
        d.mkdir(parents=True, exist_ok=True)
        with ServerProcess(system_profile(base, name), log_path=d / "server.log") as srv:
            for c in [int(x) for x in a.concurrency.split(",") if x]:
                subprocess.run(["bash", str(REPO / "scripts" / "agentic_bench.sh"), srv.url + "/v1", str(d), str(c)],
                               check=True)
                last = (d / f"abench_c{c}.jsonl").read_text().strip().splitlines()[-1]
                res = json.loads(last)
                rows.append({"system": name, "concurrency": c, **columns(res)})
                print(json.dumps(rows[-1]), file=sys.stderr)
    (out / "summary.json").write_text(json.dumps(rows, indent=1))
    for r in rows:
        print("  ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
