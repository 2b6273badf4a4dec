//! Speed of the bf16 product against f32 on the `nn.Linear` shapes of DeRIS-B:
//! `cargo run --release -p deris-kernels --example bf16_gflops`. Prints GFLOPS (2·m·n·k per
//! second, best of several runs) of the bare products on one thread (`gemm` f32,
//! [`deris_kernels::bf16::matmul_bt`]) and of [`deris_kernels::fused::linear`] (with its bias)
//! on all threads in both [`Precision`]s.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use deris_kernels::{fused, Precision};

/// (what, m, k, n): BEiT-3 base (217 tokens), Swin-S stage 3 (784 tokens), Swin stage 1.
const SHAPES: &[(&str, usize, usize, usize)] = &[
    ("beit3 qkv", 217, 768, 2304),
    ("beit3 out", 217, 768, 768),
    ("beit3 fc1", 217, 768, 3072),
    ("beit3 fc2", 217, 3072, 768),
    ("swin3 qkv", 784, 384, 1152),
    ("swin3 out", 784, 384, 384),
    ("swin3 fc1", 784, 384, 1536),
    ("swin3 fc2", 784, 1536, 384),
    ("swin1 qkv", 9604, 96, 288),
    ("beit3 text", 20, 768, 2304),
    ("text fc1", 20, 768, 3072),
    ("text fc2", 20, 3072, 768),
    ("query ffn", 10, 256, 2048),
    ("query proj", 10, 256, 256),
    ("4 rows", 4, 768, 768),
    ("2 rows", 2, 256, 2048),
    ("1 row", 1, 768, 768),
];

fn values(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        })
        .collect()
}

/// Best seconds of `f` over runs lasting about 0.3 s in all.
fn best(mut f: impl FnMut()) -> f64 {
    f();
    let (mut best, start) = (f64::INFINITY, Instant::now());
    while start.elapsed().as_secs_f64() < 0.3 {
        let t = Instant::now();
        f();
        best = best.min(t.elapsed().as_secs_f64());
    }
    best
}

/// Best seconds of `linear(x, w, b)` in precision `p`.
fn linear_s(x: &Tensor, w: &Tensor, b: &Tensor, p: Precision) -> candle_core::Result<f64> {
    deris_kernels::set_precision(p)?;
    let s = best(|| {
        fused::linear(x, w, Some(b), fused::Activation::Identity, None).unwrap();
    });
    deris_kernels::set_precision(Precision::F32)?;
    Ok(s)
}

fn main() -> candle_core::Result<()> {
    if !deris_kernels::bf16::available() {
        println!("this CPU lacks AVX512-BF16: nothing to measure");
        return Ok(());
    }
    let threads = rayon::current_num_threads();
    println!("GFLOPS; product: one thread; linear: {threads} threads");
    println!(
        "{:<10} {:>5} {:>5} {:>5}  {:>11} {:>11} {:>5}  {:>10} {:>10} {:>5}",
        "shape", "m", "k", "n", "product f32", "product bf16", "ratio", "linear f32", "linear bf16", "ratio"
    );
    for &(what, m, k, n) in SHAPES {
        let (a, b) = (values(m * k, 1), values(n * k, 2));
        let mut c = vec![0f32; m * n];
        let f32_s = best(|| {
            // SAFETY: a is m×k, b is n×k (read as its k×n transpose), c is m×n, all row-major.
            unsafe {
                gemm::gemm(m, n, k, c.as_mut_ptr(), 1, n as isize, false, a.as_ptr(), 1, k as isize, b.as_ptr(), k as isize, 1, 0.0, 1.0, false, false, false, gemm::Parallelism::None)
            }
        });
        let mut c16 = vec![0f32; m * n];
        let bf16_s = best(|| deris_kernels::bf16::matmul_bt(m, n, k, &a, k, &b, k, 1, &mut c16, n).unwrap());
        let x = Tensor::from_vec(a, (m, k), &Device::Cpu)?;
        let w = Tensor::from_vec(b, (n, k), &Device::Cpu)?;
        let bias = Tensor::zeros(n, DType::F32, &Device::Cpu)?;
        let lin_f32 = linear_s(&x, &w, &bias, Precision::F32)?;
        let lin_bf16 = linear_s(&x, &w, &bias, Precision::Bf16)?;
        let gf = |s: f64| 2.0 * (m * n * k) as f64 / s / 1e9;
        println!(
            "{what:<10} {m:>5} {k:>5} {n:>5}  {:>11.1} {:>11.1} {:>5.2}  {:>10.1} {:>10.1} {:>5.2}",
            gf(f32_s),
            gf(bf16_s),
            f32_s / bf16_s,
            gf(lin_f32),
            gf(lin_bf16),
            lin_f32 / lin_bf16
        );
    }
    Ok(())
}
