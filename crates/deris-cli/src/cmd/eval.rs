//! `deris eval`: a model over a dataset split, scored as the authors evaluate
//! ([`deris::eval::protocol`]). Prints the result as a row of the authors' README table (or one
//! JSON line with `--json`), optionally writes the full report as JSON and every sample's
//! prediction record (`--save-predictions`, the lines `deris metrics` reads). With `--objects`
//! it also says how much of the shortfall is the queries' masks and how much their selection
//! ([`deris::eval::diagnosis`]).
//!
//! Annotations are read and image files checked before the model is loaded, so a wrong split or
//! a missing image fails at once. Output files are written to a temporary name and renamed.

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{ensure, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use deris::data::readers::coco::Instances;
use deris::data::{AnnotationSource, Layout};
use deris::eval::protocol::{self, EvalOptions, EvalProgress, EvalReport, Protocol, Task};
use deris::eval::PredictionRecord;

/// Arguments of `deris eval`.
#[derive(clap::Args, Debug)]
#[command(after_help = "Split names: as in the annotation file (val_refcoco_unc, testB_refcocoplus_unc, test_refcocog_umd in the \
     SeqTR file; val, testA, testB for gRefCOCO; val, testA, testB, test in refer pickles). A wrong name lists the existing ones.\n\
     The report uses the authors' README split names and columns.")]
pub struct Args {
    /// Annotation file: SeqTR `instances_nogoogle_withid.json`, DeRIS `grefs/instances.json`,
    /// refer `refs(unc).p` or ReLA `grefs(unc).json`.
    #[arg(long)]
    annotations: PathBuf,
    /// The annotation layout [default: detected from the file].
    #[arg(long, value_enum)]
    layout: Option<LayoutArg>,
    /// COCO `instances.json` of the refer and ReLA layouts [default: beside --annotations].
    #[arg(long)]
    instances: Option<PathBuf>,
    /// COCO `instances.json` listing every object of the images (its annotation ids are the
    /// referents'; `deris synth` writes `coco/instances.json`): adds a diagnosis of where the
    /// errors come from, the queries' masks or their selection.
    #[arg(long, value_name = "FILE")]
    objects: Option<PathBuf>,
    /// Folder of the image files (COCO `train2014`).
    #[arg(long)]
    data_root: PathBuf,
    /// The split to evaluate, as named in the annotation file.
    #[arg(long)]
    split: String,
    /// Metrics [default: gres for the gRefCOCO layouts, ris otherwise].
    #[arg(long, value_enum)]
    task: Option<super::metrics::Task>,
    /// `reference`: the authors' protocol, masks compared at the model's resolution (384²) with
    /// the ground truth nearest-resized to it; `original`: at the original image size.
    #[arg(long, value_enum, default_value = "reference")]
    protocol: ProtocolArg,
    #[command(flatten)]
    model: super::model_args::ModelArgs,
    /// Samples per forward pass.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Write every sample's prediction and ground truth as JSON lines (`deris metrics` reads them).
    #[arg(long, value_name = "FILE.jsonl")]
    save_predictions: Option<PathBuf>,
    /// Write the full report (settings, counts, metrics, accumulator totals) as JSON.
    #[arg(long, value_name = "FILE")]
    report_json: Option<PathBuf>,
    /// Print the report as one JSON line on stdout (the table goes to stderr).
    #[arg(long)]
    json: bool,
    /// Leave out samples whose image file does not exist (counted in the report) instead of failing.
    #[arg(long)]
    skip_missing: bool,
    /// Evaluate only the first N sentences of the split.
    #[arg(long, value_name = "N")]
    limit: Option<usize>,
}

/// `--layout`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum LayoutArg {
    /// SeqTR/DeRIS mixed-seg JSON (RefCOCO/+/g).
    SeqtrMixedSeg,
    /// DeRIS gRefCOCO JSON.
    DerisGrefs,
    /// refer's refs(unc).p pickle + COCO instances.json.
    ReferPickle,
    /// ReLA's grefs(unc).json + COCO instances.json.
    RelaGrefs,
}

impl From<LayoutArg> for Layout {
    fn from(l: LayoutArg) -> Self {
        match l {
            LayoutArg::SeqtrMixedSeg => Layout::SeqtrMixedSeg,
            LayoutArg::DerisGrefs => Layout::DerisGrefs,
            LayoutArg::ReferPickle => Layout::ReferPickle,
            LayoutArg::RelaGrefs => Layout::RelaGrefs,
        }
    }
}

/// `--protocol`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum ProtocolArg {
    Reference,
    Original,
}

/// One line of `--save-predictions`: the record `deris metrics` reads, plus the sample's name
/// and sentence (ignored by `deris metrics`).
#[derive(Serialize)]
struct SavedLine<'a> {
    #[serde(flatten)]
    record: &'a PredictionRecord,
    sample: &'a str,
    text: &'a str,
}

pub fn run(a: Args) -> Result<()> {
    a.model.apply_threads()?;
    ensure!(a.batch > 0, "--batch must be at least 1");
    let outputs: Vec<&Path> = [a.save_predictions.as_deref(), a.report_json.as_deref()].into_iter().flatten().collect();
    check_outputs(&a, &outputs)?;

    let mut source = AnnotationSource::new(&a.annotations, &a.data_root);
    if let Some(l) = a.layout {
        source = source.with_layout(l.into());
    }
    if let Some(i) = &a.instances {
        source = source.with_instances(i);
    }
    let split = source.read_split(&a.split).context("reading the annotations")?;
    let task = match a.task {
        Some(super::metrics::Task::Ris) => Task::Ris,
        Some(super::metrics::Task::Gres) => Task::Gres,
        None => Task::for_layout(split.layout),
    };
    let options = EvalOptions {
        task,
        protocol: match a.protocol {
            ProtocolArg::Reference => Protocol::Reference,
            ProtocolArg::Original => Protocol::Original,
        },
        batch_size: a.batch,
        skip_missing: a.skip_missing,
        limit: a.limit,
        objects: match &a.objects {
            Some(path) => Some(Arc::new(
                Instances::load(path)
                    .and_then(|i| i.objects_by_image())
                    .with_context(|| format!("reading the objects of --objects {}", path.display()))?,
            )),
            None => None,
        },
    };
    let samples = protocol::sentences(&split, a.limit);
    ensure!(!samples.is_empty(), "split '{}' of {} has no sample to evaluate", a.split, a.annotations.display());
    let skipped = protocol::check_images(&samples, a.skip_missing)?;

    let segmenter = a.model.load()?.with_query_masks(a.objects.is_some());
    let (tmp_predictions, mut writer) = match a.save_predictions.as_deref().map(TempFile::create).transpose()? {
        Some((t, w)) => (Some(t), Some(w)),
        None => (None, None),
    };

    let bar = progress_bar((samples.len() - skipped.len()) as u64);
    let metric = task.running_metric_name();
    let report = protocol::evaluate(&segmenter, &split, &options, |p: &EvalProgress<'_>| -> std::io::Result<()> {
        if let Some(w) = &mut writer {
            let text = p.sample.expressions.first().map_or("", String::as_str);
            serde_json::to_writer(&mut *w, &SavedLine { record: p.record, sample: &p.sample.label, text })?;
            w.write_all(b"\n")?;
        }
        bar.inc(1);
        if let Some(v) = p.running {
            bar.set_message(format!("{metric} {v:.2}"));
        }
        Ok(())
    });
    bar.finish_and_clear();
    let report = report.with_context(|| match &a.save_predictions {
        Some(p) => format!("evaluating split '{}' ({} not written)", a.split, p.display()),
        None => format!("evaluating split '{}'", a.split),
    })?;

    if let (Some(tmp), Some(w)) = (tmp_predictions, writer) {
        let file = w.into_inner().map_err(|e| e.into_error()).context("writing the predictions")?;
        tmp.commit(file)?;
    }
    report_skipped(&report);
    eprintln!(
        "evaluated {} of {} sentences of {} in {:.1} s ({:.2} samples/s), task {}, protocol {}, threshold {}; {} missing images",
        report.evaluated,
        report.samples,
        report.readme_split,
        report.seconds,
        report.evaluated as f64 / report.seconds.max(1e-9),
        task.name(),
        options.protocol.name(),
        report.score_threshold,
        report.skipped.len(),
    );
    let mut json = report.to_json();
    if let serde_json::Value::Object(m) = &mut json {
        m.insert("model".into(), segmenter.config().name.clone().into());
    }
    if let Some(path) = &a.report_json {
        let text = serde_json::to_string_pretty(&json)? + "\n";
        let (tmp, mut w) = TempFile::create(path)?;
        w.write_all(text.as_bytes()).with_context(|| format!("writing {}", path.display()))?;
        tmp.commit(w.into_inner().map_err(|e| e.into_error()).with_context(|| format!("writing {}", path.display()))?)?;
    }
    let table = report.markdown() + &report.diagnosis.as_ref().map_or_else(String::new, |d| format!("\n{}", d.markdown()));
    if a.json {
        eprint!("{table}");
        println!("{}", serde_json::to_string(&json)?);
    } else {
        print!("{table}");
    }
    Ok(())
}

/// Refuses outputs that would replace an input file or each other.
fn check_outputs(a: &Args, outputs: &[&Path]) -> Result<()> {
    let mut named = vec![a.annotations.as_path()];
    named.extend(a.instances.as_deref());
    named.extend(a.objects.as_deref());
    named.extend(a.model.input_paths());
    let inputs: Vec<PathBuf> = named.into_iter().filter_map(|p| std::fs::canonicalize(p).ok()).collect();
    for out in outputs {
        if let Ok(existing) = std::fs::canonicalize(out) {
            ensure!(!inputs.contains(&existing), "refusing to overwrite the input file {}", out.display());
        }
    }
    if let [a, b] = outputs {
        ensure!(a != b, "--save-predictions and --report-json name the same file {}", a.display());
    }
    Ok(())
}

/// Lists (the first few) samples left out for a missing image on stderr.
fn report_skipped(report: &EvalReport) {
    const SHOWN: usize = 10;
    if report.skipped.is_empty() {
        return;
    }
    eprintln!("warning: {} of {} samples skipped, their image file does not exist:", report.skipped.len(), report.samples);
    for s in report.skipped.iter().take(SHOWN) {
        eprintln!("  {}: {}", s.label, s.image.display());
    }
    if report.skipped.len() > SHOWN {
        eprintln!("  … and {} more", report.skipped.len() - SHOWN);
    }
}

/// A bar with throughput and the running metric on stderr; hidden when stderr is not a terminal.
fn progress_bar(len: u64) -> ProgressBar {
    let bar = ProgressBar::new(len);
    if let Ok(style) = ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} samples · {per_sec} · {msg} · eta {eta}") {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

/// An output written under a temporary name beside its destination and renamed when complete;
/// removed if dropped before.
struct TempFile {
    tmp: PathBuf,
    dest: PathBuf,
}

impl TempFile {
    /// The temporary file, open for writing.
    fn create(dest: &Path) -> Result<(Self, BufWriter<std::fs::File>)> {
        let name = dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        ensure!(!name.is_empty(), "{} is not a file name", dest.display());
        let tmp = dest.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
        let file = std::fs::File::create(&tmp).with_context(|| format!("creating {}", dest.display()))?;
        Ok((Self { tmp, dest: dest.to_path_buf() }, BufWriter::new(file)))
    }

    /// Syncs `file` (the temporary file's handle) and renames it into place.
    fn commit(self, file: std::fs::File) -> Result<()> {
        file.sync_all().and_then(|()| std::fs::rename(&self.tmp, &self.dest)).with_context(|| format!("writing {}", self.dest.display()))
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        // After a successful rename the temporary name no longer exists.
        let _ = std::fs::remove_file(&self.tmp);
    }
}
