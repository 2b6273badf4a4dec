//! `deris::eval::protocol::evaluate` end to end on the generated mini datasets
//! (`deris::data::mini`) with the demo model (`configs/demo-tiny.json`, random weights): sample
//! counts, mask sizes under both protocols, the saved records re-scoring to the report, results
//! independent of the batch size, README split names and table, missing images, a callback that
//! stops the run.

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::Device;
use deris::data::mini::{self, MiniDataset};
use deris::data::{Layout, Split};
use deris::eval::protocol::{evaluate, EvalError, EvalOptions, EvalReport, Protocol, Task, TaskReport};
use deris::eval::{GresMetrics, PredictionRecord, RisMetrics};
use deris::preprocess::image::load_image;
use deris::{DerisConfig, Segmenter, Weights};

fn repo(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..").join(rel)
}

fn segmenter() -> &'static Segmenter {
    static S: OnceLock<Segmenter> = OnceLock::new();
    S.get_or_init(|| {
        let cfg = DerisConfig::from_file(&repo("configs/demo-tiny.json")).unwrap();
        Segmenter::load(&cfg, &Weights::Random { seed: 0 }, &common::fixture("gold/tokenizer/test.spm"), &Device::Cpu).unwrap()
    })
}

fn write(dir: &Path, layout: Layout) -> MiniDataset {
    mini::write(&dir.join(format!("{layout:?}")), layout).unwrap()
}

/// The mini dataset's evaluation split (`val`, as the layout spells it).
fn val(mini: &MiniDataset) -> Split {
    mini.source.read_split(&mini.splits[1]).unwrap()
}

/// Runs `evaluate`, keeping every record.
fn run(split: &Split, options: &EvalOptions) -> (EvalReport, Vec<PredictionRecord>) {
    let mut records = Vec::new();
    let report = evaluate(segmenter(), split, options, |p| -> Result<(), std::io::Error> {
        assert_eq!(p.done, records.len() + 1);
        assert!((0.0..=1.0).contains(&p.iou), "{}: iou {}", p.sample.label, p.iou);
        records.push(p.record.clone());
        Ok(())
    })
    .unwrap();
    (report, records)
}

/// The report's headline metrics recomputed from the records, as `deris metrics` does.
fn rescore(task: Task, threshold: f64, records: &[PredictionRecord]) -> serde_json::Value {
    let (mut ris, mut gres) = (RisMetrics::new(), GresMetrics::new(threshold));
    for r in records {
        let (pred, gt) = (r.pred.to_rle().unwrap(), r.gt.to_rle().unwrap());
        match task {
            Task::Ris => drop(ris.add_masks(&pred, &gt).unwrap()),
            Task::Gres => drop(gres.add_masks(&pred, &gt, r.gt_no_target.unwrap(), r.scores.as_ref().unwrap()).unwrap()),
        }
    }
    match task {
        Task::Ris => serde_json::to_value(ris.report().summary()).unwrap(),
        Task::Gres => serde_json::to_value(gres.report().summary()).unwrap(),
    }
}

fn assert_percentages(report: &EvalReport) {
    let summary = report.summary_json();
    for (k, v) in summary.as_object().unwrap() {
        if let Some(x) = v.as_f64() {
            assert!((0.0..=100.0).contains(&x), "{}: {k} = {x}", report.readme_split);
        }
    }
}

#[test]
fn both_protocols_on_a_gres_and_a_ris_layout() {
    let tmp = tempfile::tempdir().unwrap();
    for (layout, task, readme) in [(Layout::DerisGrefs, Task::Gres, "val"), (Layout::SeqtrMixedSeg, Task::Ris, "val_refcoco_unc")] {
        let mini = write(tmp.path(), layout);
        let split = val(&mini);
        let expected = mini.expected(&mini.splits[1]);
        assert_eq!(Task::for_layout(layout), task);
        for protocol in [Protocol::Reference, Protocol::Original] {
            let what = format!("{layout:?} {protocol:?}");
            let options = EvalOptions { protocol, batch_size: 3, ..EvalOptions::new(task) };
            let (report, records) = run(&split, &options);
            assert_eq!((report.samples, report.evaluated, report.skipped.len()), (expected.len(), expected.len(), 0), "{what}");
            assert_eq!(records.len(), expected.len(), "{what}");
            assert_eq!(report.readme_split, readme, "{what}");
            assert_eq!((report.task, report.protocol, report.score_threshold), (task, protocol, 0.7), "{what}");
            assert_percentages(&report);
            assert_eq!(rescore(task, report.score_threshold, &records), report.summary_json(), "{what}: records re-score to the report");
            // Mask sizes: the model's under the reference protocol, else the image's.
            let samples = deris::eval::protocol::sentences(&split, None);
            for (s, r) in samples.iter().zip(&records) {
                let img = load_image(&s.image_path).unwrap();
                let size = match protocol {
                    Protocol::Reference => [384, 384],
                    Protocol::Original => [img.h as u32, img.w as u32],
                };
                assert_eq!((r.pred.size, r.gt.size), (size, size), "{what} {}", s.label);
                assert_eq!(r.gt_no_target, Some(s.no_target()), "{what} {}", s.label);
                assert_eq!(r.scores.as_ref().map(Vec::len), Some(5), "{what}: one score per query");
                // The reference ground truth is the original one nearest-resized.
                let gt_full = s.gt_mask(img.h as u32, img.w as u32).unwrap();
                let want = match protocol {
                    Protocol::Reference => gt_full.resize_nearest(384, 384).unwrap(),
                    Protocol::Original => gt_full,
                };
                assert_eq!(r.gt.to_rle().unwrap(), want, "{what} {}: ground truth", s.label);
            }
            match (&report.metrics, task) {
                (TaskReport::Gres(g), Task::Gres) => {
                    assert_eq!(g.empty as usize, expected.iter().filter(|e| e.ann_ids.is_empty()).count(), "{what}: no-target samples")
                }
                (TaskReport::Ris(r), Task::Ris) => assert_eq!(r.n, expected.len()),
                _ => panic!("{what}: report of the wrong task"),
            }
        }
    }
}

#[test]
fn batch_size_and_limit() {
    let tmp = tempfile::tempdir().unwrap();
    let split = val(&write(tmp.path(), Layout::RelaGrefs));
    let (one, _) = run(&split, &EvalOptions { batch_size: 1, limit: Some(3), ..EvalOptions::new(Task::Gres) });
    let (three, records) = run(&split, &EvalOptions { batch_size: 3, limit: Some(3), ..EvalOptions::new(Task::Gres) });
    assert_eq!(one.metrics, three.metrics, "per-image coupling: the batch size does not change results");
    assert_eq!((three.samples, three.evaluated, records.len()), (3, 3, 3));
    // RIS metrics on a gRefCOCO split run too.
    let (ris, _) = run(&split, &EvalOptions { limit: Some(1), ..EvalOptions::new(Task::Ris) });
    assert!(matches!(ris.metrics, TaskReport::Ris(_)));
    assert!(evaluate(segmenter(), &split, &EvalOptions { batch_size: 0, ..EvalOptions::new(Task::Gres) }, |_| Ok::<_, std::io::Error>(()))
        .is_err());
}

#[test]
fn markdown_and_json_in_the_authors_format() {
    let tmp = tempfile::tempdir().unwrap();
    let (gres, _) = run(&val(&write(tmp.path(), Layout::DerisGrefs)), &EvalOptions { limit: Some(1), ..EvalOptions::new(Task::Gres) });
    let md = gres.markdown();
    let lines: Vec<&str> = md.lines().collect();
    assert_eq!(lines[0], "| Split | N-acc. | gIoU | cIoU | T-acc. |");
    assert_eq!(lines[1], "| --- | --- | --- | --- | --- |");
    assert!(lines[2].starts_with("| val | "), "{md}");
    let (ris, _) = run(&val(&write(tmp.path(), Layout::SeqtrMixedSeg)), &EvalOptions { limit: Some(1), ..EvalOptions::new(Task::Ris) });
    let md = ris.markdown();
    assert!(md.starts_with("| Split | mIoU | oIoU | MaskACC@0.5-0.9 |\n"), "{md}");
    let row = md.lines().nth(2).unwrap();
    assert!(row.starts_with("| val_refcoco_unc | "), "{md}");
    assert_eq!(row.split(" | ").nth(3).unwrap().split(", ").count(), 5, "{md}: five precisions");
    let json = ris.to_json();
    assert_eq!(json["split"], "val_refcoco_unc");
    assert_eq!(json["split_in_file"], "val_refcoco_unc");
    assert_eq!((json["task"].as_str(), json["protocol"].as_str()), (Some("ris"), Some("reference")));
    assert_eq!(json["metrics"], ris.summary_json());
    assert_eq!(json["evaluated"], 1);
}

#[test]
fn missing_images_fail_or_are_skipped() {
    let tmp = tempfile::tempdir().unwrap();
    let mini = write(tmp.path(), Layout::DerisGrefs);
    let split = val(&mini);
    let gone = &split.samples[1].image_path;
    let affected = deris::eval::protocol::sentences(&split, None).iter().filter(|s| &s.image_path == gone).count();
    assert!(affected > 0);
    std::fs::remove_file(gone).unwrap();

    let err = evaluate(segmenter(), &split, &EvalOptions::new(Task::Gres), |_| Ok::<_, std::io::Error>(())).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, EvalError::MissingImage { missing, .. } if missing == affected), "{msg}");
    assert!(msg.contains(&split.samples[1].label) && msg.contains("--skip-missing"), "{msg}");

    let (report, records) = run(&split, &EvalOptions { skip_missing: true, ..EvalOptions::new(Task::Gres) });
    let total = deris::eval::protocol::sentences(&split, None).len();
    assert_eq!((report.samples, report.evaluated, report.skipped.len()), (total, total - affected, affected));
    assert_eq!(records.len(), total - affected);
    assert!(report.skipped.iter().all(|s| &s.image == gone));
    assert_eq!(report.to_json()["missing_images"], affected);
}

#[test]
fn a_failing_callback_stops_the_run() {
    let tmp = tempfile::tempdir().unwrap();
    let split = val(&write(tmp.path(), Layout::SeqtrMixedSeg));
    let mut calls = 0;
    let err = evaluate(segmenter(), &split, &EvalOptions { batch_size: 1, ..EvalOptions::new(Task::Ris) }, |_| {
        calls += 1;
        Err(std::io::Error::other("disk full"))
    })
    .unwrap_err();
    assert_eq!(calls, 1);
    assert!(matches!(err, EvalError::Callback(_)) && err.to_string().contains("disk full"), "{err}");
}
