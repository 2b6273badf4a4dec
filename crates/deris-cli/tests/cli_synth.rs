//! `deris synth` end to end: a small dataset written to a temporary folder, its JSON summary, the
//! files read back by the gRefCOCO reader; a bad option exits 2 and writes nothing.

use std::process::{Command, Output};

use deris::data::nsc::NscBank;
use deris::data::AnnotationSource;
use serde_json::Value;

fn deris(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_deris")).args(args).output().unwrap()
}

#[test]
fn synth_writes_a_dataset_the_reader_reads() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("shapes");
    let out = deris(&["synth", "--out", dir.to_str().unwrap(), "--seed", "4", "--train", "6", "--val", "2", "--per-image", "2", "--size", "96"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["train"]["images"], 6);
    assert_eq!(summary["train"]["items"], 12);
    assert_eq!(summary["val"]["items"], 4);

    let annotations = dir.join("grefs/instances.json");
    assert_eq!(summary["annotations"].as_str().unwrap(), annotations.to_str().unwrap());
    let source = AnnotationSource::new(&annotations, dir.join("images"));
    for split in ["train", "val"] {
        let s = source.read_split(split).unwrap();
        assert_eq!(s.layout, deris::data::Layout::DerisGrefs);
        assert_eq!(s.len() as u64, summary[split]["items"].as_u64().unwrap());
        assert_eq!(s.samples.iter().filter(|x| x.no_target()).count() as u64, summary[split]["no_target"].as_u64().unwrap());
        assert!(s.missing_images().is_empty());
        for sample in &s.samples {
            assert_eq!(sample.image_size, Some((96, 96)));
            assert!(sample.targets.iter().all(|t| t.bbox.is_some()));
            let gt = sample.gt_mask(96, 96).unwrap();
            assert_eq!(gt.area() == 0, sample.no_target(), "{}", sample.label);
        }
    }
    assert_eq!(NscBank::load(&dir.join("grefs/train_dict.json")).unwrap().len(), 6);

    // The same command again rewrites the same bytes.
    let before = std::fs::read(&annotations).unwrap();
    let again = deris(&["synth", "--out", dir.to_str().unwrap(), "--seed", "4", "--train", "6", "--val", "2", "--per-image", "2", "--size", "96"]);
    assert!(again.status.success());
    assert_eq!(std::fs::read(&annotations).unwrap(), before);
}

#[test]
fn synth_rejects_a_bad_size() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("never");
    let out = deris(&["synth", "--out", dir.to_str().unwrap(), "--size", "8"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("size") && err.contains(dir.to_str().unwrap()), "{err}");
    assert!(!dir.exists());
}
