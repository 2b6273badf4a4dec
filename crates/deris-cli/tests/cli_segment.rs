//! `deris segment` end to end with the demo model (random weights) and the test tokenizer: the
//! output files exist, decode and have the right sizes; the RLE in result.json is the PNG mask;
//! batch mode survives bad inputs; bad arguments fail with a message and exit status 2.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn fixtures() -> PathBuf {
    match std::env::var("DERIS_FIXTURES") {
        Ok(p) => PathBuf::from(p),
        Err(_) => repo().join("fixtures"),
    }
}

fn fixture(rel: &str) -> PathBuf {
    let p = fixtures().join(rel);
    assert!(p.exists(), "fixture missing: {}", p.display());
    p
}

fn temp_dir(test: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("deris-cli-segment-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// `deris segment` with the demo model and the test tokenizer, plus `args`.
fn segment(args: &[&str]) -> Output {
    let config = repo().join("configs/demo-tiny.json");
    let tokenizer = fixture("gold/tokenizer/test.spm");
    let out = Command::new(env!("CARGO_BIN_EXE_deris"))
        .arg("segment")
        .args(["--config", config.to_str().unwrap(), "--tokenizer", tokenizer.to_str().unwrap()])
        .args(args)
        .output()
        .unwrap();
    println!("status: {:?}\nstdout: {}\nstderr: {}", out.status.code(), String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    out
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A smooth RGB test picture with a disc, `w × h`.
fn rgb(w: u32, h: u32) -> image::RgbImage {
    image::RgbImage::from_fn(w, h, |x, y| {
        let (dx, dy) = (x as f64 - w as f64 * 0.4, y as f64 - h as f64 * 0.5);
        if dx * dx + dy * dy < (h.min(w) as f64 * 0.3).powi(2) {
            image::Rgb([240, 200, 30])
        } else {
            image::Rgb([(x * 255 / w) as u8, (y * 255 / h) as u8, 90])
        }
    })
}

/// pycocotools `rleFrString` + decode: the compressed counts string to a row-major 0/1 mask.
fn decode_rle(counts: &str, h: usize, w: usize) -> Vec<u8> {
    let b = counts.as_bytes();
    let (mut runs, mut p): (Vec<i64>, usize) = (Vec::new(), 0);
    while p < b.len() {
        let (mut x, mut k) = (0i64, 0);
        loop {
            let c = i64::from(b[p]) - 48;
            x |= (c & 0x1f) << (5 * k);
            p += 1;
            k += 1;
            if c & 0x20 == 0 {
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
    let col_major: Vec<u8> = runs.iter().enumerate().flat_map(|(i, &r)| std::iter::repeat_n((i % 2) as u8, r as usize)).collect();
    assert_eq!(col_major.len(), h * w);
    (0..h * w).map(|i| col_major[(i % w) * h + i / w]).collect()
}

/// Checks one output folder against the input size; returns result.json.
fn check_outputs(dir: &Path, w: u32, h: u32) -> serde_json::Value {
    let mask = image::open(dir.join("mask.png")).unwrap();
    assert_eq!((mask.width(), mask.height()), (w, h), "mask.png size");
    let mask = mask.into_luma8();
    assert!(mask.as_raw().iter().all(|&v| v == 0 || v == 255), "mask.png is not 0/255");
    let overlay = image::open(dir.join("overlay.png")).unwrap();
    assert_eq!((overlay.width(), overlay.height()), (w, h), "overlay.png size");
    assert!(matches!(overlay, image::DynamicImage::ImageRgb8(_)));
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("result.json")).unwrap()).unwrap();
    assert_eq!(v["image_size"], serde_json::json!({ "height": h, "width": w }));
    assert_eq!(v["mask"]["size"], serde_json::json!([h, w]));
    let decoded = decode_rle(v["mask"]["counts"].as_str().unwrap(), h as usize, w as usize);
    let png01: Vec<u8> = mask.as_raw().iter().map(|&v| u8::from(v == 255)).collect();
    assert_eq!(decoded, png01, "the RLE in result.json is not mask.png");
    assert_eq!(v["no_target"].as_bool().unwrap(), png01.iter().all(|&v| v == 0));
    assert!(v["timings"]["forward_s"].as_f64().unwrap() > 0.0);
    let names: Vec<String> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert!(!names.iter().any(|n| n.contains(".tmp-")), "temporary files left: {names:?}");
    v
}

#[test]
fn single_image_writes_mask_overlay_and_json() {
    let dir = temp_dir("single");
    let img = dir.join("ball.png");
    rgb(203, 117).save(&img).unwrap();
    let out = dir.join("out");
    let o = segment(&["--image", s(&img), "--text", "the yellow ball", "--random-weights", "3", "--out", s(&out)]);
    assert!(o.status.success());
    let v = check_outputs(&out, 203, 117);
    assert_eq!(v["text"], "the yellow ball");
    assert_eq!(v["score_threshold"], 0.7);
    assert_eq!(v["queries"].as_array().unwrap().len(), 5);
    assert!(String::from_utf8_lossy(&o.stdout).contains("target"));

    // --threshold 1 forces "no target": empty mask, and the same sizes.
    let out1 = dir.join("out-nt");
    let o = segment(&["--image", s(&img), "--text", "the yellow ball", "--random-weights", "3", "--out", s(&out1), "--threshold", "1"]);
    assert!(o.status.success());
    let v = check_outputs(&out1, 203, 117);
    assert_eq!(v["no_target"], true);
    assert!(String::from_utf8_lossy(&o.stdout).contains("no target"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A PNG whose header claims `w × h`, with the start of an image data chunk but no pixels: for
/// the size checks, which must come before any decoding.
fn png_header_only(w: u32, h: u32) -> Vec<u8> {
    fn crc32(bytes: &[u8]) -> u32 {
        let mut c = 0xFFFF_FFFFu32;
        for &b in bytes {
            c ^= u32::from(b);
            for _ in 0..8 {
                c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
            }
        }
        !c
    }
    let mut ihdr = b"IHDR".to_vec();
    ihdr.extend(w.to_be_bytes());
    ihdr.extend(h.to_be_bytes());
    ihdr.extend([8, 2, 0, 0, 0]);
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend(13u32.to_be_bytes());
    png.extend(&ihdr);
    png.extend(crc32(&ihdr).to_be_bytes());
    let idat = b"IDAT\x78\x9c";
    png.extend(2u32.to_be_bytes());
    png.extend(idat);
    png.extend(crc32(idat).to_be_bytes());
    png.extend(0u32.to_be_bytes());
    png.extend(b"IEND");
    png.extend(crc32(b"IEND").to_be_bytes());
    png
}

#[test]
fn folder_batch_converts_png_layouts_and_survives_bad_files() {
    let dir = temp_dir("folder");
    let imgs = dir.join("imgs");
    std::fs::create_dir_all(&imgs).unwrap();
    let base = rgb(90, 70);
    image::DynamicImage::ImageRgb8(base.clone()).into_luma8().save(imgs.join("a-gray.png")).unwrap();
    image::DynamicImage::ImageRgb8(base.clone()).into_rgba8().save(imgs.join("b-rgba.png")).unwrap();
    image::DynamicImage::ImageRgb8(base.clone()).into_rgb16().save(imgs.join("c-rgb16.png")).unwrap();
    base.save(imgs.join("d-rgb.jpg")).unwrap();
    std::fs::write(imgs.join("e-corrupt.jpg"), b"\xFF\xD8\xFF\xE0 this is not really a JPEG").unwrap();
    let full = std::fs::read(imgs.join("a-gray.png")).unwrap();
    std::fs::write(imgs.join("f-truncated.png"), &full[..full.len() / 2]).unwrap();
    std::fs::write(imgs.join("g-empty-0x0.png"), png_header_only(0, 0)).unwrap();
    std::fs::write(imgs.join("h-enormous.png"), png_header_only(100_000, 100_000)).unwrap();
    std::fs::write(imgs.join("notes.txt"), "not an image").unwrap();
    let out = dir.join("out");
    let o = segment(&["--images", s(&imgs), "--text", "the ball", "--random-weights", "1", "--out", s(&out), "--batch", "3"]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    for bad in ["e-corrupt.jpg", "f-truncated.png", "g-empty-0x0.png", "h-enormous.png"] {
        assert!(err.lines().any(|l| l.starts_with("error:") && l.contains(bad)), "no error line for {bad}:\n{err}");
        assert!(!out.join(bad).join("mask.png").exists());
    }
    assert!(err.contains("larger than the limit"), "{err}");
    assert!(err.contains("4 of 8 inputs failed"), "{err}");
    for good in ["a-gray.png", "b-rgba.png", "c-rgb16.png", "d-rgb.jpg"] {
        check_outputs(&out.join(good), 90, 70);
    }
    let summary: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!((summary["inputs"].as_u64(), summary["failed"].as_u64()), (Some(8), Some(4)));
    // Per-image coupling: the same picture in gray, RGBA and 16-bit gives one RGB input for the
    // last two (alpha dropped, high byte kept), hence the same result.
    let rgba: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("b-rgba.png/result.json")).unwrap()).unwrap();
    let rgb16: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("c-rgb16.png/result.json")).unwrap()).unwrap();
    assert_eq!(rgba["mask"], rgb16["mask"]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn manifest_batch_reports_each_failure_and_completes_the_rest() {
    let dir = temp_dir("manifest");
    rgb(64, 48).save(dir.join("a.png")).unwrap();
    rgb(50, 80).save(dir.join("c.png")).unwrap();
    std::fs::write(dir.join("corrupt.jpg"), b"garbage").unwrap();
    let abs_c = dir.join("c.png");
    let manifest = dir.join("inputs.jsonl");
    std::fs::write(
        &manifest,
        format!(
            "{{\"image\": \"a.png\", \"text\": \"the ball\"}}\n{{\"image\": \"corrupt.jpg\", \"text\": \"the ball\"}}\nnot json\n\n{{\"image\": \"a.png\", \"text\": \"?!\"}}\n{{\"image\": {:?}, \"text\": \"the dark corner\"}}\n",
            s(&abs_c)
        ),
    )
    .unwrap();
    let out = dir.join("out");
    let o = segment(&["--manifest", s(&manifest), "--random-weights", "1", "--out", s(&out), "--batch", "2"]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.lines().any(|l| l.starts_with("error:") && l.contains("corrupt.jpg")), "{err}");
    assert!(err.contains("inputs.jsonl:3"), "{err}");
    assert!(err.lines().any(|l| l.contains("inputs.jsonl:5") && l.contains("no tokens")), "{err}");
    assert!(err.contains("3 of 5 inputs failed"), "{err}");
    check_outputs(&out.join("0001-a"), 64, 48);
    check_outputs(&out.join("0006-c"), 50, 80);
    assert!(!out.join("0002-corrupt").join("mask.png").exists());
    let summary: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["succeeded"], 2);
    assert!(summary["results"][1]["input"].as_str().unwrap().contains("corrupt.jpg"));
    assert!(summary["results"][1]["error"].is_string() && summary["results"][0]["error"].is_null());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn batch_results_equal_single_results() {
    let dir = temp_dir("batch-eq");
    for (name, (w, h)) in [("p.png", (64, 48)), ("q.png", (33, 90)), ("r.png", (120, 40))] {
        rgb(w, h).save(dir.join(name)).unwrap();
    }
    let batch_out = dir.join("batch");
    assert!(segment(&["--images", s(&dir), "--text", "the ball", "--random-weights", "5", "--out", s(&batch_out), "--batch", "3"]).status.success());
    for name in ["p.png", "q.png", "r.png"] {
        let single_out = dir.join(format!("single-{name}"));
        assert!(segment(&["--image", s(&dir.join(name)), "--text", "the ball", "--random-weights", "5", "--out", s(&single_out)]).status.success());
        let read = |d: &Path| -> serde_json::Value { serde_json::from_str(&std::fs::read_to_string(d.join("result.json")).unwrap()).unwrap() };
        let (b, s1) = (read(&batch_out.join(name)), read(&single_out));
        assert_eq!(b["mask"], s1["mask"], "{name}");
        assert_eq!(b["no_target"], s1["no_target"], "{name}");
        for (qb, qs) in b["queries"].as_array().unwrap().iter().zip(s1["queries"].as_array().unwrap()) {
            let (x, y) = (qb["score"].as_f64().unwrap(), qs["score"].as_f64().unwrap());
            assert!((x - y).abs() < 1e-5, "{name}: {x} vs {y}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_arguments_fail_cleanly() {
    let dir = temp_dir("bad-args");
    let img = dir.join("ball.png");
    rgb(40, 30).save(&img).unwrap();
    let out = dir.join("out");
    let expect_fail = |args: &[&str], needle: &str| {
        let o = segment(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(needle), "{args:?}: expected '{needle}' in:\n{err}");
        assert!(!out.join("mask.png").exists(), "{args:?} left an output");
    };
    expect_fail(&["--image", s(&img), "--text", "the ball", "--weights", "/nonexistent/w.pth", "--out", s(&out)], "/nonexistent/w.pth");
    expect_fail(&["--image", s(&img), "--text", "", "--random-weights", "0", "--out", s(&out)], "empty");
    expect_fail(&["--image", s(&img), "--text", "...", "--random-weights", "0", "--out", s(&out)], "no tokens");
    expect_fail(&["--image", s(&dir.join("missing.png")), "--text", "the ball", "--random-weights", "0", "--out", s(&out)], "missing.png");
    expect_fail(&["--image", s(&img), "--text", "x", "--random-weights", "0", "--out", s(&out), "--threshold", "2"], "threshold");
    #[cfg(not(feature = "cuda"))]
    expect_fail(&["--image", s(&img), "--text", "x", "--random-weights", "0", "--out", s(&out), "--device", "cuda"], "`cuda` feature");

    // A tokenizer that does not exist, and one that does not fit the model (tiny-a embeds 512 ids).
    let o = Command::new(env!("CARGO_BIN_EXE_deris"))
        .args(["segment", "--image", s(&img), "--text", "x", "--random-weights", "0", "--out", s(&out)])
        .args(["--config", s(&repo().join("configs/demo-tiny.json")), "--tokenizer", "/nonexistent/beit3.spm"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("/nonexistent/beit3.spm"));
    let o = Command::new(env!("CARGO_BIN_EXE_deris"))
        .args(["segment", "--image", s(&img), "--text", "x", "--out", s(&out)])
        .args(["--config", s(&repo().join("configs/tiny-a.json")), "--weights", s(&fixture("tiny-a/weights.safetensors"))])
        .args(["--tokenizer", s(&fixture("gold/tokenizer/test.spm"))])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("vocab_size") && err.contains("802") && err.contains("512"), "{err}");
    assert!(!out.exists());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn never_overwrites_an_input() {
    let dir = temp_dir("overwrite");
    // The input is called mask.png and the output folder is its own folder.
    let img = dir.join("mask.png");
    rgb(40, 30).save(&img).unwrap();
    let before = std::fs::read(&img).unwrap();
    let o = segment(&["--image", s(&img), "--text", "the ball", "--random-weights", "0", "--out", s(&dir)]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("refusing to overwrite the input"));
    assert_eq!(std::fs::read(&img).unwrap(), before);
    let _ = std::fs::remove_dir_all(&dir);
}
