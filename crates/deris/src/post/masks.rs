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

    /// The tight box `[x, y, w, h]` of the set pixels in pixel units, COCO's `bbox` convention
    /// (pycocotools' `toBbox`: `w = x_max − x_min + 1`); `None` for an empty mask.
    pub fn bbox_xywh(&self) -> Option<[usize; 4]> {
        let (mut x0, mut y0, mut x1, mut y1) = (usize::MAX, usize::MAX, 0, 0);
        for (y, row) in self.data.chunks_exact(self.width.max(1)).enumerate() {
            let (Some(first), Some(last)) = (row.iter().position(|&v| v != 0), row.iter().rposition(|&v| v != 0)) else { continue };
            (x0, x1) = (x0.min(first), x1.max(last));
            (y0, y1) = (y0.min(y), y);
        }
        (x0 != usize::MAX).then(|| [x0, y0, x1 - x0 + 1, y1 - y0 + 1])
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

    #[test]
    fn bbox_is_pycocotools_to_bbox() {
        // Masks that are empty, touch the borders, or have a run wrapping from the bottom of one
        // column to the top of the next (the last case), against deris_coco's port of
        // pycocotools' `toBbox` (which walks column-major runs).
        let (h, w) = (5usize, 7usize);
        let cases: [&[(usize, usize)]; 6] =
            [&[], &[(2, 3)], &[(0, 6), (4, 0)], &[(1, 1), (1, 2), (3, 5)], &[(4, 6), (0, 0), (2, 4)], &[(3, 1), (4, 1), (0, 2), (1, 2)]];
        for set in cases {
            let mut m = BinaryMask { height: h, width: w, data: vec![0; h * w] };
            for &(y, x) in set {
                m.data[y * w + x] = 1;
            }
            let rle = deris_coco::Rle::from_rowmajor(&m.data, h as u32, w as u32).unwrap();
            let want = (!set.is_empty()).then(|| rle.to_bbox().map(|v| v as usize));
            assert_eq!(m.bbox_xywh(), want, "{set:?}");
        }
    }
}
