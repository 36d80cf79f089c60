import time, torch, sys
torch.set_num_threads(1)
from sglang_ext.dspark.drafter import DSparkDrafter
from sglang_ext.dspark.sampling import SamplingParams
from transformers import AutoModelForCausalLM
t = AutoModelForCausalLM.from_pretrained("models/smollm2-135m-instruct", dtype=torch.bfloat16)
res = {}
dirs = sys.argv[1:]
ds = {p: DSparkDrafter.from_pretrained(p, dtype=torch.bfloat16) for p in dirs}
for p, d in ds.items():
    d.attach_target(t)
sp = SamplingParams.make(0.0, n=1)
for rnd in range(3):
    for p, d in ds.items():
        cfg = d.config; m = len(cfg.target_layer_ids)
        ctx = d.new_context(); L = 600
        d.append_context(ctx, torch.randn(L, m * cfg.hidden_size, dtype=d.dtype), list(range(L)))
        anch = torch.tensor([100]); apos = torch.tensor([L])
        for _ in range(5): d.draft_block([ctx], anch, apos, sp)
        N = 50; t0 = time.perf_counter()
        for _ in range(N): d.draft_block([ctx], anch, apos, sp)
        res.setdefault(p, []).append((time.perf_counter() - t0) / N * 1e3)
for p, xs in res.items():
    print(p, "draft_block ms (batch 1, 600-token context, bf16, 1 thread) min/median", round(min(xs), 2), round(sorted(xs)[1], 2))
