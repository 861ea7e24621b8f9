"""A/B of HeadwiseProjection's forward on a real decode: the earlier einsum against the batched product.

Compresses SmolLM2-135M with ``flat`` at 20 % with Q/K head-wise PCA (``qk=True``: the recipe
that builds HeadwiseProjection modules) on 16 calibration windows, then times greedy generation
of 64 tokens after a 32-token prompt with either forward, in 7 interleaved pairs on one thread.
Measured in stop 21: 50 modules; 4.242 s (einsum) against 4.154 s (bmm), paired median 1.048x
(range 1.017x-1.093x).

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python scripts/headwise_forward_ab.py
"""
import time, statistics, torch
import lrmath_hf
from lrmath_hf import modules as M
torch.set_num_threads(1)
model, tok = lrmath_hf.zoo.load_model("smollm2-135m")
text = lrmath_hf.zoo.load_text("wiki", split="calibration")
ids = tok(text[:200000], return_tensors="pt").input_ids[0]
wins = [ids[i*512:(i+1)*512].unsqueeze(0) for i in range(16)]
report = lrmath_hf.compress(model, wins, recipe="flat", ratio=0.2, progress=False, qk=True)
n_hw = sum(isinstance(m, M.HeadwiseProjection) for m in model.modules())
print("headwise modules", n_hw, "ratio", report.ratio_achieved)
new_forward = M.HeadwiseProjection.forward
def einsum_forward(self, x):
    latent = torch.nn.functional.linear(x, self.right).unflatten(-1, (self.num_heads, self.rank))
    heads = torch.einsum("...hr,hdr->...hd", latent, self.expansion).flatten(-2)
    return heads if self.bias is None else heads + self.bias
prompt = ids[:32].unsqueeze(0)
def gen():
    with torch.inference_mode():
        t = time.perf_counter()
        model.generate(prompt, max_new_tokens=64, min_new_tokens=64, do_sample=False)
        return time.perf_counter() - t
res = {"einsum": [], "bmm": []}
for name, fw in (("einsum", einsum_forward), ("bmm", new_forward)):
    M.HeadwiseProjection.forward = fw; gen()
for r in range(7):
    for name, fw in ((("einsum", einsum_forward), ("bmm", new_forward)) if r % 2 == 0 else (("bmm", new_forward), ("einsum", einsum_forward))):
        M.HeadwiseProjection.forward = fw
        res[name].append(gen())
ratios = [e / b for e, b in zip(res["einsum"], res["bmm"])]
print({k: round(statistics.median(v), 3) for k, v in res.items()}, "paired einsum/bmm median", round(statistics.median(ratios), 3), "min", round(min(ratios), 3), "max", round(max(ratios), 3))
