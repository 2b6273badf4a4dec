//! Mask binarisation and the referent union of `get_predictions_parts` (MODEL-SPEC §1.4).

use candle_core::{DType, Result, Tensor};

/// A binary mask, row-major, 1 = referred pixel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BinaryMask {
    pub height: usize,
    pub width: usize,
    /// `height · width` values in `{0, 1}`.
    pub data: Vec<u8>,
}

impl BinaryMask {
    /// Number of pixels set.
    pub fn area(&self) -> usize {
        self.data.iter().filter(|&&v| v != 0).count()
    }

    pub fn is_empty(&self) -> bool {
        self.data.iter().all(|&v| v == 0)
    }
}

/// `sigmoid(logits) >= threshold`, with PyTorch's f32 sigmoid `1/(1+exp(−x))`: tiny negative
/// logits round to exactly 0.5 and count as set, as in the reference.
///
/// # Shapes
/// - `logits`: any shape, f32 → u8 of the same shape
pub fn binarize(logits: &Tensor, threshold: f64) -> Result<Tensor> {
    candle_nn::ops::sigmoid(&logits.to_dtype(DType::F32)?)?.ge(threshold as f32)
}

/// OR over the selected queries' binary masks (`torch.any(bin[selected], dim=0)`); all zeros
/// when no query is selected.
///
/// # Shapes
/// - `binary`: `[B, N, H, W]` u8; `selected`: `[B, N]` u8 (1 = keep) → `[B, H, W]` u8
pub fn union_selected(binary: &Tensor, selected: &Tensor) -> Result<Tensor> {
    let (b, n, _, _) = binary.dims4()?;
    let sel = selected.reshape((b, n, 1, 1))?; // [B, N, 1, 1]
    binary.broadcast_mul(&sel)?.max(1) // [B, H, W]
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn binarize_rounds_like_torch() {
        let x = Tensor::new(&[-1e-8f32, -1e-3, 0.0, 2.0], &Device::Cpu).unwrap();
        assert_eq!(binarize(&x, 0.5).unwrap().to_vec1::<u8>().unwrap(), vec![1, 0, 1, 1]);
    }

    #[test]
    fn union_of_nothing_is_empty() {
        let bin = Tensor::ones((1, 2, 2, 2), DType::U8, &Device::Cpu).unwrap();
        let none = Tensor::zeros((1, 2), DType::U8, &Device::Cpu).unwrap();
        let u = union_selected(&bin, &none).unwrap();
        assert_eq!(u.dims(), &[1, 2, 2]);
        assert_eq!(u.flatten_all().unwrap().to_vec1::<u8>().unwrap(), vec![0; 4]);
        let one = Tensor::new(&[[0u8, 1]], &Device::Cpu).unwrap();
        assert_eq!(union_selected(&bin, &one).unwrap().flatten_all().unwrap().to_vec1::<u8>().unwrap(), vec![1; 4]);
    }
}
