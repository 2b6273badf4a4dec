//! Bit-exactness against pycocotools 2.0.11 and OpenCV 4.10 on `fixtures/gold/masks/cases.json`:
//! every polygon case (per-polygon RLEs and areas, the merged RLE, area, bbox, decoded mask, the
//! 384×384 nearest resize, and the error cases) and every binary case (encode, uncompressed runs,
//! area, bbox, decode round trip, resize).

use std::path::PathBuf;

use deris_coco::{fr_polygons, CocoError, Rle};
use serde_json::Value;

/// `$DERIS_FIXTURES`, else the repository's `fixtures/`, else `../shared/fixtures` beside the checkout.
fn fixture(rel: &str) -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let candidates = match std::env::var("DERIS_FIXTURES") {
        Ok(p) => vec![PathBuf::from(p)],
        Err(_) => vec![root.join("fixtures"), root.join("../shared/fixtures")],
    };
    let found = candidates.iter().map(|d| d.join(rel)).find(|p| p.exists());
    found.unwrap_or_else(|| panic!("fixture {rel} missing (looked in {candidates:?}; set DERIS_FIXTURES)"))
}

fn cases() -> Value {
    let p = fixture("gold/masks/cases.json");
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

fn size(case: &Value) -> (u32, u32) {
    (case["h"].as_u64().unwrap() as u32, case["w"].as_u64().unwrap() as u32)
}

fn bbox(v: &Value) -> [f64; 4] {
    let b: Vec<f64> = v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
    [b[0], b[1], b[2], b[3]]
}

fn mask01(s: &str) -> Vec<u8> {
    s.bytes().map(|b| u8::from(b == b'1')).collect()
}

/// Checks the fields shared by both case kinds on the merged/encoded mask `rle`.
fn check_common(label: &str, case: &Value, rle: &Rle, counts_key: &str) {
    let (h, w) = size(case);
    assert_eq!(rle.to_counts_string(), case[counts_key].as_str().unwrap(), "{label}: {counts_key}");
    assert_eq!(rle.area(), case["area"].as_u64().unwrap(), "{label}: area");
    assert_eq!(rle.to_bbox(), bbox(&case["bbox"]), "{label}: bbox");
    // The string decodes back to the same runs.
    let parsed = Rle::from_counts_string(case[counts_key].as_str().unwrap(), h, w).unwrap();
    assert_eq!(&parsed, rle, "{label}: from_counts_string");
    if let Some(m) = case["mask_rowmajor01"].as_str() {
        assert_eq!(rle.to_rowmajor(), mask01(m), "{label}: decoded mask");
    }
    let resized = rle.resize_nearest(384, 384).unwrap();
    assert_eq!(resized.to_counts_string(), case["resized384_rle_counts"].as_str().unwrap(), "{label}: resized384 RLE");
    assert_eq!(resized.area(), case["resized384_area"].as_u64().unwrap(), "{label}: resized384 area");
}

#[test]
fn polygon_cases_are_bit_exact() {
    let all = cases();
    let cases = all["polygon_cases"].as_array().unwrap();
    assert!(!cases.is_empty());
    let (mut checked, mut errors) = (0, 0);
    for case in cases {
        let label = format!("polygon case {} ({})", case["id"], case["tag"].as_str().unwrap());
        let (h, w) = size(case);
        let polygons: Vec<Vec<f64>> = case["polygons"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect())
            .collect();
        let result = fr_polygons(&polygons, h, w);
        if let Some(err) = case.get("error").and_then(Value::as_str) {
            assert!(err.starts_with("TypeError"), "{label}: unexpected kind of gold error {err}");
            assert_eq!(result, Err(CocoError::FirstPolygonIsBox), "{label}");
            errors += 1;
            continue;
        }
        let rles = result.unwrap_or_else(|e| panic!("{label}: {e}"));
        let want_counts = case["per_polygon_rle_counts"].as_array().unwrap();
        let want_areas = case["per_polygon_area"].as_array().unwrap();
        assert_eq!(rles.len(), want_counts.len(), "{label}: number of RLEs");
        for (i, r) in rles.iter().enumerate() {
            assert_eq!(r.to_counts_string(), want_counts[i].as_str().unwrap(), "{label}: polygon {i} RLE");
            assert_eq!(r.area(), want_areas[i].as_u64().unwrap(), "{label}: polygon {i} area");
        }
        let merged = Rle::merge(&rles).unwrap();
        check_common(&label, case, &merged, "merged_rle_counts");
        // pycocotools checked that merge == encode(decode(merge)); so do we.
        assert_eq!(Rle::from_colmajor(&merged.to_colmajor(), h, w).unwrap(), merged, "{label}: canonical merge");
        checked += 1;
    }
    println!("{checked} polygon cases bit-exact, {errors} error case(s) rejected");
}

#[test]
fn binary_cases_are_bit_exact() {
    let all = cases();
    let cases = all["binary_cases"].as_array().unwrap();
    assert!(!cases.is_empty());
    for case in cases {
        let label = format!("binary case {} ({})", case["id"], case["tag"].as_str().unwrap());
        let (h, w) = size(case);
        let rowmajor = match case["mask_rowmajor01"].as_str() {
            Some(s) => mask01(s),
            None => {
                let mut m = vec![0u8; (h * w) as usize];
                for r in case["mask_rects"].as_array().unwrap() {
                    let r: Vec<usize> = r.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
                    for y in r[0]..r[2] {
                        for x in r[1]..r[3] {
                            m[y * w as usize + x] = 1;
                        }
                    }
                }
                m
            }
        };
        let rle = Rle::from_rowmajor(&rowmajor, h, w).unwrap();
        let want_runs: Vec<u32> =
            case["counts_uncompressed"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
        assert_eq!(rle.counts(), want_runs.as_slice(), "{label}: uncompressed runs");
        assert_eq!(Rle::from_counts(h, w, want_runs).unwrap(), rle, "{label}: from_counts");
        assert_eq!(rle.to_rowmajor(), rowmajor, "{label}: decode round trip");
        assert!(case["decode_roundtrip_equal"].as_bool().unwrap());
        check_common(&label, case, &rle, "rle_counts");
    }
    println!("{} binary cases bit-exact", cases.len());
}

#[test]
fn nearest_rule_matches_the_recorded_check() {
    // The gold file records 0 mismatches of the reciprocal rule and N of the naive one, per target.
    let all = cases();
    for (dst, check) in all["nearest_resize_rule_check"].as_object().unwrap() {
        let dst: usize = dst.parse().unwrap();
        let naive_mismatches = (1..=1200usize)
            .filter(|&src| {
                (0..dst).any(|d| {
                    deris_coco::nearest_index(d, src, dst) != ((d as f64 * (src as f64 / dst as f64)).floor() as usize).min(src - 1)
                })
            })
            .count();
        assert_eq!(naive_mismatches as u64, check["mismatches_floor_x_times_src_over_dst"].as_u64().unwrap(), "dst {dst}");
    }
}
