"""Formats what scripts/gpu-check.sh measured: a short table on stdout, and the GPU
section of BENCHMARKS.md (everything from its `# GPU` heading on) in LOGS/gpu.md.

    python3 benches/gpu_report.py LOGS
"""

import datetime
import json
import os
import re
import sys

UNITS = {"steps_per_s": "steps/s", "points_per_s": "points/s", "us_per_op": "µs/op"}

WHAT = {
    "reference_train": "reference job: training, batch 512",
    "reference_log_prob_1m": "reference job: log-prob, 1M points",
    "reference_sample_1m": "reference job: sampling, 1M points",
    "zuko_default_train": "zuko's default RealNVP (6 × 2×64 relu): training, batch 256",
    "zuko_default_log_prob_1m": "zuko's default RealNVP: log-prob, 1M points",
    "zuko_default_sample_1m": "zuko's default RealNVP: sampling, 1M points",
    "nice_train": "NICE (5 additive, 1→512→1): training, batch 512",
    "nice_log_prob_1m": "NICE: log-prob, 1M points",
    "nice_sample_1m": "NICE: sampling, 1M points",
    "reference_train_batch_64": "reference job: training, batch 64",
    "reference_train_batch_4096": "reference job: training, batch 4 096",
    "reference_train_batch_32768": "reference job: training, batch 32 768",
    "tiny_op": "one element-wise add of two (512, 1) tensors",
}


def read(logs, name):
    try:
        with open(os.path.join(logs, name)) as f:
            return f.read().strip()
    except OSError:
        return ""


def rows(logs, name):
    out = []
    for line in read(logs, name).splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


def value(row):
    if not row:
        return None, None
    metric = next(k for k in row if k not in ("job", "fused"))
    return row[metric], metric


def launch_estimates(table):
    """Rows of launches per training step, estimated as a step's time over one tiny op's
    (issue to completion), each side by its own tiny op: an upper bound where a step
    also computes."""
    tiny = {job: (plain, torch) for job, _, plain, torch, _ in table}.get("tiny_op")
    if not tiny:
        return []

    def est(rate, us):
        return "–" if not rate or not us else f"{1e6 / rate / us:,.0f}"

    out = []
    for job, fused, plain, torch, metric in table:
        if metric == "steps_per_s":
            out.append(
                f"| {WHAT.get(job, job)} | {est(fused, tiny[0])} | {est(plain, tiny[0])} "
                f"| {est(torch, tiny[1])} |"
            )
    return out


def glow_rates(logs):
    """Steps/s of our Glow runs by name (glow.txt), and normflows' (its JSON)."""
    ours = {}
    for line in read(logs, "glow.txt").splitlines():
        m = re.match(r"(\w+) \(fusion=\d, \d+ steps\): trained .*\(([\d.]+) steps/s\)", line)
        if m:
            ours[m.group(1)] = float(m.group(2))
    try:
        peer = json.loads(read(logs, "normflows_glow.json").splitlines()[-1]).get("steps_per_s")
    except (ValueError, IndexError):
        peer = None
    return ours, peer


def main():
    logs = sys.argv[1]
    ours, peer = rows(logs, "ours.jsonl"), {r["job"]: r for r in rows(logs, "pytorch.jsonl")}
    jobs = list(dict.fromkeys(r["job"] for r in ours))
    table = []
    for job in jobs:
        by = {r.get("fused"): r for r in ours if r["job"] == job}
        fused, metric = value(by.get(True))
        plain, metric2 = value(by.get(False) or by.get(None))
        torch, _ = value(peer.get(job))
        table.append((job, fused, plain, torch, metric or metric2))

    def fmt(v):
        return "–" if v is None else f"{v:,.1f}" if v < 100 else f"{v:,.0f}"

    print(f"{'job':30} {'fused':>12} {'candle ops':>12} {'pytorch':>12}")
    for job, fused, plain, torch, _ in table:
        print(f"{job:30} {fmt(fused):>12} {fmt(plain):>12} {fmt(torch):>12}")

    card = read(logs, "card.txt") or "unknown card"
    md = [
        "# GPU",
        "",
        f"Measured on one {card.split(',')[0].strip()} (driver "
        f"{card.split(',')[-1].strip()}), {datetime.date.today().isoformat()}, by "
        "`scripts/gpu-check.sh` (binaries from `scripts/gpu-build.sh`: CUDA 13.0, PTX for "
        "compute capability 9.0). PyTorch "
        f"{read(logs, 'torch_version.txt') or '(version not read)'} ran the same jobs on "
        "the same card in the same run (`benches/pytorch_device_jobs.py`): a fixed batch "
        "on the device, no synchronisation inside the timed loop, the median of three "
        "repeats after a warm-up, f32. Ours: `crates/flow-train/benches/device_jobs.rs`, "
        "timed the same way, with the fused CUDA conditioner kernels (the default) and "
        "with candle's own CUDA ops only (`FLOWS_FUSION=0`).",
        "",
        "| job | ours, fused | ours, candle ops | PyTorch | fused / PyTorch |",
        "| --- | --- | --- | --- | --- |",
    ]
    for job, fused, plain, torch, metric in table:
        unit = UNITS.get(metric, metric)
        ratio = "–"
        best = fused if fused is not None else plain
        if best is not None and torch:
            r = torch / best if metric == "us_per_op" else best / torch
            ratio = f"{r:.2f}×"
        what = f"{WHAT.get(job, job)} ({unit})"
        md.append(f"| {what} | {fmt(fused)} | {fmt(plain)} | {fmt(torch)} | {ratio} |")
    estimates = launch_estimates(table)
    for row in estimates:
        print("launches per step (fused, candle ops, pytorch):", row)
    if estimates:
        md += [
            "",
            "Launches per training step, estimated from these timings: a step's time over "
            "one tiny op's on the same side (an upper bound, where a step also computes):",
            "",
            "| job | ours, fused | ours, candle ops | PyTorch |",
            "| --- | --- | --- | --- |",
        ] + estimates
    glow, normflows = glow_rates(logs)
    if glow or normflows:
        fused = glow.get("glow_fusion1")
        ratio = f"{fused / normflows:.2f}×" if fused and normflows else "–"
        tiny = {job: plain for job, _, plain, _, _ in table}.get("tiny_op")
        worth = (
            f"; a fused step is worth about {1e6 / fused / tiny:,.0f} tiny ops"
            if fused and tiny
            else ""
        )
        md += [
            "",
            "Glow on Fashion-MNIST (L = 2, K = 8, 64 channels, batch 64), ours with CUDA "
            "fusion on and off, normflows' Glow of the same shape on the same card "
            f"(`benches/normflows_glow_digits.py`); training steps/s, ours / normflows "
            f"{ratio}{worth}:",
            "",
            "```",
            read(logs, "glow.txt"),
            read(logs, "normflows_glow.json"),
            "```",
        ]
    skipped = read(logs, "skipped.txt")
    if skipped:
        md += ["", "Skipped for time:", "", "```", skipped, "```"]
    seed = read(logs, "pytorch_seed_job.json")
    e2e = read(logs, "e2e.txt")
    md += [
        "",
        "End to end through the binary (`flow train --data moons --n 20000 --device cuda`, "
        "1000 steps with batch sampling, loss read back every step, reporting and the "
        "checkpoint write; `flow log-prob` of 1M points read from CSV, timed as a whole "
        "process):",
        "",
        "```",
        e2e,
        "```",
        "",
        "PyTorch's reference script on the same card (`python3 benches/pytorch_seed_job.py "
        "--device cuda`, a fresh batch indexed and copied to the card every step; log-prob "
        f"and sampling of 100 000 points): `{seed}`",
        "",
        "CUDA tests run there (`FLOWS_REQUIRE_CUDA=1`, each comparing CUDA fusion off and "
        "on against the reference):",
        "",
        "```",
        read(logs, "tests.txt"),
        "```",
    ]
    with open(os.path.join(logs, "gpu.md"), "w") as f:
        f.write("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
