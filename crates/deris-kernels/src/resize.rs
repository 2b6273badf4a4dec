//! Bilinear resizing with PyTorch's `F.interpolate(mode="bilinear")` semantics.
//!
//! Each output sample blends two source samples per axis, `(1−λ)·v[i0] + λ·v[i1]`, with
//! PyTorch's f32 source-index rule ([`bilinear_weights`]). The fast path evaluates exactly that
//! per plane: every source row is first blended along the width, then each output row blends two
//! of those rows, `l0·(w0·v00 + w1·v01) + l1·(w0·v10 + w1·v11)` as PyTorch's CPU kernel does.
//! [`resize_bilinear_reference`] multiplies by the two dense interpolation matrices instead
//! (`Wy · X · Wxᵀ`), which runs on any device and has candle's gradients.
//!
//! [`resize_bilinear`] takes the fast path on the CPU for f32/f64, with its transpose as the
//! backward when the input tracks a gradient, and the reference on other devices.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, DType, Device, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

/// One output index along an axis: the two source indices and their weights.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Tap {
    i0: usize,
    i1: usize,
    l0: f32,
    l1: f32,
}

/// The taps of one axis, `input → output` samples.
///
/// `align_corners=false`: `src = max(0, (dst + 0.5)·(in/out) − 0.5)`;
/// `align_corners=true`: `src = dst·(in−1)/(out−1)`. Scales are f32 like PyTorch's CPU kernel;
/// `i1 = i0 + 1`, clamped to the last sample.
fn taps(input: usize, output: usize, align_corners: bool) -> Vec<Tap> {
    let scale = if align_corners {
        if output > 1 {
            (input as f32 - 1.0) / (output as f32 - 1.0)
        } else {
            0.0
        }
    } else {
        input as f32 / output as f32
    };
    (0..output)
        .map(|d| {
            let src = if align_corners { scale * d as f32 } else { (scale * (d as f32 + 0.5) - 0.5).max(0.0) };
            let i0 = (src as usize).min(input - 1);
            let i1 = if i0 + 1 < input { i0 + 1 } else { i0 };
            let l1 = src - i0 as f32;
            Tap { i0, i1, l0: 1.0 - l1, l1 }
        })
        .collect()
}

/// The `[output, input]` interpolation matrix of one axis (row `d` holds the two weights of
/// output `d`; they add up where both taps are the same sample).
pub fn bilinear_weights(input: usize, output: usize, align_corners: bool, device: &Device) -> Result<Tensor> {
    if input == 0 || output == 0 {
        bail!("bilinear_weights: empty axis ({input} → {output})");
    }
    let mut w = vec![0f32; output * input];
    for (d, t) in taps(input, output, align_corners).into_iter().enumerate() {
        w[d * input + t.i0] += t.l0;
        w[d * input + t.i1] += t.l1;
    }
    Tensor::from_vec(w, (output, input), device)
}

/// Checks `x` (`[..., H, W]`) and returns `(planes, H, W)`.
fn check(x: &Tensor, h: usize, w: usize) -> Result<(usize, usize, usize)> {
    let dims = x.dims();
    let n = dims.len();
    if n < 2 || dims[n - 2] == 0 || dims[n - 1] == 0 || h == 0 || w == 0 {
        bail!("resize_bilinear: cannot resize {dims:?} to {h}×{w}");
    }
    Ok((dims[..n - 2].iter().product(), dims[n - 2], dims[n - 1]))
}

fn out_shape(x: &Tensor, h: usize, w: usize) -> Vec<usize> {
    let dims = x.dims();
    let mut shape = dims[..dims.len() - 2].to_vec();
    shape.extend([h, w]);
    shape
}

/// Resizes the last two axes of `x` to `(h, w)` bilinearly (`F.interpolate(x, (h, w),
/// mode="bilinear", align_corners=…)`), fast on the CPU.
///
/// # Shapes
/// - `x`: `[..., H, W]` → `[..., h, w]`
///
/// Differentiable: the backward is the transposed map (each output gradient goes back to the
/// four source samples with the forward's weights).
pub fn resize_bilinear(x: &Tensor, h: usize, w: usize, align_corners: bool) -> Result<Tensor> {
    let (planes, ih, iw) = check(x, h, w)?;
    if (ih, iw) == (h, w) {
        return Ok(x.clone());
    }
    if !x.device().is_cpu() || !matches!(x.dtype(), DType::F32 | DType::F64) {
        return resize_bilinear_reference(x, h, w, align_corners);
    }
    let op = Resize { planes, ih, iw, ys: taps(ih, h, align_corners), xs: taps(iw, w, align_corners) };
    let y = if x.track_op() { x.contiguous()?.apply_op1(op)? } else { x.contiguous()?.apply_op1_no_bwd(&op)? };
    y.reshape(out_shape(x, h, w))
}

/// The slow twin of [`resize_bilinear`]: two products with the dense interpolation matrices
/// (any device, candle's gradients).
///
/// # Shapes
/// Same as [`resize_bilinear`].
pub fn resize_bilinear_reference(x: &Tensor, h: usize, w: usize, align_corners: bool) -> Result<Tensor> {
    let (planes, ih, iw) = check(x, h, w)?;
    if (ih, iw) == (h, w) {
        return Ok(x.clone());
    }
    let x3 = x.reshape((planes, ih, iw))?;
    let wx = bilinear_weights(iw, w, align_corners, x.device())?.to_dtype(x.dtype())?.t()?; // [iw, w]
    let wy = bilinear_weights(ih, h, align_corners, x.device())?.to_dtype(x.dtype())?; // [h, ih]
    let t = x3.broadcast_matmul(&wx)?; // [planes, ih, w]
    let out = wy.broadcast_left(planes)?.matmul(&t)?; // [planes, h, w]
    out.reshape(out_shape(x, h, w))
}

struct Resize {
    planes: usize,
    ih: usize,
    iw: usize,
    ys: Vec<Tap>,
    xs: Vec<Tap>,
}

impl CustomOp1 for Resize {
    fn name(&self) -> &'static str {
        "resize-bilinear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let len = self.planes * self.ih * self.iw;
        let (a, b) = match l.contiguous_offsets() {
            Some((a, b)) if b - a == len => (a, b),
            _ => bail!("resize_bilinear: input {:?} is not contiguous", l.dims()),
        };
        let out = match s.dtype() {
            DType::F32 => CpuStorage::F32(self.forward::<f32>(&f32::cpu_storage_as_slice(s)?[a..b])),
            DType::F64 => CpuStorage::F64(self.forward::<f64>(&f64::cpu_storage_as_slice(s)?[a..b])),
            dt => bail!("resize_bilinear: unsupported dtype {dt:?}"),
        };
        Ok((out, Shape::from((self.planes, self.ys.len(), self.xs.len()))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        use crate::autograd::read;
        if !arg.track_op() {
            return Ok(None);
        }
        let dev = Device::Cpu;
        let dx = match grad.dtype() {
            DType::F32 => read::<f32, _>(grad, |g| Tensor::from_vec(self.transpose(g), arg.shape(), &dev))?,
            DType::F64 => read::<f64, _>(grad, |g| Tensor::from_vec(self.transpose(g), arg.shape(), &dev))?,
            dt => bail!("resize_bilinear backward: unsupported dtype {dt:?}"),
        };
        Ok(Some(dx))
    }
}

impl Resize {
    fn forward<T: WithDType>(&self, x: &[T]) -> Vec<T> {
        let (h, w) = (self.ys.len(), self.xs.len());
        let mut out = vec![T::from_f64(0.0); self.planes * h * w];
        out.par_chunks_mut(h * w).zip(x.par_chunks(self.ih * self.iw)).for_each(|(dst, src)| {
            resize_plane(src, dst, self.iw, &self.ys, &self.xs);
        });
        out
    }

    /// The transposed map: every output gradient scattered to its four source samples.
    fn transpose<T: WithDType>(&self, g: &[T]) -> Vec<T> {
        let (h, w) = (self.ys.len(), self.xs.len());
        let mut out = vec![T::from_f64(0.0); self.planes * self.ih * self.iw];
        out.par_chunks_mut(self.ih * self.iw).zip(g.par_chunks(h * w)).for_each(|(dst, src)| {
            resize_plane_transpose(src, dst, self.iw, &self.ys, &self.xs);
        });
        out
    }
}

/// [`resize_plane_body`] transposed: the height blend scattered into `ih` rows of width `w`,
/// then the width blend scattered into the source row.
fn resize_plane_transpose<T: WithDType>(g: &[T], dst: &mut [T], iw: usize, ys: &[Tap], xs: &[Tap]) {
    let w = xs.len();
    let ih = dst.len() / iw;
    let mut rows = vec![T::from_f64(0.0); ih * w];
    for (gr, t) in g.chunks_exact(w).zip(ys) {
        let (l0, l1) = (T::from_f64(t.l0 as f64), T::from_f64(t.l1 as f64));
        for (j, &v) in gr.iter().enumerate() {
            rows[t.i0 * w + j] += l0 * v;
            rows[t.i1 * w + j] += l1 * v;
        }
    }
    for (row, d) in rows.chunks_exact(w).zip(dst.chunks_exact_mut(iw)) {
        for (&v, t) in row.iter().zip(xs) {
            d[t.i0] += T::from_f64(t.l0 as f64) * v;
            d[t.i1] += T::from_f64(t.l1 as f64) * v;
        }
    }
}

crate::with_avx2!(fn resize_plane<T: WithDType>(src: &[T], dst: &mut [T], iw: usize, ys: &[Tap], xs: &[Tap]) => resize_plane_body);

/// One plane: the width blend of every source row any output row reads, then the height blend.
#[inline(always)]
fn resize_plane_body<T: WithDType>(src: &[T], dst: &mut [T], iw: usize, ys: &[Tap], xs: &[Tap]) {
    let w = xs.len();
    let ih = src.len() / iw;
    let xw: Vec<(usize, usize, T, T)> = xs.iter().map(|t| (t.i0, t.i1, T::from_f64(t.l0 as f64), T::from_f64(t.l1 as f64))).collect();
    let mut used = vec![false; ih];
    for t in ys {
        used[t.i0] = true;
        used[t.i1] = true;
    }
    let mut rows = vec![T::from_f64(0.0); ih * w];
    for (r, row) in rows.chunks_exact_mut(w).enumerate().filter(|(r, _)| used[*r]) {
        let s = &src[r * iw..(r + 1) * iw];
        for (o, &(i0, i1, l0, l1)) in row.iter_mut().zip(&xw) {
            *o = l0 * s[i0] + l1 * s[i1];
        }
    }
    for (d, t) in dst.chunks_exact_mut(w).zip(ys) {
        let (l0, l1) = (T::from_f64(t.l0 as f64), T::from_f64(t.l1 as f64));
        let (r0, r1) = (&rows[t.i0 * w..(t.i0 + 1) * w], &rows[t.i1 * w..(t.i1 + 1) * w]);
        for ((o, &a), &b) in d.iter_mut().zip(r0).zip(r1) {
            *o = l0 * a + l1 * b;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_rows_follow_torch_rule() {
        // 96 -> 12, align_corners=false: sample at 8i+3.5 -> mean of pixels 8i+3, 8i+4.
        let w = bilinear_weights(96, 12, false, &Device::Cpu).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(w[1][11], 0.5);
        assert_eq!(w[1][12], 0.5);
        // upsampling clamps to the last pixel
        let w = bilinear_weights(2, 4, false, &Device::Cpu).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(w[0], vec![1.0, 0.0]);
        assert_eq!(w[3], vec![0.0, 1.0]);
        // align_corners=true hits both corners exactly
        let w = bilinear_weights(3, 5, true, &Device::Cpu).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(w[0], vec![1.0, 0.0, 0.0]);
        assert_eq!(w[2], vec![0.0, 1.0, 0.0]);
        assert_eq!(w[4], vec![0.0, 0.0, 1.0]);
    }

    #[test]
    fn fast_matches_reference() {
        let dev = Device::Cpu;
        // (input dims, h, w, align_corners): up, down, mixed, one-pixel axes, identity
        let cases: [(&[usize], usize, usize, bool); 7] = [
            (&[2, 3, 12, 12], 48, 48, false),
            (&[1, 5, 96, 96], 12, 24, false),
            (&[1, 4, 24, 24], 96, 96, true),
            (&[3, 7, 5], 9, 4, false),
            (&[2, 1, 5], 3, 8, true),
            (&[1, 2, 4, 4], 1, 1, true),
            (&[1, 2, 4, 4], 4, 4, false),
        ];
        for (dims, h, w, ac) in cases {
            for dtype in [DType::F32, DType::F64] {
                let x = Tensor::randn(0f32, 1., dims, &dev).unwrap().to_dtype(dtype).unwrap();
                let fast = resize_bilinear(&x, h, w, ac).unwrap();
                let slow = resize_bilinear_reference(&x, h, w, ac).unwrap();
                assert_eq!(fast.dims(), slow.dims());
                let d = (&fast - &slow).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap();
                let d = d.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap();
                let tol = if dtype == DType::F32 { 1e-6 } else { 1e-14 };
                assert!(d <= tol, "{dims:?} → {h}×{w} (align_corners {ac}) {dtype:?}: max |fast − reference| = {d:e}");
            }
        }
    }

    #[test]
    fn constant_maps_stay_constant() {
        let x = Tensor::full(3f32, (2, 1, 5, 7), &Device::Cpu).unwrap();
        let y = resize_bilinear(&x, 9, 4, false).unwrap();
        assert_eq!(y.dims(), &[2, 1, 9, 4]);
        let v = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(v.iter().all(|&a| (a - 3.0).abs() < 1e-6));
    }
}
