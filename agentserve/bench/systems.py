"""The serving systems every bench compares: drafter settings layered on a base profile."""

from __future__ import annotations

from pathlib import Path

from agentserve.profile import DrafterSpec

REPO = Path(__file__).resolve().parents[2]
DRAFTER = str(REPO / "drafters" / "smollm2-135m-dspark")

SYSTEMS: dict[str, DrafterSpec] = {
    "plain": DrafterSpec(algorithm="none"),
    "ngram": DrafterSpec(algorithm="ngram", num_draft_tokens=8),
    # our worker, model drafts only
    "dspark": DrafterSpec(algorithm="agentspark", path=DRAFTER, num_draft_tokens=8, radix_drafting=False),
    # our worker, model drafts + copied continuations from the session index
    "hybrid": DrafterSpec(algorithm="agentspark", path=DRAFTER, num_draft_tokens=8, radix_drafting=True),
    # ablation: hybrid with every row padded to the step's widest (SGLang's uniform verify layout)
    "hybrid_padded": DrafterSpec(algorithm="agentspark", path=DRAFTER, num_draft_tokens=8, radix_drafting=True,
                                 ragged_verify=False),
    # SGLang's own DSPARK worker on the same checkpoint (CUDA/NPU/XPU only: a GPU baseline)
    "upstream": DrafterSpec(algorithm="dspark", path=DRAFTER, num_draft_tokens=8),
}
