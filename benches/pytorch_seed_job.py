"""The reference job in PyTorch, for side-by-side numbers with `flow`.

RealNVP on 2-D two moons: 5 affine couplings whose s and t nets are
Linear(1, 512) -> LeakyReLU -> Linear(512, 1), raw exp scale, layer i swapping
halves when odd; Adam lr 1e-3 with ExponentialLR(0.999) stepped every batch;
batch 512; 1000 steps; data standardised, NLL reported in data units.

    pip install torch scikit-learn
    python benches/pytorch_seed_job.py --threads 2 --seed 0 --test heldout.csv
    python benches/pytorch_seed_job.py --device cuda     # the same job on a GPU

Prints one JSON object: training steps/s, log-prob and sampling points/s, held-out NLL.
"""

import argparse
import json
import math
import time

import numpy as np
import torch
from torch import nn
from sklearn.datasets import make_moons


class Coupling(nn.Module):
    def __init__(self, hidden=512):
        super().__init__()
        self.sig_net = nn.Sequential(nn.Linear(1, hidden), nn.LeakyReLU(), nn.Linear(hidden, 1))
        self.mu_net = nn.Sequential(nn.Linear(1, hidden), nn.LeakyReLU(), nn.Linear(hidden, 1))

    def forward(self, x, flip):
        x1, x2 = x[:, :1], x[:, 1:]
        if flip:
            x1, x2 = x2, x1
        s = self.sig_net(x1)
        z2 = x2 * torch.exp(s) + self.mu_net(x1)
        z = torch.cat([z2, x1], 1) if flip else torch.cat([x1, z2], 1)
        return z, s.sum(1)

    def inverse(self, z, flip):
        z1, z2 = z[:, :1], z[:, 1:]
        if flip:
            z1, z2 = z2, z1
        x2 = (z2 - self.mu_net(z1)) * torch.exp(-self.sig_net(z1))
        return torch.cat([x2, z1], 1) if flip else torch.cat([z1, x2], 1)


class Flow(nn.Module):
    def __init__(self, layers=5):
        super().__init__()
        self.layers = nn.ModuleList([Coupling() for _ in range(layers)])

    def log_prob(self, x):
        ld = torch.zeros(len(x), device=x.device)
        for i, layer in enumerate(self.layers):
            x, l = layer(x, i % 2 == 1)
            ld = ld + l
        return -0.5 * (x ** 2).sum(1) - math.log(2 * math.pi) + ld

    def sample(self, n, device):
        z = torch.randn(n, 2, device=device)
        for i in reversed(range(len(self.layers))):
            z = self.layers[i].inverse(z, i % 2 == 1)
        return z


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--test", help="held-out CSV (header line, two columns)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    a = p.parse_args()
    dev = torch.device(a.device)

    def sync():
        # GPU work is queued: wait for it before reading the clock.
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    x, _ = make_moons(20000, noise=0.05, random_state=a.seed)
    mean, std = x.mean(0), x.std(0)
    data = torch.tensor((x - mean) / std, dtype=torch.float32, device=dev)
    flow = Flow().to(dev)
    opt = torch.optim.Adam(flow.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, 0.999)
    gen = torch.Generator().manual_seed(a.seed)
    sync()
    start = time.perf_counter()
    for _ in range(a.steps):
        idx = torch.randint(0, len(data), (512,), generator=gen).to(dev)
        loss = -flow.log_prob(data[idx]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    sync()
    train_s = time.perf_counter() - start
    out = {
        "device": a.device,
        "threads": a.threads,
        "seed": a.seed,
        "train_steps_per_s": a.steps / train_s,
    }
    with torch.no_grad():
        big = torch.randn(100_000, 2, device=dev)
        flow.log_prob(big[:1000])
        sync()
        t = time.perf_counter()
        flow.log_prob(big)
        sync()
        out["log_prob_points_per_s"] = 100_000 / (time.perf_counter() - t)
        t = time.perf_counter()
        flow.sample(100_000, dev)
        sync()
        out["sample_points_per_s"] = 100_000 / (time.perf_counter() - t)
        if a.test:
            test = np.loadtxt(a.test, delimiter=",", skiprows=1)
            z = torch.tensor((test - mean) / std, dtype=torch.float32, device=dev)
            # Data units: log p(x) = log p(standardised x) - sum(log std).
            lp = flow.log_prob(z).double().cpu().numpy() - np.log(std).sum()
            out["heldout_nll"] = float(-np.mean(lp))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
