"""The peers' own architectures, timed for `cargo xtask bench` beside ours in the same run:
zuko's default RealNVP (and the same architecture built from normflows' parts), a
dimension sweep and a depth sweep. Training steps use a fixed batch, as the criterion
benchmarks do; the rate is the median of three timed runs after a warm-up.

    pip install torch zuko normflows
    python benches/zuko_jobs.py --threads 2

Prints one JSON object. Jobs whose library is missing are left out.
"""

import argparse
import json
import time

import torch

STEPS = 100


def rate(units, work, repeats=3):
    work()
    runs = []
    for _ in range(repeats):
        t = time.perf_counter()
        work()
        runs.append(units / (time.perf_counter() - t))
    return sorted(runs)[repeats // 2]


def train_rate(log_prob, params, x):
    opt = torch.optim.Adam(params, lr=1e-3)

    def steps():
        for _ in range(STEPS):
            loss = -log_prob(x).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()

    return rate(STEPS, steps)


def log_prob_rate(log_prob, n, dim):
    x = torch.randn(n, dim)
    with torch.no_grad():
        return rate(n, lambda: log_prob(x))


def zuko_realnvp(dim, transforms, hidden):
    import zuko

    flow = zuko.flows.RealNVP(dim, transforms=transforms, hidden_features=hidden)
    return (lambda x: flow().log_prob(x)), flow.parameters()


def normflows_realnvp(dim, transforms, hidden):
    """zuko's default architecture from normflows' parts: affine coupling blocks whose
    MLP gives shift and scale, alternating halves."""
    import normflows as nf

    half = dim // 2
    flows = []
    for _ in range(transforms):
        net = nf.nets.MLP([half, *hidden, 2 * (dim - half)], init_zeros=True)
        flows.append(nf.flows.AffineCouplingBlock(net))
        flows.append(nf.flows.Permute(dim, mode="swap"))
    model = nf.NormalizingFlow(nf.distributions.DiagGaussian(dim), flows)
    return model.log_prob, model.parameters()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    out = {"threads": a.threads}
    jobs = {
        "zuko": zuko_realnvp,
        "normflows": normflows_realnvp,
    }
    for lib, make in jobs.items():
        try:
            log_prob, params = make(2, 6, (64, 64))
        except ImportError:
            continue
        x = torch.randn(256, 2)
        out[f"{lib}_default_train_steps_per_s"] = train_rate(log_prob, params, x)
        out[f"{lib}_default_log_prob_points_per_s"] = log_prob_rate(log_prob, 100_000, 2)
    try:
        for dim in [2, 8, 64, 256]:
            log_prob, params = zuko_realnvp(dim, 5, (512,))
            out[f"zuko_dim_{dim}_train_steps_per_s"] = train_rate(
                log_prob, params, torch.randn(512, dim)
            )
        for depth in [1, 2, 3, 4]:
            log_prob, params = zuko_realnvp(2, 6, (64,) * depth)
            out[f"zuko_depth_{depth}_train_steps_per_s"] = train_rate(
                log_prob, params, torch.randn(256, 2)
            )
    except ImportError:
        pass
    print(json.dumps(out))


if __name__ == "__main__":
    main()
