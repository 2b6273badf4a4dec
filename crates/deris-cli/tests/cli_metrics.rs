//! `deris metrics` end to end: every group of the gold metric files converted to a JSON-lines file
//! of prediction records, run through the binary, and compared with the reference values; bad
//! lines fail with exit status 2 and the line number.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::{json, Value};

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

fn load(rel: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(rel)).unwrap()).unwrap()
}

fn deris(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_deris")).args(args).output().unwrap()
}

/// Runs `deris metrics` on `lines` and returns the printed JSON.
fn metrics(dir: &Path, name: &str, lines: &[Value], args: &[&str]) -> Value {
    let path = dir.join(name);
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(&path, text).unwrap();
    let mut all = vec!["metrics"];
    all.extend_from_slice(args);
    all.push(path.to_str().unwrap());
    let out = deris(&all);
    assert!(out.status.success(), "{name}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{name}: stdout is not one JSON object ({e})"))
}

fn record(s: &Value) -> Value {
    let size = json!([s["h"], s["w"]]);
    json!({"pred": {"size": size, "counts": s["pred_rle_counts"]}, "gt": {"size": size, "counts": s["gt_rle_counts"]},
           "gt_no_target": s.get("gt_nt").cloned().unwrap_or(json!(false)), "scores": s.get("scores").cloned().unwrap_or(json!([]))})
}

fn group_lines(gold: &Value, group: &Value) -> Vec<Value> {
    let samples = gold["samples"].as_array().unwrap();
    group["sample_ids"].as_array().unwrap().iter().map(|i| record(&samples[i.as_u64().unwrap() as usize])).collect()
}

fn check(name: &str, got: &Value, want: &Value) {
    match (got.as_f64(), want.as_f64()) {
        (Some(g), Some(w)) => assert!((g - w).abs() <= 1e-6, "{name}: got {g}, want {w}"),
        _ => assert!(got.is_null() && want.is_null(), "{name}: got {got}, want {want}"),
    }
}

#[test]
fn ris_groups_match_the_reference() {
    let tmp = tempfile::tempdir().unwrap();
    let gold = load("gold/metrics/ris_cases.json");
    for g in gold["groups"].as_array().unwrap() {
        let name = g["name"].as_str().unwrap();
        let out = metrics(tmp.path(), &format!("ris_{name}.jsonl"), &group_lines(&gold, g), &["--task", "ris"]);
        let keys: Vec<&String> = out.as_object().unwrap().keys().collect();
        assert_eq!(keys.len(), 7, "{name}: {keys:?}");
        check(&format!("{name} mIoU"), &out["mIoU"], &g["mIoU"]);
        check(&format!("{name} oIoU"), &out["oIoU"], &g["oIoU"]);
        for (k, t) in ["0.5", "0.6", "0.7", "0.8", "0.9"].iter().enumerate() {
            check(&format!("{name} Pr@{t}"), &out[format!("Pr@{t}")], &g["MaskACC"][k]);
        }
    }
}

#[test]
fn gres_groups_match_the_reference() {
    let tmp = tempfile::tempdir().unwrap();
    let gold = load("gold/metrics/gres_cases.json");
    for g in gold["groups"].as_array().unwrap() {
        let name = g["name"].as_str().unwrap();
        let threshold = g["threshold"].as_f64().unwrap().to_string();
        let out = metrics(tmp.path(), &format!("gres_{name}.jsonl"), &group_lines(&gold, g), &["--task", "gres", "--score-threshold", &threshold]);
        assert_eq!(out.as_object().unwrap().len(), 7, "{name}: {out}");
        let ge = &g["gres_evaluate"];
        check(&format!("{name} gIoU"), &out["gIoU"], &ge["gIoU"]);
        check(&format!("{name} cIoU"), &out["cIoU"], ge.get("cIoU").unwrap_or(&Value::Null));
        check(&format!("{name} N-acc"), &out["N-acc"], &g["grec_evaluate_f1_nacc"]["N_acc"]);
        check(&format!("{name} T-acc"), &out["T-acc"], &g["grec_evaluate_f1_nacc"]["T_acc"]);
        let targets = ge["not_empty_count"].as_u64().unwrap();
        for t in ["0.7", "0.8", "0.9"] {
            let key = format!("Pr@{t}");
            let want = if targets == 0 { Value::Null } else { ge[&key].clone() };
            check(&format!("{name} {key}"), &out[&key], &want);
        }
    }
}

#[test]
fn bad_lines_fail_with_their_line_number() {
    let tmp = tempfile::tempdir().unwrap();
    let good = json!({"pred": {"size": [2, 2], "counts": "04"}, "gt": {"size": [2, 2], "counts": "4"}, "gt_no_target": false, "scores": [0.9]});
    let cases: [(&str, Value, &str, &str); 5] = [
        ("not_json", json!("{"), "ris", "line 3"),
        ("bad_rle", json!({"pred": {"size": [2, 2], "counts": "0 4"}, "gt": good["gt"]}), "ris", "line 3"),
        ("size", json!({"pred": {"size": [2, 3], "counts": "6"}, "gt": good["gt"]}), "ris", "sizes disagree"),
        ("sum", json!({"pred": {"size": [2, 2], "counts": "5"}, "gt": good["gt"]}), "ris", "add up to 5"),
        ("no_scores", json!({"pred": good["pred"], "gt": good["gt"], "gt_no_target": false}), "gres", "scores"),
    ];
    for (name, bad, task, needle) in cases {
        let path = tmp.path().join(format!("{name}.jsonl"));
        let bad_line = if bad.is_string() { bad.as_str().unwrap().to_string() } else { bad.to_string() };
        std::fs::write(&path, format!("{good}\n\n{bad_line}\n{good}\n")).unwrap();
        let out = deris(&["metrics", "--task", task, path.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{name}: {stderr}");
        assert!(out.stdout.is_empty(), "{name}: no partial output");
        assert!(stderr.contains("line 3") && stderr.contains(needle), "{name}: {stderr}");
    }
    let out = deris(&["metrics", "--task", "ris", tmp.path().join("absent.jsonl").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("absent.jsonl"));
}

#[test]
fn empty_input_gives_nulls() {
    let tmp = tempfile::tempdir().unwrap();
    let out = metrics(tmp.path(), "empty.jsonl", &[], &["--task", "ris"]);
    assert!(out.as_object().unwrap().values().all(Value::is_null), "{out}");
}
