//! The model built from each released config requests exactly the keys (names and shapes) of the
//! authors' checkpoint (fixtures/keys/*.json), without allocating any weights.

mod common;

use std::collections::BTreeMap;

use deris::model::Deris;
use deris::Preset;

fn expected(file: &str) -> BTreeMap<String, Vec<usize>> {
    let p = common::fixture(&format!("keys/{file}"));
    let text = std::fs::read_to_string(&p).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn check(preset: Preset, file: &str) {
    let cfg = preset.config();
    let (_model, requested) = deris::checkpoint::dry_run(|vb| Deris::new(&cfg, vb)).unwrap();
    let got: BTreeMap<String, Vec<usize>> = requested.into_iter().map(|(n, s, _)| (n, s)).collect();
    let want = expected(file);
    let missing: Vec<_> = want.keys().filter(|k| !got.contains_key(*k)).collect();
    let extra: Vec<_> = got.keys().filter(|k| !want.contains_key(*k)).collect();
    let wrong: Vec<_> = want
        .iter()
        .filter_map(|(k, s)| got.get(k).filter(|g| *g != s).map(|g| format!("{k}: model {g:?} vs file {s:?}")))
        .collect();
    assert!(missing.is_empty() && extra.is_empty() && wrong.is_empty(),
        "{}: {} keys the model does not request: {:?}\n{} keys the file lacks: {:?}\nshape mismatches: {:?}",
        preset.name(), missing.len(), &missing[..missing.len().min(10)], extra.len(), &extra[..extra.len().min(10)], wrong);
    println!("{}: {} keys match", preset.name(), want.len());
}

#[test]
fn deris_b_refcoco_layout() {
    check(Preset::DerisBRefcoco, "keys-DERIS-B-refcoco.json");
}

#[test]
fn deris_l_refcoco_layout() {
    check(Preset::DerisLRefcoco, "keys-DERIS-L-refcoco.json");
}

#[test]
fn deris_b_grefcoco_layout() {
    check(Preset::DerisBGrefcoco, "keys-DERIS-B-grefcoco.json");
}

#[test]
fn deris_l_grefcoco_layout() {
    check(Preset::DerisLGrefcoco, "keys-DERIS-L-grefcoco.json");
}

/// The tiny fixture's config requests exactly the tiny checkpoint's keys too.
#[test]
fn tiny_a_layout() {
    let cfg = common::tiny_a_config();
    let (_m, requested) = deris::checkpoint::dry_run(|vb| Deris::new(&cfg, vb)).unwrap();
    let got: BTreeMap<String, Vec<usize>> = requested.into_iter().map(|(n, s, _)| (n, s)).collect();
    let file = common::load_tensors("tiny-a/weights.safetensors");
    let want: BTreeMap<String, Vec<usize>> = file.iter().map(|(k, t)| (k.clone(), t.dims().to_vec())).collect();
    assert_eq!(got, want);
}
