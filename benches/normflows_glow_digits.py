"""normflows' side of a bits/dim comparison: multi-scale Glow on scikit-learn's 8x8 digits.

Data: a gzipped CSV (--data) of 1797 rows of 64 pixel values in 0..16 (17 levels),
each one 1x8x8 image in row order, followed by the class label (the shared file's 65th
column, unused here and dropped). The first 1500 images train, the last 297 test.

Preprocessing, as normflows' Glow example does it (examples/glow_colab.ipynb:
`ToTensor()`, `nf.utils.Scale(255/256)`, `nf.utils.Jitter(1/256)`, i.e. uniform
dequantisation onto [0, 1) with no logit transform and `MultiscaleFlow(transform=None)`),
with 17 levels in place of 256:

    x = (pixel + u) / 17,  u ~ U[0, 1), fresh noise for every training batch.

bits/dim = (-log p(x) + D ln 17) / (D ln 2), D = 64, where p is the model's density on
[0, 1)^D (the example's `nll / ln 2 / D + 8`, with log2(17) in place of log2(256) = 8).
`test_bpd` dequantises the test set once with a generator seeded with --seed;
`test_bpd_10draws` is the mean over 10 dequantisations from that generator (the first
of which is the one `test_bpd` uses). Each is the mean of the per-image bits/dim.

Model: the example's structure verbatim with L=2, K=8, input (1, 8, 8), 64 hidden
channels, split_mode='channel', scale=True, and normflows' GlowBlock defaults
(sigmoid scale map `sigmoid(s + 2)`, a 3-1-3 ConvNet2d with ReLU, zero-initialised last
convolution, LU-parametrised invertible 1x1 convolution, ActNorm initialised from the
first batch it sees, i.e. the first training batch):

    level i=1 (nearest the data): Squeeze (1,8,8) -> (4,4,4), 8 GlowBlock(4 channels);
        then Merge (channel split) sends (2,4,4) to DiagGaussian((2,4,4)), keeps (2,4,4)
    level i=0: Squeeze (2,4,4) -> (8,2,2), 8 GlowBlock(8 channels);
        latent to DiagGaussian((8,2,2))
    latent dims 32 + 32 = 64.

Parameters: 152 320 in all (`sum(p.numel())`): 90 368 at level i=0, 61 824 at level
i=1, 128 in the two DiagGaussians (loc and log_scale). The count includes the full
n x n `L` and `U` tensors normflows stores for each LU 1x1 convolution, of which only
the strict triangles are used.

GlowBlock channels follow the example's `channels * 2 ** (L + 1 - i)` (8 at i=0, 4 at
i=1) and latent shapes its formulas ((8,2,2) at i=0, (2,4,4) at i=1). Since every
level squeezes before its GlowBlocks, no coupling ever sees the 1-channel input: the
channel split works unchanged and no adjustment to the example's structure is needed.
The one change: the example is class-conditional (`ClassCondDiagGaussian`); here the
bases are the unconditional, trainable `nf.distributions.DiagGaussian(latent_shape)`
and `MultiscaleFlow(..., class_cond=False)`.

Training: Adamax, lr 1e-3, weight decay 1e-5 (as the example), batch 64 drawn from a
fresh permutation of the 1500 training images each epoch with the last partial batch
dropped (the example's `DataLoader(shuffle=True, drop_last=True)`), seed 0. As in the
example, a step whose loss is NaN/inf is skipped (`skipped_steps` counts them).

    python benches/normflows_glow_digits.py --threads 2 --steps 3000 [--samples grid.png]

The same model on Fashion-MNIST (28x28, 256 levels, the same preprocessing with 256 in
place of 17; all 60 000 training images, the 10 000 test images scored), on any device
PyTorch has, e.g. the GPU beside `cargo xtask fashion-mnist --device cuda`:

    python benches/normflows_glow_digits.py --data train-images-idx3-ubyte.gz \
        --test t10k-images-idx3-ubyte.gz --device cuda --steps 2000

Progress goes to stderr; the last stdout line is one flat JSON object. `steps_per_s`
leaves out the first 20 steps. On a machine with other load, libgomp's spin-waiting
makes 2-thread runs far slower (over 1 s a step here); `OMP_WAIT_POLICY=PASSIVE`
softens that, which the numbers don't depend on.
"""

import argparse
import gzip
import json
import math
import os
import sys
import time

import numpy as np
import torch
import normflows as nf

DIGITS_LEVELS = 17
N_TRAIN = 1500
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def default_data():
    local = os.path.join(REPO, "crates", "flow-train", "data", "digits.csv.gz")
    return local if os.path.exists(local) else "/work/shared/data/digits.csv.gz"


def load(path):
    """The digits CSV as (n, 1, 8, 8) pixels in 0..16."""
    with gzip.open(path, "rt") as f:
        rows = [[float(v) for v in line.split(",")] for line in f if line.strip()]
    x = torch.tensor(rows, dtype=torch.float32)
    if x.shape[1] == 65:  # trailing class label
        x = x[:, :64]
    assert x.shape[1] == 64, x.shape
    assert x.min() >= 0 and x.max() <= DIGITS_LEVELS - 1
    return x.view(-1, 1, 8, 8)


def load_idx(path):
    """A gzipped IDX file of unsigned-byte images as (n, 1, h, w) pixels in 0..255."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    magic, n, h, w = (int.from_bytes(raw[i : i + 4], "big") for i in range(0, 16, 4))
    assert magic == 0x803, f"{path}: not an IDX file of images"
    x = np.frombuffer(raw, dtype=np.uint8, count=n * h * w, offset=16)
    return torch.from_numpy(x.astype(np.float32)).view(n, 1, h, w)


def build(L, K, hidden, input_shape, split_mode="channel", scale=True):
    channels = input_shape[0]
    q0, merges, flows = [], [], []
    for i in range(L):
        flows_ = []
        for _ in range(K):
            flows_ += [
                nf.flows.GlowBlock(
                    channels * 2 ** (L + 1 - i),
                    hidden,
                    split_mode=split_mode,
                    scale=scale,
                )
            ]
        flows_ += [nf.flows.Squeeze()]
        flows += [flows_]
        if i > 0:
            merges += [nf.flows.Merge()]
            latent_shape = (
                input_shape[0] * 2 ** (L - i),
                input_shape[1] // 2 ** (L - i),
                input_shape[2] // 2 ** (L - i),
            )
        else:
            latent_shape = (
                input_shape[0] * 2 ** (L + 1),
                input_shape[1] // 2**L,
                input_shape[2] // 2**L,
            )
        q0 += [nf.distributions.DiagGaussian(latent_shape)]
    return nf.MultiscaleFlow(q0, flows, merges, class_cond=False)


def bpd(log_p, d, levels):
    return (-log_p + d * math.log(levels)) / (d * math.log(2))


def dequantise(pixels, gen, levels, device):
    return ((pixels + torch.rand(pixels.shape, generator=gen)) / levels).to(device)


def test_bpd(model, test, seed, draws, levels, device, batch=1000):
    gen = torch.Generator().manual_seed(seed)
    d = test[0].numel()
    out = []
    with torch.no_grad():
        for _ in range(draws):
            x = dequantise(test, gen, levels, device)
            lp = torch.cat([model.log_prob(c, None) for c in x.split(batch)]).double()
            out.append(bpd(lp, d, levels).mean().item())
    return out


def write_samples(model, path, seed, side):
    try:
        from PIL import Image
    except ImportError:
        return False
    torch.manual_seed(seed)
    with torch.no_grad():
        x, _ = model.sample(64)
    # grid row, grid col, pixel row, col
    x = x.clamp(0, 1).view(8, 8, side, side).cpu().numpy()
    pad = 1
    img = np.ones((8 * (side + pad) + pad, 8 * (side + pad) + pad), dtype=np.float32)
    for r in range(8):
        for c in range(8):
            y0, x0 = pad + r * (side + pad), pad + c * (side + pad)
            img[y0 : y0 + side, x0 : x0 + side] = 1.0 - x[r, c]  # dark ink on light
    zoom = max(1, 32 // side)
    img = np.kron(img, np.ones((zoom, zoom), dtype=np.float32))
    Image.fromarray((img * 255).round().astype(np.uint8), mode="L").save(path)
    return True


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data", default=default_data())
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--levels", type=int, default=2)
    p.add_argument("--blocks", type=int, default=8)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--samples", default=None)
    p.add_argument("--test", default=None,
                   help="with an IDX --data: the IDX file of test images")
    p.add_argument("--device", default="cpu", help="PyTorch's device: cpu, cuda, mps")
    p.add_argument("--draws", type=int, default=10,
                   help="dequantisations of the test set that test_bpd_draws averages")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    device = torch.device(a.device)

    if a.test:
        train, test, levels = load_idx(a.data), load_idx(a.test), 256
    else:
        pixels = load(a.data)
        train, test, levels = pixels[:N_TRAIN], pixels[N_TRAIN:], DIGITS_LEVELS
    shape = tuple(train.shape[1:])
    d = train[0].numel()
    print(f"data {a.data}: train {tuple(train.shape)}, test {tuple(test.shape)}",
          file=sys.stderr)

    torch.manual_seed(a.seed)
    model = build(a.levels, a.blocks, a.hidden, shape).to(device)
    params = sum(q.numel() for q in model.parameters())
    print(f"params {params}", file=sys.stderr)
    opt = torch.optim.Adamax(model.parameters(), lr=a.lr, weight_decay=a.weight_decay)

    order = torch.Generator().manual_seed(a.seed)
    noise = torch.Generator().manual_seed(a.seed + 1)
    n = len(train)
    per_epoch = n // a.batch
    warmup = 20
    hist = []
    skipped = 0
    step = 0
    t_warm = None
    start = time.perf_counter()
    while step < a.steps:
        perm = torch.randperm(n, generator=order)
        for b in range(per_epoch):
            if step == a.steps:
                break
            if step == warmup:
                t_warm = time.perf_counter()
            x = dequantise(train[perm[b * a.batch : (b + 1) * a.batch]], noise, levels, device)
            opt.zero_grad()
            loss = model.forward_kld(x)
            if torch.isfinite(loss):
                loss.backward()
                opt.step()
            else:
                skipped += 1
            hist.append(bpd(-loss.item(), d, levels))
            step += 1
            if step % 100 == 0 or step == a.steps:
                recent = hist[-100:]
                print(f"step {step}: train bpd (last {len(recent)}) "
                      f"{sum(recent) / len(recent):.4f}, "
                      f"{time.perf_counter() - start:.1f}s", file=sys.stderr)
    if device.type == "cuda":
        torch.cuda.synchronize()
    end = time.perf_counter()
    steps_per_s = (a.steps - warmup) / (end - t_warm) if t_warm is not None else None

    model.eval()
    draws = test_bpd(model, test, a.seed, a.draws, levels, device)
    last = [v for v in hist[-100:] if math.isfinite(v)]
    out = {
        "normflows": nf.__version__,
        "torch": torch.__version__,
        "threads": a.threads,
        "device": a.device,
        "steps": a.steps,
        "test_bpd": draws[0],
        "test_bpd_10draws": sum(draws) / len(draws) if a.draws == 10 else None,
        "test_bpd_draws": sum(draws) / len(draws),
        "draws": a.draws,
        "train_bpd_last100": sum(last) / len(last) if last else None,
        "steps_per_s": steps_per_s,
        "params": params,
        "skipped_steps": skipped,
        "train_seconds": end - start,
    }
    if a.samples:
        if write_samples(model, a.samples, a.seed, shape[-1]):
            print(f"samples -> {a.samples}", file=sys.stderr)
    for k, v in out.items():
        if isinstance(v, float) and not math.isfinite(v):
            out[k] = None
    print(json.dumps(out))


if __name__ == "__main__":
    main()
