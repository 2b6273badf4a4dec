"""Compares a `deris dump` output with a golden file by the parity tests' rules: continuous
tensors within tol * max(1, max|golden|) (default 1e-4), binary (uint8) tensors with at most 0.1%
flipped entries. Prints one line per tensor and a summary; exits 1 on any failure.

    python3 compare_golden.py GOLDEN.safetensors DUMP.safetensors [--tol 1e-4]
"""
import argparse
import sys

import numpy as np
from safetensors.numpy import load_file


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("golden")
    ap.add_argument("dump")
    ap.add_argument("--tol", type=float, default=1e-4)
    args = ap.parse_args()
    gold, got = load_file(args.golden), load_file(args.dump)
    failures, worst = [], (0.0, "")
    for name in sorted(k for k in gold if not k.startswith("input.")):
        want = gold[name]
        if name not in got:
            failures.append(f"{name}: missing from the dump")
            continue
        have = got[name]
        if have.shape != want.shape:
            failures.append(f"{name}: shape {have.shape} vs golden {want.shape}")
            continue
        if want.dtype == np.uint8:
            flips = float(np.mean((have != 0) != (want != 0))) if want.size else 0.0
            ok = flips <= 1e-3
            print(f"{name:55} flipped {flips:.2e} {'ok' if ok else 'FAIL'}")
            if not ok:
                failures.append(f"{name}: {flips:.2e} of entries flipped")
            continue
        w, h = want.astype(np.float64), have.astype(np.float64)
        scale = max(1.0, float(np.abs(w).max()) if w.size else 0.0)
        d = float(np.abs(h - w).max()) if w.size else 0.0
        if np.isnan(h).any():
            d = float("nan")
        ok = d <= args.tol * scale
        print(f"{name:55} max|d| {d:.3e} (scale {scale:.2f}) {'ok' if ok else 'FAIL'}")
        if not ok:
            failures.append(f"{name}: max|d| {d:.3e} > {args.tol:g} * {scale:.2f}")
        if not d / scale <= worst[0]:
            worst = (d / scale, name)
    n = sum(1 for k in gold if not k.startswith("input."))
    print(f"compared {n} golden tensors: {n - len(failures)} ok, {len(failures)} failed; "
          f"worst relative error {worst[0]:.3e} ({worst[1]})")
    for f in failures:
        print("FAIL", f)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
