#!/usr/bin/env bash
# Data-parallel training on the CPU: the same jobs on one process and on two (mpirun),
# one thread each, alternated in one run so that both see the same load, and one
# process on two threads beside them. Prints one line per run: the job, how it ran,
# steps/s and rank 0's seconds in collectives. Needs Open MPI and
# `cargo build --release -p flow-cli --features mpi`.
set -euo pipefail
cd "$(dirname "$0")/.."
flow=${FLOW:-target/release/flow}
repeats=${REPEATS:-3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1

reference=(--data moons --n 20000 --steps 1000 --seed 1)
glow=(--data digits --batch 256 --steps 60 --seed 1)

# The summary line's rate and time in collectives.
summary() {
    grep '^trained' | sed -E 's/.*\(([0-9.]+) steps\/s\).*/\1/; s/^([0-9.]+)$/\1/' | head -1
}
collectives() {
    grep '^trained' | grep -oE '[0-9.]+s of rank 0' | cut -d s -f1 || echo -
}

run() {
    local job=$1 how=$2
    shift 2
    local out
    case $how in
        1x1) out=$(RAYON_NUM_THREADS=1 "$flow" train "$@" --out "$work/m.safetensors" 2>&1) ;;
        1x2) out=$(RAYON_NUM_THREADS=2 "$flow" train "$@" --out "$work/m.safetensors" 2>&1) ;;
        2x1) out=$(mpirun --oversubscribe -np 2 -x RAYON_NUM_THREADS=1 "$flow" train \
            --distributed mpi "$@" --out "$work/m.safetensors" 2>&1) ;;
    esac
    echo "$job $how $(summary <<<"$out") $(collectives <<<"$out")"
}

for _ in $(seq "$repeats"); do
    for how in 1x1 2x1 1x2; do
        run reference "$how" "${reference[@]}"
        run glow-digits "$how" "${glow[@]}"
    done
done
