//! `deris convert IN OUT.safetensors [--config NAME|FILE]`: rewrites a checkpoint as a clean
//! safetensors file of the model's tensors (normalised names; optimizer, scheduler and other
//! training state dropped), then reopens the output and checks every tensor bit for bit.
//! With `--config`, the keys and shapes are first checked against the model of that config.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use candle_core::{Device, Tensor};
use deris::checkpoint::{self, Checkpoint, VarBuilder};
use deris::DerisConfig;

/// Arguments of `deris convert`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Checkpoint to read: a PyTorch `.pth`/`.pt`/`.bin` (flat, or nested under `state_dict`,
    /// with or without `module.` prefixes) or a `.safetensors`. The format is read from the
    /// content.
    pub input: PathBuf,
    /// The `.safetensors` file to write (via a temporary file: never a partial output).
    pub output: PathBuf,
    /// Also check every key and shape against the model of this config: a preset name
    /// (`deris-b-refcoco`, …) or a JSON config file.
    #[arg(long, value_name = "NAME|FILE")]
    pub config: Option<String>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if args.output.extension().is_none_or(|e| e != "safetensors") {
        bail!("output {} must end in .safetensors", args.output.display());
    }
    if same_file(&args.input, &args.output) {
        bail!("refusing to overwrite the input {}: choose another output path", args.input.display());
    }
    let cfg = args
        .config
        .as_deref()
        .map(|c| DerisConfig::from_name_or_path(c).with_context(|| format!("--config {c}")))
        .transpose()?;

    let ckpt = Checkpoint::open(&args.input)?;
    if let Some(cfg) = &cfg {
        audit_against_config(&ckpt, cfg, |cfg, vb| deris::Deris::new(cfg, vb))?;
    }

    let tensors = ckpt.load_all(&Device::Cpu)?;
    checkpoint::save_safetensors(&tensors, &args.output)?;
    if let Err(e) = verify(&tensors, &args.output) {
        // A file that does not read back as the input is worse than none.
        let _ = std::fs::remove_file(&args.output);
        return Err(e.context(format!("verifying {} (removed)", args.output.display())));
    }
    print_summary(&ckpt, &args.output, cfg.as_ref());
    Ok(())
}

/// Checks `ckpt`'s keys and shapes against the model that `build` makes from `cfg`, without
/// reading any weight: one [`deris::Error::KeyMismatch`] (inside the `anyhow` error) lists
/// every problem.
pub fn audit_against_config<T>(
    ckpt: &Checkpoint,
    cfg: &DerisConfig,
    build: impl FnOnce(&DerisConfig, VarBuilder<'_>) -> candle_core::Result<T>,
) -> anyhow::Result<()> {
    let report = checkpoint::audit(ckpt, |vb| build(cfg, vb))?;
    Ok(report.into_result(ckpt, &cfg.name)?)
}

/// True when `output` names the same file as `input` (after resolving links and `..`).
fn same_file(input: &Path, output: &Path) -> bool {
    let Ok(input) = std::fs::canonicalize(input) else { return false };
    let output = std::fs::canonicalize(output).ok().or_else(|| {
        let parent = output.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        Some(std::fs::canonicalize(parent).ok()?.join(output.file_name()?))
    });
    output.is_some_and(|o| o == input)
}

/// Reopens the written file and compares every tensor with the source, bit for bit.
fn verify(source: &BTreeMap<String, Tensor>, output: &Path) -> anyhow::Result<()> {
    let back = Checkpoint::open(output)?;
    if back.len() != source.len() {
        bail!("{} tensors written, {} read back", source.len(), back.len());
    }
    for (name, t) in source {
        let b = back.get(name, &Device::Cpu)?;
        if !checkpoint::bit_identical(t, &b)? {
            bail!(
                "tensor '{name}' reads back different ({:?} {:?} vs {:?} {:?})",
                t.dtype(),
                t.dims(),
                b.dtype(),
                b.dims()
            );
        }
    }
    Ok(())
}

/// `1234567` → `1,234,567`.
fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn print_summary(ckpt: &Checkpoint, output: &Path, cfg: Option<&DerisConfig>) {
    let s = ckpt.summary();
    let layout = ckpt.layout();
    println!(
        "wrote {}: {} tensors ({} parameters + {} buffers), {} parameter values, {} bytes",
        output.display(),
        s.tensors,
        s.tensors - s.buffers,
        s.buffers,
        thousands(s.parameter_count),
        thousands(s.bytes)
    );
    let mut from = format!("  from {} ({}", ckpt.path().display(), ckpt.format());
    match &layout.nested_under {
        Some(key) => from.push_str(&format!(", weights under '{key}'")),
        None => from.push_str(", flat"),
    }
    if layout.stripped_prefixes > 0 {
        from.push_str(&format!(", 'module.' stripped from {} keys", layout.stripped_prefixes));
    }
    if !layout.ignored.is_empty() {
        from.push_str(&format!(", dropped: {}", layout.ignored.join(", ")));
    }
    println!("{from})");
    if let Some(cfg) = cfg {
        println!("  keys and shapes match the model '{}'", cfg.name);
    }
    println!("  verified: every tensor reads back bit-identical");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo(rel: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..").join(rel)
    }

    /// A constructor that requests a single real key.
    fn one_key(cfg: &DerisConfig, vb: VarBuilder<'_>) -> candle_core::Result<()> {
        let n = cfg.understanding.num_queries;
        vb.pp("understanding_branch.init_query").get((n, cfg.beit3.embed_dim), "weight").map(drop)
    }

    #[test]
    fn audit_against_config_reports_through_the_constructor() {
        let ckpt = Checkpoint::open(&repo("fixtures/tiny-a/weights.safetensors")).unwrap();
        let cfg = DerisConfig::from_file(&repo("configs/tiny-a.json")).unwrap();
        // Every key requested with the file's shape: clean.
        let all = |_: &DerisConfig, vb: VarBuilder<'_>| -> candle_core::Result<()> {
            for n in ckpt.names() {
                let m = ckpt.meta(n).unwrap();
                vb.get_with_hints_dtype(m.shape.clone(), n, Default::default(), m.dtype)?;
            }
            Ok(())
        };
        audit_against_config(&ckpt, &cfg, all).unwrap();
        // One real key only: the other 561 are unexpected, in one error naming the model.
        let err = audit_against_config(&ckpt, &cfg, one_key).unwrap_err();
        match err.downcast_ref::<deris::Error>().unwrap() {
            deris::Error::KeyMismatch { model, missing, unexpected, mismatched, .. } => {
                assert_eq!(model, &cfg.name);
                assert!(missing.is_empty() && mismatched.is_empty(), "{missing:?} {mismatched:?}");
                assert_eq!(unexpected.len(), 561);
            }
            e => panic!("{e}"),
        }
    }

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(291_462_038), "291,462,038");
    }
}
