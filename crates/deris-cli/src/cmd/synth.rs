//! `deris synth`: write a synthetic GRES dataset (coloured shapes and referring expressions) in the
//! DeRIS gRefCOCO layout, with PNG images and the NSC bank; prints a JSON summary on stdout.

use std::path::PathBuf;

use anyhow::Context;
use deris::data::synth::{self, Proportions, SplitCounts, SynthConfig};
use serde_json::json;

/// Arguments.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Output folder (created): `images/`, `grefs/instances.json`, `grefs/train_dict.json`,
    /// `coco/instances.json` (every object).
    #[arg(long)]
    out: PathBuf,
    /// Seed: the same seed writes byte-identical files.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Images in the `train` split.
    #[arg(long, default_value_t = 1000)]
    train: usize,
    /// Images in the `val` split.
    #[arg(long, default_value_t = 100)]
    val: usize,
    /// Sentences (items) per image.
    #[arg(long, default_value_t = 3)]
    per_image: usize,
    /// Side of the square images in pixels (64..=4096).
    #[arg(long, default_value_t = 128)]
    size: u32,
    /// Share of single-target items.
    #[arg(long, default_value_t = 0.55)]
    single: f64,
    /// Share of multi-target items.
    #[arg(long, default_value_t = 0.30)]
    multi: f64,
    /// Share of no-target items.
    #[arg(long, default_value_t = 0.15)]
    no_target: f64,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let cfg = SynthConfig {
        seed: args.seed,
        train_images: args.train,
        val_images: args.val,
        size: args.size,
        sentences_per_image: args.per_image,
        proportions: Proportions { single: args.single, multi: args.multi, no_target: args.no_target },
    };
    let written = synth::write(&args.out, &cfg).with_context(|| format!("writing a synthetic dataset to {}", args.out.display()))?;
    let counts = |c: SplitCounts| json!({"images": c.images, "items": c.items, "single": c.single, "multi": c.multi, "no_target": c.no_target});
    let summary = json!({
        "annotations": written.annotations, "image_root": written.image_root, "train_dict": written.train_dict,
        "objects": written.objects,
        "layout": "deris-grefs", "seed": args.seed, "train": counts(written.train), "val": counts(written.val),
    });
    println!("{summary:#}");
    Ok(())
}
