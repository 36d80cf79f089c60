"""Weight products as a forward reads them: all of a 30-layer model's linear weights in sequence (as a forward reads them: from memory),
bf16 native vs the fp32 copies the chooser picks, at M = 1..16 rows. Best of 5 passes."""
import time, torch
torch.manual_seed(0)
shapes = [(960, 576), (576, 576), (3072, 576), (576, 1536)]
L = 30
Ws = [[torch.randn(n, k).to(torch.bfloat16) for (n, k) in shapes] for _ in range(L)]
W32 = [[w.float() for w in ws] for ws in Ws]
head = torch.randn(49152, 576).to(torch.bfloat16)
def run(M, kind):
    xs = {k: torch.randn(M, k).to(torch.bfloat16) for k in (576, 1536)}
    best = 1e9
    for _ in range(5):
        t0 = time.perf_counter()
        for l in range(L):
            for (n, k), w, w32 in zip(shapes, Ws[l], W32[l]):
                x = xs[k]
                if kind == "bf16": torch.nn.functional.linear(x, w)
                elif kind == "fp32": torch.nn.functional.linear(x.float(), w32).to(torch.bfloat16)
                else: (w32 @ x.float().T).T.to(torch.bfloat16)
        torch.nn.functional.linear(xs[576], head)
        best = min(best, time.perf_counter() - t0)
    return best
print("threads", torch.get_num_threads())
for M in (1, 2, 3, 4, 6, 8, 12, 16, 32):
    r = {k: run(M, k) for k in ("bf16", "fp32", "fp32_t")}
    print(M, {k: round(v * 1e3, 1) for k, v in r.items()})
