//! `nn.Linear` with its bias (and an optional ReLU) in one product: the output rows are
//! pre-filled with the bias and the GEMM accumulates `x · Wᵀ` into them, reading `W` in place
//! (no transposed copy); the ReLU then runs in place on the fresh output.
//!
//! [`linear`] takes this path on the CPU for f32/f64 when no input tracks a gradient, and
//! otherwise [`linear_reference`] (candle's matmul, broadcast add and relu, with gradients, any
//! device).

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

use crate::cpu_gemm::{self, MatRef};

/// `F.linear(x, weight, bias)`, then `relu` if asked, fast on the CPU.
///
/// # Shapes
/// - `x`: `[..., K]`; `weight`: `[N, K]`; `bias`: `[N]`
/// - returns `[..., N]`
///
/// Differentiable: with a gradient-tracking input it runs [`linear_reference`].
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, relu: bool) -> Result<Tensor> {
    let (rows, k, n) = check(x, weight, bias)?;
    let tracked = x.track_op() || weight.track_op() || bias.is_some_and(|b| b.track_op());
    let same_dtype = weight.dtype() == x.dtype() && bias.is_none_or(|b| b.dtype() == x.dtype());
    if tracked || !x.device().is_cpu() || !matches!(x.dtype(), DType::F32 | DType::F64) || !same_dtype {
        return linear_reference(x, weight, bias, relu);
    }
    let bias = match bias {
        Some(b) => b.contiguous()?,
        None => Tensor::zeros(n, x.dtype(), x.device())?,
    };
    let mut out_dims = x.dims().to_vec();
    if let Some(last) = out_dims.last_mut() {
        *last = n;
    }
    let y = x.contiguous()?.apply_op3_no_bwd(&weight.contiguous()?, &bias, &LinearOp { rows, k, n, relu })?;
    y.reshape(out_dims)
}

/// The slow twin of [`linear`]: `x · Wᵀ + b` (and `relu`) from candle's primitive ops.
///
/// # Shapes
/// Same as [`linear`].
pub fn linear_reference(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, relu: bool) -> Result<Tensor> {
    let y = x.broadcast_matmul(&weight.t()?)?;
    let y = match bias {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    };
    if relu {
        y.relu()
    } else {
        Ok(y)
    }
}

/// `(rows, K, N)`: the leading axes of `x` flattened, after checking the shapes.
fn check(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<(usize, usize, usize)> {
    let (n, k) = weight.dims2()?;
    let dims = x.dims();
    if dims.is_empty() || dims[dims.len() - 1] != k {
        bail!("linear: input {dims:?} does not end in the weight's {k} input features ({:?})", weight.dims());
    }
    if let Some(b) = bias {
        if b.dims() != [n] {
            bail!("linear: bias {:?} must be [{n}]", b.dims());
        }
    }
    Ok((x.elem_count() / k.max(1), k, n))
}

struct LinearOp {
    rows: usize,
    k: usize,
    n: usize,
    relu: bool,
}

fn slice<'a, T: WithDType>(what: &str, s: &'a CpuStorage, l: &Layout, len: usize) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) if b - a == len => Ok(&T::cpu_storage_as_slice(s)?[a..b]),
        _ => bail!("linear: {what} {:?} is not a contiguous block of {len} elements", l.dims()),
    }
}

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "linear-bias"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (rows, k, n) = (self.rows, self.k, self.n);
        let out = match sx.dtype() {
            DType::F32 => CpuStorage::F32(self.forward::<f32>(
                slice("input", sx, lx, rows * k)?,
                slice("weight", sw, lw, n * k)?,
                slice("bias", sb, lb, n)?,
            )?),
            DType::F64 => CpuStorage::F64(self.forward::<f64>(
                slice("input", sx, lx, rows * k)?,
                slice("weight", sw, lw, n * k)?,
                slice("bias", sb, lb, n)?,
            )?),
            dt => bail!("linear: unsupported dtype {dt:?}"),
        };
        Ok((out, Shape::from((rows, n))))
    }
}

impl LinearOp {
    fn forward<T: WithDType>(&self, x: &[T], w: &[T], bias: &[T]) -> Result<Vec<T>> {
        let (rows, k, n) = (self.rows, self.k, self.n);
        let mut out = Vec::with_capacity(rows * n);
        for _ in 0..rows {
            out.extend_from_slice(bias);
        }
        let lhs = MatRef { data: x, rows, cols: k, rs: k, cs: 1 };
        // Wᵀ read in place: element (i, j) of the [K, N] matrix is w[j·K + i]
        let rhs = MatRef { data: w, rows: k, cols: n, rs: 1, cs: k };
        cpu_gemm::matmul(&mut out, n, lhs, rhs, true)?;
        if self.relu {
            out.par_chunks_mut(1 << 14).for_each(relu_in_place);
        }
        Ok(out)
    }
}

crate::with_avx2!(pub(crate) fn relu_in_place<T: WithDType>(xs: &mut [T]) => relu_body);

#[inline(always)]
fn relu_body<T: WithDType>(xs: &mut [T]) {
    let zero = T::from_f64(0.0);
    for v in xs.iter_mut() {
        // a select, not a branch, so that the loop vectorises; NaN stays NaN, like torch.relu
        *v = if *v < zero { zero } else { *v };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn fast_matches_reference() {
        let dev = Device::Cpu;
        for dims in [vec![7usize, 5], vec![2, 3, 16], vec![1, 130, 33]] {
            let k = dims[dims.len() - 1];
            for dtype in [DType::F32, DType::F64] {
                let x = Tensor::randn(0f32, 1., dims.as_slice(), &dev).unwrap().to_dtype(dtype).unwrap();
                let w = Tensor::randn(0f32, 1., (9, k), &dev).unwrap().to_dtype(dtype).unwrap();
                let b = Tensor::randn(0f32, 1., 9, &dev).unwrap().to_dtype(dtype).unwrap();
                for (bias, relu) in [(Some(&b), false), (Some(&b), true), (None, false), (None, true)] {
                    let fast = linear(&x, &w, bias, relu).unwrap();
                    let slow = linear_reference(&x, &w, bias, relu).unwrap();
                    assert_eq!(fast.dims(), slow.dims());
                    let d = (&fast - &slow).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap();
                    let d = d.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap();
                    let tol = if dtype == DType::F32 { 1e-5 } else { 1e-12 };
                    assert!(d <= tol * (k as f64).sqrt(), "{dims:?} {dtype:?} relu {relu}: max |fast − reference| = {d:e}");
                }
            }
        }
    }
}

