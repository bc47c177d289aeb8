"""The jobs of `crates/flow-train/benches/device_jobs.rs` in PyTorch, timed the same way:
a fixed batch on the device, no synchronisation inside the timed loop, the median of
three repeats after a warm-up. Prints one JSON object per line.

    python benches/pytorch_device_jobs.py --device cuda

Jobs: the reference job (`pytorch_seed_job.py`'s RealNVP), zuko's default RealNVP
(`zuko.flows.RealNVP(2, transforms=6, hidden_features=(64, 64))`, batch 256), NICE
(5 additive couplings, shift nets 1 -> 512 -> 1); training steps, log-prob and sampling of
1M points; a batch sweep of the reference job; the latency of one tiny op.
"""

import argparse
import json
import os
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pytorch_seed_job import Flow  # noqa: E402

REPEATS = 3
STEPS = 100
POINTS = 1_000_000


class NiceCoupling(nn.Module):
    def __init__(self, hidden=512):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(1, hidden), nn.LeakyReLU(), nn.Linear(hidden, 1))

    def forward(self, x, flip):
        x1, x2 = (x[:, 1:], x[:, :1]) if flip else (x[:, :1], x[:, 1:])
        z2 = x2 + self.net(x1)
        z = torch.cat([z2, x1], 1) if flip else torch.cat([x1, z2], 1)
        return z

    def inverse(self, z, flip):
        z1, z2 = (z[:, 1:], z[:, :1]) if flip else (z[:, :1], z[:, 1:])
        x2 = z2 - self.net(z1)
        return torch.cat([x2, z1], 1) if flip else torch.cat([z1, x2], 1)


class Nice(nn.Module):
    def __init__(self, layers=5):
        super().__init__()
        self.layers = nn.ModuleList([NiceCoupling() for _ in range(layers)])

    def log_prob(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x, i % 2 == 1)
        return -0.5 * (x**2).sum(1) - torch.log(torch.tensor(2 * torch.pi, device=x.device))

    def sample(self, n, device):
        z = torch.randn(n, 2, device=device)
        for i in reversed(range(len(self.layers))):
            z = self.layers[i].inverse(z, i % 2 == 1)
        return z


class Zuko(nn.Module):
    """zuko's lazy flow behind the log_prob/sample interface of the others."""

    def __init__(self):
        super().__init__()
        import zuko

        self.flow = zuko.flows.RealNVP(2, transforms=6, hidden_features=(64, 64))

    def log_prob(self, x):
        return self.flow().log_prob(x)

    def sample(self, n, device):
        return self.flow().sample((n,))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    a = p.parse_args()
    dev = torch.device(a.device)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def rate(units, work):
        def timed():
            sync()
            t = time.perf_counter()
            work()
            sync()
            return units / (time.perf_counter() - t)

        timed()
        return sorted(timed() for _ in range(REPEATS))[REPEATS // 2]

    def emit(job, metric, value):
        print(json.dumps({"job": job, metric: round(value, 1)}), flush=True)

    def train_rate(model, batch):
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        x = torch.randn(batch, 2, device=dev)

        def steps():
            for _ in range(STEPS):
                loss = -model.log_prob(x).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()

        return rate(STEPS, steps)

    big = torch.randn(POINTS, 2, device=dev)
    models = [("reference", Flow, 512), ("zuko_default", Zuko, 256), ("nice", Nice, 512)]
    for name, make, batch in models:
        try:
            model = make().to(dev)
        except ImportError as e:
            print(f"pytorch_device_jobs: {name} skipped: {e}", file=sys.stderr)
            continue
        emit(f"{name}_train", "steps_per_s", train_rate(model, batch))
        with torch.no_grad():
            emit(f"{name}_log_prob_1m", "points_per_s", rate(POINTS, lambda: model.log_prob(big)))
            emit(f"{name}_sample_1m", "points_per_s", rate(POINTS, lambda: model.sample(POINTS, dev)))
    for batch in [64, 4096, 32768]:
        emit(f"reference_train_batch_{batch}", "steps_per_s", train_rate(Flow().to(dev), batch))
    x, y = torch.randn(512, 1, device=dev), torch.randn(512, 1, device=dev)
    ops = 2000

    def tiny():
        for _ in range(ops):
            x + y

    print(json.dumps({"job": "tiny_op", "us_per_op": round(1e6 / rate(ops, tiny), 2)}), flush=True)


if __name__ == "__main__":
    main()
