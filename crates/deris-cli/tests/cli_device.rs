//! `--device`: a bad name and, in a build without the `cuda` feature, a CUDA device are clear
//! errors (exit 2) that say what to do.

use std::process::{Command, Output};

fn deris(args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_deris")).args(args).output().unwrap();
    println!("stdout: {}\nstderr: {}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    out
}

fn tiny_a_config() -> String {
    format!("{}/../../configs/tiny-a.json", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn unknown_device_is_an_error() {
    let cfg = tiny_a_config();
    for dev in ["tpu", "cuda:x"] {
        let out = deris(&["bench", "--config", &cfg, "--device", dev, "--runs", "1"]);
        assert_eq!(out.status.code(), Some(2));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--device") && err.contains(&format!("'{dev}' is not a device")), "{err}");
    }
}

#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_without_the_feature_names_it() {
    let cfg = tiny_a_config();
    let dump = ["dump", "--config", &cfg, "--weights", "w", "--inputs", "i", "--out", "o", "--device", "cuda:1"];
    for args in [&["bench", "--config", &cfg, "--device", "cuda"][..], &dump[..]] {
        let out = deris(args);
        assert_eq!(out.status.code(), Some(2));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("without the `cuda` feature"), "{err}");
    }
}
