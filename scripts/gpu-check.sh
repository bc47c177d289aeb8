#!/usr/bin/env bash
# The CUDA path on a real GPU, in one command: the CUDA tests (fused kernels against
# candle's ops, whole flows and training against the CPU, each with CUDA fusion off and
# on), then the device benchmarks beside PyTorch (and zuko) on the same card, and the
# end-to-end `flow` commands. Runs the binaries scripts/gpu-build.sh left in .gpu/bin,
# so the GPU machine needs no Rust toolchain. Full logs go to $LOGS (default gpu-logs/);
# where $OUT is set, they are also packed into $OUT/gpu-logs.tar.gz, beside gpu.md, the
# GPU section for BENCHMARKS.md. A short table is printed last.
#
# `scripts/gpu-check.sh tests` runs the tests only. zuko and normflows are imported if
# Python finds them (wheels in .gpu/whl, made by gpu-build.sh, else in .whl/).
#
# The whole run keeps within $BUDGET seconds (default 540, under a lent machine's ten
# minutes a command), most wanted first: the tests (side by side), the benchmarks
# beside PyTorch, Glow on Fashion-MNIST beside normflows, the end-to-end commands, and
# last a longer Glow run in whatever time is left. Each step's time limit is cut to the
# time left; a step that would get under 15 s is skipped and listed in skipped.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
logs=${LOGS:-gpu-logs}
mkdir -p "$logs"
bin=$PWD/.gpu/bin
status=0
budget=${BUDGET:-540}
: >"$logs/skipped.txt"
# Seconds of the budget left.
left() { echo $((budget - SECONDS)); }
# `within N CMD…`: CMD under a time limit of N seconds, or the time left if less. With
# under 15 s left it is skipped: listed in skipped.txt, not counted as a failure.
within() {
    local want=$1 rest
    shift
    rest=$(left)
    if [ "$rest" -lt 15 ]; then
        echo "$*" >>"$logs/skipped.txt"
        return 0
    fi
    timeout $((want < rest ? want : rest)) "$@"
}
# Pack the logs on any exit, a timeout's TERM included, so what ran comes back.
pack() {
    if [ -n "${OUT:-}" ]; then
        cp "$logs/gpu.md" "$OUT/" 2>/dev/null
        tar -C "$logs" -czf "$OUT/gpu-logs.tar.gz" .
    fi
}
trap pack EXIT
trap 'exit 124' TERM
if [ ! -d "$bin" ]; then
    python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' \
        .gpu/bin.tar.xz .gpu || exit 1
fi

# CUDA's libraries (cuBLAS, cuRAND, NVRTC, the runtime) where PyTorch's pip packages
# keep them; the driver's libcuda is found by the loader as it is for PyTorch.
libs=$(find / \( -path /proc -o -path /sys -o -path '*/stubs' -o -path '*/compat' \) -prune -o \
    \( -name 'libcublas.so.*' -o -name 'libcurand.so.*' -o -name 'libnvrtc.so.*' \
    -o -name 'libcudart.so.*' \) -print 2>/dev/null | xargs -r -n1 dirname | sort -u | paste -sd:)
export LD_LIBRARY_PATH=$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH" >"$logs/env.log"
{ ldconfig -p | grep libcuda; nvidia-smi; } >>"$logs/env.log" 2>&1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader >"$logs/card.txt" 2>&1

wheels=$(ls .gpu/whl/*.whl 2>/dev/null || ls .whl/*.whl 2>/dev/null)
if [ -n "$wheels" ]; then
    # shellcheck disable=SC2086
    python3 -m pip install -q --no-index --no-deps --target /tmp/site $wheels >>"$logs/env.log" 2>&1 &&
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

# 1. Tests, side by side (the card has room for all of them). FLOWS_REQUIRE_CUDA turns
# "no GPU found" from a skip into a failure.
: >"$logs/tests.txt"
names=() pids=()
for t in "$bin"/test_*; do
    names+=("$(basename "$t")")
    FLOWS_REQUIRE_CUDA=1 within 150 "$t" >"$logs/${names[-1]}.log" 2>&1 &
    pids+=($!)
done
for i in "${!pids[@]}"; do
    name=${names[$i]}
    if wait "${pids[$i]}"; then
        echo "$name pass $(grep -o '[0-9]* passed' "$logs/$name.log" | tail -1)" >>"$logs/tests.txt"
    else
        echo "$name FAIL" >>"$logs/tests.txt"
        status=1
    fi
done

if [ "${1:-}" = tests ]; then
    cat "$logs/card.txt" "$logs/tests.txt"
    exit $status
fi

# 2. Benchmarks, ours and PyTorch's, same card, same run.
within 150 "$bin/device_jobs" >"$logs/ours.jsonl" 2>"$logs/ours.err" || status=1
within 150 python3 benches/pytorch_device_jobs.py --device cuda \
    >"$logs/pytorch.jsonl" 2>"$logs/pytorch.err" || status=1
within 60 python3 benches/pytorch_seed_job.py --device cuda \
    >"$logs/pytorch_seed_job.json" 2>"$logs/pytorch_seed_job.err" || status=1

# 3. Glow on Fashion-MNIST (L = 2, K = 8, 64 channels, batch 64): ours with CUDA fusion
# on, normflows' Glow of the same shape on the same card for the same steps, the test
# bits/dim and a sample grid of ours, then ours with fusion off. The IDX files come from
# .gpu/fashion-mnist (scripts/gpu-build.sh) or $FASHION_MNIST_DIR.
work=$(mktemp -d)
fm=${FASHION_MNIST_DIR:-.gpu/fashion-mnist}
glow_steps=${GLOW_STEPS:-300}
glow=(--flow glow --scales 2 --depth 8 --channels 64 --batch 64 --val-fraction 0 --device cuda)
: >"$logs/glow.txt"
# `glow_train FUSION STEPS NAME`: ours, its summary line into glow.txt.
glow_train() {
    FLOWS_FUSION=$1 within "${4:-300}" "$bin/flow" train --data "$fm/train-images-idx3-ubyte.gz" \
        "${glow[@]}" --steps "$2" --out "$work/$3.safetensors" >"$logs/$3.log" 2>&1 || status=1
    echo "$3 (fusion=$1, $2 steps): $(grep '^trained' "$logs/$3.log")" >>"$logs/glow.txt"
}
# `glow_score NAME`: test bits/dim and a 64-sample grid of a trained model.
glow_score() {
    within 120 "$bin/flow" log-prob --model "$work/$1.safetensors" \
        --input "$fm/t10k-images-idx3-ubyte.gz" --device cuda >"$logs/$1_test.log" 2>&1 || status=1
    echo "$1 test: $(tail -1 "$logs/$1_test.log")" >>"$logs/glow.txt"
    within 60 "$bin/flow" sample --model "$work/$1.safetensors" --n 64 --device cuda \
        --out "$logs/$1_samples.png" >>"$logs/$1_test.log" 2>&1 || status=1
}
if [ -f "$fm/train-images-idx3-ubyte.gz" ]; then
    glow_train 1 "$glow_steps" glow_fusion1
    within 300 python3 benches/normflows_glow_digits.py --data "$fm/train-images-idx3-ubyte.gz" \
        --test "$fm/t10k-images-idx3-ubyte.gz" --device cuda --steps "$glow_steps" \
        --samples "$logs/normflows_glow_samples.png" \
        >"$logs/normflows_glow.json" 2>"$logs/normflows_glow.err" || status=1
    echo "normflows glow ($glow_steps steps): $(tail -1 "$logs/normflows_glow.json")" >>"$logs/glow.txt"
    glow_score glow_fusion1
    glow_train 0 "$glow_steps" glow_fusion0
else
    echo "no Fashion-MNIST in $fm: Glow not run" >>"$logs/glow.txt"
fi

# 4. End to end through the binary: the reference job, and log-prob of 1M points read
# from CSV, each with CUDA fusion on and off.
within 60 "$bin/flow" data moons --n 1000000 --noise 0.05 --seed 3 --out "$work/big.csv" >/dev/null 2>&1
: >"$logs/e2e.txt"
for fusion in 1 0; do
    export FLOWS_FUSION=$fusion
    within 60 "$bin/flow" train --data moons --n 20000 --noise 0.05 --device cuda \
        --out "$work/m$fusion.safetensors" >"$logs/train_fusion$fusion.log" 2>&1 || status=1
    echo "fusion=$fusion train: $(grep '^trained' "$logs/train_fusion$fusion.log")" >>"$logs/e2e.txt"
    start=$EPOCHREALTIME
    within 60 "$bin/flow" log-prob --model "$work/m$fusion.safetensors" --input "$work/big.csv" \
        --device cuda >"$logs/log_prob_fusion$fusion.log" 2>&1 || status=1
    secs=$(awk "BEGIN { printf \"%.2f\", $EPOCHREALTIME - $start }")
    echo "fusion=$fusion log-prob 1M from CSV: ${secs}s $(tail -1 "$logs/log_prob_fusion$fusion.log")" >>"$logs/e2e.txt"
done
unset FLOWS_FUSION

# 5. A longer Glow run of ours in the time left: steps from the fused run's rate, with
# a minute kept for loading the data and saving, and a minute for scoring it.
rate=$(grep -o '([0-9.]* steps/s' "$logs/glow_fusion1.log" 2>/dev/null | tr -d '(' | cut -d' ' -f1)
if [ -n "$rate" ] && [ -f "$fm/train-images-idx3-ubyte.gz" ]; then
    steps=$(awk "BEGIN { printf \"%d\", $rate * ($(left) - 120) }")
    if [ "$steps" -gt "$glow_steps" ]; then
        glow_train 1 "$steps" glow_long $(($(left) - 60))
        glow_score glow_long
    else
        echo "glow_long: no time left for more than $glow_steps steps" >>"$logs/skipped.txt"
    fi
fi
rm -rf "$work"

# 6. The table, and the GPU section of BENCHMARKS.md in $logs/gpu.md.
python3 -c 'import torch; print(torch.__version__)' >"$logs/torch_version.txt" 2>&1
echo
echo "== $(cat "$logs/card.txt")"
cat "$logs/tests.txt"
python3 benches/gpu_report.py "$logs"
cat "$logs/pytorch_seed_job.json"
cat "$logs/e2e.txt"
cat "$logs/glow.txt"
[ -s "$logs/skipped.txt" ] && { echo "skipped for time:"; cat "$logs/skipped.txt"; }
exit $status
