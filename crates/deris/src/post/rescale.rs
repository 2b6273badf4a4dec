//! From the model's resolution back to the original image: `rescale=True` of
//! `get_predictions_parts` (MODEL-SPEC §1.4).
//!
//! - Masks: mmdet `BitmapMasks.resize`, i.e. OpenCV `INTER_NEAREST` with its reciprocal-scale
//!   index rule ([`crate::preprocess::resize::nearest_index`]).
//! - Boxes: divided by mmcv's `scale_factor = [S_w / W, S_h / H, S_w / W, S_h / H]` (float32).
//!
//! No keys.

use super::BinaryMask;
use crate::error::{Error, Result};
use crate::preprocess::resize::resize_nearest_u8;

/// Resizes a binary mask to `height × width` with OpenCV's `INTER_NEAREST`.
///
/// Errors: [`Error::Input`] when either size is empty or `mask.data` does not hold
/// `height · width` values.
pub fn rescale_mask(mask: &BinaryMask, height: usize, width: usize) -> Result<BinaryMask> {
    let (h, w) = (mask.height, mask.width);
    if h == 0 || w == 0 || height == 0 || width == 0 || mask.data.len() != h * w {
        return Err(Error::Input {
            name: "mask".into(),
            reason: format!("cannot resize a {h}x{w} mask of {} values to {height}x{width}", mask.data.len()),
        });
    }
    if (h, w) == (height, width) {
        return Ok(mask.clone());
    }
    Ok(BinaryMask { height, width, data: resize_nearest_u8(&mask.data, h, w, 1, height, width) })
}

/// Maps a box `[x0, y0, x1, y1]` from model-input pixels (`model_h × model_w`) to original-image
/// pixels (`height × width`): `box / scale_factor`, with mmcv's float32 scale factor
/// `model_w / width`, `model_h / height`.
pub fn rescale_box(b: [f32; 4], model_h: usize, model_w: usize, height: usize, width: usize) -> [f32; 4] {
    let sx = (model_w as f64 / width.max(1) as f64) as f32;
    let sy = (model_h as f64 / height.max(1) as f64) as f32;
    [b[0] / sx, b[1] / sy, b[2] / sx, b[3] / sy]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rescale_mask_is_opencv_nearest() {
        let m = BinaryMask { height: 2, width: 2, data: vec![1, 0, 0, 1] };
        let up = rescale_mask(&m, 3, 4).unwrap();
        // rows: floor(d * 2/3) = 0, 0, 1; columns: floor(d * 2/4) = 0, 0, 1, 1.
        assert_eq!(up.data, vec![1, 1, 0, 0, 1, 1, 0, 0, 0, 0, 1, 1]);
        assert_eq!(rescale_mask(&m, 2, 2).unwrap(), m);
        assert!(rescale_mask(&m, 0, 4).is_err());
        assert!(rescale_mask(&BinaryMask { height: 2, width: 2, data: vec![1] }, 4, 4).is_err());
    }

    #[test]
    fn rescale_box_divides_by_the_scale_factor() {
        // 384² model input, 768 × 192 original: x scale 0.5, y scale 2.
        assert_eq!(rescale_box([10.0, 20.0, 384.0, 384.0], 384, 384, 192, 768), [20.0, 10.0, 768.0, 192.0]);
    }
}
