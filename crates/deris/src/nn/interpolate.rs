//! Bilinear resizing with PyTorch's `F.interpolate(mode="bilinear")` semantics.
//!
//! The op lives in [`deris_kernels::resize`]: a direct separable kernel on the CPU (the blend
//! PyTorch's CPU kernel evaluates), and two products with dense interpolation matrices
//! (`Wy · X · Wxᵀ`, any device, with gradients) when the input tracks a gradient or is not on
//! the CPU. Both are tested against each other there.

pub use deris_kernels::resize::bilinear_weights;

use candle_core::{Result, Tensor};

/// Resizes the last two axes of `x` (`[..., H, W]`) to `(h, w)` bilinearly.
///
/// # Shapes
/// - `x`: `[..., H, W]` → `[..., h, w]`
pub fn resize_bilinear(x: &Tensor, h: usize, w: usize, align_corners: bool) -> Result<Tensor> {
    deris_kernels::resize_bilinear(x, h, w, align_corners)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn tracked_inputs_get_gradients() {
        // a Var takes the matrix path, whose gradient of Σ resize(x) spreads each output's
        // unit weight over its source pixels: the total is the number of outputs
        let x = Var::from_tensor(&Tensor::arange(0f32, 12., &Device::Cpu).unwrap().reshape((1, 1, 3, 4)).unwrap()).unwrap();
        let y = resize_bilinear(x.as_tensor(), 5, 6, false).unwrap();
        let grads = y.sum_all().unwrap().backward().unwrap();
        let g = grads.get(x.as_tensor()).unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert!((g - 30.0).abs() < 1e-4, "gradient mass {g}");
    }
}
