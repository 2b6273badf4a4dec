"""Checks kernels/ms_deform_attn.cu on a GPU without Rust: compiles it to PTX with nvcc, runs the
three kernels through CuPy and compares them with PyTorch's grid_sample (the authors' CPU
fallback semantics) and its autograd, in float64. Prints max errors and timings.

    python3 check_cuda.py [--small]     # needs nvcc, torch (CUDA) and cupy

The Rust side launches the same kernels with the same argument order (src/ms_deform_attn/cuda.rs).
"""
import os
import subprocess
import sys
import time

import cupy as cp
import numpy as np
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
PTX = "/tmp/ms_deform_attn.ptx"
THREADS = 256


def compile_module():
    cap = torch.cuda.get_device_capability()
    cmd = ["nvcc", "--ptx", "-O3", "-std=c++17", f"-arch=sm_{cap[0]}{cap[1]}", "-o", PTX,
           os.path.join(HERE, "ms_deform_attn.cu")]
    subprocess.run(cmd, check=True)
    return cp.RawModule(path=PTX)


MOD = compile_module()
KERNELS = {n: MOD.get_function(f"ms_deform_attn_{n}_f32") for n in ("fwd", "grad_value", "grad_sampling")}


def launch(name, inputs, out, dims, threads, levels):
    blocks = min(max(1, -(-threads // THREADS)), 1 << 16)
    args = tuple(cp.from_dlpack(t.contiguous()) for t in inputs) + (levels, cp.from_dlpack(out))
    args += tuple(np.int32(d) for d in dims)
    KERNELS[name]((blocks,), (THREADS,), args)


def levels_of(shapes):
    flat, start = [], 0
    for h, w in shapes:
        flat += [h, w, start]
        start += h * w
    return cp.asarray(flat, dtype=cp.int32)


def kernel_forward(value, shapes, loc, attn):
    b, s, m, dh = value.shape
    lq, nl, p = loc.shape[1], loc.shape[3], loc.shape[4]
    out = torch.zeros(b, lq, m * dh, device="cuda", dtype=torch.float32)
    launch("fwd", (value, loc, attn), out, (b, s, m, dh, lq, nl, p), b * lq * m * dh, levels_of(shapes))
    return out


def kernel_backward(value, shapes, loc, attn, grad):
    b, s, m, dh = value.shape
    lq, nl, p = loc.shape[1], loc.shape[3], loc.shape[4]
    dims = (b, s, m, dh, lq, nl, p)
    lv = levels_of(shapes)
    g_value = torch.zeros_like(value)
    launch("grad_value", (loc, attn, grad), g_value, dims, b * lq * m * dh, lv)
    vjp = torch.zeros(b, lq, m, nl, p, 3, device="cuda", dtype=torch.float32)
    launch("grad_sampling", (value, loc, grad), vjp, dims, b * lq * m * nl * p * 32, lv)
    return g_value, vjp[..., :2] * attn[..., None], vjp[..., 2]


def torch_reference(value, shapes, loc, attn):
    """Bilinear zero-padded sampling with grid_sample(align_corners=False), level by level."""
    b, s, m, dh = value.shape
    lq, nl, p = loc.shape[1], loc.shape[3], loc.shape[4]
    out = 0
    start = 0
    for l, (h, w) in enumerate(shapes):
        v = value[:, start:start + h * w].permute(0, 2, 3, 1).reshape(b * m, dh, h, w)
        start += h * w
        grid = (2 * loc[:, :, :, l] - 1).permute(0, 2, 1, 3, 4).reshape(b * m, lq, p, 2)
        sampled = F.grid_sample(v, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        a = attn[:, :, :, l].permute(0, 2, 1, 3).reshape(b * m, 1, lq, p)
        out = out + (sampled * a).sum(-1)  # [B*M, Dh, Lq]
    return out.reshape(b, m * dh, lq).transpose(1, 2)


def inputs(b, shapes, m, dh, lq, p, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    s = sum(h * w for h, w in shapes)
    nl = len(shapes)
    value = torch.rand(b, s, m, dh, device="cuda", generator=g, dtype=torch.float64) * 2 - 1
    loc = torch.rand(b, lq, m, nl, p, 2, device="cuda", generator=g, dtype=torch.float64) * 1.6 - 0.3
    attn = torch.softmax(torch.randn(b, lq, m, nl * p, device="cuda", generator=g, dtype=torch.float64), -1)
    attn = attn.reshape(b, lq, m, nl, p)
    grad = torch.rand(b, lq, m * dh, device="cuda", generator=g, dtype=torch.float64) * 2 - 1
    return value, loc, attn, grad


def rel_err(got, want):
    return ((got.double() - want).abs().max() / want.abs().max().clamp(min=1.0)).item()


def check(name, b, shapes, m, dh, lq, p):
    value, loc, attn, grad = inputs(b, shapes, m, dh, lq, p, seed=len(name))
    vs, ls, as_ = (t.clone().requires_grad_(True) for t in (value, loc, attn))
    want = torch_reference(vs, shapes, ls, as_)
    want.backward(grad)
    f32 = [t.float().contiguous() for t in (value, loc, attn, grad)]
    got = kernel_forward(*f32[:1], shapes, *f32[1:3])
    g_value, g_loc, g_attn = kernel_backward(f32[0], shapes, f32[1], f32[2], f32[3])
    torch.cuda.synchronize()
    errs = {
        "forward": rel_err(got, want.detach()),
        "d_value": rel_err(g_value, vs.grad),
        "d_loc": rel_err(g_loc, ls.grad),
        "d_attn": rel_err(g_attn, as_.grad),
    }
    ok = all(e < 2e-5 for e in errs.values())
    print(f"{name:28s} " + "  ".join(f"{k} {v:.2e}" for k, v in errs.items()) + ("  OK" if ok else "  FAIL"))
    return ok


def timed(fn, iters=20):
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters * 1e3


def bench(b):
    shapes = [(12, 12), (24, 24), (48, 48)]
    s = sum(h * w for h, w in shapes)
    value, loc, attn, grad = (t.float().contiguous() for t in inputs(b, shapes, 8, 32, s, 4, seed=1))
    fwd = timed(lambda: kernel_forward(value, shapes, loc, attn))
    bwd = timed(lambda: kernel_backward(value, shapes, loc, attn, grad))
    ref_fwd = timed(lambda: torch_reference(value, shapes, loc, attn))

    def ref_step():
        vs, ls, as_ = (t.clone().requires_grad_(True) for t in (value, loc, attn))
        torch_reference(vs, shapes, ls, as_).backward(grad)

    ref_both = timed(ref_step)
    print(f"bench B={b} Lq=S={s} M=8 Dh=32 L=3 P=4: kernel fwd {fwd:.3f} ms, bwd {bwd:.3f} ms; "
          f"torch grid_sample fallback fwd {ref_fwd:.3f} ms, fwd+bwd {ref_both:.3f} ms")


def main():
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "cupy", cp.__version__)
    cases = [
        ("small B2 Dh5", 2, [(3, 4), (5, 2), (1, 1), (6, 7)], 3, 5, 7, 3),
        ("Dh40 (2 lane rounds)", 2, [(4, 6), (2, 3)], 2, 40, 33, 2),
    ]
    if "--small" not in sys.argv:
        cases.append(("real size B2", 2, [(12, 12), (24, 24), (48, 48)], 8, 32, 3024, 4))
    ok = all([check(*c) for c in cases])
    if "--small" not in sys.argv:
        bench(1)
        bench(2)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
