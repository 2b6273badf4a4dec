//! `deris demo`: draws a fresh synthetic scene (`deris synth`'s generator), segments several
//! sentences about it with the model (by default the embedded one), and writes one overlay
//! picture per sentence plus `scene.png` and `demo.json`. Each line printed compares the answer
//! with the scene's true referents (IoU at the image's size; no-target sentences are right when
//! the answer is "no target").

use std::collections::HashSet;
use std::path::PathBuf;

use anyhow::{Context, Result};
use serde_json::json;

use deris::data::synth::expr::Kind;
use deris::data::synth::{self, Proportions, SynthConfig};
use deris::post::BinaryMask;
use deris::preprocess::image::RgbImage;
use deris::Prediction;
use deris::viz::{overlay, Style};

use super::segment::{encode_png, write_file};

/// Arguments.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Output folder (created).
    #[arg(long, default_value = "deris-demo")]
    out: PathBuf,
    /// Scene seed [default: a new one each run, printed].
    #[arg(long)]
    seed: Option<u64>,
    /// Sentences to ask.
    #[arg(long, default_value_t = 4)]
    sentences: usize,
    #[command(flatten)]
    model: super::model_args::ModelArgs,
}

/// The pictures are drawn at this multiple of the scene size (nearest), so that the caption
/// does not hide the scene.
const PICTURE_SCALE: usize = 3;

pub fn run(a: Args) -> Result<()> {
    a.model.apply_threads()?;
    anyhow::ensure!((1..=12).contains(&a.sentences), "--sentences must be 1..=12");
    let segmenter = a.model.load()?;
    let seed = a.seed.unwrap_or_else(|| std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64));
    let size = u32::try_from(segmenter.config().runtime.hier_img_size).unwrap_or(128).max(64);
    let cfg = SynthConfig { seed, train_images: 0, val_images: 1, size, sentences_per_image: a.sentences, proportions: Proportions::default() };
    let scene = synth::image(&cfg, 1).context("drawing a scene")?;
    let picture = scene.scene.render().context("rendering the scene")?;
    let (w, h) = (picture.width() as usize, picture.height() as usize);
    let rgb = RgbImage::new(h, w, picture.into_raw())?;
    let truth = scene.scene.masks().context("rasterising the scene")?;

    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let none = HashSet::new();
    write_file(&a.out.join("scene.png"), &encode_png(&rgb.data, w, h, image::ExtendedColorType::Rgb8)?, &none)?;
    println!("scene seed {seed}: {} shapes, model '{}'", scene.scene.objects.len(), segmenter.config().name);
    let mut results = Vec::new();
    for (i, r) in scene.sentences.iter().enumerate() {
        let p = segmenter.segment(&rgb, &r.text).with_context(|| format!("segmenting {:?}", r.text))?;
        let mut gt = vec![0u8; w * h];
        for &t in &r.targets {
            if let Some(m) = truth.get(t) {
                for (g, v) in gt.iter_mut().zip(m.to_rowmajor()) {
                    *g |= v;
                }
            }
        }
        let inter = gt.iter().zip(&p.mask.data).filter(|(g, m)| **g > 0 && **m > 0).count();
        let union = gt.iter().zip(&p.mask.data).filter(|(g, m)| **g > 0 || **m > 0).count();
        let verdict = match (r.kind, p.no_target) {
            (Kind::NoTarget, true) => "right: no target".to_string(),
            (Kind::NoTarget, false) => "wrong: answered a mask, there is no target".to_string(),
            (_, true) => "wrong: answered no target".to_string(),
            _ => format!("IoU {:.2}", inter as f64 / union.max(1) as f64),
        };
        let file = format!("{i}.png");
        let o = overlay(&upscale(&rgb, PICTURE_SCALE)?, &upscaled(&p, PICTURE_SCALE), &Style::default());
        write_file(&a.out.join(&file), &encode_png(&o.data, o.w, o.h, image::ExtendedColorType::Rgb8)?, &none)?;
        println!("{file}: {:?} ({} target(s)) → {verdict}", r.text, r.targets.len());
        results.push(json!({"file": file, "text": r.text, "targets": r.targets.len(), "no_target": p.no_target,
                            "best_score": p.best_score(), "verdict": verdict}));
    }
    let summary = json!({"seed": seed, "model": segmenter.config().name, "scene": "scene.png", "sentences": results});
    write_file(&a.out.join("demo.json"), format!("{summary:#}\n").as_bytes(), &none)?;
    println!("pictures in {}", a.out.display());
    Ok(())
}

/// `image` enlarged `k` times (nearest).
fn upscale(image: &RgbImage, k: usize) -> Result<RgbImage> {
    let (h, w) = (image.h * k, image.w * k);
    let mut data = Vec::with_capacity(h * w * 3);
    for y in 0..h {
        for x in 0..w {
            let i = ((y / k) * image.w + x / k) * 3;
            data.extend_from_slice(&image.data[i..i + 3]);
        }
    }
    Ok(RgbImage::new(h, w, data)?)
}

/// `p` with its mask enlarged `k` times (nearest), to draw on an enlarged picture.
fn upscaled(p: &Prediction, k: usize) -> Prediction {
    let m = &p.mask;
    let (h, w) = (m.height * k, m.width * k);
    let data = (0..h * w).map(|i| m.data[(i / w / k) * m.width + (i % w) / k]).collect();
    Prediction { mask: BinaryMask { height: h, width: w, data }, ..p.clone() }
}
