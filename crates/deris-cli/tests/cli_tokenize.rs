//! `deris tokenize` run as a process: the gold tokenizer cases through stdin/stdout, bad lines
//! answered in place, and a missing or invalid model file as a fatal error (exit 2).

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use serde_json::Value;

/// `$DERIS_FIXTURES`, else the repository's `fixtures/`.
fn fixture(rel: &str) -> PathBuf {
    let dir = std::env::var_os("DERIS_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures"));
    let p = dir.join(rel);
    assert!(p.exists(), "fixture missing: {} (set DERIS_FIXTURES to the fixtures folder)", p.display());
    p
}

fn tokenize(spm: &std::path::Path, max_token: &str, stdin: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_deris"))
        .args(["tokenize", "--spm"])
        .arg(spm)
        .args(["--max-token", max_token])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A fatal error may close stdin before we write: ignore that write error.
    let _ = child.stdin.take().unwrap().write_all(stdin.as_bytes());
    child.wait_with_output().unwrap()
}

fn output_lines(out: &Output) -> Vec<Value> {
    String::from_utf8(out.stdout.clone()).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn gold_cases_through_stdin() {
    let spm = fixture("gold/tokenizer/test.spm");
    let cases: Vec<Value> = std::fs::read_to_string(fixture("gold/tokenizer/cases.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for max_token in [20, 50] {
        let mine: Vec<&Value> = cases.iter().filter(|c| c["max_token"] == max_token).collect();
        assert!(!mine.is_empty());
        // The gold lines themselves are the input: extra fields are ignored.
        let stdin: String = mine.iter().map(|c| format!("{c}\n")).collect();
        let out = tokenize(&spm, &max_token.to_string(), &stdin);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let got = output_lines(&out);
        assert_eq!(got.len(), mine.len());
        for (g, c) in got.iter().zip(&mine) {
            if c["error"].is_null() {
                assert_eq!(g["ids"], c["ids"], "{}", c["text"]);
                assert_eq!(g["attention_mask"], c["attention_mask"], "{}", c["text"]);
                assert!(g.get("error").is_none());
            } else {
                assert!(g["error"].as_str().unwrap().contains("no tokens"), "{g}");
            }
        }
    }
}

#[test]
fn bad_lines_get_error_lines_in_place() {
    let spm = fixture("gold/tokenizer/test.spm");
    let stdin =
        "{\"text\": \"the red car\"}\nnot json\n\n{\"txt\": \"x\"}\n{\"text\": \"?!\"}\r\n{\"text\": \"left one\"}";
    let out = tokenize(&spm, "20", stdin);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let got = output_lines(&out);
    assert_eq!(got.len(), 6);
    for i in [0, 5] {
        assert_eq!(got[i]["ids"].as_array().unwrap().len(), 20);
        assert_eq!(got[i]["attention_mask"].as_array().unwrap().len(), 20);
    }
    for (i, line) in got.iter().enumerate().take(5).skip(1) {
        let e = line["error"].as_str().unwrap();
        assert!(e.starts_with(&format!("line {}:", i + 1)), "{e}");
    }
}

#[test]
fn missing_or_invalid_model_is_fatal() {
    let missing = std::env::temp_dir().join("deris-cli-tokenize-no-such-model.spm");
    let garbage = std::env::temp_dir().join(format!("deris-cli-tokenize-garbage-{}.spm", std::process::id()));
    std::fs::write(&garbage, b"this is not a sentencepiece model").unwrap();
    for spm in [&missing, &garbage] {
        let out = tokenize(spm, "20", "{\"text\": \"the red car\"}\n");
        assert_eq!(out.status.code(), Some(2));
        assert!(out.stdout.is_empty());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(&spm.display().to_string()), "{stderr}");
    }
    let _ = std::fs::remove_file(&garbage);
}

#[test]
fn max_token_below_three_is_refused() {
    let out = tokenize(&fixture("gold/tokenizer/test.spm"), "2", "{\"text\": \"the red car\"}\n");
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty());
}
