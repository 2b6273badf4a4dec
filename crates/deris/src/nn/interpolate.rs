//! Bilinear resizing with PyTorch's `F.interpolate(mode="bilinear")` semantics, expressed as two
//! matrix products (`Wy · X · Wxᵀ`) so that it runs on any device and has a gradient.
//!
//! Each output sample is `(1−λ)·v[i0] + λ·v[i1]` per axis, with PyTorch's f32 source-index rule;
//! the other weights in a row are exact zeros, so the products add nothing but rounding-free 0s.

use candle_core::{Device, Result, Tensor};

/// The `[out, in]` interpolation matrix of one axis.
///
/// `align_corners=false`: `src = max(0, (dst + 0.5)·(in/out) − 0.5)`;
/// `align_corners=true`: `src = dst·(in−1)/(out−1)`. Scales are f32 like PyTorch's CPU kernel.
pub fn bilinear_weights(input: usize, output: usize, align_corners: bool, device: &Device) -> Result<Tensor> {
    let mut w = vec![0f32; output * input];
    let scale = if align_corners {
        if output > 1 {
            (input as f32 - 1.0) / (output as f32 - 1.0)
        } else {
            0.0
        }
    } else {
        input as f32 / output as f32
    };
    for d in 0..output {
        let src = if align_corners {
            scale * d as f32
        } else {
            (scale * (d as f32 + 0.5) - 0.5).max(0.0)
        };
        let i0 = (src as usize).min(input - 1);
        let i1 = if i0 + 1 < input { i0 + 1 } else { i0 };
        let l1 = src - i0 as f32;
        let l0 = 1.0 - l1;
        w[d * input + i0] += l0;
        w[d * input + i1] += l1;
    }
    Tensor::from_vec(w, (output, input), device)
}

/// Resizes the last two axes of `x` (`[..., H, W]`) to `(h, w)` bilinearly.
pub fn resize_bilinear(x: &Tensor, h: usize, w: usize, align_corners: bool) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let n = dims.len();
    let (ih, iw) = (dims[n - 2], dims[n - 1]);
    if (ih, iw) == (h, w) {
        return Ok(x.clone());
    }
    let lead: usize = dims[..n - 2].iter().product();
    let x3 = x.reshape((lead, ih, iw))?;
    let wx = bilinear_weights(iw, w, align_corners, x.device())?.t()?; // [iw, w]
    let wy = bilinear_weights(ih, h, align_corners, x.device())?; // [h, ih]
    let t = x3.broadcast_matmul(&wx)?; // [lead, ih, w]
    let out = wy.broadcast_left(lead)?.matmul(&t)?; // [lead, h, w]
    let mut shape = dims[..n - 2].to_vec();
    shape.extend([h, w]);
    out.reshape(shape)
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
    fn resize_keeps_constant_maps() {
        let x = Tensor::full(3f32, (2, 1, 5, 7), &Device::Cpu).unwrap();
        let y = resize_bilinear(&x, 9, 4, false).unwrap();
        assert_eq!(y.dims(), &[2, 1, 9, 4]);
        let v = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(v.iter().all(|&a| (a - 3.0).abs() < 1e-6));
    }
}
