//! Speed of the bf16 product ([`deris_kernels::bf16::matmul_bt`]) against the f32 `gemm` crate
//! on one thread, on the `nn.Linear` shapes of DeRIS-B: `cargo run --release -p deris-kernels
//! --example bf16_gflops`. Prints GFLOPS (2·m·n·k per second, best of several runs).

use std::time::Instant;

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

fn main() -> candle_core::Result<()> {
    if !deris_kernels::bf16::available() {
        println!("this CPU lacks AVX512-BF16: nothing to measure");
        return Ok(());
    }
    println!("{:<10} {:>5} {:>5} {:>5}  {:>9} {:>9}  {:>5}", "shape", "m", "k", "n", "f32 GF/s", "bf16 GF/s", "ratio");
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
        let gf = |s: f64| 2.0 * (m * n * k) as f64 / s / 1e9;
        println!("{what:<10} {m:>5} {k:>5} {n:>5}  {:>9.1} {:>9.1}  {:>5.2}", gf(f32_s), gf(bf16_s), f32_s / bf16_s);
    }
    Ok(())
}
