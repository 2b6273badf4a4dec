#!/usr/bin/env bash
# Builds the `cuda` feature's binaries for scripts/cuda-check.sh (the `deris` command and the
# deris-kernels CUDA test) and packs them into DEST/bundle.tar.xz, with the check's helper script,
# for a machine that has a GPU but no Rust.
#
#   DEST=.cuda-run bash scripts/cuda-bundle.sh
#
# Needs nvcc (and the CUDA headers) on PATH or in CUDA_HOME, and CUDA_COMPUTE_CAP (e.g. 90). Where
# no CUDA toolkit is installed, nvcc and the headers come from PyPI (nvidia-cuda-nvcc,
# nvidia-cuda-runtime, nvidia-cuda-cccl, nvidia-cuda-crt, nvidia-nvvm, of the CUDA version of the
# target's driver), and the libraries that are only linked against (libcuda, libcublas,
# libcublasLt, libcurand, libnvrtc) can be stubs with the right sonames; the real ones are
# loaded where the binaries run.
set -euo pipefail
DEST=${DEST:-.cuda-run}
HERE=$(cd "$(dirname "$0")" && pwd)
: "${CUDA_COMPUTE_CAP:?set CUDA_COMPUTE_CAP, e.g. 90 for an H100}"
export CARGO_PROFILE_DEV_DEBUG=${CARGO_PROFILE_DEV_DEBUG:-0}
# One package set and feature set for both commands, so that they share every artifact.
pkgs=(-p deris-kernels -p deris -p deris-cli --features deris-kernels/cuda,deris/cuda,deris-cli/cuda)
json=$(mktemp)
cargo build "${pkgs[@]}" --message-format=json-render-diagnostics >"$json"
cargo test --no-run "${pkgs[@]}" --test cuda --message-format=json-render-diagnostics >>"$json"
exe() { # exe TARGET_NAME KIND: path of the built executable
    python3 -c 'import json, sys
for line in open(sys.argv[1]):
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == sys.argv[2] and sys.argv[3] in m["target"]["kind"] and m.get("executable"):
        print(m["executable"])' "$json" "$1" "$2" | tail -n 1
}
stage=$(mktemp -d)
mkdir -p "$stage/bin" "$DEST"
cp "$(exe deris bin)" "$stage/bin/deris"
cp "$(exe cuda test)" "$stage/bin/kernels-cuda-test"
strip "$stage/bin/"*
tar -C "$stage" -cJf "$DEST/bundle.tar.xz" bin
cp "$HERE/compare_golden.py" "$HERE/cuda-check.sh" "$DEST/"
rm -rf "$stage" "$json"
ls -la "$DEST"
