"""AGENT_NGRAM: SGLang's n-gram drafter run as a plugin-registered algorithm.

It exists to prove, with the simplest drafter, the path the DSpark worker takes: registration
through our plugin, a spec class SGLang's scheduler can dispatch on, the CPU ops of our
sgl_kernel stand-in, and target-verify attention on the torch_native backend. Verification is
SGLang's (greedy on CPU), so this worker is for greedy requests; AGENTSPARK verifies itself.
"""

from __future__ import annotations

from sglang.srt.speculative.ngram_worker import NGRAMWorker


class AgentNgramWorker(NGRAMWorker):
    """Marks the worker as ours in logs and stack traces; behaviour is NGRAM's."""
