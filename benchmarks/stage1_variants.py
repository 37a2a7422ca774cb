"""Stage-1 variants at CPU scale: which CycleGAN set-up learns to remove tumours within a CPU budget?

The scratch script (kept as run, apart from this docstring and the default paths) that chose the CPU config's
`in_channels: 4` and `bf16`: a plain training loop over the repo's networks and losses (same computation as
`CycleGANTrainer`, without the bundle) on the demo's prepared 64² phantom slices, printing every 300 iterations the
probe of `cyclegan_tumour_probe.py` on 150 FLAIR tumour slices: AUPRC of |x − G_B→A(x)| for the tumour voxels
(chance ≈ 0.04) and mean |x − G_B→A(x)| inside / outside the tumour. One seed per variant: GAN runs are noisy.

    python benchmarks/stage1_variants.py --out /tmp/s1 --tag flair2400 --modalities flair --iters 2400
    python benchmarks/stage1_variants.py --out /tmp/s1 --tag multi_d2 --multichannel --n_layers_d 2 --bf16 --iters 2400

and the other rows of the results table, each with the arguments listed there (`--tag base --iters 1200` is the
paper's set-up: 1-channel samples of all modalities).

Results: `benchmarks/results/stage1_variants_cpu.md`. Writes `<out>/<tag>.pt` (the two generators).
"""

import argparse
import json
import time
import numpy as np
import torch
from pathlib import Path
from tsgm_components.networks.cyclegan import ResnetGenerator, PatchDiscriminator
from tsgm_components.losses.gan import CycleGANLossWeights, ImagePool, discriminator_loss
from tsgm_components.evaluation.metrics import average_precision

p = argparse.ArgumentParser()
p.add_argument("--prepared", default="runs/demo/prepared")
p.add_argument("--out", default="/tmp")
p.add_argument("--modalities", default="t1,t1ce,t2,flair")
p.add_argument("--iters", type=int, default=1200)
p.add_argument("--batch", type=int, default=4)
p.add_argument("--identity", type=float, default=0.5)
p.add_argument("--lam", type=float, default=10.0)
p.add_argument("--ngf", type=int, default=16)
p.add_argument("--nblocks", type=int, default=4)
p.add_argument("--ndf", type=int, default=16)
p.add_argument("--n_layers_d", type=int, default=3)
p.add_argument("--lr", type=float, default=2e-4)
p.add_argument("--modality_channels", action="store_true", help="append one-hot modality channels to the input")
p.add_argument("--residual", action="store_true")
p.add_argument("--multichannel", action="store_true")
p.add_argument("--bf16", action="store_true")
p.add_argument("--decay_from", type=int, default=0)
p.add_argument("--min_tumour_fraction", type=float, default=0.0, help="domain B: only slices whose lesion covers this fraction of the brain")
p.add_argument("--content", type=float, default=0.0, help="weight of L1(G_AB(x_A), x_A): a sparse-change prior for the pseudo-pair direction")
p.add_argument("--threads", type=int, default=1)
p.add_argument("--tag", default="x")
a = p.parse_args()
torch.set_num_threads(a.threads)
torch.manual_seed(0)
rng = np.random.default_rng(0)
prep = Path(a.prepared)
d = json.loads((prep / "datalist.json").read_text())
mods = a.modalities.split(",")
MI = {m: i for i, m in enumerate(["t1", "t1ce", "t2", "flair"])}


def load(items, key="image"):
    return torch.stack([torch.from_numpy(np.load(prep / i[key])).float().reshape(1, 64, 64) for i in items])


tr = [i for i in d["training"] if i["modality"] in mods]


def lesion_fraction(i):
    return float((np.load(prep / i["label"]) > 0).sum() / max(1, (np.load(prep / i["image"]) > 0).sum()))


big = {(i["subject"], i["z"]) for i in d["training"] if i["modality"] == "flair" and i["tumour"] == 1 and lesion_fraction(i) >= a.min_tumour_fraction}
A = [i for i in tr if i["tumour"] == 0]
B = [i for i in tr if i["tumour"] == 1 and (i["subject"], i["z"]) in big]
xa, xb = load(A), load(B)
if a.multichannel:
    import collections

    def stacks(split, tumour):
        g = collections.defaultdict(dict)
        for i in d[split]:
            if i["tumour"] == tumour and (tumour == 0 or (i["subject"], i["z"]) in big):
                g[(i["subject"], i["z"])][i["modality"]] = i
        keys = sorted(k for k in g if len(g[k]) == 4)
        return torch.cat([torch.cat([load([g[k][m]]) for m in ["t1", "t1ce", "t2", "flair"]], 1) for k in keys]), [g[k]["flair"] for k in keys]

    xa, _ = stacks("training", 0)
    xb, _ = stacks("training", 1)
    A, B = range(len(xa)), range(len(xb))
ma = torch.zeros(len(A), dtype=torch.long)
mb = torch.zeros(len(B), dtype=torch.long)
if not a.multichannel:
    ma = torch.tensor([MI[i["modality"]] for i in A])
    mb = torch.tensor([MI[i["modality"]] for i in B])


def cond(x, m):
    if not a.modality_channels:
        return x
    oh = torch.nn.functional.one_hot(m, 4).float()[:, :, None, None].expand(-1, -1, x.shape[2], x.shape[3])
    return torch.cat([x, oh], 1)


cin = 5 if a.modality_channels else (4 if a.multichannel else 1)


class Res(torch.nn.Module):
    def __init__(s, g):
        super().__init__()
        s.g = g
        torch.nn.init.zeros_(g.model[-2].weight)
        torch.nn.init.zeros_(g.model[-2].bias)

    def forward(s, x):
        return (x[:, :1] + s.g.model(x * 2 - 1)).clamp(0, 1)


def mk():
    g = ResnetGenerator(cin, cin if a.multichannel else 1, a.ngf, a.nblocks)
    return Res(g) if a.residual else g


gab, gba = mk(), mk()
da, db = PatchDiscriminator(cin, a.ndf, a.n_layers_d), PatchDiscriminator(cin, a.ndf, a.n_layers_d)
go = torch.optim.Adam(list(gab.parameters()) + list(gba.parameters()), a.lr, betas=(0.5, 0.999))
do = torch.optim.Adam(list(da.parameters()) + list(db.parameters()), a.lr, betas=(0.5, 0.999))
W = CycleGANLossWeights(a.lam, a.lam, a.identity)
pa, pb = ImagePool(50, 0), ImagePool(50, 1)
# probe set: validation+training FLAIR tumour slices
ev = [i for i in d["validation"] + d["training"] if i["modality"] == "flair" and i["tumour"] == 1][:150]
ex, ey = load(ev), load(ev, "label") > 0.5
if a.multichannel:
    byk = {(i["subject"], i["z"], i["modality"]): i for i in d["validation"] + d["training"]}
    exs = torch.cat([torch.cat([load([byk[(i["subject"], i["z"], m)]]) for m in ["t1", "t1ce", "t2", "flair"]], 1) for i in ev])
em = torch.full((len(ev),), 3)
# lesion-adding probe (as cyclegan_tumour_probe.py): fraction of brain voxels of G_A→B(healthy FLAIR) brighter than the
# 99th percentile of healthy brain; healthy slices 0.01 by construction, real tumour slices below (printed once)
hv = [i for i in d["validation"] + d["training"] if i["modality"] == "flair" and i["tumour"] == 0][:150]
hx = load(hv)
if a.multichannel:
    hxs = torch.cat([torch.cat([load([byk[(i["subject"], i["z"], m)]]) for m in ["t1", "t1ce", "t2", "flair"]], 1) for i in hv])
bright = torch.quantile(hx[hx > 0], 0.99)
print(
    f"[{a.tag}] bright fraction: healthy {float((hx[hx > 0] > bright).float().mean()):.4f} tumour {float((ex[ex > 0] > bright).float().mean()):.4f}",
    flush=True,
)


def probe_ab():
    gab.eval()
    with torch.no_grad():
        if a.multichannel:
            fb_ = torch.cat([gab(hxs[k : k + 50]) for k in range(0, len(hv), 50)])[:, 3:]
        else:
            fb_ = torch.cat([gab(cond(hx[k : k + 50], em[k : k + 50])) for k in range(0, len(hv), 50)])
    gab.train()
    brain = hx > 0
    change = (fb_ - hx).abs()[brain]
    # bright fraction; median and mean |G_AB(x_A) − x_A| over the brain (the median ignores sparse added lesions: the
    # change to normal tissue, which pseudo-pairs pass on to VE-JP as a condition that differs from x_A everywhere)
    return float((fb_[brain] > bright).float().mean()), float(change.median()), float(change.mean())


def probe():
    gba.eval()
    with torch.no_grad():
        if a.multichannel:
            fa = torch.cat([gba(exs[k : k + 50]) for k in range(0, len(ev), 50)])[:, 3:]
        else:
            fa = torch.cat([gba(cond(ex[k : k + 50], em[k : k + 50])) for k in range(0, len(ev), 50)])
    gba.train()
    r = (ex - fa).abs()
    brain = ex > 0
    return average_precision(r[brain].numpy(), ey[brain].numpy()), float(r[ey].mean()), float(r[brain & ~ey].mean())


t0 = time.time()
for it in range(1, a.iters + 1):
    if a.decay_from and it > a.decay_from:
        for o in (go, do):
            for g_ in o.param_groups:
                g_["lr"] = a.lr * (a.iters - it + 1) / (a.iters - a.decay_from + 1)
    ia = rng.integers(len(A), size=a.batch)
    ib = rng.integers(len(B), size=a.batch)
    ra, rb = xa[ia], xb[ib]
    if rng.random() < 0.5:
        ra = ra.flip(2)
    if rng.random() < 0.5:
        rb = rb.flip(2)
    ca, cb = ma[ia], mb[ib]
    ac = torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.bf16)
    with ac:
        fb = gab(cond(ra, ca))
        rec_a = gba(cond(fb, ca))
        fa = gba(cond(rb, cb))
        rec_b = gab(cond(fa, cb))
    for n in (da, db):
        n.requires_grad_(False)
    go.zero_grad()
    with ac:
        L = W.generator_losses(
            ra,
            rb,
            rec_a.float(),
            rec_b.float(),
            gab(cond(rb, cb)).float() if a.identity else None,
            gba(cond(ra, ca)).float() if a.identity else None,
            db(cond(fb, ca)).float(),
            da(cond(fa, cb)).float(),
        )
    fb, fa = fb.float(), fa.float()
    loss_g = L["loss_G"] + (a.content * (fb - ra).abs().mean() if a.content else 0.0)
    loss_g.backward()
    go.step()
    for n in (da, db):
        n.requires_grad_(True)
    do.zero_grad()
    qa = pa.query(torch.cat([fa.detach(), cond(fa, cb)[:, 1:]], 1) if a.modality_channels else fa.detach())
    qb = pb.query(torch.cat([fb.detach(), cond(fb, ca)[:, 1:]], 1) if a.modality_channels else fb.detach())
    with ac:
        lda = discriminator_loss(da(cond(ra, ca)).float(), da(qa).float())
        ldb = discriminator_loss(db(cond(rb, cb)).float(), db(qb).float())
    (lda + ldb).backward()
    do.step()
    if it % 300 == 0 or it == a.iters:
        ap, ins, outs = probe()
        bf, dmed, dmean = probe_ab()
        print(
            f"[{a.tag}] it {it} {time.time() - t0:.0f}s gAB {float(L['loss_gan_AB']):.3f} gBA {float(L['loss_gan_BA']):.3f} cyc {float(L['loss_cycle_A'] + L['loss_cycle_B']):.3f} dA {float(lda):.3f} dB {float(ldb):.3f} | AUPRC {ap:.3f} in {ins:.3f} out {outs:.3f} | G_AB bright {bf:.4f} tissue change median {dmed:.4f} mean {dmean:.4f}",
            flush=True,
        )
torch.save({"G_AB": gab.state_dict(), "G_BA": gba.state_dict()}, f"{a.out}/{a.tag}.pt")
