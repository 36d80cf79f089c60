"""agentserve's SGLang plugin (entry point group `sglang.srt.plugins`).

SGLang calls `load()` early in every server process (main, scheduler, detokenizer). It:
1. teaches the torch_native attention backend the TARGET_VERIFY forward;
2. registers our speculative algorithms (AGENT_NGRAM, AGENTSPARK).
Failures are logged, never raised: a broken plugin must not take plain serving down.
"""

from __future__ import annotations

import logging

log = logging.getLogger("agentserve.plugin")
_loaded = False


def load() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    from sglang_ext import verify_attention

    HookRegistry.register(verify_attention.TARGET, verify_attention.around_forward_extend, HookType.AROUND)

    from sglang_ext import algorithms

    algorithms.register_all()
