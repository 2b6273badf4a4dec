//! The bf16 product ([`deris_kernels::bf16::matmul_bt`]) against f64 products of the same
//! bf16-rounded inputs (only summation order and f32 sums may differ) and against the f32
//! product (within bf16's rounding), on shapes that miss every block size; and the rounding
//! against hand-derived bit patterns; a weight packed once ([`PackedWeight`]) against packing
//! on every call, bit for bit. On CPUs without AVX512-BF16 the product tests print why and skip.

use deris_kernels::bf16::{self, from_bf16, to_bf16, PackedWeight};

mod common;

/// A small deterministic generator (xorshift64*), so failures are reproducible.
struct Rng(u64);

impl Rng {
    /// Uniform in `[lo, hi)`.
    fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let u = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11;
        lo + (hi - lo) * u as f64 / (1u64 << 53) as f64
    }
}

fn skip() -> bool {
    if !bf16::available() {
        eprintln!("skipped: this CPU lacks AVX512-BF16");
        return true;
    }
    false
}

#[test]
fn rounding_table() {
    let table: &[(u32, u16, &str)] = &[
        (0x3F80_0000, 0x3F80, "1.0"),
        (0xBF80_0000, 0xBF80, "-1.0"),
        (0x0000_0000, 0x0000, "+0"),
        (0x8000_0000, 0x8000, "-0"),
        (0x3F80_8000, 0x3F80, "1 + 2^-8: tie, down to even"),
        (0x3F81_8000, 0x3F82, "1 + 3·2^-8: tie, up to even"),
        (0x3F80_8001, 0x3F81, "just above the tie"),
        (0x3F80_7FFF, 0x3F80, "just below the tie"),
        (0xBF81_8000, 0xBF82, "negative tie, away from zero to even"),
        (0x3FFF_FFFF, 0x4000, "carry into the exponent"),
        (0x7F7F_0000, 0x7F7F, "largest bf16"),
        (0x7F7F_FFFF, 0x7F80, "f32::MAX rounds to infinity"),
        (0x7F80_0000, 0x7F80, "+inf"),
        (0xFF80_0000, 0xFF80, "-inf"),
        (0x0001_0000, 0x0001, "smallest bf16 subnormal"),
        (0x0000_8000, 0x0000, "subnormal tie, down to even (zero)"),
        (0x0001_8000, 0x0002, "subnormal tie, up to even"),
        (0x8000_0001, 0x8000, "smallest negative f32 subnormal"),
        (0x007F_FFFF, 0x0080, "largest f32 subnormal up to the smallest normal"),
        (0x7FC0_0000, 0x7FC0, "quiet NaN"),
        (0xFFC0_0001, 0x7FC0, "negative NaN"),
        (0x7F80_0001, 0x7FC0, "signalling NaN, payload only in the dropped bits"),
    ];
    for &(x, want, what) in table {
        let got = to_bf16(f32::from_bits(x));
        assert_eq!(got, want, "{what}: {x:#010x} → {got:#06x}, want {want:#06x}");
    }
    assert_eq!(from_bf16(0x3F82), 1.015625);
    assert!(from_bf16(0x7FC0).is_nan());
}

/// The vectorised rounding inside the packing gives [`to_bf16`]'s bits: `C = 1 · B` with k = 1
/// reads each rounded B value back (normal values only: the instruction counts subnormals as 0).
#[test]
fn packing_rounds_like_to_bf16() {
    if skip() {
        return;
    }
    let mut vals: Vec<f32> = [0x3F80_8000u32, 0x3F81_8000, 0x3F80_8001, 0x3F80_7FFF, 0xBF81_8000, 0x3FFF_FFFF, 0x7F7F_FFFF, 0xFF80_0000, 0xC2F6_E979]
        .iter()
        .map(|&b| f32::from_bits(b))
        .collect();
    let mut rng = Rng(7 | 1 << 40);
    vals.extend((0..100).map(|_| rng.uniform(-1e4, 1e4) as f32));
    for k in [1, 2] {
        // k = 2: the second value of each row is zero, so the sum is exact too.
        let b: Vec<f32> = vals.iter().flat_map(|&v| [v, 0.0]).collect();
        let mut c = vec![0f32; vals.len()];
        bf16::matmul_bt(1, vals.len(), k, &[1.0, 0.0], k, &b, 2, 1, &mut c, vals.len()).unwrap();
        for (v, got) in vals.iter().zip(&c) {
            assert_eq!(got.to_bits(), from_bf16(to_bf16(*v)).to_bits(), "k {k}: {v:e} ({:#010x})", v.to_bits());
        }
    }
}

/// A `[rows, cols]` matrix with strides `(rs, cs)` inside a buffer of random values.
struct Strided {
    data: Vec<f32>,
    rs: usize,
    cs: usize,
}

impl Strided {
    fn new(rows: usize, cols: usize, rs: usize, cs: usize, rng: &mut Rng) -> Self {
        let len = (rows - 1) * rs + (cols - 1) * cs + 1;
        Self { data: (0..len).map(|_| rng.uniform(-2.0, 2.0) as f32).collect(), rs, cs }
    }
    fn at(&self, i: usize, j: usize) -> f32 {
        self.data[i * self.rs + j * self.cs]
    }
}

/// `(m, n, k)`: single values, odd sizes, sizes past the 8-row blocks, the 32-column panels,
/// the 16-row transposes and the 256-value k slices.
const SHAPES: &[(usize, usize, usize)] =
    &[(1, 1, 1), (1, 33, 7), (7, 5, 3), (9, 31, 17), (3, 17, 2), (8, 32, 16), (17, 64, 259), (13, 48, 300), (65, 100, 513), (30, 47, 256), (20, 16, 33)];

fn check(m: usize, n: usize, k: usize, b_transposed: bool, seed: u64) {
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let (lda, ldc) = (k + 3, n + 2);
    let a = Strided::new(m, k, lda, 1, &mut rng);
    // B is [n, k]: rows padded, or stored as its [k, n] transpose (unit stride along n).
    let b = if b_transposed { Strided::new(n, k, 1, n + 1, &mut rng) } else { Strided::new(n, k, k + 5, 1, &mut rng) };
    let mut c = vec![f32::NAN; (m - 1) * ldc + n + 1];
    bf16::matmul_bt(m, n, k, &a.data, lda, &b.data, b.rs, b.cs, &mut c, ldc).unwrap();
    let r = |x: f32| from_bf16(to_bf16(x)) as f64;
    for i in 0..m {
        let l1_row: f64 = (0..n).map(|j| (0..k).map(|t| (r(a.at(i, t)) * r(b.at(j, t))).abs()).sum::<f64>()).fold(0.0, f64::max);
        for j in 0..n {
            let exact: f64 = (0..k).map(|t| r(a.at(i, t)) * r(b.at(j, t))).sum();
            let full: f64 = (0..k).map(|t| a.at(i, t) as f64 * b.at(j, t) as f64).sum();
            let l1: f64 = (0..k).map(|t| (a.at(i, t) as f64 * b.at(j, t) as f64).abs()).sum();
            let got = c[i * ldc + j] as f64;
            let what = format!("m {m} n {n} k {k} transposed B {b_transposed} at ({i}, {j})");
            assert!((got - exact).abs() <= 1e-5 * l1_row, "{what}: {got} vs bf16-exact {exact} (row L1 {l1_row})");
            // Each operand is off by at most 2^-8 relatively (8 significant bits), a product
            // by about 2^-7.
            assert!((got - full).abs() <= l1 / 128.0 + 1e-6, "{what}: {got} vs f32 product {full} (L1 {l1})");
        }
        if i + 1 < m {
            assert!(c[i * ldc + n..(i + 1) * ldc].iter().all(|v| v.is_nan()), "row {i}: padding written");
        }
    }
    assert!(c[(m - 1) * ldc + n].is_nan(), "past the last row written");
}

#[test]
fn matches_f64_on_odd_shapes() {
    if skip() {
        return;
    }
    for (s, &(m, n, k)) in SHAPES.iter().enumerate() {
        check(m, n, k, false, s as u64);
        check(m, n, k, true, 100 + s as u64);
    }
}

#[test]
fn empty_and_out_of_bounds() {
    if skip() {
        return;
    }
    let mut c = vec![1f32; 6];
    bf16::matmul_bt(2, 3, 0, &[], 0, &[], 0, 1, &mut c, 3).unwrap();
    assert_eq!(c, [0.0; 6], "k = 0 gives zeros");
    bf16::matmul_bt(0, 3, 4, &[], 4, &[0.0; 12], 4, 1, &mut c, 3).unwrap();
    assert!(bf16::matmul_bt(2, 3, 4, &[0.0; 7], 4, &[0.0; 12], 4, 1, &mut c, 3).is_err(), "short A");
    assert!(bf16::matmul_bt(2, 3, 4, &[0.0; 8], 4, &[0.0; 11], 4, 1, &mut c, 3).is_err(), "short B");
    assert!(bf16::matmul_bt(2, 3, 4, &[0.0; 8], 4, &[0.0; 12], 4, 1, &mut c[..5], 3).is_err(), "short C");
}

/// `len` values in `[-2, 2)` from the shared generator.
fn values(len: usize, seed: u64) -> Vec<f32> {
    common::rand(&[len], seed, 2.0).unwrap().to_vec1().unwrap()
}

/// A weight packed once gives the bits of the product that packs it on every call: every m up to
/// 20 (whole 8-row blocks and their 4-, 2- and 1-row tails), k odd, under and past the 256-value
/// slices (not a multiple of them), n under, at and past the 32-column panels; rows padded and
/// the weight stored transposed (the strided packing).
#[test]
fn prepacked_weight_gives_the_same_bits() {
    if skip() {
        return;
    }
    let shapes = [(1, 1), (5, 3), (31, 17), (32, 256), (33, 259), (47, 300), (100, 513), (64, 600)];
    for (s, &(n, k)) in shapes.iter().enumerate() {
        for transposed in [false, true] {
            let (rs, cs) = if transposed { (1, n + 1) } else { (k + 5, 1) };
            let w = values((n - 1) * rs + (k - 1) * cs + 1, 2 * s as u64 + transposed as u64);
            let packed = PackedWeight::new(&w, n, k, rs, cs).unwrap();
            assert_eq!(packed.shape(), (n, k));
            for m in 1..=20 {
                let (lda, ldc) = (k + 3, n + 2);
                let a = values((m - 1) * lda + k, 1000 + 20 * s as u64 + m as u64);
                let (mut want, mut got) = (vec![f32::NAN; (m - 1) * ldc + n + 1], vec![f32::NAN; (m - 1) * ldc + n + 1]);
                bf16::matmul_bt(m, n, k, &a, lda, &w, rs, cs, &mut want, ldc).unwrap();
                bf16::matmul_bt_prepacked(m, &a, lda, &packed, &mut got, ldc).unwrap();
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&want), "m {m} n {n} k {k} transposed {transposed}");
            }
        }
    }
}

#[test]
fn prepacked_empty_and_out_of_bounds() {
    if skip() {
        return;
    }
    assert!(PackedWeight::new(&[0.0; 11], 3, 4, 4, 1).is_err(), "short weight");
    let w = PackedWeight::new(&[0.5; 12], 3, 4, 4, 1).unwrap();
    let mut c = vec![1f32; 6];
    assert!(bf16::matmul_bt_prepacked(2, &[0.0; 7], 4, &w, &mut c, 3).is_err(), "short A");
    assert!(bf16::matmul_bt_prepacked(2, &[0.0; 8], 4, &w, &mut c[..5], 3).is_err(), "short C");
    bf16::matmul_bt_prepacked(0, &[], 4, &w, &mut c, 3).unwrap();
    assert_eq!(c, [1.0; 6], "no rows write nothing");
    let none = PackedWeight::new(&[], 3, 0, 0, 1).unwrap();
    bf16::matmul_bt_prepacked(2, &[], 0, &none, &mut c, 3).unwrap();
    assert_eq!(c, [0.0; 6], "k = 0 gives zeros");
    let empty = PackedWeight::new(&[], 0, 4, 4, 1).unwrap();
    bf16::matmul_bt_prepacked(2, &[0.0; 8], 4, &empty, &mut [], 0).unwrap();
}
