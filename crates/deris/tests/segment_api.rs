//! The `Segmenter` API end to end on generated images: sizes, batch == singles, the COCO RLE of the
//! final mask, the no-target path, per-query masks, sharing across threads and bad inputs.
//!
//! The model is `configs/demo-tiny.json` (tiny-a's architecture, a vocabulary that fits the test
//! tokenizer) with seeded random weights, so the numbers mean nothing but are deterministic.

mod common;

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use candle_core::Device;
use deris::output::coco_rle_counts;
use deris::post::rescale::rescale_mask;
use deris::post::BinaryMask;
use deris::preprocess::image::RgbImage;
use deris::viz::{overlay, Style};
use deris::{DerisConfig, Error, Prediction, Segmenter, Weights};

const SEED: u64 = 7;

fn repo(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..").join(rel)
}

fn demo_config() -> DerisConfig {
    DerisConfig::from_file(&repo("configs/demo-tiny.json")).unwrap()
}

fn tokenizer() -> PathBuf {
    common::fixture("gold/tokenizer/test.spm")
}

fn segmenter() -> &'static Segmenter {
    static S: OnceLock<Segmenter> = OnceLock::new();
    S.get_or_init(|| Segmenter::load(&demo_config(), &Weights::Random { seed: SEED }, &tokenizer(), &Device::Cpu).unwrap())
}

/// A smooth background with a bright disc and a dark bar, `h × w`; `k` varies the layout.
fn image(h: usize, w: usize, k: usize) -> RgbImage {
    let mut data = Vec::with_capacity(h * w * 3);
    let (cy, cx, r) = (h as f64 * 0.4, w as f64 * (0.3 + 0.1 * k as f64), h.min(w) as f64 * 0.25);
    for y in 0..h {
        for x in 0..w {
            let (fy, fx) = (y as f64, x as f64);
            let px = if (fy - cy).powi(2) + (fx - cx).powi(2) < r * r {
                [250, 200, 40]
            } else if y > h * 3 / 4 && x > w / 2 {
                [20, 30, 90]
            } else {
                [(x * 255 / w) as u8, (y * 255 / h) as u8, ((x + y + 40 * k) % 256) as u8]
            };
            data.extend_from_slice(&px);
        }
    }
    RgbImage::new(h, w, data).unwrap()
}

/// pycocotools `rleFrString` + `rleDecode`: the compressed counts string back to a row-major mask.
fn decode_rle(counts: &str, h: usize, w: usize) -> Vec<u8> {
    let s = counts.as_bytes();
    let mut runs: Vec<i64> = Vec::new();
    let mut p = 0;
    while p < s.len() {
        let (mut x, mut k) = (0i64, 0);
        loop {
            let c = i64::from(s[p]) - 48;
            x |= (c & 0x1f) << (5 * k);
            let more = c & 0x20 != 0;
            p += 1;
            k += 1;
            if !more {
                if c & 0x10 != 0 {
                    x |= -1i64 << (5 * k);
                }
                break;
            }
        }
        if runs.len() > 2 {
            x += runs[runs.len() - 2];
        }
        runs.push(x);
    }
    let mut col_major = Vec::with_capacity(h * w);
    for (i, &r) in runs.iter().enumerate() {
        col_major.extend(std::iter::repeat_n((i % 2) as u8, r as usize));
    }
    assert_eq!(col_major.len(), h * w, "RLE runs cover {} pixels, not {h}x{w}", col_major.len());
    let mut out = vec![0u8; h * w];
    for x in 0..w {
        for y in 0..h {
            out[y * w + x] = col_major[x * h + y];
        }
    }
    out
}

fn assert_same_prediction(a: &Prediction, b: &Prediction, what: &str) {
    assert_eq!(a.queries.len(), b.queries.len());
    for (qa, qb) in a.queries.iter().zip(&b.queries) {
        assert!((qa.score - qb.score).abs() <= 1e-5, "{what}: score {} vs {}", qa.score, qb.score);
        for (x, y) in qa.bbox.iter().zip(&qb.bbox) {
            assert!((x - y).abs() <= 1e-3, "{what}: box {:?} vs {:?}", qa.bbox, qb.bbox);
        }
    }
    assert!((a.existence - b.existence).abs() <= 1e-5, "{what}: existence");
    assert_eq!(a.no_target, b.no_target, "{what}: no_target");
    assert_eq!((a.mask.height, a.mask.width), (b.mask.height, b.mask.width));
    let flips = a.mask.data.iter().zip(&b.mask.data).filter(|(x, y)| x != y).count();
    assert!(flips as f64 <= 1e-4 * a.mask.data.len() as f64, "{what}: {flips} mask pixels differ");
}

#[test]
fn segments_a_generated_image_at_its_original_size() {
    let s = segmenter();
    let img = image(150, 221, 0);
    let p = s.segment(&img, "the yellow ball on the left").unwrap();
    println!("{p:?}");
    assert_eq!((p.height(), p.width()), (150, 221));
    assert_eq!((p.mask.height, p.mask.width, p.mask.data.len()), (150, 221, 150 * 221));
    assert_eq!((p.mask_model.height, p.mask_model.width), (384, 384));
    assert_eq!(p.queries.len(), 5);
    assert_eq!(p.score_threshold, 0.7);
    assert!(p.queries.iter().all(|q| (0.0..=1.0).contains(&q.score)));
    assert_eq!(p.no_target, !p.queries.iter().any(|q| q.selected));
    assert_eq!(p.no_target, p.mask_model.is_empty());
    // Boxes: in the original image, and the model-resolution box divided by (384/221, 384/150).
    for q in &p.queries {
        let [x0, y0, x1, y1] = q.bbox;
        assert!(0.0 <= x0 && x0 <= x1 && x1 <= 221.01 && 0.0 <= y0 && y0 <= y1 && y1 <= 150.01, "{:?}", q.bbox);
        assert!((q.bbox[2] - q.bbox_model[2] * 221.0 / 384.0).abs() < 1e-3);
        assert!(q.mask.is_none());
    }
    assert!(p.timings.forward_s > 0.0 && p.timings.preprocess_s > 0.0 && p.timings.batch_size == 1);
    assert!((0.0..=1.0).contains(&p.existence) && (p.pred_nt - (1.0 - p.existence)).abs() < 1e-6);

    // The JSON carries the decision, sizes and the RLE of the original-size mask.
    let v: serde_json::Value = serde_json::from_str(&p.to_json().unwrap()).unwrap();
    assert_eq!(v["image_size"]["height"], 150);
    assert_eq!(v["model_size"]["width"], 384);
    assert_eq!(v["no_target"], p.no_target);
    assert_eq!(v["mask"]["size"], serde_json::json!([150, 221]));
    assert_eq!(v["queries"].as_array().unwrap().len(), 5);
    let counts = v["mask"]["counts"].as_str().unwrap();
    assert_eq!(decode_rle(counts, 150, 221), p.mask.data);
    assert_eq!(v["mask_area"], p.mask.area());
    assert_eq!(v["mask_bbox_xywh"], serde_json::json!(p.mask_bbox()));
    match p.mask_bbox() {
        Some([x, y, w, h]) => {
            // The box holds every set pixel, and each of its four edges touches one.
            let set = |r: usize, c: usize| p.mask.data[r * 221 + c] != 0;
            assert!((0..150).all(|r| (0..221).all(|c| !set(r, c) || (x..x + w).contains(&c) && (y..y + h).contains(&r))));
            assert!((x..x + w).any(|c| set(y, c)) && (x..x + w).any(|c| set(y + h - 1, c)));
            assert!((y..y + h).any(|r| set(r, x)) && (y..y + h).any(|r| set(r, x + w - 1)));
        }
        None => assert!(p.mask.is_empty() && v["mask_bbox_xywh"].is_null()),
    }
}

#[test]
fn mask_is_the_nearest_rescale_of_the_model_mask() {
    let p = segmenter().segment(&image(97, 300, 1), "dark bar at the bottom right").unwrap();
    let m = &p.mask_model;
    for y in 0..97 {
        for x in 0..300 {
            let (sy, sx) = (deris::preprocess::resize::nearest_index(y, 384, 97), deris::preprocess::resize::nearest_index(x, 384, 300));
            assert_eq!(p.mask.data[y * 300 + x], m.data[sy * 384 + sx]);
        }
    }
}

#[test]
fn batch_equals_singles() {
    let s = segmenter();
    let imgs = [image(120, 160, 0), image(300, 200, 1), image(64, 64, 2)];
    let texts = ["the ball", "a dark bar on the right side", "left"];
    let items: Vec<(&RgbImage, &str)> = imgs.iter().zip(texts).collect();
    let batch = s.segment_batch(&items).unwrap();
    assert_eq!(batch.len(), 3);
    for (i, (img, text)) in items.iter().enumerate() {
        let single = s.segment(img, text).unwrap();
        assert_eq!(batch[i].timings.batch_size, 3);
        assert_eq!(batch[i].text, *text);
        assert_same_prediction(&batch[i], &single, &format!("item {i}"));
    }
}

#[test]
fn threshold_one_gives_no_target() {
    let s = Segmenter::load(&demo_config(), &Weights::Random { seed: SEED }, &tokenizer(), &Device::Cpu)
        .unwrap()
        .with_score_threshold(1.0)
        .unwrap();
    let img = image(80, 120, 0);
    let p = s.segment(&img, "the ball").unwrap();
    assert!(p.no_target);
    assert!(p.mask.is_empty() && p.mask_model.is_empty());
    assert!(p.queries.iter().all(|q| !q.selected));
    let v: serde_json::Value = serde_json::from_str(&p.to_json().unwrap()).unwrap();
    assert_eq!(v["no_target"], true);
    assert_eq!(decode_rle(v["mask"]["counts"].as_str().unwrap(), 80, 120), vec![0; 80 * 120]);
}

#[test]
fn per_query_masks_make_up_the_final_mask() {
    let s = Segmenter::load(&demo_config(), &Weights::Random { seed: SEED }, &tokenizer(), &Device::Cpu)
        .unwrap()
        .with_query_masks(true)
        .with_score_threshold(0.0)
        .unwrap();
    let p = s.segment(&image(100, 100, 0), "the ball").unwrap();
    let mut union = vec![0u8; 384 * 384];
    for q in p.queries.iter().filter(|q| q.selected) {
        let m = q.mask.as_ref().unwrap();
        assert_eq!((m.height, m.width), (384, 384));
        for (u, &v) in union.iter_mut().zip(&m.data) {
            *u |= v;
        }
    }
    assert_eq!(union, p.mask_model.data);
    let v = p.to_json_value().unwrap();
    assert!(v["queries"][0]["mask"]["counts"].is_string());
}

#[test]
fn shared_across_threads() {
    let s = Arc::new(Segmenter::load(&demo_config(), &Weights::Random { seed: SEED }, &tokenizer(), &Device::Cpu).unwrap());
    let img = Arc::new(image(90, 90, 1));
    let handles: Vec<_> = (0..2)
        .map(|_| {
            let (s, img) = (Arc::clone(&s), Arc::clone(&img));
            std::thread::spawn(move || s.segment(&img, "the ball").unwrap())
        })
        .collect();
    let results: Vec<Prediction> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_same_prediction(&results[0], &results[1], "threads");
}

#[test]
fn overlay_has_the_image_size_and_leaves_the_image_alone() {
    let img = image(150, 221, 0);
    let p = segmenter().segment(&img, "the yellow ball on the left").unwrap();
    let before = img.clone();
    let o = overlay(&img, &p, &Style::default());
    assert_eq!((o.h, o.w), (150, 221));
    assert_eq!(img, before);
    assert_ne!(o, img);
}

#[test]
fn bad_text_is_a_clear_error() {
    let s = segmenter();
    let img = image(32, 32, 0);
    for text in ["", "   ", "?!.,", "-/"] {
        let e = s.segment(&img, text).unwrap_err();
        assert!(matches!(e, Error::Text { .. }), "{text:?}: {e}");
        println!("{text:?}: {e}");
    }
    let e = s.segment_batch(&[(&img, "ok"), (&img, "")]).unwrap_err().to_string();
    assert!(e.contains("batch item 1") && e.contains("empty"), "{e}");
}

#[test]
fn bad_images_are_clear_errors() {
    let s = segmenter();
    let dir = std::env::temp_dir().join(format!("deris-segment-api-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("not-an-image.png");
    std::fs::write(&bad, b"definitely not a PNG").unwrap();
    let e = s.segment_path(&bad, "the ball").unwrap_err().to_string();
    assert!(e.contains("not-an-image.png"), "{e}");
    let e = s.segment_path(&dir.join("missing.jpg"), "the ball").unwrap_err().to_string();
    assert!(e.contains("missing.jpg"), "{e}");
    let empty = RgbImage { h: 0, w: 0, data: vec![] };
    assert!(s.segment(&empty, "the ball").is_err());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn loading_errors_name_the_problem() {
    let dev = Device::Cpu;
    // tiny-a embeds 512 token ids; the test tokenizer produces 802.
    let tiny_a = common::tiny_a_config();
    let e = Segmenter::load(&tiny_a, &Weights::File(common::fixture("tiny-a/weights.safetensors")), &tokenizer(), &dev).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, Error::Config { .. }) && msg.contains("802") && msg.contains("512") && msg.contains("test.spm"), "{msg}");

    let e = Segmenter::load(&demo_config(), &Weights::File("/nonexistent/weights.pth".into()), &tokenizer(), &dev).unwrap_err().to_string();
    assert!(e.contains("/nonexistent/weights.pth"), "{e}");
    let e = Segmenter::load(&demo_config(), &Weights::Random { seed: 0 }, Path::new("/nonexistent/beit3.spm"), &dev).unwrap_err().to_string();
    assert!(e.contains("/nonexistent/beit3.spm"), "{e}");
    // Weights of another model: every key problem in one error.
    let e = Segmenter::load(&demo_config(), &Weights::File(common::fixture("tiny-a/weights.safetensors")), &tokenizer(), &dev).unwrap_err();
    assert!(matches!(e, Error::KeyMismatch { .. }), "{e}");
    for t in [-0.1, 1.5, f64::NAN] {
        let s = Segmenter::load(&demo_config(), &Weights::Random { seed: 0 }, &tokenizer(), &dev).unwrap();
        assert!(s.with_score_threshold(t).is_err(), "{t}");
    }
}

#[test]
fn rle_matches_pycocotools_on_the_gold_masks() {
    let cases: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(common::fixture("gold/masks/cases.json")).unwrap()).unwrap();
    let mut checked = 0;
    for c in cases["binary_cases"].as_array().unwrap() {
        let (h, w) = (c["h"].as_u64().unwrap() as usize, c["w"].as_u64().unwrap() as usize);
        let data: Vec<u8> = match c["mask_rowmajor01"].as_str() {
            Some(s) => s.bytes().map(|b| b - b'0').collect(),
            None => {
                let mut d = vec![0u8; h * w];
                for r in c["mask_rects"].as_array().unwrap() {
                    let r: Vec<usize> = r.as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
                    for y in r[0]..r[2] {
                        for x in r[1]..r[3] {
                            d[y * w + x] = 1;
                        }
                    }
                }
                d
            }
        };
        let mask = BinaryMask { height: h, width: w, data };
        let want = c["rle_counts"].as_str().unwrap();
        assert_eq!(coco_rle_counts(&mask).unwrap(), want, "case {}", c["id"]);
        assert_eq!(decode_rle(want, h, w), mask.data, "decoding case {}", c["id"]);
        // The nearest rescale of the final mask is OpenCV's: the gold 384² resize.
        let up = rescale_mask(&mask, 384, 384).unwrap();
        assert_eq!(coco_rle_counts(&up).unwrap(), c["resized384_rle_counts"].as_str().unwrap(), "384² resize of case {}", c["id"]);
        checked += 1;
    }
    println!("{checked} gold RLE cases");
    assert!(checked >= 50);
}

#[test]
fn segments_the_fixture_photo() {
    let Some(dog) = common::optional_fixture("images/dog.jpg") else { return };
    let p = segmenter().segment_path(&dog, "the dog").unwrap();
    let img = deris::preprocess::image::load_image(&dog).unwrap();
    assert_eq!((p.height(), p.width()), (img.h, img.w));
    println!("{p:?}");
}
