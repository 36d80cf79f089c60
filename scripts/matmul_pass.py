"""Weight products as a forward reads them: every linear weight of a 30-layer SmolLM2-135M-shaped
model in sequence (so they stream from memory, as between layers) plus the LM head, bf16 native
against the fp32 copies sglang_ext/cpu/matmul.py can choose, at M = 1..32 rows. Best of 5 passes.

    .venv/bin/python scripts/matmul_pass.py

Why it exists: timing one weight at a time (even after evicting the caches) picked fp32 copies
at 2-8 rows on the AMX VM, while this pass shows them up to 2x slower there; the chooser now
times each shape over all of its weights (GemmChooser.calibrate).
"""

from __future__ import annotations

import time

import torch

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # SGLang's fused qkv, o, gate_up, down
LAYERS = 30


def main() -> None:
    torch.manual_seed(0)
    ws = [[torch.randn(n, k).to(torch.bfloat16) for (n, k) in SHAPES] for _ in range(LAYERS)]
    w32 = [[w.float() for w in layer] for layer in ws]
    head = torch.randn(49152, 576).to(torch.bfloat16)

    def run(m: int, kind: str) -> float:
        xs = {k: torch.randn(m, k).to(torch.bfloat16) for k in (576, 1536)}
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            for layer, layer32 in zip(ws, w32):
                for (_, k), w, w_32 in zip(SHAPES, layer, layer32):
                    x = xs[k]
                    if kind == "bf16":
                        torch.nn.functional.linear(x, w)
                    elif kind == "fp32":
                        torch.nn.functional.linear(x.float(), w_32).to(torch.bfloat16)
                    else:
                        (w_32 @ x.float().T).T.to(torch.bfloat16)
            torch.nn.functional.linear(xs[576], head)
            best = min(best, time.perf_counter() - t0)
        return best

    print(f"threads {torch.get_num_threads()}; ms per pass (30 layers + LM head)")
    print("rows   bf16   fp32  fp32_t")
    for m in (1, 2, 3, 4, 6, 8, 12, 16, 32):
        r = [run(m, k) * 1e3 for k in ("bf16", "fp32", "fp32_t")]
        print(f"{m:4d} {r[0]:6.1f} {r[1]:6.1f} {r[2]:6.1f}")


if __name__ == "__main__":
    main()
