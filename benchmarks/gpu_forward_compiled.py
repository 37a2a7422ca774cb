"""torch.compile of the paper-scale ScoreUNet (random weights, batch 64 at 256²): compile time, ms per network
evaluation and the largest output difference from eager float32, for float16 autocast and float32.

    python benchmarks/gpu_forward_compiled.py

results/gpu_forward_variants_h100.md holds a run.
"""
import time, torch, sys
sys.path.insert(0, ".")
from tsgm_components.networks.score import ScoreUNet, PAPER_PRESET
torch.manual_seed(0)
dev = torch.device("cuda")
net = ScoreUNet(1, **PAPER_PRESET).to(dev).eval()
with torch.no_grad():
    for p in net.unet.out.parameters(): p.normal_(0, 0.02)
x = torch.rand(64, 1, 256, 256, device=dev); c = torch.rand_like(x); s = torch.full((64,), 3.0, device=dev)
def bench(name, f, dtype, n=5):
    with torch.no_grad(), torch.autocast("cuda", dtype=dtype or torch.float16, enabled=dtype is not None):
        t0 = time.perf_counter(); out = f(x, s, c); torch.cuda.synchronize(); first = time.perf_counter() - t0
        out = f(x, s, c)
        torch.cuda.synchronize(); t = time.perf_counter()
        for _ in range(n): out = f(x, s, c)
        torch.cuda.synchronize()
    print(f"{name:40s} first call {first:6.1f} s, then {(time.perf_counter()-t)/n*1000:7.1f} ms/NFE", flush=True)
    return out.float()
ref = bench("eager fp32", net, None)
eager16 = bench("eager fp16", net, torch.float16)
comp = torch.compile(net)
o16 = bench("compiled fp16", comp, torch.float16)
print("compiled fp16 vs eager fp32 max diff", float((o16-ref).abs().max()), "scale", float(ref.abs().max()))
o32 = bench("compiled fp32", comp, None)
print("compiled fp32 vs eager fp32 max diff", float((o32-ref).abs().max()))
