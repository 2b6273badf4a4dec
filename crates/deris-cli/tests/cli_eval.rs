//! `deris eval` end to end on the generated mini datasets (`deris::data::mini`) with the demo
//! model (`configs/demo-tiny.json`, random weights) and the test tokenizer: the report (table,
//! JSON line, JSON file) has the right counts and values in [0, 100]; `deris metrics` on the saved
//! predictions gives the same numbers; both protocols run; missing images, unknown splits and
//! malformed annotations fail with exit status 2 and a message naming the culprit.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use deris::data::mini::{self, MiniDataset};
use deris::data::Layout;
use serde_json::Value;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `$DERIS_FIXTURES`, else the repository's `fixtures/`, else `../shared/fixtures` beside the checkout.
fn fixture(rel: &str) -> PathBuf {
    let candidates = match std::env::var("DERIS_FIXTURES") {
        Ok(p) => vec![PathBuf::from(p)],
        Err(_) => vec![repo().join("fixtures"), repo().join("../shared/fixtures")],
    };
    let found = candidates.iter().map(|d| d.join(rel)).find(|p| p.exists());
    found.unwrap_or_else(|| panic!("fixture {rel} missing (looked in {candidates:?}; set DERIS_FIXTURES)"))
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn deris(args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_deris")).args(args).output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    println!("deris {args:?}\nstatus: {:?}\nstdout: {stdout}\nstderr: {stderr}", out.status.code());
    out
}

/// `deris eval` on `mini`'s annotations and images with the demo model, plus `args`.
fn eval(mini: &MiniDataset, args: &[&str]) -> Output {
    let config = repo().join("configs/demo-tiny.json");
    let tokenizer = fixture("gold/tokenizer/test.spm");
    let mut all = vec![
        "eval",
        "--annotations",
        s(&mini.source.annotations),
        "--data-root",
        s(&mini.source.image_root),
        "--config",
        s(&config),
        "--tokenizer",
        s(&tokenizer),
        "--random-weights",
        "0",
    ];
    all.extend_from_slice(args);
    deris(&all)
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn read_json(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// Every metric is a number in [0, 100] (or null where undefined).
fn assert_percentages(metrics: &Value, keys: &[&str]) {
    let m = metrics.as_object().unwrap();
    assert_eq!(m.len(), keys.len(), "{metrics}");
    for k in keys {
        let v = &m[*k];
        assert!(v.is_null() || v.as_f64().is_some_and(|x| (0.0..=100.0).contains(&x)), "{k} = {v}");
    }
}

/// `deris metrics` on the saved predictions.
fn metrics(task: &str, file: &Path) -> Value {
    let out = deris(&["metrics", "--task", task, "--score-threshold", "0.7", s(file)]);
    assert!(out.status.success());
    serde_json::from_slice(&out.stdout).unwrap()
}

const GRES_KEYS: [&str; 7] = ["gIoU", "cIoU", "N-acc", "T-acc", "Pr@0.7", "Pr@0.8", "Pr@0.9"];
const RIS_KEYS: [&str; 7] = ["mIoU", "oIoU", "Pr@0.5", "Pr@0.6", "Pr@0.7", "Pr@0.8", "Pr@0.9"];

#[test]
fn grefcoco_both_protocols_and_metrics_reproduce_the_report() {
    let tmp = tempfile::tempdir().unwrap();
    let mini = mini::write(&tmp.path().join("g"), Layout::DerisGrefs).unwrap();
    let n = mini.expected("val").len();
    for protocol in ["reference", "original"] {
        let (preds, report) = (tmp.path().join(format!("{protocol}.jsonl")), tmp.path().join(format!("{protocol}.json")));
        let out = eval(
            &mini,
            &["--split", "val", "--protocol", protocol, "--json", "--batch", "3", "--save-predictions", s(&preds), "--report-json", s(&report)],
        );
        assert!(out.status.success(), "{protocol}");
        let line: Value = serde_json::from_slice(&out.stdout).expect("--json prints one JSON line");
        let file = read_json(&report);
        assert_eq!(file, line, "{protocol}: the report file is the printed line");
        assert_eq!((line["task"].as_str(), line["protocol"].as_str(), line["split"].as_str()), (Some("gres"), Some(protocol), Some("val")));
        let counts = (line["samples"].as_u64(), line["evaluated"].as_u64(), line["missing_images"].as_u64());
        assert_eq!(counts, (Some(n as u64), Some(n as u64), Some(0)), "{protocol}");
        assert_eq!(line["details"]["empty"].as_u64(), Some(mini.expected("val").iter().filter(|e| e.ann_ids.is_empty()).count() as u64));
        assert_percentages(&line["metrics"], &GRES_KEYS);
        // The table goes to stderr with --json.
        assert!(stderr(&out).contains("| Split | N-acc. | gIoU | cIoU | T-acc. |\n| --- | --- | --- | --- | --- |\n| val | "), "{protocol}");

        let lines: Vec<Value> = std::fs::read_to_string(&preds).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), n, "{protocol}: one record per sentence");
        let size = if protocol == "reference" { Some(vec![384, 384]) } else { None };
        for l in &lines {
            assert!(l["pred"]["counts"].is_string() && l["gt"]["counts"].is_string() && l["gt_no_target"].is_boolean());
            assert_eq!(l["scores"].as_array().map(Vec::len), Some(5));
            if let Some(size) = &size {
                assert_eq!(l["pred"]["size"], serde_json::json!(size));
            }
        }
        assert_eq!(metrics("gres", &preds), line["metrics"], "{protocol}: deris metrics on the saved predictions");
    }
}

#[test]
fn refcoco_pickle_layout_default_table() {
    let tmp = tempfile::tempdir().unwrap();
    let mini = mini::write(&tmp.path().join("r"), Layout::ReferPickle).unwrap();
    let preds = tmp.path().join("preds.jsonl");
    let out = eval(&mini, &["--split", "val", "--save-predictions", s(&preds)]);
    assert!(out.status.success());
    // The README's split name (from refcoco/refs(unc).p) and columns, on stdout.
    let table = String::from_utf8(out.stdout.clone()).unwrap();
    let rows: Vec<&str> = table.lines().collect();
    assert_eq!(rows.len(), 3, "{table}");
    assert_eq!(rows[0], "| Split | mIoU | oIoU | MaskACC@0.5-0.9 |");
    assert!(rows[2].starts_with("| val_refcoco_unc | "), "{table}");
    let cells: Vec<&str> = rows[2].trim_matches('|').split('|').map(str::trim).collect();
    let m = metrics("ris", &preds);
    assert_percentages(&m, &RIS_KEYS);
    let two = |k: &str| m[k].as_f64().map_or("n/a".to_string(), |x| format!("{x:.2}"));
    assert_eq!(cells[1..3], [two("mIoU"), two("oIoU")], "{table}");
    let pr: Vec<String> = ["Pr@0.5", "Pr@0.6", "Pr@0.7", "Pr@0.8", "Pr@0.9"].iter().map(|k| two(k)).collect();
    assert_eq!(cells[3], pr.join(", "), "{table}");
    let n = std::fs::read_to_string(&preds).unwrap().lines().count();
    assert_eq!(n, mini.expected("val").len());
    assert!(stderr(&out).contains(&format!("evaluated {n} of {n} sentences of val_refcoco_unc")));
}

#[test]
fn missing_images_stop_the_run_unless_skipped() {
    let tmp = tempfile::tempdir().unwrap();
    let mini = mini::write(&tmp.path().join("g"), Layout::DerisGrefs).unwrap();
    let split = mini.source.read_split("val").unwrap();
    let gone = split.samples[1].image_path.clone();
    let sentences = deris::eval::protocol::sentences(&split, None);
    let affected = sentences.iter().filter(|x| x.image_path == gone).count();
    std::fs::remove_file(&gone).unwrap();

    let preds = tmp.path().join("preds.jsonl");
    let out = eval(&mini, &["--split", "val", "--save-predictions", s(&preds)]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(err.contains(&split.samples[1].label) && err.contains(s(&gone)) && err.contains("--skip-missing"), "{err}");
    assert!(!preds.exists(), "no partial output");

    let report = tmp.path().join("report.json");
    let out = eval(&mini, &["--split", "val", "--skip-missing", "--report-json", s(&report)]);
    assert!(out.status.success());
    let r = read_json(&report);
    let n = sentences.len() as u64;
    let counts = (r["samples"].as_u64(), r["evaluated"].as_u64(), r["missing_images"].as_u64());
    assert_eq!(counts, (Some(n), Some(n - affected as u64), Some(affected as u64)));
    assert!(stderr(&out).contains(&format!("{affected} of {n} samples skipped")));
}

#[test]
fn unknown_split_and_malformed_annotations() {
    let tmp = tempfile::tempdir().unwrap();
    let mini = mini::write(&tmp.path().join("s"), Layout::SeqtrMixedSeg).unwrap();
    let out = eval(&mini, &["--split", "val"]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(err.contains("no split 'val'") && err.contains("testA_refcoco_unc, train, val_refcoco_unc"), "{err}");

    let bad = MiniDataset { source: deris::data::AnnotationSource::new(tmp.path().join("bad.json"), &mini.source.image_root), ..mini.clone() };
    std::fs::write(&bad.source.annotations, r#"{"val": [{"image_id": 1, "expressions": ["x"]}]}"#).unwrap();
    let out = eval(&bad, &["--split", "val", "--layout", "seqtr-mixed-seg"]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(err.contains("bad.json") && err.contains("val item 0"), "{err}");

    let out = eval(&mini, &["--split", "val_refcoco_unc", "--batch", "0"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--batch"));
}

#[test]
fn objects_add_a_diagnosis() {
    let tmp = tempfile::tempdir().unwrap();
    let mini = mini::write(&tmp.path().join("r"), Layout::RelaGrefs).unwrap();
    let objects = mini.source.annotations.with_file_name("instances.json");
    let report = tmp.path().join("report.json");
    let out = eval(&mini, &["--split", "val", "--objects", s(&objects), "--report-json", s(&report)]);
    assert_eq!(out.status.code(), Some(0));
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("| oracle selection IoU (%) |") && table.contains("| ranking AUC, referents vs other objects (%) |"), "{table}");
    let json = read_json(&report);
    assert_eq!(json["diagnosis"]["sentences"], json["evaluated"]);
    let oracle = json["diagnosis"]["oracle_iou"].as_f64().unwrap();
    assert!((0.0..=100.0).contains(&oracle), "{oracle}");

    // an objects file that cannot be read names itself
    let out = eval(&mini, &["--split", "val", "--objects", s(&tmp.path().join("nope.json"))]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("nope.json"), "{}", stderr(&out));
}
