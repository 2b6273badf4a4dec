//! Position embeddings exactly as the authors' code computes them.

use candle_core::{Device, Result, Tensor};

/// Mask2Former's `PositionEmbeddingSine(num_pos_feats, temperature=10000, normalize=True,
/// scale=2π)` for an `h × w` map with no padding mask.
///
/// Returns `[2·num_pos_feats, h, w]` (no batch axis; the same for every image): channels
/// `0..num_pos_feats` encode y, the rest x; even channels are `sin`, odd are `cos`.
pub fn sine_2d(num_pos_feats: usize, h: usize, w: usize, device: &Device) -> Result<Tensor> {
    let scale = 2.0 * std::f32::consts::PI;
    let eps = 1e-6f32;
    // dim_t[k] = 10000 ** (2·floor(k/2) / num_pos_feats), evaluated in f32 like torch.
    let dim_t: Vec<f32> = (0..num_pos_feats)
        .map(|k| 10000f32.powf(2.0 * (k / 2) as f32 / num_pos_feats as f32))
        .collect();
    let axis = |n: usize| -> Vec<f32> {
        // cumsum of ones = i+1, then (i+1) / (n + eps) * 2π, in f32.
        (0..n).map(|i| (i as f32 + 1.0) / (n as f32 + eps) * scale).collect()
    };
    let (ys, xs) = (axis(h), axis(w));
    let c = 2 * num_pos_feats;
    let mut out = vec![0f32; c * h * w];
    for k in 0..num_pos_feats {
        let f = |v: f32| {
            let p = v / dim_t[k];
            if k % 2 == 0 {
                p.sin()
            } else {
                p.cos()
            }
        };
        // one sin/cos per row and per column, broadcast over the map
        let vx: Vec<f32> = xs.iter().map(|&v| f(v)).collect();
        for r in 0..h {
            out[(k * h + r) * w..][..w].fill(f(ys[r]));
            out[((num_pos_feats + k) * h + r) * w..][..w].copy_from_slice(&vx);
        }
    }
    Tensor::from_vec(out, (c, h, w), device)
}

/// The authors' `PositionEmbeddingSine1D` as it really computes: its inverse frequencies are
/// cast to int64 and become `[1, 0, 0, …]`, so only channels 0 and 1 vary with position.
///
/// Returns `[len, dim]`: `[p, 0] = sin(p)`, `[p, 1] = cos(p)`, then `0, 1, 0, 1, …`.
pub fn sine_1d_degenerate(len: usize, dim: usize, device: &Device) -> Result<Tensor> {
    let mut out = vec![0f32; len * dim];
    for p in 0..len {
        for k in 0..dim / 2 {
            let angle = if k == 0 { p as f32 } else { 0.0 };
            out[p * dim + 2 * k] = angle.sin();
            out[p * dim + 2 * k + 1] = angle.cos();
        }
    }
    Tensor::from_vec(out, (len, dim), device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn degenerate_1d_has_only_two_varying_channels() {
        let t = sine_1d_degenerate(3, 8, &Device::Cpu).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(t[0], vec![0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0]);
        assert!((t[2][0] - 2f32.sin()).abs() < 1e-7 && (t[2][1] - 2f32.cos()).abs() < 1e-7);
        assert_eq!(&t[2][2..], &[0.0, 1.0, 0.0, 1.0, 0.0, 1.0]);
    }

    #[test]
    fn sine_2d_first_pixel() {
        let t = sine_2d(4, 2, 3, &Device::Cpu).unwrap();
        assert_eq!(t.dims(), &[8, 2, 3]);
        let v = t.to_vec3::<f32>().unwrap();
        let y0 = 1.0f32 / (2.0 + 1e-6) * 2.0 * std::f32::consts::PI;
        assert!((v[0][0][0] - y0.sin()).abs() < 1e-6);
        assert!((v[1][0][0] - y0.cos()).abs() < 1e-6);
    }
}
