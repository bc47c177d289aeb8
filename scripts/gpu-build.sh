#!/usr/bin/env bash
# Builds what scripts/gpu-check.sh runs on a GPU machine that has no Rust toolchain:
# the `flow` binary, the test executables with a CUDA path and the device benchmark,
# compiled with `--features cuda`, stripped into .gpu/bin and packed as
# .gpu/bin.tar.xz (about 8 MB: the binaries share candle's PTX, which a long xz window
# stores once), small enough to travel to a machine that takes little.
#
# Needs nvcc on PATH whose CUDA version the GPU's driver supports (PTX from a newer
# nvcc does not load on an older driver), and CUDA_COMPUTE_CAP (90 for H100/H200).
# From pip, all of one CUDA release:
#   pip install 'nvidia-cuda-nvcc==13.0.*' 'nvidia-nvvm==13.0.*' 'nvidia-cuda-crt==13.0.*' \
#       'nvidia-cuda-cccl==13.0.*' 'nvidia-cuda-runtime==13.0.*' 'nvidia-cublas==13.0.*' \
#       'nvidia-cuda-nvrtc==13.0.*' 'nvidia-curand==10.*'
# and PATH=…/site-packages/nvidia/cu13/bin:$PATH. On a machine without the driver's
# libcuda, the binaries link against a stub of it made here (.gpu/link), as the CUDA
# toolkit's own stubs serve; the GPU machine's real libcuda is what they load there.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${CUDA_COMPUTE_CAP:?set CUDA_COMPUTE_CAP, e.g. 90}"
target=${CARGO_TARGET_DIR:-target}
bin=.gpu/bin
rm -rf "$bin" && mkdir -p "$bin"

# CUDA's libraries beside nvcc, under the unversioned names the linker asks for, and a
# libcuda stub with the driver functions cudarc calls, where the system has none.
lib=$(dirname "$(command -v nvcc)")/../lib
link=$PWD/.gpu/link
mkdir -p "$link"
for f in "$lib"/lib{cublas,cublasLt,curand,nvrtc,cudart}.so.*; do
    [ -e "$f" ] && ln -sf "$f" "$link/$(basename "${f%%.so.*}").so"
done
if ! ldconfig -p | grep -q 'libcuda\.so '; then
    cargo build --release --features cuda -p flow-kernels
    nm -u "$target"/release/deps/libcudarc-*.rlib 2>/dev/null | awk '{print $NF}' |
        grep -E '^cu[A-Z]' | sort -u | awk '{print "void " $1 "(void) {}"}' >"$link/cuda_stub.c"
    cc -shared -fPIC -Wl,-soname,libcuda.so.1 "$link/cuda_stub.c" -o "$link/libcuda.so"
fi
export LIBRARY_PATH=$link${LIBRARY_PATH:+:$LIBRARY_PATH}

cargo build --release --features cuda -p flow-cli
cp "$target/release/flow" "$bin/"

# The test executables, by name, from cargo's list of what it built.
tests=$(cargo test --release --features cuda --no-run \
    -p flow-core -p flow-nn -p flow-realnvp -p flow-train -p flow-glow --message-format=json 2>/dev/null |
    python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        t = m["target"]
        name = t["name"] if t["kind"] != ["lib"] else t["name"] + "_lib"
        print(name, m["executable"])
')
while read -r name exe; do
    case "$name" in
        fused | fused_flow | spline | cuda_training | optim | flow_core_lib) cp "$exe" "$bin/test_$name" ;;
        fusion) cp "$exe" "$bin/test_glow_fusion" ;;
    esac
done <<<"$tests"

bench=$(cargo bench --features cuda -p flow-train --bench device_jobs --no-run \
    --message-format=json 2>/dev/null |
    python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        print(m["executable"])
')
cp "$bench" "$bin/device_jobs"

# Fashion-MNIST for the Glow run of gpu-check.sh (the GPU machine has no network):
# Debian's IDX files, or $FASHION_MNIST_DIR's, carried as .gpu/fashion-mnist.
fm=${FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}
if [ -f "$fm/train-images-idx3-ubyte.gz" ]; then
    mkdir -p .gpu/fashion-mnist
    cp "$fm/train-images-idx3-ubyte.gz" "$fm/t10k-images-idx3-ubyte.gz" .gpu/fashion-mnist/
else
    echo "no Fashion-MNIST in $fm: gpu-check.sh will skip the Glow run" >&2
fi

# The peers gpu-check.sh measures beside PyTorch, as wheels (the GPU machine has
# PyTorch and numpy, which they need, but not them): .gpu/whl travels with the run.
rm -rf .gpu/whl
python3 -m pip wheel -q --no-deps zuko normflows -w .gpu/whl ||
    echo "no wheels for zuko and normflows: gpu-check.sh will run without them" >&2

strip "$bin"/*
tar -C .gpu -cf - bin | xz -9 -T2 --lzma2=preset=9,dict=256MiB >.gpu/bin.tar.xz
ls -la "$bin" .gpu/bin.tar.xz
