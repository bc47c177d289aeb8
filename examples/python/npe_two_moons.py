"""Neural posterior estimation on the two-moons task of the sbibm benchmark.

Simulate (theta, x) pairs, fit a conditional flow p(theta | x), and draw the posterior at
an observation: a crescent with two arms, since the simulator cannot tell theta from its
mirror image. Writes npe_two_moons.png (the posterior samples over the flow's density).

    pip install ./crates/flow-py matplotlib
    python examples/python/npe_two_moons.py [--out npe_two_moons.png]
"""

import argparse
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

import flows


def simulate(theta, rng):
    """The two-moons simulator (Greenberg et al. 2019; sbibm's `two_moons`)."""
    n = len(theta)
    a = rng.uniform(-np.pi / 2, np.pi / 2, n)
    r = rng.normal(0.1, 0.01, n)
    p = np.stack([r * np.cos(a) + 0.25, r * np.sin(a)], 1)
    shift = np.stack(
        [-np.abs(theta[:, 0] + theta[:, 1]) / np.sqrt(2), (-theta[:, 0] + theta[:, 1]) / np.sqrt(2)], 1
    )
    return p + shift


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--simulations", type=int, default=20_000)
    parser.add_argument("--steps", type=int, default=2_000)
    parser.add_argument("--out", default="npe_two_moons.png")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    theta = rng.uniform(-1, 1, (args.simulations, 2))
    x = simulate(theta, rng)
    observation = np.array([[0.0, 0.0]])

    # The prior's box, held as sbi holds a uniform prior: draws outside it are rejected
    # and the density is divided by the flow's mass inside.
    posterior = flows.Flow(
        2,
        context=2,
        flow="nsf",
        layers=5,
        hidden=64,
        hidden_layers=2,
        bins=8,
        bounds=[(-1, 1), (-1, 1)],
        bounds_by="rejection",
    )
    start = time.perf_counter()
    summary = posterior.fit(theta, context=x, steps=args.steps, batch=256, lr=1e-3, seed=0, progress=False)
    print(f"trained {summary['steps']} steps in {time.perf_counter() - start:.1f} s, last batch NLL {summary['final_loss']:.3f}")

    samples = posterior.sample(4_000, context=observation, seed=1)
    # Cell centres: the box's faces are outside it.
    g = -1 + (np.arange(200) + 0.5) / 100
    grid = np.stack(np.meshgrid(g, g), -1).reshape(-1, 2)
    log_density = posterior.log_prob(grid, context=observation).reshape(len(g), len(g))
    # Riemann sum of the density over the prior's box: 1, up to the estimate of the
    # flow's mass inside it and the grid's resolution.
    mass = np.exp(log_density).sum() * (g[1] - g[0]) ** 2
    print(f"the posterior density integrates to {mass:.3f} over the prior's box [-1, 1]^2")

    fig, ax = plt.subplots(figsize=(6.5, 5))
    # The log-density, down to e⁻⁸ of its peak: the posterior is sharp.
    peak = log_density.max()
    mesh = ax.pcolormesh(g, g, np.clip(log_density, peak - 8, peak), cmap="Blues", shading="auto")
    fig.colorbar(mesh, ax=ax, label="log p(θ | x₀)", shrink=0.8)
    ax.scatter(samples[:, 0], samples[:, 1], s=1, c="tab:orange", alpha=0.4, label="samples of p(θ | x₀)")
    ax.set(xlim=(-1, 1), ylim=(-1, 1), xlabel="θ₁", ylabel="θ₂", aspect="equal")
    ax.set_title("Two moons: posterior at x₀ = (0, 0)")
    ax.legend(loc="lower left", markerscale=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
