//! `deris metrics`: the authors' mask metrics over a JSON-lines file of predictions (the file
//! `deris eval --save-predictions` writes). Prints one JSON object, in percent, `null` where the
//! reference cannot compute a value (oIoU or cIoU with ΣU = 0, or no sample at all).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;

use anyhow::{bail, Context};
use deris::eval::{GresMetrics, PredictionRecord, RisMetrics};

/// Which benchmark's metrics to compute.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Task {
    /// RefCOCO/+/g: mIoU, oIoU, Pr@0.5 … Pr@0.9.
    Ris,
    /// gRefCOCO: gIoU, cIoU, N-acc, T-acc, Pr@0.7, Pr@0.8, Pr@0.9.
    Gres,
}

/// Arguments.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The metrics to compute.
    #[arg(long, value_enum)]
    task: Task,
    /// A query is a referent when its score is strictly above this; a sample with no such query
    /// is predicted as no-target (GRES only).
    #[arg(long, default_value_t = 0.7)]
    score_threshold: f64,
    /// JSON lines `{"pred": {"size": [h, w], "counts": "…"}, "gt": {…}, "gt_no_target": bool,
    /// "scores": [f32, …]}` (`gt_no_target` and `scores` are needed for gres); `-` reads stdin.
    file: PathBuf,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if !args.score_threshold.is_finite() {
        bail!("--score-threshold must be a finite number, got {}", args.score_threshold);
    }
    let name = args.file.display().to_string();
    let reader: Box<dyn BufRead> = if name == "-" {
        Box::new(BufReader::new(std::io::stdin()))
    } else {
        Box::new(BufReader::new(std::fs::File::open(&args.file).with_context(|| format!("opening {name}"))?))
    };
    let mut ris = RisMetrics::new();
    let mut gres = GresMetrics::new(args.score_threshold);
    for (index, line) in reader.lines().enumerate() {
        let line = line.with_context(|| format!("reading {name}"))?;
        if line.trim().is_empty() {
            continue;
        }
        add_line(&line, args.task, &mut ris, &mut gres).with_context(|| format!("{name}: line {}", index + 1))?;
    }
    let json = match args.task {
        Task::Ris => serde_json::to_string(&ris.report().summary())?,
        Task::Gres => serde_json::to_string(&gres.report().summary())?,
    };
    println!("{json}");
    Ok(())
}

/// Parses one record and adds it to the accumulator of `task`.
fn add_line(line: &str, task: Task, ris: &mut RisMetrics, gres: &mut GresMetrics) -> anyhow::Result<()> {
    let record: PredictionRecord = serde_json::from_str(line).context("not a prediction record")?;
    let pred = record.pred.to_rle().context("pred")?;
    let gt = record.gt.to_rle().context("gt")?;
    match task {
        Task::Ris => {
            ris.add_masks(&pred, &gt).context("pred vs gt")?;
        }
        Task::Gres => {
            let gt_no_target = record.gt_no_target.context("missing \"gt_no_target\" (needed for gres)")?;
            let scores = record.scores.context("missing \"scores\" (needed for gres)")?;
            gres.add_masks(&pred, &gt, gt_no_target, &scores).context("pred vs gt")?;
        }
    }
    Ok(())
}
