"""zuko's side of `cargo xtask bench quality`, beside ours in the same run.

- Density quality: zuko's `NSF(2, transforms=5, hidden_features=(512,))` (8 bins,
  zuko's default) trained on each of FFJORD's toy sets from the files our side wrote
  (`DATA/<set>-train.csv`, `DATA/<set>-test.csv`): data standardised with the training
  points' mean and (population) standard deviation, as ours are, batch 512 from a
  fresh permutation each epoch, Adam at 1e-3. The held-out NLL is reported in the
  data's own units: the standardised NLL plus the sum of log sigma.
- Autoregressive directions: zuko's `MAF(8, transforms=5, hidden_features=(64, 64))`
  and, for IAF, the same flow with its transformation inverted
  (`zuko.flows.LazyInverse(maf.transform)` over the same base): log-prob and sampling
  of 100 000 points, the median of five calls after a warm-up, without gradients.

    python benches/zuko_quality.py --data target/bench-quality/data --threads 2

Prints one flat JSON object.
"""

import argparse
import json
import math
import time

import torch
import zuko

SETS = ["eight-gaussians", "checkerboard", "pinwheel", "spirals"]


def load(path):
    with open(path) as f:
        rows = [[float(v) for v in line.split(",")] for line in f if line.strip()]
    return torch.tensor(rows, dtype=torch.float64)


def quality(name, data, steps, batch, lr, seed):
    train = load(f"{data}/{name}-train.csv")
    test = load(f"{data}/{name}-test.csv")
    mean = train.mean(0)
    std = train.std(0, unbiased=False)
    train = ((train - mean) / std).float()
    test = ((test - mean) / std).float()
    log_sigma = torch.log(std.float()).sum().item()

    torch.manual_seed(seed)
    flow = zuko.flows.NSF(2, transforms=5, hidden_features=(512,))
    opt = torch.optim.Adam(flow.parameters(), lr=lr)
    order = torch.Generator().manual_seed(seed)
    n = len(train)
    per_epoch = n // batch
    step = 0
    loss = float("nan")
    start = time.perf_counter()
    while step < steps:
        perm = torch.randperm(n, generator=order)
        for b in range(per_epoch):
            if step == steps:
                break
            x = train[perm[b * batch : (b + 1) * batch]]
            loss = -flow().log_prob(x).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
    elapsed = time.perf_counter() - start
    with torch.no_grad():
        nll = -flow().log_prob(test).double().mean().item() + log_sigma
    return {
        f"{name}_nll": nll,
        f"{name}_steps_per_s": steps / elapsed,
        f"{name}_final_loss": float(loss.detach()) + log_sigma,
    }


def median_secs(work, repeats):
    work()
    runs = []
    for _ in range(repeats):
        t = time.perf_counter()
        work()
        runs.append(time.perf_counter() - t)
    return sorted(runs)[repeats // 2]


def speed(dim, points, repeats, seed):
    torch.manual_seed(seed)
    maf = zuko.flows.MAF(dim, transforms=5, hidden_features=(64, 64))
    base = zuko.flows.MAF(dim, transforms=5, hidden_features=(64, 64))
    iaf = zuko.flows.Flow(zuko.flows.LazyInverse(base.transform), base.base)
    x = torch.randn(points, dim)
    out = {}
    with torch.no_grad():
        for name, flow in [("maf", maf), ("iaf", iaf)]:
            out[f"{name}_log_prob_s"] = median_secs(lambda: flow().log_prob(x), repeats)
            out[f"{name}_sample_s"] = median_secs(
                lambda: flow().sample((points,)), repeats
            )
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data", default="target/bench-quality/data")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sections", default="quality,speed")
    p.add_argument("--ar-dim", type=int, default=8)
    p.add_argument("--ar-points", type=int, default=100_000)
    p.add_argument("--ar-repeats", type=int, default=5)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    out = {
        "threads": a.threads,
        "steps": a.steps,
        "torch": torch.__version__,
        "zuko": zuko.__version__,
    }
    sections = a.sections.split(",")
    if "quality" in sections:
        for name in SETS:
            out.update(quality(name, a.data, a.steps, a.batch, a.lr, a.seed))
    if "speed" in sections:
        out.update(speed(a.ar_dim, a.ar_points, a.ar_repeats, a.seed))
    for k, v in out.items():
        if isinstance(v, float) and not math.isfinite(v):
            out[k] = None
    print(json.dumps(out))


if __name__ == "__main__":
    main()
