//! Images in, model inputs out: decoding like `cv2.imdecode(..., IMREAD_COLOR)`, then the DeRIS
//! test pipeline (`HierResize` with `keep_ratio=False`, `mmcv.imnormalize`, `DefaultFormatBundle`).
//!
//! MODEL-SPEC §9.1, as corrected by `fixtures/gold/README.md` §3. The two resizes are OpenCV-exact
//! (see [`super::resize`]) and the normalisation is bit-exact with mmcv. Decoding uses the `image`
//! crate: PNG is lossless, so it matches OpenCV exactly; JPEG decoders may differ from OpenCV's
//! libjpeg-turbo by a level or two in some pixels, which no later step can undo.

use std::io::Cursor;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use image::metadata::Orientation;
use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, Limits};

use super::resize::resize_linear_u8;
use crate::{Error, Result};

/// The largest image accepted, in pixels (2^26, e.g. 8192 × 8192). Larger files are refused before
/// their pixels are decoded.
pub const MAX_PIXELS: u64 = 1 << 26;

/// `Normalize.mean` of the DeRIS configs, RGB order, 0–255 scale (ImageNet statistics).
pub const MEAN_RGB: [f32; 3] = [123.675, 116.28, 103.53];
/// `Normalize.std` of the DeRIS configs, RGB order, 0–255 scale.
pub const STD_RGB: [f32; 3] = [58.395, 57.12, 57.375];

/// A decoded 8-bit RGB image, rows top to bottom, pixels interleaved (`[h, w, 3]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    pub h: usize,
    pub w: usize,
    /// `h * w * 3` bytes, R, G, B per pixel.
    pub data: Vec<u8>,
}

impl RgbImage {
    /// Wraps `[h, w, 3]` RGB bytes; fails unless the size is non-empty and matches `data`.
    pub fn new(h: usize, w: usize, data: Vec<u8>) -> Result<Self> {
        if h == 0 || w == 0 || data.len() != h * w * 3 {
            return Err(Error::Input { name: "image".into(), reason: format!("{} bytes do not make a non-empty {h}x{w} RGB image", data.len()) });
        }
        Ok(Self { h, w, data })
    }
}

/// Reads and decodes a JPEG or PNG file; see [`decode_image_bytes`].
pub fn load_image(path: &Path) -> Result<RgbImage> {
    let bytes = std::fs::read(path).map_err(|e| image_error(path, format!("cannot read the file: {e}")))?;
    decode_image_bytes(&bytes, path)
}

/// Decodes JPEG or PNG bytes as `cv2.imdecode(bytes, cv2.IMREAD_COLOR)` does, but into RGB order.
///
/// - The EXIF orientation is applied (OpenCV does so by default for `IMREAD_COLOR`).
/// - Grayscale becomes three equal channels; an alpha channel is dropped, not blended.
/// - 16-bit samples keep their high byte (`v >> 8`, libpng's `png_set_strip_16`).
/// - CMYK/YCCK JPEGs are converted to RGB by the decoder.
///
/// `name` is only used in error messages. Empty, truncated, corrupt, unsupported, 0×0 and larger
/// than [`MAX_PIXELS`] inputs give [`Error::Image`].
pub fn decode_image_bytes(bytes: &[u8], name: impl AsRef<Path>) -> Result<RgbImage> {
    let name = name.as_ref();
    let fail = |reason: String| image_error(name, reason);
    if bytes.is_empty() {
        return Err(fail("the file is empty (0 bytes)".into()));
    }
    let mut reader = ImageReader::new(Cursor::new(bytes)).with_guessed_format().map_err(|e| fail(e.to_string()))?;
    match reader.format() {
        Some(ImageFormat::Jpeg | ImageFormat::Png) => {}
        Some(other) => return Err(fail(format!("{other:?} images are not supported (JPEG or PNG only)"))),
        None => return Err(fail("not a JPEG or PNG image (unrecognised file signature)".into())),
    }
    if reader.format() == Some(ImageFormat::Jpeg) && !jpeg_reaches_end_marker(bytes) {
        return Err(fail("truncated JPEG: no end-of-image marker after the image data".into()));
    }
    let mut limits = Limits::default();
    limits.max_alloc = Some(MAX_PIXELS * 8 + (64 << 20));
    reader.limits(limits);
    let mut decoder = reader.into_decoder().map_err(|e| fail(e.to_string()))?;
    let (w, h) = decoder.dimensions();
    if w == 0 || h == 0 {
        return Err(fail(format!("the image has no pixels ({w}x{h})")));
    }
    if u64::from(w) * u64::from(h) > MAX_PIXELS {
        return Err(fail(format!("{w}x{h} is larger than the limit of {MAX_PIXELS} pixels")));
    }
    // An unreadable EXIF block is ignored, as OpenCV does.
    let orientation = decoder.orientation().unwrap_or(Orientation::NoTransforms);
    let mut img = DynamicImage::from_decoder(decoder).map_err(|e| fail(e.to_string()))?;
    img.apply_orientation(orientation);
    to_rgb8_like_opencv(img).map_err(fail)
}

/// Whether JPEG data has an end-of-image marker (`FF D9`) after its first scan header. The JPEG
/// decoder, like libjpeg behind OpenCV, decodes a truncated file "successfully" with the missing
/// part filled with gray; we refuse such files instead.
fn jpeg_reaches_end_marker(bytes: &[u8]) -> bool {
    // Walk the marker segments after SOI up to the first SOS (start of scan).
    let mut i = 2;
    while i + 4 <= bytes.len() {
        if bytes[i] != 0xFF {
            return false;
        }
        match bytes[i + 1] {
            // A fill byte, then: start of scan, end of image, markers without a length.
            0xFF => i += 1,
            0xDA => return bytes[i + 2..].windows(2).any(|m| m == [0xFF, 0xD9]),
            0xD9 => return false,
            0x01 | 0xD0..=0xD8 => i += 2,
            _ => i += 2 + usize::from(u16::from_be_bytes([bytes[i + 2], bytes[i + 3]])),
        }
    }
    false
}

fn image_error(path: &Path, reason: String) -> Error {
    Error::Image { path: PathBuf::from(path), reason }
}

/// Converts any decoded layout to 8-bit RGB with `IMREAD_COLOR`'s rules (see [`decode_image_bytes`]).
fn to_rgb8_like_opencv(img: DynamicImage) -> std::result::Result<RgbImage, String> {
    let (h, w) = (img.height() as usize, img.width() as usize);
    // Each sample's 8-bit value, then which of a pixel's samples give R, G, B.
    fn expand<T: Copy>(samples: &[T], channels: usize, rgb_of: [usize; 3], to_u8: impl Fn(T) -> u8) -> Vec<u8> {
        samples.chunks_exact(channels).flat_map(|p| rgb_of.map(|i| to_u8(p[i]))).collect()
    }
    let high_byte = |v: u16| (v >> 8) as u8;
    let data = match &img {
        DynamicImage::ImageRgb8(b) => b.as_raw().clone(),
        DynamicImage::ImageRgba8(b) => expand(b.as_raw(), 4, [0, 1, 2], |v| v),
        DynamicImage::ImageLuma8(b) => expand(b.as_raw(), 1, [0, 0, 0], |v| v),
        DynamicImage::ImageLumaA8(b) => expand(b.as_raw(), 2, [0, 0, 0], |v| v),
        DynamicImage::ImageRgb16(b) => expand(b.as_raw(), 3, [0, 1, 2], high_byte),
        DynamicImage::ImageRgba16(b) => expand(b.as_raw(), 4, [0, 1, 2], high_byte),
        DynamicImage::ImageLuma16(b) => expand(b.as_raw(), 1, [0, 0, 0], high_byte),
        DynamicImage::ImageLumaA16(b) => expand(b.as_raw(), 2, [0, 0, 0], high_byte),
        other => return Err(format!("unsupported pixel layout {:?}", other.color())),
    };
    Ok(RgbImage { h, w, data })
}

/// `normalised = (f32)(((double)x - (double)mean[c]) * (1.0 / (double)std[c]))` for every byte
/// value `x` and RGB channel `c`: mmcv's `imnormalize` with OpenCV's double `1/std` (gold README §3;
/// an all-f32 `(x - mean) * (1/std)` is 1 ulp off for 214 of the 768 entries).
pub fn normalize_lut() -> [[f32; 256]; 3] {
    let mut lut = [[0f32; 256]; 3];
    for (c, row) in lut.iter_mut().enumerate() {
        let mean = f64::from(MEAN_RGB[c]);
        let inv_std = 1.0 / f64::from(STD_RGB[c]);
        for (x, v) in row.iter_mut().enumerate() {
            *v = ((x as f64 - mean) * inv_std) as f32;
        }
    }
    lut
}

/// Normalises an RGB `[h, w, 3]` byte image into a `[3, h, w]` f32 tensor (RGB, CHW): mmcv
/// `imnormalize(to_rgb=True)` on the BGR image, then `DefaultFormatBundle`'s transpose.
///
/// # Shapes
/// - `rgb_hwc`: `[h, w, 3]` u8, RGB; returns `[3, h, w]` f32 on `device`.
pub fn normalize(rgb_hwc: &[u8], h: usize, w: usize, device: &Device) -> Result<Tensor> {
    if rgb_hwc.len() != h * w * 3 {
        return Err(Error::Input { name: "image".into(), reason: format!("{} bytes are not a {h}x{w} RGB image", rgb_hwc.len()) });
    }
    let lut = normalize_lut();
    let mut chw = vec![0f32; 3 * h * w];
    for (c, plane) in chw.chunks_exact_mut(h * w).enumerate() {
        for (v, px) in plane.iter_mut().zip(rgb_hwc.chunks_exact(3)) {
            *v = lut[c][usize::from(px[c])];
        }
    }
    Ok(Tensor::from_vec(chw, (3, h, w), device)?) // [3, h, w]
}

/// The two image inputs of one sample, as the authors' test pipeline builds them.
#[derive(Debug, Clone)]
pub struct Preprocessed {
    /// `[3, S, S]` f32, the Swin (perception) input, S = `hier_img_size` (384).
    pub img: Tensor,
    /// `[3, s, s]` f32, the BEiT-3 (cognition) input, s = `img_mini_size` (224).
    pub img_mini: Tensor,
    /// Size of the decoded image before resizing (`ori_shape`).
    pub orig_h: usize,
    pub orig_w: usize,
}

impl Preprocessed {
    /// mmcv's `scale_factor` of `img`: `[S / w, S / h, S / w, S / h]`.
    pub fn scale_factor(&self) -> [f64; 4] {
        let s = self.img.dim(1).unwrap_or(0) as f64;
        let (sx, sy) = (s / self.orig_w as f64, s / self.orig_h as f64);
        [sx, sy, sx, sy]
    }
}

/// Resizes the original image to `hier_size`² and, separately, to `mini_size`² (OpenCV
/// `INTER_LINEAR`, aspect ratio not kept), and normalises both.
///
/// # Shapes
/// - returns `img` `[3, hier_size, hier_size]` and `img_mini` `[3, mini_size, mini_size]`, f32.
pub fn preprocess(image: &RgbImage, hier_size: usize, mini_size: usize, device: &Device) -> Result<Preprocessed> {
    let RgbImage { h, w, data } = image;
    if *h == 0 || *w == 0 || data.len() != h * w * 3 {
        return Err(Error::Input { name: "image".into(), reason: format!("{} bytes do not make a non-empty {h}x{w} RGB image", data.len()) });
    }
    let to_input = |size: usize| -> Result<Tensor> {
        if size == 0 {
            return Err(Error::Config { field: "runtime image size".into(), reason: "must be at least 1".into() });
        }
        normalize(&resize_linear_u8(data, *h, *w, 3, size, size), size, size, device)
    };
    Ok(Preprocessed { img: to_input(hier_size)?, img_mini: to_input(mini_size)?, orig_h: *h, orig_w: *w })
}

/// Stacks samples into the batched model inputs `(img [B, 3, S, S], img_mini [B, 3, s, s])`.
pub fn stack_batch(samples: &[Preprocessed]) -> Result<(Tensor, Tensor)> {
    if samples.is_empty() {
        return Err(Error::Input { name: "batch".into(), reason: "no samples to stack".into() });
    }
    let img: Vec<&Tensor> = samples.iter().map(|p| &p.img).collect();
    let mini: Vec<&Tensor> = samples.iter().map(|p| &p.img_mini).collect();
    Ok((Tensor::stack(&img, 0)?, Tensor::stack(&mini, 0)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lut_matches_f32_division() {
        // gold README §3: plain f32 (x - mean) / std happens to give the same 768 values.
        let lut = normalize_lut();
        for (c, row) in lut.iter().enumerate() {
            for (x, &v) in row.iter().enumerate() {
                assert_eq!(v, (x as f32 - MEAN_RGB[c]) / STD_RGB[c]);
            }
        }
    }

    #[test]
    fn normalize_is_chw_rgb() {
        let t = normalize(&[0, 128, 255, 10, 20, 30], 1, 2, &Device::Cpu).unwrap();
        assert_eq!(t.dims(), &[3, 1, 2]);
        let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let lut = normalize_lut();
        assert_eq!(v, vec![lut[0][0], lut[0][10], lut[1][128], lut[1][20], lut[2][255], lut[2][30]]);
    }
}
