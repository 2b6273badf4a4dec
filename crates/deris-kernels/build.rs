//! Compiles `kernels/*.cu` to PTX with `nvcc`, only when the `cuda` feature is on; the default
//! (CPU) build does nothing here.
//!
//! Environment: `NVCC` (compiler path, default `nvcc` from `CUDA_HOME`/`CUDA_PATH` or `PATH`),
//! `CUDA_COMPUTE_CAP` (e.g. `90`; default: asked from `nvidia-smi`, else nvcc's default).

use std::path::PathBuf;
use std::process::Command;

const KERNELS: [&str; 1] = ["ms_deform_attn"];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    for k in KERNELS {
        println!("cargo:rerun-if-changed=kernels/{k}.cu");
    }
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    for v in ["NVCC", "CUDA_HOME", "CUDA_PATH", "CUDA_COMPUTE_CAP"] {
        println!("cargo:rerun-if-env-changed={v}");
    }
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").unwrap_or_else(|_| fail("OUT_DIR is not set")));
    let nvcc = nvcc();
    let arch = compute_cap().map(|c| format!("-arch=sm_{c}"));
    for k in KERNELS {
        let ptx = out_dir.join(format!("{k}.ptx"));
        let mut cmd = Command::new(&nvcc);
        cmd.args(["--ptx", "-O3", "-std=c++17", "-o"]).arg(&ptx).arg(format!("kernels/{k}.cu"));
        if let Some(a) = &arch {
            cmd.arg(a);
        }
        match cmd.status() {
            Ok(s) if s.success() => {}
            Ok(s) => fail(&format!("{cmd:?} failed with {s}")),
            Err(e) => fail(&format!(
                "cannot run {} ({e}): the `cuda` feature needs the CUDA toolkit (set NVCC or CUDA_HOME)",
                nvcc.display()
            )),
        }
    }
}

fn nvcc() -> PathBuf {
    if let Some(p) = std::env::var_os("NVCC") {
        return PathBuf::from(p);
    }
    for root in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(r) = std::env::var_os(root) {
            let p = PathBuf::from(r).join("bin").join("nvcc");
            if p.exists() {
                return p;
            }
        }
    }
    PathBuf::from("nvcc")
}

/// `CUDA_COMPUTE_CAP` (`90`, `8.6`), else the first GPU's capability from `nvidia-smi`.
fn compute_cap() -> Option<String> {
    let raw = std::env::var("CUDA_COMPUTE_CAP").ok().or_else(|| {
        let out = Command::new("nvidia-smi").args(["--query-gpu=compute_cap", "--format=csv,noheader"]).output().ok()?;
        let text = String::from_utf8(out.stdout).ok()?;
        text.lines().next().map(str::to_owned)
    })?;
    let cap: String = raw.trim().chars().filter(char::is_ascii_digit).collect();
    (!cap.is_empty()).then_some(cap)
}

fn fail(msg: &str) -> ! {
    eprintln!("deris-kernels build: {msg}");
    std::process::exit(1)
}
