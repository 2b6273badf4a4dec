//! Post-norm transformer sublayers, fused by blocks of rows:
//!
//! - [`linear_residual_norm`]: `LayerNorm(residual + x·Wᵀ + b)` (an attention's output
//!   projection, its residual and norm);
//! - [`ffn_residual_norm`]: `LayerNorm(x + linear2(relu(linear1(x))))` (a ReLU feed-forward
//!   block with its residual and norm).
//!
//! Every row of these is independent, so the fast path splits the rows into one block per
//! rayon item and runs the whole sublayer on a block with single-threaded products: the block's
//! hidden activations stay in cache, the bias and the residual are pre-filled into the product's
//! destination, and nothing waits on a thread pool between the steps. The LayerNorm is written
//! here (two passes per row: mean, then the variance of the centred values, partial sums in
//! f64); it is the same function as `nn.LayerNorm`, local to these fused blocks. In bf16 mode
//! ([`crate::Precision::Bf16`]) the products of blocks of 8 rows or more run in bf16; a weight
//! packed beforehand ([`DenseWeight::Bf16`]) always runs in bf16, whatever the mode and the rows.
//!
//! Each takes this path on the CPU for f32/f64 when no input tracks a gradient, and otherwise
//! its `_reference` twin built from primitive ops (candle's gradients, any device); with a
//! packed weight only the fast path exists (f32 CPU inputs without gradient; errors otherwise).

use candle_core::{bail, DType, Result, Storage, StorageRef, Tensor, WithDType};
use rayon::prelude::*;

use crate::bf16::PackedWeight;
use crate::cpu_gemm::{self, MatRef};
use crate::fused::{linear_reference, Activation};

/// The parameters of an `nn.Linear`: weight `[N, K]`, bias `[N]`.
#[derive(Debug, Clone, Copy)]
pub struct Dense<'a> {
    pub weight: DenseWeight<'a>,
    pub bias: Option<&'a Tensor>,
}

/// A dense layer's weight `[N, K]`: a tensor, or rounded to bf16 and packed once
/// ([`crate::fused::pack_weight`]) for the bf16 product of every call.
#[derive(Debug, Clone, Copy)]
pub enum DenseWeight<'a> {
    F32(&'a Tensor),
    Bf16(&'a PackedWeight),
}

impl<'a> From<&'a Tensor> for DenseWeight<'a> {
    fn from(w: &'a Tensor) -> Self {
        Self::F32(w)
    }
}

impl DenseWeight<'_> {
    /// `(N, K)`.
    fn dims2(&self) -> Result<(usize, usize)> {
        match self {
            Self::F32(w) => w.dims2(),
            Self::Bf16(w) => Ok(w.shape()),
        }
    }

    /// The tensor, for the paths that take one (the reference, the value views).
    fn tensor(&self) -> Option<&Tensor> {
        match self {
            Self::F32(w) => Some(w),
            Self::Bf16(_) => None,
        }
    }

    fn packed(&self) -> Option<&PackedWeight> {
        match self {
            Self::F32(_) => None,
            Self::Bf16(w) => Some(w),
        }
    }
}

/// The weight of a dense layer as a block's product reads it: `[N, K]` values or packed.
#[derive(Clone, Copy)]
enum BlockWeight<'a, T> {
    Values(&'a [T]),
    Packed(&'a PackedWeight),
}

/// The parameters of an `nn.LayerNorm` over the last axis: weight and bias `[C]`, epsilon.
#[derive(Debug, Clone, Copy)]
pub struct Norm<'a> {
    pub weight: &'a Tensor,
    pub bias: Option<&'a Tensor>,
    pub eps: f64,
}

/// `LayerNorm(residual + x·Wᵀ + b)`, fast on the CPU.
///
/// # Shapes
/// - `x`: `[..., K]`; `dense.weight`: `[C, K]`; `residual`: the output shape `[..., C]`
/// - returns `[..., C]`
///
/// Differentiable: with a gradient-tracking input it runs [`linear_residual_norm_reference`].
pub fn linear_residual_norm(x: &Tensor, dense: Dense, residual: &Tensor, norm: Norm) -> Result<Tensor> {
    let (rows, k, c) = check_dense("linear_residual_norm", x, dense)?;
    if residual.dims() != out_dims(x, c).as_slice() {
        bail!("linear_residual_norm: residual {:?} must be {:?}", residual.dims(), out_dims(x, c));
    }
    check_norm("linear_residual_norm", norm, c)?;
    let all = [Some(x), dense.weight.tensor(), dense.bias, Some(residual), Some(norm.weight), norm.bias];
    if !fast_path(&all) || (dense.weight.packed().is_some() && x.dtype() != DType::F32) {
        return linear_residual_norm_reference(x, dense, residual, norm);
    }
    let t = Contig::new(&all)?;
    let out = match x.dtype() {
        DType::F32 => t.dispatch::<f32>(|v| Tensor::from_vec(
            residual_norm_blocks(rows, c, |r0, o| linear_block(&v, dense.weight, (rows, k, c), r0, o), v.get(4), v.get(5), norm.eps)?,
            out_dims(x, c),
            x.device(),
        ))?,
        DType::F64 => t.dispatch::<f64>(|v| Tensor::from_vec(
            residual_norm_blocks(rows, c, |r0, o| linear_block(&v, dense.weight, (rows, k, c), r0, o), v.get(4), v.get(5), norm.eps)?,
            out_dims(x, c),
            x.device(),
        ))?,
        dt => bail!("linear_residual_norm: unsupported dtype {dt:?}"),
    };
    Ok(out)
}

/// The slow twin of [`linear_residual_norm`] from primitive ops.
///
/// # Shapes
/// Same as [`linear_residual_norm`].
///
/// Errors for a packed weight (it has no f32 values for the primitive ops).
pub fn linear_residual_norm_reference(x: &Tensor, dense: Dense, residual: &Tensor, norm: Norm) -> Result<Tensor> {
    let y = linear_reference(x, reference_weight(dense)?, dense.bias, Activation::Identity, None)?;
    layer_norm_reference(&(residual + y)?, norm)
}

/// `LayerNorm(x + linear2(relu(linear1(x))))`, fast on the CPU.
///
/// # Shapes
/// - `x`: `[..., C]`; `linear1.weight`: `[F, C]`; `linear2.weight`: `[C, F]`
/// - returns `[..., C]`
///
/// Differentiable: with a gradient-tracking input it runs [`ffn_residual_norm_reference`].
pub fn ffn_residual_norm(x: &Tensor, linear1: Dense, linear2: Dense, norm: Norm) -> Result<Tensor> {
    let (rows, c, f) = check_dense("ffn_residual_norm", x, linear1)?;
    let (f2, c2) = linear2.weight.dims2()?;
    if (f2, c2) != (c, f) {
        bail!("ffn_residual_norm: linear2 weight [{f2}, {c2}] must be [{c}, {f}]");
    }
    if linear2.bias.is_some_and(|b| b.dims() != [c]) {
        bail!("ffn_residual_norm: linear2 bias must be [{c}]");
    }
    check_norm("ffn_residual_norm", norm, c)?;
    let all = [Some(x), linear1.weight.tensor(), linear1.bias, linear2.weight.tensor(), linear2.bias, Some(norm.weight), norm.bias];
    let packed = linear1.weight.packed().is_some() || linear2.weight.packed().is_some();
    if !fast_path(&all) || (packed && x.dtype() != DType::F32) {
        return ffn_residual_norm_reference(x, linear1, linear2, norm);
    }
    let t = Contig::new(&all)?;
    let out = match x.dtype() {
        DType::F32 => t.dispatch::<f32>(|v| Tensor::from_vec(
            residual_norm_blocks(rows, c, |r0, o| ffn_block(&v, (linear1.weight, linear2.weight), (rows, c, f), r0, o), v.get(5), v.get(6), norm.eps)?,
            x.dims(),
            x.device(),
        ))?,
        DType::F64 => t.dispatch::<f64>(|v| Tensor::from_vec(
            residual_norm_blocks(rows, c, |r0, o| ffn_block(&v, (linear1.weight, linear2.weight), (rows, c, f), r0, o), v.get(5), v.get(6), norm.eps)?,
            x.dims(),
            x.device(),
        ))?,
        dt => bail!("ffn_residual_norm: unsupported dtype {dt:?}"),
    };
    Ok(out)
}

/// The slow twin of [`ffn_residual_norm`] from primitive ops.
///
/// # Shapes
/// Same as [`ffn_residual_norm`].
///
/// Errors for a packed weight (it has no f32 values for the primitive ops).
pub fn ffn_residual_norm_reference(x: &Tensor, linear1: Dense, linear2: Dense, norm: Norm) -> Result<Tensor> {
    let h = linear_reference(x, reference_weight(linear1)?, linear1.bias, Activation::Identity, None)?.relu()?;
    let y = linear_reference(&h, reference_weight(linear2)?, linear2.bias, Activation::Identity, None)?;
    layer_norm_reference(&(x + y)?, norm)
}

/// The weight tensor of a dense layer for the primitive ops.
fn reference_weight(dense: Dense<'_>) -> Result<&Tensor> {
    match dense.weight {
        DenseWeight::F32(w) => Ok(w),
        DenseWeight::Bf16(_) => bail!("post-norm block: a bf16 packed weight takes f32 CPU inputs that track no gradient"),
    }
}

/// `nn.LayerNorm` over the last axis from primitive ops (two-pass mean and variance).
fn layer_norm_reference(x: &Tensor, norm: Norm) -> Result<Tensor> {
    let d = candle_core::D::Minus1;
    let centred = x.broadcast_sub(&x.mean_keepdim(d)?)?;
    let var = centred.sqr()?.mean_keepdim(d)?;
    let y = centred.broadcast_div(&(var + norm.eps)?.sqrt()?)?.broadcast_mul(norm.weight)?;
    match norm.bias {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

/// `x.dims()` with the last axis replaced by `n`.
fn out_dims(x: &Tensor, n: usize) -> Vec<usize> {
    let mut d = x.dims().to_vec();
    if let Some(last) = d.last_mut() {
        *last = n;
    }
    d
}

/// `(rows, K, N)` of a dense layer applied to `x`, after checking the shapes.
fn check_dense(op: &str, x: &Tensor, dense: Dense) -> Result<(usize, usize, usize)> {
    let (n, k) = dense.weight.dims2()?;
    let dims = x.dims();
    if dims.is_empty() || dims[dims.len() - 1] != k {
        bail!("{op}: input {dims:?} does not end in the weight's {k} input features ([{n}, {k}])");
    }
    if dense.bias.is_some_and(|b| b.dims() != [n]) {
        bail!("{op}: bias {:?} must be [{n}]", dense.bias.map(|b| b.dims().to_vec()));
    }
    Ok((x.elem_count() / k.max(1), k, n))
}

fn check_norm(op: &str, norm: Norm, c: usize) -> Result<()> {
    if norm.weight.dims() != [c] || norm.bias.is_some_and(|b| b.dims() != [c]) {
        bail!("{op}: norm weight {:?} and bias must be [{c}]", norm.weight.dims());
    }
    Ok(())
}

/// Whether the fused CPU path applies: every present input on the CPU, f32 or f64 alike, and
/// none tracking a gradient.
fn fast_path(all: &[Option<&Tensor>]) -> bool {
    let Some(Some(first)) = all.first() else { return false };
    let dt = first.dtype();
    matches!(dt, DType::F32 | DType::F64)
        && all.iter().flatten().all(|t| t.device().is_cpu() && t.dtype() == dt && !t.track_op())
}

/// Contiguous copies (where needed) of the inputs, held while their data is borrowed.
struct Contig {
    tensors: Vec<Option<Tensor>>,
}

/// The borrowed data of every input; `get(i)` is `None` for an absent optional input.
struct Views<'a, T> {
    slices: Vec<Option<&'a [T]>>,
}

impl<'a, T> Views<'a, T> {
    fn get(&self, i: usize) -> Option<&'a [T]> {
        self.slices.get(i).copied().flatten()
    }
}

impl Contig {
    fn new(all: &[Option<&Tensor>]) -> Result<Self> {
        let tensors = all.iter().map(|t| t.map(|t| t.contiguous()).transpose()).collect::<Result<Vec<_>>>()?;
        Ok(Self { tensors })
    }

    /// Calls `f` with the inputs' data as `&[T]`.
    fn dispatch<T: WithDType>(&self, f: impl FnOnce(Views<T>) -> Result<Tensor>) -> Result<Tensor> {
        let guards: Vec<Option<(StorageRef<'_>, usize, usize)>> = self
            .tensors
            .iter()
            .map(|t| {
                t.as_ref()
                    .map(|t| {
                        let (s, l) = t.storage_and_layout();
                        match l.contiguous_offsets() {
                            Some((a, b)) => Ok((s, a, b)),
                            None => bail!("post-norm block: an input is not contiguous"),
                        }
                    })
                    .transpose()
            })
            .collect::<Result<_>>()?;
        let slices = guards
            .iter()
            .map(|g| {
                g.as_ref()
                    .map(|(s, a, b)| match &**s {
                        Storage::Cpu(cpu) => Ok(&T::cpu_storage_as_slice(cpu)?[*a..*b]),
                        _ => bail!("post-norm block: an input is not on the CPU"),
                    })
                    .transpose()
            })
            .collect::<Result<_>>()?;
        f(Views { slices })
    }
}

/// Runs `fill(first_row, block)` on blocks of rows of a `[rows, c]` output in parallel (each
/// writes the pre-norm values of its rows), then normalises each row in place.
fn residual_norm_blocks<T: WithDType>(
    rows: usize,
    c: usize,
    fill: impl Fn(usize, &mut [T]) -> Result<()> + Sync,
    weight: Option<&[T]>,
    bias: Option<&[T]>,
    eps: f64,
) -> Result<Vec<T>> {
    let Some(weight) = weight else { bail!("post-norm block: missing norm weight") };
    if rows == 0 || c == 0 {
        return Ok(Vec::new());
    }
    let threads = rayon::current_num_threads().max(1);
    // two blocks per thread at least, at most ~512 rows each (the hidden block stays in cache)
    let blocks = (2 * threads).max(rows.div_ceil(512)).min(rows.max(1));
    let block_rows = rows.div_ceil(blocks).max(1);
    let mut out = vec![T::from_f64(0.0); rows * c];
    out.par_chunks_mut(block_rows * c).enumerate().try_for_each(|(i, o)| -> Result<()> {
        fill(i * block_rows, o)?;
        for row in o.chunks_exact_mut(c) {
            layer_norm_row(row, weight, bias, eps);
        }
        Ok(())
    })?;
    Ok(out)
}

/// The weight of a dense layer for the blocks: its values (view `i`) or the packed weight.
fn block_weight<'a, T>(v: &Views<'a, T>, i: usize, w: DenseWeight<'a>) -> Option<BlockWeight<'a, T>> {
    match w {
        DenseWeight::F32(_) => v.get(i).map(BlockWeight::Values),
        DenseWeight::Bf16(p) => Some(BlockWeight::Packed(p)),
    }
}

/// `o += lhs·Wᵀ` (`o`: `[lhs.rows, N]` row-major) with a weight `[N, K]`: the linear product of
/// the current precision on values, the bf16 product on a packed weight.
fn dense_product<T: WithDType>(o: &mut [T], n: usize, lhs: MatRef<T>, w: BlockWeight<T>) -> Result<()> {
    match w {
        BlockWeight::Values(w) => cpu_gemm::matmul_serial_linear(o, n, lhs, MatRef { data: w, rows: lhs.cols, cols: n, rs: 1, cs: lhs.cols }, true),
        BlockWeight::Packed(w) => cpu_gemm::matmul_serial_prepacked(o, n, lhs, w, true),
    }
}

/// Rows `r0..` of `residual + x·Wᵀ + b` (inputs: x, W, b, residual).
fn linear_block<T: WithDType>(v: &Views<T>, weight: DenseWeight, (_, k, c): (usize, usize, usize), r0: usize, o: &mut [T]) -> Result<()> {
    let (Some(x), Some(w), Some(res)) = (v.get(0), block_weight(v, 1, weight), v.get(3)) else {
        bail!("linear_residual_norm: missing input")
    };
    let r = o.len() / c;
    prefill(o, &res[r0 * c..(r0 + r) * c], v.get(2), c);
    dense_product(o, c, MatRef { data: &x[r0 * k..(r0 + r) * k], rows: r, cols: k, rs: k, cs: 1 }, w)
}

/// Rows `r0..` of `x + linear2(relu(linear1(x)))` (inputs: x, W1, b1, W2, b2).
fn ffn_block<T: WithDType>(v: &Views<T>, (w1, w2): (DenseWeight, DenseWeight), (_, c, f): (usize, usize, usize), r0: usize, o: &mut [T]) -> Result<()> {
    let (Some(x), Some(w1), Some(w2)) = (v.get(0), block_weight(v, 1, w1), block_weight(v, 3, w2)) else {
        bail!("ffn_residual_norm: missing input")
    };
    let r = o.len() / c;
    let xs = &x[r0 * c..(r0 + r) * c];
    let mut hidden = vec![T::from_f64(0.0); r * f];
    if let Some(b1) = v.get(2) {
        for row in hidden.chunks_exact_mut(f) {
            row.copy_from_slice(b1);
        }
    }
    dense_product(&mut hidden, f, MatRef { data: xs, rows: r, cols: c, rs: c, cs: 1 }, w1)?;
    relu_in_place(&mut hidden);
    prefill(o, xs, v.get(4), c);
    dense_product(o, c, MatRef { data: &hidden, rows: r, cols: f, rs: f, cs: 1 }, w2)
}

/// `o = residual + bias` (row-wise broadcast of the bias).
fn prefill<T: WithDType>(o: &mut [T], residual: &[T], bias: Option<&[T]>, c: usize) {
    match bias {
        Some(b) => {
            for (orow, rrow) in o.chunks_exact_mut(c).zip(residual.chunks_exact(c)) {
                for ((d, &r), &bb) in orow.iter_mut().zip(rrow).zip(b) {
                    *d = r + bb;
                }
            }
        }
        None => o.copy_from_slice(residual),
    }
}

crate::with_avx2!(fn relu_in_place<T: WithDType>(xs: &mut [T]) => relu_body);

#[inline(always)]
fn relu_body<T: WithDType>(xs: &mut [T]) {
    let zero = T::from_f64(0.0);
    for v in xs.iter_mut() {
        // a select, not a branch, so that the loop vectorises; NaN stays NaN, like torch.relu
        *v = if *v < zero { zero } else { *v };
    }
}

crate::with_avx2!(fn layer_norm_row<T: WithDType>(row: &mut [T], weight: &[T], bias: Option<&[T]>, eps: f64) => layer_norm_row_body);

/// `(x − mean)/√(var + ε)·w + b` over one row, in place.
#[inline(always)]
fn layer_norm_row_body<T: WithDType>(row: &mut [T], weight: &[T], bias: Option<&[T]>, eps: f64) {
    let n = row.len() as f64;
    let mean = lane_sum(row, |v| v) / n;
    let mean_t = T::from_f64(mean);
    let var = lane_sum(row, |v| (v - mean_t) * (v - mean_t)) / n;
    let rstd = T::from_f64(1.0 / (var + eps).sqrt());
    match bias {
        Some(b) => {
            for ((x, &w), &bb) in row.iter_mut().zip(weight).zip(b) {
                *x = (*x - mean_t) * rstd * w + bb;
            }
        }
        None => {
            for (x, &w) in row.iter_mut().zip(weight) {
                *x = (*x - mean_t) * rstd * w;
            }
        }
    }
}

/// Σ `f(v)` over a row: 8 lanes in `T`, added in f64.
#[inline(always)]
fn lane_sum<T: WithDType>(xs: &[T], f: impl Fn(T) -> T) -> f64 {
    let zero = T::from_f64(0.0);
    let mut acc = [zero; 8];
    let it = xs.chunks_exact(8);
    let tail = it.remainder().iter().fold(0f64, |s, &v| s + f(v).to_f64());
    for block in it {
        for k in 0..8 {
            acc[k] += f(block[k]);
        }
    }
    acc.iter().fold(tail, |s, &v| s + v.to_f64())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
    }

    #[test]
    fn fast_matches_reference() {
        let dev = Device::Cpu;
        // (leading dims, C, F): odd sizes, fewer rows than threads·2, and DeRIS-like blocks
        for (lead, c, f) in [(vec![1usize, 3], 5usize, 7usize), (vec![2, 37], 16, 40), (vec![1, 1100], 32, 128)] {
            for dtype in [DType::F32, DType::F64] {
                let r = |dims: Vec<usize>, s: f32| Tensor::randn(0f32, s, dims, &dev).unwrap().to_dtype(dtype).unwrap();
                let mut xd = lead.clone();
                xd.push(c);
                let x = r(xd.clone(), 1.0);
                let res = r(xd.clone(), 1.0);
                let xf = r([lead.clone(), vec![f]].concat(), 1.0);
                let (w, b) = (r(vec![c, c], 0.3), r(vec![c], 0.3));
                let (w1, b1, w2, b2) = (r(vec![f, c], 0.3), r(vec![f], 0.3), r(vec![c, f], 0.3), r(vec![c], 0.3));
                let (wf, bf) = (r(vec![c, f], 0.3), r(vec![c], 0.3));
                let (g, beta) = ((r(vec![c], 0.2) + 1.0).unwrap(), r(vec![c], 0.2));
                let norm = Norm { weight: &g, bias: Some(&beta), eps: 1e-5 };
                let tol = if dtype == DType::F32 { 1e-5 } else { 1e-12 };
                for bias in [Some(&b), None] {
                    let d = Dense { weight: (&w).into(), bias };
                    let fast = linear_residual_norm(&x, d, &res, norm).unwrap();
                    let slow = linear_residual_norm_reference(&x, d, &res, norm).unwrap();
                    assert_eq!(fast.dims(), x.dims());
                    let e = max_diff(&fast, &slow);
                    assert!(e <= tol, "linear_residual_norm {lead:?} {c} {dtype:?}: {e:e}");
                }
                // a projection from another width (the residual has the output's shape)
                let d = Dense { weight: (&wf).into(), bias: Some(&bf) };
                let e = max_diff(&linear_residual_norm(&xf, d, &res, norm).unwrap(), &linear_residual_norm_reference(&xf, d, &res, norm).unwrap());
                assert!(e <= tol, "linear_residual_norm from {f} {dtype:?}: {e:e}");
                let (l1, l2) = (Dense { weight: (&w1).into(), bias: Some(&b1) }, Dense { weight: (&w2).into(), bias: Some(&b2) });
                let fast = ffn_residual_norm(&x, l1, l2, norm).unwrap();
                let slow = ffn_residual_norm_reference(&x, l1, l2, norm).unwrap();
                let e = max_diff(&fast, &slow);
                assert!(e <= tol, "ffn_residual_norm {lead:?} {c} {f} {dtype:?}: {e:e}");
            }
        }
    }

    /// The row blocks depend on the total row count, but a row's result does not: an image
    /// gets the same bits alone and in a batch.
    #[test]
    fn rows_do_not_depend_on_batch_mates() {
        let dev = Device::Cpu;
        let r = |dims: Vec<usize>, s: f32| Tensor::randn(0f32, s, dims, &dev).unwrap();
        let (x, mates) = (r(vec![1, 300, 64], 1.0), r(vec![2, 300, 64], 1.0));
        let batch = Tensor::cat(&[&x, &mates], 0).unwrap();
        let (w1, b1, w2, b2) = (r(vec![256, 64], 0.1), r(vec![256], 0.1), r(vec![64, 256], 0.1), r(vec![64], 0.1));
        let (g, beta) = ((r(vec![64], 0.2) + 1.0).unwrap(), r(vec![64], 0.2));
        let norm = Norm { weight: &g, bias: Some(&beta), eps: 1e-5 };
        let (l1, l2) = (Dense { weight: (&w1).into(), bias: Some(&b1) }, Dense { weight: (&w2).into(), bias: Some(&b2) });
        let alone = ffn_residual_norm(&x, l1, l2, norm).unwrap();
        let in_batch = ffn_residual_norm(&batch, l1, l2, norm).unwrap().narrow(0, 0, 1).unwrap();
        assert_eq!(max_diff(&alone, &in_batch), 0.0);
        let sq = r(vec![64, 64], 0.1);
        let alone = linear_residual_norm(&x, Dense { weight: (&sq).into(), bias: Some(&b2) }, &x, norm).unwrap();
        let in_batch = linear_residual_norm(&batch, Dense { weight: (&sq).into(), bias: Some(&b2) }, &batch, norm).unwrap();
        assert_eq!(max_diff(&alone, &in_batch.narrow(0, 0, 1).unwrap()), 0.0);
    }
}

