"""Forward-pass time of the paper-scale ScoreUNet (random weights, batch 64 at 256²) on one GPU under precision,
memory-format and cuDNN settings, plus a CUDA profile of the float16 channels-last pass.

    python benchmarks/gpu_forward_variants.py

Prints a line per variant (ms per network evaluation, peak memory); results/gpu_forward_variants_h100.md holds a run.
"""
import time, torch, sys
sys.path.insert(0, ".")
from tsgm_components.networks.score import ScoreUNet, PAPER_PRESET
torch.manual_seed(0)
dev = torch.device("cuda")
def make():
    net = ScoreUNet(1, **PAPER_PRESET).to(dev).eval()
    with torch.no_grad():
        for p in net.unet.out.parameters(): p.normal_(0, 0.02)
    return net
x = torch.rand(64, 1, 256, 256, device=dev); c = torch.rand_like(x); s = torch.full((64,), 3.0, device=dev)
def bench(name, net, dtype=None, cl=False, n=5):
    xi, ci = (x.contiguous(memory_format=torch.channels_last), c.contiguous(memory_format=torch.channels_last)) if cl else (x, c)
    with torch.no_grad(), torch.autocast("cuda", dtype=dtype or torch.float16, enabled=dtype is not None):
        for _ in range(2): out = net(xi, s, ci)
        torch.cuda.synchronize(); t = time.perf_counter()
        for _ in range(n): out = net(xi, s, ci)
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t) / n
    print(f"{name:45s} {dt*1000:8.1f} ms/NFE (batch 64)  peak {torch.cuda.max_memory_allocated()/2**30:.1f} GiB", flush=True)
    torch.cuda.reset_peak_memory_stats()
    return out.float()
net = make()
ref = bench("fp32 (tf32 convs default)", net)
torch.backends.cudnn.benchmark = True
bench("fp32 + cudnn.benchmark", net)
bench("fp16 autocast + benchmark", net, torch.float16)
bench("bf16 autocast + benchmark", net, torch.bfloat16)
net_cl = net.to(memory_format=torch.channels_last)
o = bench("fp16 autocast + channels_last + benchmark", net_cl, torch.float16, cl=True)
print("fp16 cl vs fp32 max abs diff", float((o - ref).abs().max()), "ref scale", float(ref.abs().max()))
bench("bf16 autocast + channels_last + benchmark", net_cl, torch.bfloat16, cl=True)
bench("fp32 + channels_last + benchmark", net_cl, None, cl=True)
from torch.profiler import profile, ProfilerActivity
with profile(activities=[ProfilerActivity.CUDA]) as prof:
    bench("profiled fp16 cl", net_cl, torch.float16, cl=True, n=2)
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15))
