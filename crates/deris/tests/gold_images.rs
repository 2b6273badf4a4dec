//! Image decoding and preprocessing against OpenCV 4.10 / mmcv: `fixtures/gold/images` (cv2
//! resizes, mmcv normalisation table, one end-to-end tensor), the nearest-resize rule of
//! `gold/masks/cases.json`, the tiny-a golden inputs, EXIF orientation, and bad files.

mod common;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use deris::preprocess::image::{decode_image_bytes, load_image, normalize, normalize_lut, preprocess, stack_batch, RgbImage};
use deris::preprocess::resize::{nearest_index, resize_linear_u8, resize_nearest_u8};
use image::codecs::jpeg::JpegEncoder;
use image::codecs::png::PngEncoder;
use image::{ExtendedColorType, ImageEncoder};

fn u8_vec(t: &Tensor) -> Vec<u8> {
    t.flatten_all().unwrap().to_vec1::<u8>().unwrap()
}

fn f32_vec(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// Swaps R and B of an interleaved 3-channel image (BGR <-> RGB).
fn swap_rb(px: &[u8]) -> Vec<u8> {
    px.chunks_exact(3).flat_map(|p| [p[2], p[1], p[0]]).collect()
}

fn bit_diffs(got: &[f32], want: &[f32]) -> usize {
    assert_eq!(got.len(), want.len());
    got.iter().zip(want).filter(|(a, b)| a.to_bits() != b.to_bits()).count()
}

fn gold_index() -> serde_json::Value {
    let p = common::fixture("gold/images/index.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

#[test]
fn gold_resizes_are_byte_exact() {
    let cases = common::load_tensors("gold/images/cases.safetensors");
    let index = gold_index();
    let images = index["images"].as_array().unwrap();
    assert!(!images.is_empty());
    for entry in images {
        let name = entry["name"].as_str().unwrap();
        let (h, w) = (entry["h"].as_u64().unwrap() as usize, entry["w"].as_u64().unwrap() as usize);
        let src = common::get(&cases, &format!("{name}_bgr_u8"));
        assert_eq!(src.dims(), &[h, w, 3]);
        let src = u8_vec(src);
        for size in [384, 224] {
            let want = u8_vec(common::get(&cases, &format!("{name}_resize{size}_bgr_u8")));
            let got = resize_linear_u8(&src, h, w, 3, size, size);
            let differing = got.iter().zip(&want).filter(|(a, b)| a != b).count();
            let area = entry[format!("area_path_{size}")].as_bool().unwrap();
            println!("{name} {h}x{w} -> {size} (area path {area}): {differing} differing bytes");
            assert_eq!(got.len(), want.len());
            assert_eq!(differing, 0, "{name} -> {size}");
        }
    }
}

#[test]
fn normalisation_table_is_bit_exact() {
    let cases = common::load_tensors("gold/images/cases.safetensors");
    let want = f32_vec(common::get(&cases, "norm_lut_rgb_f32"));
    let got: Vec<f32> = normalize_lut().iter().flatten().copied().collect();
    assert_eq!(bit_diffs(&got, &want), 0);
}

#[test]
fn normalised_tensors_are_bit_exact() {
    let cases = common::load_tensors("gold/images/cases.safetensors");
    let lut = f32_vec(common::get(&cases, "norm_lut_rgb_f32"));
    for entry in gold_index()["images"].as_array().unwrap() {
        let name = entry["name"].as_str().unwrap();
        let (h, w) = (entry["h"].as_u64().unwrap() as usize, entry["w"].as_u64().unwrap() as usize);
        let image = RgbImage::new(h, w, swap_rb(&u8_vec(common::get(&cases, &format!("{name}_bgr_u8"))))).unwrap();
        let pre = preprocess(&image, 384, 224, &Device::Cpu).unwrap();
        assert_eq!((pre.orig_h, pre.orig_w), (h, w));
        for (size, got) in [(384, &pre.img), (224, &pre.img_mini)] {
            assert_eq!(got.dims(), &[3, size, size]);
            // gold README §3: normalised[c, y, x] = lut[c][resized_bgr[y, x, 2 - c]].
            let bgr = u8_vec(common::get(&cases, &format!("{name}_resize{size}_bgr_u8")));
            let mut want = vec![0f32; 3 * size * size];
            for c in 0..3 {
                for (i, px) in bgr.chunks_exact(3).enumerate() {
                    want[c * size * size + i] = lut[c * 256 + px[2 - c] as usize];
                }
            }
            let diffs = bit_diffs(&f32_vec(got), &want);
            println!("{name} {size}: {diffs} differing values");
            assert_eq!(diffs, 0, "{name} {size}");
        }
    }
    // The stored end-to-end example: img2, 224, RGB, CHW.
    let image = RgbImage::new(37, 53, swap_rb(&u8_vec(common::get(&cases, "img2_bgr_u8")))).unwrap();
    let pre = preprocess(&image, 384, 224, &Device::Cpu).unwrap();
    let want = common::get(&cases, "img2_norm224_rgb_chw_f32");
    assert_eq!(pre.img_mini.dims(), want.dims());
    assert_eq!(bit_diffs(&f32_vec(&pre.img_mini), &f32_vec(want)), 0);
    assert_eq!(common::max_abs_diff(&pre.img_mini, want).0, 0.0);
}

#[test]
fn tiny_a_inputs_are_reproduced_exactly() {
    let golden = common::golden();
    let raw = common::get(&golden, "input.raw_rgb_uint8.0");
    let (h, w, _) = raw.dims3().unwrap();
    let image = RgbImage::new(h, w, u8_vec(raw)).unwrap();
    let pre = preprocess(&image, 128, 64, &Device::Cpu).unwrap();
    let (img, mini) = stack_batch(&[pre]).unwrap();
    for (name, got) in [("input.img", &img), ("input.img_mini", &mini)] {
        let want = common::get(&golden, name);
        assert_eq!(got.dims(), want.dims(), "{name}");
        let (d, i) = common::max_abs_diff(got, want);
        println!("{name:20} max|Δ| = {d:e}");
        assert_eq!(d, 0.0, "{name}: differs at flat index {i}");
    }
}

#[test]
fn nearest_rule_matches_the_gold_check() {
    let p = common::fixture("gold/masks/cases.json");
    let masks: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
    let check = &masks["nearest_resize_rule_check"];
    for dst in [384usize, 224] {
        let rec = &check[dst.to_string()];
        // The spec's `floor(d * (src / dst))` (double) disagrees with OpenCV for these source lengths.
        let mismatching: Vec<usize> = (1..=1200usize)
            .filter(|&src| (0..dst).any(|d| nearest_index(d, src, dst) != ((d as f64 * (src as f64 / dst as f64)).floor() as usize).min(src - 1)))
            .collect();
        println!("dst {dst}: {} source lengths differ from floor(d*(src/dst)), first {:?}", mismatching.len(), &mismatching[..5]);
        assert_eq!(mismatching.len() as u64, rec["mismatches_floor_x_times_src_over_dst"].as_u64().unwrap());
        let examples: Vec<usize> = rec["examples_a"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
        assert_eq!(&mismatching[..examples.len()], &examples[..]);
    }
    // resize_nearest_u8 reads exactly those indices, on both axes.
    for (h, w) in [(68, 118), (136, 148), (194, 3), (1, 500)] {
        let src: Vec<u8> = (0..h * w).map(|i| (i * 7919 % 251) as u8).collect();
        let out = resize_nearest_u8(&src, h, w, 1, 384, 384);
        for y in 0..384 {
            for x in 0..384 {
                assert_eq!(out[y * 384 + x], src[nearest_index(y, h, 384) * w + nearest_index(x, w, 384)]);
            }
        }
    }
}

/// A scratch file path unique to this test process.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("deris-gold-images-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// A `w`x`h` RGB test pattern whose pixels differ from their neighbours.
fn pattern(w: usize, h: usize) -> Vec<u8> {
    (0..h * w).flat_map(|i| [(i * 10 % 256) as u8, (i / w * 15 % 256) as u8, (255 - i % w * 9 % 256) as u8]).collect()
}

fn encode_jpeg(rgb: &[u8], w: u32, h: u32, orientation: Option<u16>) -> Vec<u8> {
    let mut out = Vec::new();
    let mut enc = JpegEncoder::new_with_quality(&mut out, 95);
    if let Some(o) = orientation {
        // A minimal big-endian TIFF block: one IFD entry, Orientation (0x0112), SHORT, count 1.
        let mut tiff = b"MM\0\x2a\0\0\0\x08\0\x01\x01\x12\0\x03\0\0\0\x01".to_vec();
        tiff.extend_from_slice(&o.to_be_bytes());
        tiff.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
        enc.set_exif_metadata(tiff).unwrap();
    }
    enc.write_image(rgb, w, h, ExtendedColorType::Rgb8).unwrap();
    out
}

fn encode_png(samples: &[u8], w: u32, h: u32, color: ExtendedColorType) -> Vec<u8> {
    let mut out = Vec::new();
    PngEncoder::new(&mut out).write_image(samples, w, h, color).unwrap();
    out
}

#[test]
fn exif_orientation_is_applied() {
    let (w, h) = (24usize, 16usize);
    let rgb = pattern(w, h);
    let plain = decode_image_bytes(&encode_jpeg(&rgb, w as u32, h as u32, None), "plain.jpg").unwrap();
    assert_eq!((plain.h, plain.w), (h, w));
    // For each EXIF value: output size and, for output (y, x), the stored pixel (sy, sx) it shows.
    type Map = fn(usize, usize, usize, usize) -> (usize, usize);
    let cases: [(u16, bool, Map); 8] = [
        (1, false, |y, x, _, _| (y, x)),
        (2, false, |y, x, _, w| (y, w - 1 - x)),
        (3, false, |y, x, h, w| (h - 1 - y, w - 1 - x)),
        (4, false, |y, x, h, _| (h - 1 - y, x)),
        (5, true, |y, x, _, _| (x, y)),
        (6, true, |y, x, h, _| (h - 1 - x, y)),
        (7, true, |y, x, h, w| (h - 1 - x, w - 1 - y)),
        (8, true, |y, x, _, w| (x, w - 1 - y)),
    ];
    for (o, transposed, map) in cases {
        let got = decode_image_bytes(&encode_jpeg(&rgb, w as u32, h as u32, Some(o)), "exif.jpg").unwrap();
        let (oh, ow) = if transposed { (w, h) } else { (h, w) };
        assert_eq!((got.h, got.w), (oh, ow), "orientation {o}");
        for y in 0..oh {
            for x in 0..ow {
                let (sy, sx) = map(y, x, h, w);
                let i = (y * ow + x) * 3;
                let j = (sy * w + sx) * 3;
                assert_eq!(got.data[i..i + 3], plain.data[j..j + 3], "orientation {o} at ({y}, {x})");
            }
        }
    }
}

#[test]
fn png_layouts_convert_like_imread_color() {
    // 16-bit RGB keeps the high byte (the encoder takes native-endian samples).
    let rgb16: Vec<u16> = vec![0x12ff, 0x0001, 0xfe80, 0x8000, 0x7fff, 0xffff];
    let bytes: Vec<u8> = rgb16.iter().flat_map(|v| v.to_ne_bytes()).collect();
    let img = decode_image_bytes(&encode_png(&bytes, 2, 1, ExtendedColorType::Rgb16), "deep.png").unwrap();
    assert_eq!(img.data, vec![0x12, 0x00, 0xfe, 0x80, 0x7f, 0xff]);
    // Gray becomes three equal channels.
    let img = decode_image_bytes(&encode_png(&[7, 200], 1, 2, ExtendedColorType::L8), "gray.png").unwrap();
    assert_eq!((img.h, img.w, img.data), (2, 1, vec![7, 7, 7, 200, 200, 200]));
    // 16-bit gray: high byte, replicated.
    let img = decode_image_bytes(&encode_png(&0xabcdu16.to_ne_bytes(), 1, 1, ExtendedColorType::L16), "gray16.png").unwrap();
    assert_eq!(img.data, vec![0xab; 3]);
    // A grayscale JPEG too.
    let gray: Vec<u8> = (0..64u8).map(|i| i * 4).collect();
    let mut jpeg = Vec::new();
    JpegEncoder::new_with_quality(&mut jpeg, 90).write_image(&gray, 8, 8, ExtendedColorType::L8).unwrap();
    let img = decode_image_bytes(&jpeg, "gray.jpg").unwrap();
    assert_eq!((img.h, img.w), (8, 8));
    assert!(img.data.chunks_exact(3).all(|p| p[0] == p[1] && p[1] == p[2]));
    // Alpha is dropped, not blended.
    let img = decode_image_bytes(&encode_png(&[10, 20, 30, 0, 40, 50, 60, 128], 2, 1, ExtendedColorType::Rgba8), "rgba.png").unwrap();
    assert_eq!(img.data, vec![10, 20, 30, 40, 50, 60]);
    let img = decode_image_bytes(&encode_png(&[90, 0], 1, 1, ExtendedColorType::La8), "la.png").unwrap();
    assert_eq!(img.data, vec![90; 3]);
    // A PNG decodes to exactly its pixels, from a file too.
    let rgb = pattern(24, 16);
    let p = scratch("pattern.png");
    std::fs::write(&p, encode_png(&rgb, 24, 16, ExtendedColorType::Rgb8)).unwrap();
    assert_eq!(load_image(&p).unwrap(), RgbImage::new(16, 24, rgb).unwrap());
}

/// A PNG declaring `w`x`h` RGB: signature, IHDR, and an IDAT chunk holding no real data.
fn png_header_only(w: u32, h: u32) -> Vec<u8> {
    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in bytes {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 == 1 { (crc >> 1) ^ 0xedb8_8320 } else { crc >> 1 };
            }
        }
        !crc
    }
    let mut ihdr = b"IHDR".to_vec();
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    for chunk in [ihdr, b"IDAT\x78\x9c\x03\x00".to_vec()] {
        png.extend_from_slice(&(chunk.len() as u32 - 4).to_be_bytes());
        png.extend_from_slice(&chunk);
        png.extend_from_slice(&crc32(&chunk).to_be_bytes());
    }
    png
}

/// `load_image` on a file with these bytes fails with an image error that names the file.
fn assert_image_error(file: &str, bytes: Option<&[u8]>) -> String {
    let p = scratch(file);
    if let Some(b) = bytes {
        std::fs::write(&p, b).unwrap();
    }
    let err = load_image(&p).expect_err(file);
    assert!(matches!(err, deris::Error::Image { .. }), "{file}: {err:?}");
    let msg = err.to_string();
    println!("{file}: {msg}");
    assert!(msg.contains(&p.display().to_string()), "{file}: message lacks the path: {msg}");
    msg
}

#[test]
fn bad_files_give_errors_naming_the_file() {
    assert_image_error("missing.jpg", None);
    assert_image_error("empty.jpg", Some(b""));
    assert_image_error("garbage.jpg", Some(b"this is not an image at all, just text\n"));
    let jpeg = encode_jpeg(&pattern(64, 48), 64, 48, None);
    assert_image_error("truncated.jpg", Some(&jpeg[..jpeg.len() / 2]));
    assert_image_error("header_only.jpg", Some(&jpeg[..200]));
    let png = encode_png(&pattern(64, 48), 64, 48, ExtendedColorType::Rgb8);
    assert_image_error("truncated.png", Some(&png[..png.len() / 2]));
    assert_image_error("zero_width.png", Some(&png_header_only(0, 10)));
    let msg = assert_image_error("huge.png", Some(&png_header_only(100_000, 100_000)));
    assert!(msg.contains("larger than"), "{msg}");
    // In-memory bytes report the given name.
    let err = decode_image_bytes(b"\xff\xd8\xff", Path::new("upload.jpg")).unwrap_err();
    assert!(err.to_string().contains("upload.jpg"), "{err}");
    // Wrong sizes are input errors, not panics.
    assert!(RgbImage::new(0, 3, vec![]).is_err());
    assert!(RgbImage::new(2, 2, vec![0; 11]).is_err());
    assert!(normalize(&[0; 5], 1, 2, &Device::Cpu).is_err());
    let one = RgbImage::new(1, 1, vec![1, 2, 3]).unwrap();
    assert!(preprocess(&one, 0, 224, &Device::Cpu).is_err());
    assert!(stack_batch(&[]).is_err());
}
