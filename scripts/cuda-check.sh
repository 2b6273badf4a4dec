#!/usr/bin/env bash
# The GPU checks of the `cuda` feature in one run (for a lent device machine, no Rust there):
# the deris-kernels CUDA tests, the tiny-a whole-model parity on CUDA, and `deris bench --device
# cuda` for DeRIS-B at batch 1, 8 and 32. Expects the prebuilt binaries in $BUNDLE (default
# .cuda-run, see scripts/cuda-bundle.sh) and writes its logs to $OUT (default ./cuda-out).
#
#   bash scripts/cuda-check.sh        # from the repository root
set -u
ROOT=$(pwd)
BUNDLE=${BUNDLE:-$ROOT/.cuda-run}
OUT=${OUT:-$ROOT/cuda-out}
mkdir -p "$OUT"
SUMMARY=$OUT/summary.txt
: >"$SUMMARY"
say() { echo "$*" | tee -a "$SUMMARY"; }
step() { # step NAME TIMEOUT_S LOG CMD...: runs CMD with a time limit, logs, records the verdict
    local name=$1 limit=$2 log=$3; shift 3
    local t0=$SECONDS
    echo "### $name: $*" >>"$log"
    timeout -k 5 "$limit" "$@" >>"$log" 2>&1
    local rc=$?
    say "$name: rc=$rc in $((SECONDS - t0)) s"
    return $rc
}

cd "$BUNDLE" && tar -xJf bundle.tar.xz && cd "$ROOT" || { say "no bundle in $BUNDLE"; exit 1; }

# The CUDA libraries the binaries link to: the toolkit's, else the PyPI wheels of python3's torch.
PYLIBS=$(python3 -c 'import glob, os, nvidia; print(":".join(sorted({os.path.dirname(p) for d in nvidia.__path__ for p in glob.glob(d + "/**/lib*.so*", recursive=True)})))' 2>/dev/null)
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/nvidia/lib64:${PYLIBS}:${LD_LIBRARY_PATH:-}
# Any library still missing: look for it in the usual places.
for so in $(ldd "$BUNDLE"/bin/* 2>/dev/null | awk '/not found/ {print $1}' | sort -u); do
    hit=$(find /usr /opt /usr/local -name "$so" 2>/dev/null | head -n 1)
    [ -n "$hit" ] && export LD_LIBRARY_PATH=$(dirname "$hit"):$LD_LIBRARY_PATH
done
export DERIS_FIXTURES=$ROOT/fixtures RUST_BACKTRACE=1
{
    nvidia-smi
    nvcc --version
    echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
    for b in "$BUNDLE"/bin/*; do echo "== ldd $b"; ldd "$b" | grep -E 'cuda|cublas|curand|nvrtc|not found'; done
} >"$OUT/env.log" 2>&1
say "device: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -1)"
grep -q 'not found' "$OUT/env.log" && say "WARNING: unresolved libraries (see env.log)"

# 1. deris-kernels: CUDA kernels against the CPU kernels, forward and gradients.
step kernels-cuda-test 90 "$OUT/kernels.log" "$BUNDLE/bin/kernels-cuda-test" --nocapture --test-threads 1
grep -E '^case|test result' "$OUT/kernels.log" | tee -a "$SUMMARY"

# 2. tiny-a on CUDA against the golden tensors, from both weight files.
for w in safetensors pth; do
    step "dump-tiny-a-cuda-$w" 60 "$OUT/parity.log" "$BUNDLE/bin/deris" dump --device cuda --config configs/tiny-a.json \
        --weights fixtures/tiny-a/weights.$w --inputs fixtures/tiny-a/golden.safetensors --out "$OUT/tiny-a-cuda-$w.safetensors" &&
        step "parity-tiny-a-cuda-$w" 30 "$OUT/parity.log" python3 "$BUNDLE/compare_golden.py" \
            fixtures/tiny-a/golden.safetensors "$OUT/tiny-a-cuda-$w.safetensors"
    grep -E '^compared|^FAIL' "$OUT/parity.log" | tail -n 12 | tee -a "$SUMMARY"
done
rm -f "$OUT/tiny-a-cuda-pth.safetensors"

# 3. DeRIS-B bench on CUDA at batch 1, 8, 32, then batch 1 on the CPU for the checksum.
bench() { # bench DEVICE BATCH RUNS WARMUP LIMIT
    step "bench-$1-b$2" "$5" "$OUT/bench.log" "$BUNDLE/bin/deris" bench --config deris-b-refcoco --device "$1" \
        --batch "$2" --runs "$3" --warmup "$4" --json
    tail -n 1 "$OUT/bench.log" | grep '^{' >>"$OUT/bench.jsonl"
}
bench cuda 1 10 2 60
bench cuda 8 5 1 60
bench cuda 32 3 1 90
bench cpu 1 1 0 60
python3 - "$OUT/bench.jsonl" <<'PY' | tee -a "$SUMMARY"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print("| device | batch | median s/image | min s/image | median s/batch | peak GPU MiB (base) | peak RSS MiB | checksum |")
print("|---|---|---|---|---|---|---|---|")
for r in rows:
    gpu = f"{r['peak_gpu_mib']:.0f} ({r['gpu_base_mib']:.0f})" if r.get("peak_gpu_mib") else "-"
    rss = f"{r['peak_rss_mib']:.0f}" if r.get("peak_rss_mib") else "-"
    print(f"| {r['device']} | {r['batch']} | {r['median_s_per_image']:.4f} | {r['min_s_per_image']:.4f} | "
          f"{r['median_s_per_batch']:.4f} | {gpu} | {rss} | {r['checksum']:.6e} |")
for r in rows:
    print(f"stages {r['device']} b{r['batch']}: " + ", ".join(f"{k} {v:.4f}" for k, v in r["stages"].items()))
b1 = {r["device"]: r["checksum"] for r in rows if r["batch"] == 1}
if "cuda" in b1 and "cpu" in b1:
    print(f"checksum b1 cuda vs cpu: rel diff {abs(b1['cuda'] - b1['cpu']) / max(1e-12, abs(b1['cpu'])):.3e}")
PY
say "done in $SECONDS s"
