"""The `sbi` side of `cargo xtask npe`: neural posterior estimation with sbi's defaults.

Reads the simulations `cargo xtask npe` wrote (a CSV of parameter columns, then data
columns), trains `sbi`'s NPE with its neural spline flow (`density_estimator="nsf"`)
at every other setting its default (5 coupling transforms of residual conditioners of
50 units, 10 bins, z-scored parameters and data, batch 200, Adam at 5e-4, 10% held out,
stopping after 20 epochs without improvement), under a box-uniform prior, then draws
posterior samples for each observation (sbi's default: rejected outside the prior's
support). With `--test`, also scores the trained estimator by its held-out NLL,
−E log q(θ | x) in nats over the rows of that CSV (the estimator's own density, as
`flow log-prob` scores ours). With `--unrejected-out`, also writes each observation's
samples as the flow draws them, none rejected (what the estimator gives without the
prior's box). Prints one JSON line: training seconds, epochs and that NLL.
"""

import argparse
import json
import time

import numpy as np
import torch
from sbi.inference import NPE
from sbi.utils import BoxUniform


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sims", required=True)
    ap.add_argument("--theta-dim", type=int, required=True)
    ap.add_argument("--low", type=float, required=True)
    ap.add_argument("--high", type=float, required=True)
    ap.add_argument("--observations", nargs="+", required=True)
    ap.add_argument("--out", nargs="+", required=True)
    ap.add_argument("--samples", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--test", help="a CSV of held-out simulations to score")
    ap.add_argument(
        "--unrejected-out",
        nargs="+",
        help="also write each observation's samples as the flow draws them, none rejected outside the prior's box",
    )
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    sims = np.loadtxt(a.sims, delimiter=",", skiprows=1, dtype=np.float32, ndmin=2)
    theta = torch.from_numpy(sims[:, : a.theta_dim].copy())
    x = torch.from_numpy(sims[:, a.theta_dim :].copy())
    d = a.theta_dim
    prior = BoxUniform(low=a.low * torch.ones(d), high=a.high * torch.ones(d))
    inference = NPE(prior=prior, density_estimator="nsf", show_progress_bars=False)
    start = time.perf_counter()
    inference.append_simulations(theta, x).train()
    seconds = time.perf_counter() - start
    posterior = inference.build_posterior()
    for obs, out in zip(a.observations, a.out):
        x_o = torch.from_numpy(np.loadtxt(obs, delimiter=",", skiprows=1, dtype=np.float32, ndmin=1))
        s = posterior.sample((a.samples,), x=x_o.reshape(1, -1), show_progress_bars=False)
        header = ",".join(f"theta{j}" for j in range(d))
        np.savetxt(out, s.detach().numpy(), delimiter=",", header=header, comments="")
    for obs, out in zip(a.observations, a.unrejected_out or []):
        x_o = torch.from_numpy(np.loadtxt(obs, delimiter=",", skiprows=1, dtype=np.float32, ndmin=1))
        s = posterior.sample(
            (a.samples,), x=x_o.reshape(1, -1), show_progress_bars=False, reject_outside_prior=False
        )
        header = ",".join(f"theta{j}" for j in range(d))
        np.savetxt(out, s.detach().numpy(), delimiter=",", header=header, comments="")
    epochs = inference._summary.get("epochs_trained", [None])[-1]
    result = {"train_secs": seconds, "epochs": epochs}
    if a.test:
        test = np.loadtxt(a.test, delimiter=",", skiprows=1, dtype=np.float32, ndmin=2)
        theta_t = torch.from_numpy(test[:, :d].copy())
        x_t = torch.from_numpy(test[:, d:].copy())
        with torch.no_grad():
            # The estimator's density of each θ given its own x: input (1, batch, d).
            log_q = inference._neural_net.log_prob(theta_t.unsqueeze(0), x_t)
        result["test_nll"] = -float(log_q.mean())
    print(json.dumps(result))


if __name__ == "__main__":
    main()
