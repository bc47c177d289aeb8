"""Training from Python against `flow train`, on the same data, in the same run: zuko's
default architecture (RealNVP, 6 couplings, networks of two hidden layers of 64 ReLU
units, batch 256, 1000 steps) on 20 000 moons points. Runs alternate between the two
so that both see the same load on a shared machine; each side's rate is the median of
its runs' steps/s, as the trainer measures it.

    python benches/python_train.py --flow target/release/flow --data target/bench-run/moons.npy

Prints a markdown section; without the flows package it says that it skipped.
"""

import argparse
import re
import statistics
import subprocess
import sys

ARCH = dict(layers=6, hidden=64, hidden_layers=2, activation="relu")
STEPS, BATCH = 1000, 256


def flags():
    out = []
    for key, value in ARCH.items():
        out += ["--" + key.replace("_", "-"), str(value)]
    return out + ["--flow", "realnvp", "--steps", str(STEPS), "--batch", str(BATCH)]


def cli_rate(flow, data, out):
    r = subprocess.run(
        [flow, "train", "--data", data, *flags(), "--out", out], capture_output=True, text=True
    )
    if r.returncode != 0:
        sys.exit(f"flow train failed: {r.stderr.strip()}")
    return float(re.search(r"\(([\d.]+) steps/s\)", r.stderr).group(1))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--flow", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", default="/tmp/flows-python-bench.safetensors")
    p.add_argument("--runs", type=int, default=5)
    a = p.parse_args()
    print("## Training from Python\n")
    try:
        import numpy as np

        import flows
    except ImportError as e:
        print(f"Skipped: the flows package is not installed for {sys.executable} ({e}); `scripts/test-python.sh` installs it into target/pyenv.\n")
        return
    x = np.load(a.data)
    ours, cli = [], []
    for _ in range(a.runs):
        model = flows.Flow(2, flow="realnvp", **ARCH)
        ours.append(model.fit(x, steps=STEPS, batch=BATCH, progress=False)["steps_per_sec"])
        cli.append(cli_rate(a.flow, a.data, a.out))
    py, rs = statistics.median(ours), statistics.median(cli)
    print(
        f"zuko's default architecture (`flows.Flow(2, flow=\"realnvp\", layers=6, hidden=64, hidden_layers=2, activation=\"relu\").fit(x, steps=1000, batch=256)`) "
        f"against `flow train` with the same flags on the same {len(x)} points, {a.runs} runs each, alternating: "
        f"Python {py:.0f} steps/s, `flow train` {rs:.0f} steps/s, Python / CLI {py / rs:.2f} "
        f"(runs: Python {', '.join(f'{v:.0f}' for v in ours)}; CLI {', '.join(f'{v:.0f}' for v in cli)}).\n"
    )


if __name__ == "__main__":
    main()
