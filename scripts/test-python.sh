#!/usr/bin/env bash
# Builds the Python package into a virtual environment (target/pyenv) and runs its
# tests. Its comparisons with the `flow` command use target/release/flow, which
# `cargo test --release --workspace` builds; they skip, saying so, without it.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=target/pyenv
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
export PATH="$PWD/$venv/bin:$PATH"
pip install --quiet --upgrade maturin numpy pytest
# The workspace's build folder: dependencies built for the Rust tests are reused.
CARGO_TARGET_DIR="$PWD/target" pip install --quiet --no-build-isolation ./crates/flow-py
python -m pytest -q crates/flow-py/tests
