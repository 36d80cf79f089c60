"""agentserve's SGLang plugin (entry point group `sglang.srt.plugins`).

SGLang calls `load()` early in every server process (main, scheduler, detokenizer). It:
1. teaches the torch_native attention backend the TARGET_VERIFY forward, and picks the faster
   of bf16 and fp32 GEMM per weight shape and row count on CPUs (cpu_matmul.py), or, in exact
   mode (server.deterministic), makes every row's products independent of its batch (exact.py);
2. honours per-request seeds on every device, identically with and without speculation
   (seeded_sampling.py);
3. registers our speculative algorithms (AGENT_NGRAM, AGENTSPARK);
4. in the HTTP process, adds agent identity and per-agent metrics (http/middleware.py), and
   lets streamed tool calls keep up with chunks of several tokens (http/tool_stream.py).
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

    from sglang_ext.cpu import attention as verify_attention

    from sglang_ext.cpu import exact

    HookRegistry.register(verify_attention.TARGET, verify_attention.around_forward_extend, HookType.AROUND)
    verify_attention.FP32_ON_CPU = verify_attention.decode_mode_from_profile() == "fp32"
    verify_attention.EXACT = exact_mode = exact.enabled_from_profile()
    if verify_attention.FP32_ON_CPU or exact_mode:  # CPU decode attention in fp32 (float64 when exact)
        HookRegistry.register(verify_attention.DECODE_TARGET, verify_attention.around_decode_sdpa, HookType.AROUND)

    from sglang_ext.cpu import matmul as cpu_matmul

    if exact_mode:  # server.deterministic: row-invariant products instead of the measured choice
        HookRegistry.register(exact.EXTEND_TARGET, exact.around_extend_sdpa, HookType.AROUND)
        HookRegistry.register(cpu_matmul.LINEAR_TARGET, exact.around_linear, HookType.AROUND)
        HookRegistry.register(cpu_matmul.LM_HEAD_TARGET, exact.around_lm_head, HookType.AROUND)
        HookRegistry.register(cpu_matmul.LOAD_TARGET, exact.after_load_model, HookType.AFTER)
    elif cpu_matmul.mode_from_profile() != "native":  # measured bf16/fp32 GEMM choice (acts on CPU bf16 only)
        HookRegistry.register(cpu_matmul.LINEAR_TARGET, cpu_matmul.around_linear, HookType.AROUND)
        HookRegistry.register(cpu_matmul.LM_HEAD_TARGET, cpu_matmul.around_lm_head, HookType.AROUND)
        HookRegistry.register(cpu_matmul.LOAD_TARGET, cpu_matmul.after_load_model, HookType.AFTER)

    from sglang_ext.spec import seeded_sampling

    HookRegistry.register(seeded_sampling.TP_TARGET, seeded_sampling.around_tp_forward, HookType.AROUND)
    HookRegistry.register(seeded_sampling.SAMPLER_TARGET, seeded_sampling.around_sampler, HookType.AROUND)

    from sglang_ext.spec import algorithms
    from sglang_ext.tiers import pacing as prefill_pacing

    algorithms.register_all()
    # a no-op unless the speculative worker carries a pacer (AGENTSPARK, tier-aware)
    HookRegistry.register(prefill_pacing.TARGET, prefill_pacing.around_prefill, HookType.AROUND)

    import multiprocessing

    if multiprocessing.parent_process() is None:
        # Only the HTTP (main) process serves requests; scheduler processes skip the import.
        from sglang_ext.http import tool_stream

        tool_stream.register()
        HookRegistry.register("sglang.srt.entrypoints.http_server.launch_server", _before_launch, HookType.BEFORE)


def _before_launch(*args: object, **kwargs: object) -> tuple | None:
    from sglang.srt.entrypoints import http_server

    from sglang_ext.http import middleware as agent_api

    # the agent API (keys, tiers, sessions); it wraps SGLang's warmup so that it passes the keys
    launch = agent_api.install(http_server.app, args, kwargs)
    from agentserve.server import drain

    drain.install(http_server.app)  # refuses new work once SIGTERM starts the drain
    return launch
