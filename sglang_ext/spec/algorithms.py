"""Speculative algorithms agentserve registers with SGLang.

SGLang dispatches on duck-typed predicates (`is_ngram()`, `has_draft_kv()`, ...) in the
scheduler, the overlap relay and the KV sizing. Our workers keep their drafter outside SGLang's
KV pools and verify through the target-verify forward with a draft mask, which is exactly the
NGRAM data flow, so our spec class answers like NGRAM there while keeping its own name.

SGLang 0.5.23's CustomSpecAlgo lacks `carries_draft_hidden_states`, `need_topk` and
`create_future_map`, which the scheduler calls; the spec class provides them with the
semantics of the builtin enum's versions for an NGRAM-like algorithm.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

AGENT_NGRAM = "AGENT_NGRAM"
AGENTSPARK = "AGENTSPARK"


def _spec_class() -> type:
    from sglang.srt.speculative.spec_registry import CustomSpecAlgo

    class NgramFamilySpec(CustomSpecAlgo):  # type: ignore[misc, valid-type]
        """An algorithm whose drafts come from outside SGLang's pools (no draft KV)."""

        def is_ngram(self) -> bool:
            return True

        def has_draft_kv(self) -> bool:
            return False

        def carries_draft_hidden_states(self) -> bool:
            return False

        def need_topk(self) -> bool:
            return False

        def supports_mixed_chunk(self) -> bool:
            # AGENTSPARK runs synchronously (no overlap relay) and takes a mixed batch as its
            # extend step: the running requests decode one token each through the target's
            # plain path and SGLang's sampler, then resume drafting from the emitted token.
            return self.name == AGENTSPARK

        def create_future_map(self, device: Any, req_to_token_pool: Any, needs_cpu_seq_lens: bool = True,
                              needs_confidence_relay: bool = False) -> Any:
            from sglang.srt.managers.overlap_utils import FutureMap

            return FutureMap(device, self, req_to_token_pool, needs_cpu_seq_lens, needs_confidence_relay)

        def handle_server_args(self, server_args: Any) -> None:
            # Same resolution SGLang applies to NGRAM (device check, no mixed chunk, draft
            # width defaults, overlap off on CPU).
            from sglang.srt.arg_groups.speculative_hook import _handle_ngram

            mixed = bool(getattr(server_args, "enable_mixed_chunk", False))
            _handle_ngram(server_args)
            if str(getattr(server_args, "speculative_algorithm", "")).upper() == AGENTSPARK and mixed:
                # AGENTSPARK runs a mixed batch (prefill chunk + one token for each running
                # request) as its extend step through the target's plain path and SGLang's
                # sampler, so --enable-mixed-chunk keeps its meaning: running streams go on
                # decoding while a new request is prefilled instead of standing still.
                server_args.enable_mixed_chunk = True  # SGLang declares a callback's writes

    return NgramFamilySpec


def register_all() -> None:
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm
    from sglang.srt.speculative.spec_registry import get_spec

    spec_cls = _spec_class()
    if get_spec(AGENT_NGRAM) is None:
        @SpeculativeAlgorithm.register(AGENT_NGRAM, supports_overlap=False, spec_class=spec_cls)
        def _agent_ngram(server_args: Any) -> type:
            from sglang_ext.spec.ngram_worker import AgentNgramWorker

            return AgentNgramWorker

    if get_spec(AGENTSPARK) is None:
        @SpeculativeAlgorithm.register(AGENTSPARK, supports_overlap=False, spec_class=spec_cls)
        def _agentspark(server_args: Any) -> type:
            from sglang_ext.spec.worker import AgentSparkWorker

            return AgentSparkWorker
