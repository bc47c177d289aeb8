"""PyTorch's side of the TarFlow comparison: the same architecture as `flow train --flow
tarflow`, written from the paper (Zhai et al. 2024, "Normalizing Flows are Capable
Generative Models"), on scikit-learn's 8x8 digits.

Data: the gzipped CSV of 1797 rows of 64 pixel values in 0..16 (17 levels) that
`benches/normflows_glow_digits.py` reads (a trailing label column is dropped); the first
1500 images train, the last 297 test. Uniform dequantisation, x = (pixel + u) / 17 with
fresh u ~ U[0, 1) for every batch; bits/dim = (-log p(x) + D ln 17) / (D ln 2), D = 64.

Model (ours at its defaults): the 1x8x8 image cut into 2x2 patches, 16 tokens of 4
values in (C, p, p) order, row by row. B = 4 blocks, each

    z_t = x_t * exp(s_hat_t) + b_t,  (s_t, b_t) = Transformer(x_0 .. x_{t-1}),
    s_hat = s / (1 + |s| / 3),  log|det| = sum of s_hat,

the token order reversed in odd blocks. The Transformer: the sequence shifted right by
one token (zeros first), Linear(4, W), learned positional embeddings (N(0, 0.02^2)),
L = 2 pre-norm layers (LayerNorm, one Linear(W, 3W) for queries, keys and values,
causal multi-head attention with H = 4 heads through
`torch.nn.functional.scaled_dot_product_attention(is_causal=True)`, Linear(W, W);
LayerNorm, Linear(W, 4W), ReLU, Linear(4W, W); each a residual branch), a final
LayerNorm and a zero-initialised Linear(W, 2 * 4) to the raw log-scales, then the
shifts. W = 64. Base N(0, I). Adam, lr 1e-3 decayed by 0.999 per step, batch 64 from a
fresh permutation each epoch.

    python benches/pytorch_tarflow.py --threads 2 --steps 3000

Progress goes to stderr; the last stdout line is one flat JSON object. `steps_per_s`
leaves out the first 20 steps.
"""

import argparse
import gzip
import json
import math
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

LEVELS = 17
D = 64
N_TRAIN = 1500
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def default_data():
    local = os.path.join(REPO, "crates", "flow-train", "data", "digits.csv.gz")
    return local if os.path.exists(local) else "/work/shared/data/digits.csv.gz"


def load(path):
    with gzip.open(path, "rt") as f:
        rows = [[float(v) for v in line.split(",")] for line in f if line.strip()]
    x = torch.tensor(rows, dtype=torch.float32)
    if x.shape[1] == D + 1:
        x = x[:, :D]
    assert x.shape[1] == D, x.shape
    return x


def patch_order(channels, height, width, patch, reversed_):
    """For each position of the flattened token sequence, the (C, H, W) feature it holds."""
    across = width // patch
    tokens = (height // patch) * across
    order = []
    for position in range(tokens):
        token = tokens - 1 - position if reversed_ else position
        row, col = token // across * patch, token % across * patch
        for c in range(channels):
            for dy in range(patch):
                for dx in range(patch):
                    order.append((c * height + row + dy) * width + col + dx)
    return torch.tensor(order)


class Layer(nn.Module):
    def __init__(self, width, heads, mlp_ratio):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, mlp_ratio * width), nn.ReLU(), nn.Linear(mlp_ratio * width, width)
        )

    def forward(self, h):
        b, t, w = h.shape
        qkv = self.qkv(self.norm1(h)).view(b, t, 3, self.heads, w // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = h + self.proj(a.transpose(1, 2).reshape(b, t, w))
        return h + self.mlp(self.norm2(h))


class Block(nn.Module):
    def __init__(self, shape, patch, layers, width, heads, mlp_ratio, reversed_):
        super().__init__()
        c, hgt, wid = shape
        self.tokens = (hgt // patch) * (wid // patch)
        self.token_dim = patch * patch * c
        order = patch_order(c, hgt, wid, patch, reversed_)
        self.register_buffer("order", order)
        self.register_buffer("unorder", torch.argsort(order))
        self.input = nn.Linear(self.token_dim, width)
        self.position = nn.Parameter(torch.randn(self.tokens, width) * 0.02)
        self.layers = nn.ModuleList(Layer(width, heads, mlp_ratio) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.output = nn.Linear(width, 2 * self.token_dim)
        nn.init.zeros_(self.output.weight)
        nn.init.zeros_(self.output.bias)

    def forward(self, x):
        n = x.shape[0]
        seq = x[:, self.order].view(n, self.tokens, self.token_dim)
        before = F.pad(seq[:, :-1], (0, 0, 1, 0))
        h = self.input(before) + self.position
        for layer in self.layers:
            h = layer(h)
        s, b = self.output(self.norm(h)).chunk(2, dim=-1)
        s = s / (1 + s.abs() / 3)
        z = seq * s.exp() + b
        return z.reshape(n, -1)[:, self.unorder], s.sum(dim=(1, 2))


class TarFlow(nn.Module):
    def __init__(self, shape=(1, 8, 8), patch=2, blocks=4, layers=2, width=64, heads=4,
                 mlp_ratio=4):
        super().__init__()
        self.blocks = nn.ModuleList(
            Block(shape, patch, layers, width, heads, mlp_ratio, i % 2 == 1)
            for i in range(blocks)
        )

    def log_prob(self, x):
        log_det = torch.zeros(x.shape[0])
        for block in self.blocks:
            x, ld = block(x)
            log_det = log_det + ld
        base = -0.5 * (x**2).sum(1) - 0.5 * x.shape[1] * math.log(2 * math.pi)
        return base + log_det


def bpd(log_p):
    return (-log_p + D * math.log(LEVELS)) / (D * math.log(2))


def dequantise(pixels, gen):
    return (pixels + torch.rand(pixels.shape, generator=gen)) / LEVELS


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data", default=default_data())
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--patch", type=int, default=2)
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--layers-per-block", type=int, default=2)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    a = p.parse_args()
    torch.set_num_threads(a.threads)

    pixels = load(a.data)
    train, test = pixels[:N_TRAIN], pixels[N_TRAIN:]
    torch.manual_seed(a.seed)
    model = TarFlow(patch=a.patch, blocks=a.blocks, layers=a.layers_per_block,
                    width=a.width, heads=a.heads)
    params = sum(q.numel() for q in model.parameters())
    print(f"params {params}", file=sys.stderr)
    opt = torch.optim.Adam(model.parameters(), lr=a.lr)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, 0.999)

    order = torch.Generator().manual_seed(a.seed)
    noise = torch.Generator().manual_seed(a.seed + 1)
    n, warmup, step, hist = len(train), 20, 0, []
    t_warm = None
    start = time.perf_counter()
    while step < a.steps:
        perm = torch.randperm(n, generator=order)
        for b in range(n // a.batch):
            if step == a.steps:
                break
            if step == warmup:
                t_warm = time.perf_counter()
            x = dequantise(train[perm[b * a.batch:(b + 1) * a.batch]], noise)
            opt.zero_grad()
            loss = -model.log_prob(x).mean()
            loss.backward()
            opt.step()
            sched.step()
            hist.append(bpd(-loss.item()))
            step += 1
            if step % 100 == 0 or step == a.steps:
                recent = hist[-100:]
                print(f"step {step}: train bpd (last {len(recent)}) "
                      f"{sum(recent) / len(recent):.4f}, "
                      f"{time.perf_counter() - start:.1f}s", file=sys.stderr)
    end = time.perf_counter()

    gen = torch.Generator().manual_seed(a.seed)
    with torch.no_grad():
        draws = [bpd(model.log_prob(dequantise(test, gen)).double()).mean().item()
                 for _ in range(10)]
    out = {
        "torch": torch.__version__,
        "threads": a.threads,
        "steps": a.steps,
        "test_bpd_10draws": sum(draws) / len(draws),
        "train_bpd_last100": sum(hist[-100:]) / len(hist[-100:]),
        "steps_per_s": (a.steps - warmup) / (end - t_warm) if t_warm else None,
        "params": params,
        "train_seconds": end - start,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
