//! `deris segment`: image(s) + sentence(s) → `mask.png`, `overlay.png` and `result.json` per input.
//!
//! One input (`--image IMG --text "…"`) writes into `--out`; batch mode (`--manifest FILE.jsonl`
//! or `--images DIR --text "…"`) writes one sub-folder per input plus `summary.json`, runs
//! batched forwards, shows a progress bar on stderr (only on a terminal), and goes on past
//! inputs that fail: each is reported with its path, and the exit status is non-zero at the end.
//! Every file is written to a temporary name and renamed; an output never replaces an input.

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;
use serde::Deserialize;
use serde_json::{json, Value};

use deris::pipeline::PreparedInput;
use deris::preprocess::image::{load_image, RgbImage, MAX_PIXELS};
use deris::viz::{overlay, Style};
use deris::{Prediction, Segmenter};

/// Arguments of `deris segment`.
#[derive(clap::Args, Debug)]
#[command(after_help = format!(
    "Images: JPEG or PNG (grayscale, RGBA and 16-bit PNGs are converted to 8-bit RGB), at most {MAX_PIXELS} pixels.\n\
     Outputs per input: mask.png (original size, 0/255), overlay.png, result.json (scores, decision, COCO RLE, sizes, timings)."
))]
pub struct Args {
    /// One image (JPEG or PNG); outputs go straight into --out.
    #[arg(long, required_unless_present_any = ["manifest", "images"], conflicts_with_all = ["manifest", "images"])]
    image: Option<PathBuf>,
    /// Batch mode: JSON lines `{"image": PATH, "text": SENTENCE}`; relative image paths are
    /// relative to the manifest's folder.
    #[arg(long, conflicts_with_all = ["images", "text"])]
    manifest: Option<PathBuf>,
    /// Batch mode: every .jpg, .jpeg and .png file in this folder (not recursive), with --text.
    #[arg(long)]
    images: Option<PathBuf>,
    /// The referring sentence (with --image or --images).
    #[arg(long, required_unless_present = "manifest")]
    text: Option<String>,
    #[command(flatten)]
    model: super::model_args::ModelArgs,
    /// Output folder (created if needed).
    #[arg(long, default_value = "deris-out")]
    out: PathBuf,
    /// Inputs per forward pass in batch mode.
    #[arg(long, default_value_t = 4)]
    batch: usize,
}

/// One (image, sentence) pair to segment, or a manifest line that could not be read.
struct Job {
    /// How the input is named in messages: its path, and its manifest line if any.
    label: String,
    image: PathBuf,
    text: String,
    /// Output folder.
    dir: PathBuf,
    /// Set for a manifest line that is not a valid input.
    invalid: Option<String>,
}

/// What happened to one job: its prediction (outputs written), or why it failed.
type Outcome = std::result::Result<Prediction, String>;

pub fn run(a: Args) -> Result<()> {
    a.model.apply_threads()?;
    ensure!(a.batch > 0, "--batch must be at least 1");
    let batch_mode = a.image.is_none();
    let jobs = collect_jobs(&a)?;
    ensure!(!jobs.is_empty(), "no inputs: {} holds no .jpg, .jpeg or .png file", a.images.as_deref().unwrap_or(Path::new("?")).display());
    let protected = protected_inputs(&a, &jobs);

    let segmenter = a.model.load()?;
    if batch_mode {
        // One input creates its folder when it writes; a batch needs it for summary.json anyway.
        std::fs::create_dir_all(&a.out).with_context(|| format!("creating the output folder {}", a.out.display()))?;
    }

    let start = Instant::now();
    let bar = progress_bar(jobs.len() as u64, batch_mode);
    let mut outcomes: Vec<Outcome> = Vec::with_capacity(jobs.len());
    for chunk in jobs.chunks(a.batch) {
        for (job, outcome) in chunk.iter().zip(run_chunk(&segmenter, chunk, &protected)) {
            match &outcome {
                Ok(p) => bar.suspend(|| println!("{}: {}", job.dir.display(), describe(p))),
                Err(e) if !batch_mode => bail!("{}: {e}", job.label),
                Err(e) => bar.suspend(|| eprintln!("error: {}: {e}", job.label)),
            }
            bar.inc(1);
            outcomes.push(outcome);
        }
    }
    bar.finish_and_clear();
    let secs = start.elapsed().as_secs_f64();

    if !batch_mode {
        return Ok(());
    }
    let failed = outcomes.iter().filter(|o| o.is_err()).count();
    let ok = jobs.len() - failed;
    eprintln!("segmented {ok} of {} inputs in {secs:.1} s ({:.2} inputs/s); {failed} failed", jobs.len(), ok as f64 / secs.max(1e-9));
    let summary = summary_json(&jobs, &outcomes, secs, &segmenter.config().name, segmenter.score_threshold());
    write_file(&a.out.join("summary.json"), summary.as_bytes(), &protected).context("writing summary.json")?;
    ensure!(failed == 0, "{failed} of {} inputs failed (listed above)", jobs.len());
    Ok(())
}

/// The inputs named on the command line, in order (folders sorted by file name).
fn collect_jobs(a: &Args) -> Result<Vec<Job>> {
    let text = a.text.clone().unwrap_or_default();
    if let Some(image) = &a.image {
        return Ok(vec![Job { label: image.display().to_string(), image: image.clone(), text, dir: a.out.clone(), invalid: None }]);
    }
    if let Some(dir) = &a.images {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .with_context(|| format!("reading the folder {}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && has_image_extension(p))
            .collect();
        files.sort();
        return Ok(files
            .into_iter()
            .map(|p| {
                let name = sanitize(&p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default());
                Job { label: p.display().to_string(), dir: a.out.join(name), image: p, text: text.clone(), invalid: None }
            })
            .collect());
    }
    let Some(manifest) = &a.manifest else { bail!("give --image, --images or --manifest") };
    let content = std::fs::read_to_string(manifest).with_context(|| format!("reading the manifest {}", manifest.display()))?;
    let base = manifest.parent().unwrap_or(Path::new("."));
    let mut jobs = Vec::new();
    for (i, line) in content.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let n = i + 1;
        let at = format!("{}:{n}", manifest.display());
        #[derive(Deserialize)]
        struct Line {
            image: PathBuf,
            text: String,
        }
        jobs.push(match serde_json::from_str::<Line>(line) {
            Ok(l) => {
                let image = base.join(&l.image);
                let stem = l.image.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
                Job { label: format!("{} ({at})", image.display()), dir: a.out.join(format!("{n:04}-{}", sanitize(&stem))), image, text: l.text, invalid: None }
            }
            Err(e) => Job {
                label: at,
                image: PathBuf::new(),
                text: String::new(),
                dir: a.out.join(format!("{n:04}")),
                invalid: Some(format!("not a manifest line {{\"image\": PATH, \"text\": SENTENCE}}: {e}")),
            },
        });
    }
    Ok(jobs)
}

fn has_image_extension(p: &Path) -> bool {
    p.extension().and_then(|e| e.to_str()).is_some_and(|e| ["jpg", "jpeg", "png"].contains(&e.to_ascii_lowercase().as_str()))
}

/// A file name safe for an output folder: letters, digits, `.`, `-` and `_`.
fn sanitize(name: &str) -> String {
    let s: String = name.chars().map(|c| if c.is_ascii_alphanumeric() || "._-".contains(c) { c } else { '_' }).collect();
    if s.is_empty() || s.chars().all(|c| c == '.') {
        "input".into()
    } else {
        s
    }
}

/// Canonical paths of every input file, which no output may replace.
fn protected_inputs(a: &Args, jobs: &[Job]) -> HashSet<PathBuf> {
    let mut paths: Vec<&Path> = jobs.iter().map(|j| j.image.as_path()).collect();
    paths.extend(a.manifest.as_deref());
    paths.extend(a.model.input_paths());
    paths.into_iter().filter_map(|p| std::fs::canonicalize(p).ok()).collect()
}

/// Decodes and prepares a chunk in parallel, runs one forward on the inputs that made it, and
/// writes every result. Returns one outcome per job, in order.
fn run_chunk(seg: &Segmenter, chunk: &[Job], protected: &HashSet<PathBuf>) -> Vec<Outcome> {
    let prepared: Vec<std::result::Result<(RgbImage, PreparedInput), String>> = chunk
        .par_iter()
        .map(|job| {
            if let Some(e) = &job.invalid {
                return Err(e.clone());
            }
            let image = load_image(&job.image).map_err(|e| match e {
                // The job's label already names the file.
                deris::Error::Image { reason, .. } => reason,
                other => other.to_string(),
            })?;
            let input = seg.prepare(&image, &job.text).map_err(|e| e.to_string())?;
            Ok((image, input))
        })
        .collect();
    let ready: Vec<PreparedInput> = prepared.iter().filter_map(|r| r.as_ref().ok().map(|(_, p)| p.clone())).collect();
    let mut predictions = match ready.is_empty() {
        true => Ok(Vec::new()),
        false => seg.predict(&ready).map_err(|e| format!("model: {e}")),
    }
    .map(Vec::into_iter);
    chunk
        .iter()
        .zip(prepared)
        .map(|(job, prep)| {
            prep.and_then(|(image, _)| {
                let p = match &mut predictions {
                    Ok(it) => it.next().ok_or_else(|| "model: missing prediction".to_string())?,
                    Err(e) => return Err(e.clone()),
                };
                write_outputs(job, &image, &p, protected).map_err(|e| format!("{e:#}"))?;
                Ok(p)
            })
        })
        .collect()
}

/// `mask.png`, `overlay.png` and `result.json` into the job's folder.
fn write_outputs(job: &Job, image: &RgbImage, p: &Prediction, protected: &HashSet<PathBuf>) -> Result<()> {
    std::fs::create_dir_all(&job.dir).with_context(|| format!("creating {}", job.dir.display()))?;
    let mask: Vec<u8> = p.mask.data.iter().map(|&v| if v != 0 { 255 } else { 0 }).collect();
    let png = encode_png(&mask, p.mask.width, p.mask.height, image::ExtendedColorType::L8)?;
    write_file(&job.dir.join("mask.png"), &png, protected)?;
    let o = overlay(image, p, &Style::default());
    write_file(&job.dir.join("overlay.png"), &encode_png(&o.data, o.w, o.h, image::ExtendedColorType::Rgb8)?, protected)?;
    let mut v = p.to_json_value()?;
    if let Value::Object(m) = &mut v {
        m.insert("image".into(), json!(job.image.display().to_string()));
        m.insert("files".into(), json!({ "mask": "mask.png", "overlay": "overlay.png" }));
    }
    let text = serde_json::to_string_pretty(&v)? + "\n";
    write_file(&job.dir.join("result.json"), text.as_bytes(), protected)
}

pub(super) fn encode_png(data: &[u8], w: usize, h: usize, color: image::ExtendedColorType) -> Result<Vec<u8>> {
    use image::ImageEncoder;
    let mut buf = Vec::new();
    image::codecs::png::PngEncoder::new(&mut buf)
        .write_image(data, u32::try_from(w)?, u32::try_from(h)?, color)
        .context("encoding PNG")?;
    Ok(buf)
}

/// Writes `bytes` to a temporary file beside `path`, then renames it over `path`; refuses when
/// `path` is one of the inputs.
pub(super) fn write_file(path: &Path, bytes: &[u8], protected: &HashSet<PathBuf>) -> Result<()> {
    if let Ok(existing) = std::fs::canonicalize(path) {
        ensure!(!protected.contains(&existing), "refusing to overwrite the input file {}", path.display());
    }
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let written = std::fs::File::create(&tmp)
        .and_then(|mut f| f.write_all(bytes).and_then(|()| f.sync_all()))
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("writing {}", path.display()));
    }
    Ok(())
}

/// `target: score 0.72 > 0.70, mask 12.3% of 640x480` or `no target: best score 0.58 <= 0.70`.
fn describe(p: &Prediction) -> String {
    let best = p.best_score().unwrap_or(0.0);
    if p.no_target {
        format!("no target: best score {best:.3} <= {:.2}", p.score_threshold)
    } else {
        let share = 100.0 * p.mask.area() as f64 / (p.width() * p.height()).max(1) as f64;
        let bbox = p.mask_bbox().map(|[x, y, w, h]| format!(", box x {x} y {y} w {w} h {h}")).unwrap_or_default();
        format!("target: score {best:.3} > {:.2}, mask {share:.1}% of {}x{}{bbox}", p.score_threshold, p.width(), p.height())
    }
}

/// A bar with throughput on stderr; indicatif hides it when stderr is not a terminal.
fn progress_bar(len: u64, batch_mode: bool) -> ProgressBar {
    if !batch_mode {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    if let Ok(style) = ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} inputs · {per_sec} · eta {eta}") {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

fn summary_json(jobs: &[Job], outcomes: &[Outcome], secs: f64, model: &str, threshold: f64) -> String {
    let results: Vec<Value> = jobs
        .iter()
        .zip(outcomes)
        .map(|(j, o)| match o {
            Ok(p) => json!({
                "input": j.label, "text": j.text, "output": j.dir.display().to_string(),
                "no_target": p.no_target, "best_score": p.best_score(), "error": null,
            }),
            Err(e) => json!({ "input": j.label, "text": j.text, "output": null, "error": e }),
        })
        .collect();
    let failed = outcomes.iter().filter(|o| o.is_err()).count();
    let v = json!({
        "model": model,
        "score_threshold": threshold,
        "inputs": jobs.len(),
        "succeeded": jobs.len() - failed,
        "failed": failed,
        "seconds": secs,
        "results": results,
    });
    serde_json::to_string_pretty(&v).unwrap_or_default() + "\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_names_are_safe() {
        assert_eq!(sanitize("dog 1.jpg"), "dog_1.jpg");
        assert_eq!(sanitize(".."), "input");
        assert_eq!(sanitize("../x"), ".._x");
    }
}
