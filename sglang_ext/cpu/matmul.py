"""Measured matmul kernel choice for bf16 models on CPUs without native bf16 GEMM.

On a CPU without AVX512-BF16 or AMX (e.g. AMD Zen 3: AVX2 only), PyTorch's bf16 linear costs
about M times a one-row product for M rows, while an fp32 GEMM on fp32 weights amortises the
weight reads over the rows. Measured on such a 2-core VM (576 x 3072 weight):

    M rows          1      2      8      16
    bf16 linear   0.19   0.37   1.46   2.90  ms
    fp32 linear   0.18   0.35   0.46   0.69  ms

Every multi-row product pays: a prefill, a decode batch of several requests, and above all a
speculative verify of 1 + l positions per request. So per weight shape, at its first product of
two or more rows, `GemmChooser` times the kernels at M = 2, 3, 4, 6, 8, 16, ..., 128 and from
then on picks the fastest per M bucket (one row always stays in bf16, which reads half the
bytes of fp32 and was the faster single-row kernel with cold caches). Where native bf16 GEMM is fast (AVX512-BF16, AMX), the bf16 kernel
wins the timing and nothing changes.

How it times matters. At start-up (`calibrate`) each shape is timed as a forward uses it: one
pass over every weight of that shape in the model (30 layers' worth), so the weights stream from
memory as they do between layers. Timing one weight, even after evicting the caches, is not
that: on the AMX VM one 576x3072 product picked the fp32 copy at 2-8 rows, while a pass over the
model's weights costs 27-28 ms in bf16 at 1-16 rows against 29-61 ms with those fp32 copies
(twice the bytes), so every verify step and every decode batch of the speculative and the plain
server paid up to 2x for its weight products (scripts/matmul_pass.py reproduces the pass).

The fp32 weights are copies of the bf16 ones, made once per layer on first use, within a
memory budget (`budget_bytes`, default a quarter of the memory available then); layers past it
keep the bf16 kernel. Each output element is the same dot product of bf16 values, accumulated
in fp32 and rounded to bf16 once, which is what the bf16 kernel computes up to accumulation
order (the same kind of difference a change of batch shape makes). The result keeps the
caller's dtype.

Before timing, every kernel is checked at each row count (and at one row) against a float64
product of the same bf16 values on this CPU (tolerance in selfcheck.py); a kernel that
disagrees is never chosen there, and the fp32 product (the reference) stands in, logged.

Selected by the profile's `server.cpu_matmul`: `auto` (the default, measured), `native` (always
the model's dtype) or `fp32` (fp32 from two rows on, without timing).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Optional

import torch

from sglang_ext import config
from sglang_ext.cpu import selfcheck

log = logging.getLogger("agentserve.cpu_matmul")

# Row counts timed; M uses the largest bucket <= M. One-row products always keep the native
# kernel: bf16 reads half the bytes, and a one-row step (decoding one request) is where the
# call overhead of choosing would show (~120 linears of 0.2 ms per step for a 135M model).
BUCKETS = (2, 3, 4, 6, 8, 16, 32, 64, 128)
MARGIN = 0.9  # an fp32 kernel must be at least 10 % faster than the native one to be chosen

NATIVE, F32, F32_T = 0, 1, 2  # bf16 x @ W.T; fp32 x @ W.T; fp32 (W @ x.T).T (wide weights, few rows)
KIND_NAMES = ("bf16", "fp32", "fp32_t")


def _available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


_SCRATCH: Optional[torch.Tensor] = None


def _evict() -> None:
    """Push the weights out of the CPU caches: in a model forward every layer's weights come
    from memory, and a kernel timed on cache-resident weights looks faster than it is (twice
    the bytes of fp32 weights cost most where the product is memory-bound)."""
    global _SCRATCH
    if _SCRATCH is None:
        _SCRATCH = torch.ones(96 << 20, dtype=torch.uint8)  # larger than a server CPU's L3 slice
    _SCRATCH.add_(1)


def _time(fn: Callable[[], Any], reps: int) -> float:
    fn()  # warm-up (allocations, kernel selection)
    best = float("inf")
    for _ in range(reps):
        _evict()
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _run(kind: int, x: torch.Tensor, w: torch.Tensor, w32: Optional[torch.Tensor]) -> torch.Tensor:
    """x [M, K] @ w.T in the chosen kernel; fp32 kernels return fp32."""
    if kind == NATIVE:
        return torch.nn.functional.linear(x, w)
    assert w32 is not None
    if kind == F32:
        return torch.nn.functional.linear(x.float(), w32)
    return (w32 @ x.float().T).T


class GemmChooser:
    """Per (out, in) weight shape: the fastest kernel per row-count bucket, measured once."""

    def __init__(self, budget_bytes: Optional[int] = None, reps: int = 3,
                 buckets: tuple[int, ...] = BUCKETS, force_fp32: bool = False) -> None:
        self.budget = budget_bytes
        self.force_fp32 = force_fp32  # profile cpu_matmul: fp32 — no timing, fp32 from two rows
        self.reps, self.buckets = reps, buckets
        self.used = 0
        self.kinds: dict[tuple[int, int], tuple[int, ...]] = {}  # shape -> kernel per bucket
        self._w32: dict[tuple[int, tuple[int, ...]], tuple[torch.Tensor, int]] = {}  # (storage, shape) -> (copy, version)
        self.min_rows = buckets[0]  # fewer rows: straight to the native kernel (one comparison)
        self.one_row: dict[tuple[int, int], int] = {}  # shape -> the one-row kernel (NATIVE unless its check failed)

    def verify(self, w: torch.Tensor) -> dict[int, set[int]]:
        """Per row count (1 and each bucket): the kernels whose product agrees with the float64
        reference on this CPU (selfcheck.py states the tolerance). Random rows, the real weight."""
        n, k = w.shape
        g = torch.Generator().manual_seed(n * 131 + k)
        x = torch.randn(max(self.buckets), k, generator=g).to(w.dtype)
        cols = selfcheck.check_columns(n)
        w32 = w.detach().float()
        ok: dict[int, set[int]] = {}
        for m in (1,) + tuple(self.buckets):
            ok[m] = set()
            for kind in (NATIVE, F32, F32_T):
                out = _run(kind, x[:m], w, w32).to(w.dtype)  # rounded as linear() rounds it
                err = selfcheck.gemm_error(out, x[:m], w, cols)
                if err <= 1.0:
                    ok[m].add(kind)
                else:
                    log.warning("cpu_matmul %dx%d: the %s kernel at %d rows is off the float64 reference by %.1fx "
                                "the tolerance on this CPU; not used there", n, k, KIND_NAMES[kind], m, err)
        return ok

    def measure(self, w: torch.Tensor, group: Optional[list[torch.Tensor]] = None) -> tuple[int, ...]:
        """Kernel per row-count bucket for w's shape. `group`: every weight of that shape in the
        model; each kernel is then timed over a pass through all of them, as a forward reads
        them (module docstring), else over w alone."""
        n, k = w.shape
        ok = self.verify(w)
        if NATIVE not in ok[1]:
            self.min_rows = 1  # one-row products must come here too: their native kernel failed
        if self.force_fp32:
            kinds = tuple(self._fallback(F32_T, ok[m], n, k, m) for m in self.buckets)
            log.info("cpu_matmul %dx%d: fp32_t from 2 rows (cpu_matmul: fp32), checked against float64", n, k)
            self.one_row[(n, k)] = self._fallback(NATIVE, ok[1], n, k, 1)
            return kinds
        ws = [g.detach() for g in group] if group else [w.detach()]
        w32s = [g.float() for g in ws]  # timing copies; weight32 makes the kept ones

        def run(c: int, x: torch.Tensor) -> None:
            for wi, wi32 in zip(ws, w32s):
                _run(c, x, wi, wi32)

        kinds = []
        native_out = False  # the native kernel grows ~linearly in M here: stop timing it
        fp32_out = False  # the fp32 copies lose by far (native bf16 GEMM): stop timing them
        for m in self.buckets:
            x = torch.randn(m, k, dtype=w.dtype)
            cands = set() if fp32_out and NATIVE in ok[m] else ok[m] - {NATIVE}
            t = {c: _time(lambda c=c: run(c, x), self.reps) for c in cands}
            t_native = (float("inf") if native_out or NATIVE not in ok[m]
                        else _time(lambda: run(NATIVE, x), self.reps))
            best = min(t, key=t.get) if t else NATIVE
            chosen = best if t and t[best] < MARGIN * t_native else NATIVE
            kinds.append(self._fallback(chosen, ok[m], n, k, m))
            native_out = native_out or (bool(t) and t_native > 2 * t[best])
            fp32_out = fp32_out or (bool(t) and t[best] > 1.5 * t_native)
        self.one_row[(n, k)] = self._fallback(NATIVE, ok[1], n, k, 1)
        log.info("cpu_matmul %dx%d: kernel per row count %s (each checked against float64; timed over %d "
                 "weight(s) of this shape)", n, k, {m: KIND_NAMES[c] for m, c in zip(self.buckets, kinds)}, len(ws))
        return tuple(kinds)

    @staticmethod
    def _fallback(kind: int, ok: set[int], n: int, k: int, m: int) -> int:
        """`kind` if it passed the check at m rows, else the reference (fp32 product, F32) where
        that passed, else the native kernel (logged: nothing here agrees with float64)."""
        if kind in ok:
            return kind
        for alt in (F32, F32_T, NATIVE):
            if alt in ok:
                log.warning("cpu_matmul %dx%d: %d rows fall back to the %s kernel", n, k, m, KIND_NAMES[alt])
                return alt
        log.error("cpu_matmul %dx%d: no kernel agrees with the float64 reference at %d rows; keeping %s",
                  n, k, m, KIND_NAMES[kind])
        return kind

    def kind(self, m: int, w: torch.Tensor) -> int:
        if m < self.min_rows:
            return NATIVE
        shape = (int(w.shape[0]), int(w.shape[1]))
        kinds = self.kinds.get(shape)
        if kinds is None:
            kinds = self.kinds[shape] = self.measure(w)
        if m < self.buckets[0]:  # min_rows was lowered: a one-row native product failed its check
            return self.one_row.get(shape, NATIVE)
        i = 0
        while i + 1 < len(self.buckets) and self.buckets[i + 1] <= m:
            i += 1
        return kinds[i]

    def weight32(self, w: torch.Tensor) -> Optional[torch.Tensor]:
        """The fp32 copy of w (made now if the budget allows; None when it does not). Copies
        are keyed by storage and shape, so a weight shared by two modules (a drafter using
        the target's LM head) has one; a copy is remade when the weight changed since (in-place
        version or new storage: SGLang can update weights while serving)."""
        key = (w.data_ptr(), tuple(w.shape))
        held = self._w32.get(key)
        if held is not None:
            w32, version = held
            if version == w._version:
                return w32
            del self._w32[key]
            self.used -= w32.numel() * 4
        if self.budget is None:
            self.budget = _available_bytes() // 4
        need = w.numel() * 4
        if self.used + need > self.budget:
            return None
        w32 = w.detach().float()
        self._w32[key] = (w32, w._version)
        self.used += need
        return w32

    def applies(self, x: torch.Tensor, w: Any) -> bool:
        return (isinstance(w, torch.Tensor) and w.dim() == 2 and x.device.type == "cpu"
                and x.dtype == torch.bfloat16 and w.dtype == torch.bfloat16
                and not (w.requires_grad and torch.is_grad_enabled()))  # training keeps autograd's kernel

    def linear(self, x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """x @ w.T (+ bias) in bf16, computed by the fastest measured kernel for x's row count;
        None: the caller's own (native) kernel is the one to use."""
        if not self.applies(x, w):
            return None
        x2 = x.reshape(-1, x.shape[-1])
        kind = self.kind(x2.shape[0], w)
        if kind == NATIVE:
            return None
        w32 = self.weight32(w)
        if w32 is None:
            return None
        out = _run(kind, x2, w, w32)
        if bias is not None:
            out = out + bias.float()
        return out.to(x.dtype, memory_format=torch.contiguous_format).reshape(*x.shape[:-1], w.shape[0])

    def calibrate(self, model: torch.nn.Module) -> None:
        """Measure every bf16 CPU linear shape of a loaded model now (start-up), not during a
        request: SGLang's unquantized linears and LM head, and plain torch Linear layers."""
        groups: dict[tuple[int, int], list[torch.Tensor]] = {}
        for mod in model.modules():
            w = getattr(mod, "weight", None)
            if (is_linear(mod) and isinstance(w, torch.Tensor) and w.dim() == 2 and w.device.type == "cpu"
                    and w.dtype == torch.bfloat16 and not getattr(mod, "use_intel_amx_backend", False)):
                group = groups.setdefault((int(w.shape[0]), int(w.shape[1])), [])
                if all(g.data_ptr() != w.data_ptr() for g in group):  # a tied weight is read once
                    group.append(w)
        for shape, group in groups.items():
            if shape not in self.kinds:
                self.kinds[shape] = self.measure(group[0], group)


def is_linear(mod: torch.nn.Module) -> bool:
    """A torch Linear, or an SGLang layer whose product is a plain weight product (its
    unquantized linear or embedding-as-head method): the layers our kernel choices act on."""
    return isinstance(mod, torch.nn.Linear) or type(getattr(mod, "quant_method", None)).__name__ in (
        "UnquantizedLinearMethod", "UnquantizedEmbeddingMethod")


_chooser: Optional[GemmChooser] = None


def mode_from_profile() -> str:
    """`server.cpu_matmul` of the profile the launcher passed: auto (default), native, fp32."""
    return config.served().server.cpu_matmul


def chooser() -> GemmChooser:
    global _chooser
    if _chooser is None:
        _chooser = GemmChooser(force_fp32=mode_from_profile() == "fp32")
    return _chooser


def fast_linear(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """F.linear with the measured kernel choice (a plain torch caller: our DSpark drafter)."""
    ch = chooser()
    if x.dim() and x.numel() >= ch.min_rows * x.shape[-1]:
        out = ch.linear(x, w, bias)
        if out is not None:
            return out
    return torch.nn.functional.linear(x, w, bias)


def accelerate(model: torch.nn.Module) -> int:
    """Route every torch Linear of `model` through fast_linear and measure their shapes now;
    returns how many layers were routed."""
    n = 0
    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear):
            mod.forward = (lambda m: lambda x: fast_linear(x, m.weight, m.bias))(mod)  # type: ignore[method-assign]
            n += 1
    chooser().calibrate(model)
    return n


# ---- SGLang hooks (registered by plugin.py; AROUND: fn(original, *args, **kwargs))

LINEAR_TARGET = "sglang.srt.layers.quantization.unquant.UnquantizedLinearMethod.apply"
LM_HEAD_TARGET = "sglang.srt.layers.logits_processor.LogitsProcessor._compute_lm_head"
LOAD_TARGET = "sglang.srt.model_executor.model_runner.ModelRunner.load_model"


def after_load_model(result: Any, runner: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        if str(getattr(runner, "device", "")) == "cpu":
            t0 = time.perf_counter()
            chooser().calibrate(runner.model)
            log.info("cpu_matmul: kernels measured in %.1f s", time.perf_counter() - t0)
    except Exception as e:  # measuring is an aid: the hooks measure lazily instead
        log.warning("cpu_matmul: start-up measurement failed (%s); measuring on first use", e)
    return result


def around_linear(original: Callable[..., torch.Tensor], method: Any, layer: Any, x: torch.Tensor,
                  bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    if x.shape[0] >= chooser().min_rows and not getattr(layer, "use_intel_amx_backend", False):
        out = chooser().linear(x, layer.weight, bias)
        if out is not None:
            return out
    return original(method, layer, x, bias)


def _plain_head(proc: Any, lm_head: Any, embedding_bias: Optional[torch.Tensor]) -> bool:
    """The head is a plain weight product (no LoRA, quantized, fp32 or AMX head, no bias)."""
    from sglang.srt.layers.logits_processor import should_apply_lm_head_quant_method

    return (embedding_bias is None and not hasattr(lm_head, "set_lora") and not getattr(proc, "use_fp32_lm_head", False)
            and getattr(proc, "rl_on_policy_target", None) is None and not getattr(lm_head, "use_intel_amx_backend", False)
            and not should_apply_lm_head_quant_method(lm_head, getattr(lm_head, "quant_method", None))
            and isinstance(getattr(lm_head, "weight", None), torch.Tensor))


def around_lm_head(original: Callable[..., torch.Tensor], proc: Any, hidden_states: torch.Tensor, lm_head: Any,
                   embedding_bias: Optional[torch.Tensor] = None, **kw: Any) -> torch.Tensor:
    if hidden_states.shape[0] >= chooser().min_rows and _plain_head(proc, lm_head, embedding_bias):
        out = chooser().linear(hidden_states, lm_head.weight, None)
        if out is not None:
            return out
    return original(proc, hidden_states, lm_head, embedding_bias, **kw)
