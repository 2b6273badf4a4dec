//! `deris train`: train or fine-tune DeRIS from a training config (see
//! [`deris::train::TrainConfig`]), with a progress bar, a JSONL log, validation, checkpoints that
//! `--resume` continues exactly, and `curve.png`. The trained model ends up in `OUT/model/`
//! (`model.safetensors`, `config.json`, `tokenizer.spm`).

use std::path::PathBuf;

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use deris::train::{Event, TrainConfig, Trainer};

/// Arguments.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Training config (JSON).
    #[arg(long)]
    config: PathBuf,
    /// Output folder: log.jsonl, checkpoints/, curve.png, model/.
    #[arg(long)]
    out: PathBuf,
    /// Continue a run: a checkpoint folder, or a run's `checkpoints/` folder (its latest).
    #[arg(long)]
    resume: Option<PathBuf>,
    /// A `deris synth` folder: sets data.annotations and data.image_root (and data.objects, when
    /// the config uses an object list, to its coco/instances.json).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Stop after this many steps in all.
    #[arg(long)]
    max_steps: Option<u64>,
    /// Stop after this many minutes (a checkpoint and a validation are written).
    #[arg(long)]
    max_minutes: Option<f64>,
    /// `cpu`, or `cuda` / `cuda:N`.
    #[arg(long, default_value = "cpu")]
    device: super::DeviceArg,
    /// CPU threads [default: all cores].
    #[arg(long)]
    threads: Option<usize>,
}

pub fn run(args: Args) -> Result<()> {
    let mut cfg = TrainConfig::from_file(&args.config).with_context(|| format!("reading {}", args.config.display()))?;
    if let Some(d) = &args.data {
        cfg.data.annotations = d.join("grefs").join("instances.json");
        cfg.data.image_root = d.join("images");
        cfg.data.layout = Some("deris_grefs".into());
        if cfg.data.objects.is_some() {
            cfg.data.objects = Some(d.join("coco").join("instances.json"));
        }
    }
    if args.max_steps.is_some() {
        cfg.max_steps = args.max_steps;
    }
    if args.max_minutes.is_some() {
        cfg.max_minutes = args.max_minutes;
    }
    // Replicas and chunks run side by side, one per core: each runs its element-wise ops on its
    // own thread (measured on 2 cores: 0.14 s per step with 2 chunks, 0.25 s with 1 on both).
    super::threads::configure(args.threads, (cfg.replicas * cfg.chunks > 1).then_some(1))?;
    let device = args.device.open()?;
    let mut trainer = Trainer::new(cfg, &args.out, args.resume.as_deref(), &device).context("setting up training")?;

    let bar = ProgressBar::new(trainer.total_steps());
    if let Ok(style) = ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} steps · {msg} · eta {eta}") {
        bar.set_style(style.progress_chars("=> "));
    }
    let mut smoothed: Option<f64> = None;
    let summary = trainer.run(&mut |e| match e {
        Event::Start { first_step, trainable, steps_per_epoch, .. } => {
            bar.set_position(first_step);
            bar.reset_eta();
            bar.println(format!("{trainable} trainable parameters, {steps_per_epoch} steps per epoch"));
        }
        Event::Step(r) => {
            let s = smoothed.map_or(r.loss, |s| 0.95 * s + 0.05 * r.loss);
            smoothed = Some(s);
            bar.set_position(r.step);
            bar.set_message(format!("loss {s:.3} · lr {:.1e} · {:.1} samples/s", r.lr, r.samples as f64 / r.seconds.max(1e-9)));
        }
        Event::EvalStart { step, samples } => bar.set_message(format!("validating at step {step} ({samples} samples)")),
        Event::Eval(v) => bar.println(format!("step {}: {}", v["step"], v["metrics"])),
        Event::Checkpoint(p) => bar.println(format!("checkpoint {}", p.display())),
    });
    bar.finish_and_clear();
    let summary = summary.context("training")?;
    let out = json!({
        "steps": summary.steps,
        "seconds": summary.seconds,
        "validation": summary.last_eval.map(|v| v["metrics"].clone()),
        "nsc": {"eligible": summary.nsc.eligible, "converted": summary.nsc.converted, "realised_rate": summary.nsc.realised_rate()},
        "model": summary.model_dir,
        "log": args.out.join("log.jsonl"),
        "curve": args.out.join("curve.png"),
    });
    println!("{out:#}");
    Ok(())
}
