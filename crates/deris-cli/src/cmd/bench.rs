//! `deris bench`: end-to-end speed and memory of a full-size model with random weights (or a
//! checkpoint), at the real input sizes, with the stage split of `fixtures/reference-timing.md`.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use serde::Serialize;

use deris::checkpoint::{self, Checkpoint};
use deris::model::{Deris, ModelInputs, StageTimes};
use deris::post::{self, PostParams};
use deris::{DerisConfig, Precision, Taps};

/// Arguments of `deris bench`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Built-in model name or JSON config file.
    #[arg(long, default_value = "deris-b-refcoco")]
    config: String,
    /// Load these weights (timing the load) instead of random ones.
    #[arg(long)]
    weights: Option<PathBuf>,
    /// Images per forward.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Timed runs.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Untimed warm-up runs.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Seed of the random weights and inputs.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// cpu, cuda or cuda:N (CUDA needs a build with the `cuda` feature).
    #[arg(long, default_value = "cpu")]
    device: super::DeviceArg,
    /// Arithmetic of the CPU `linear` products: f32, or bf16 (operands rounded to bf16, f32
    /// sums; needs AVX512-BF16) [default: the config's runtime.precision, f32].
    #[arg(long)]
    precision: Option<Precision>,
}

#[derive(Serialize)]
struct Report {
    config: String,
    device: String,
    /// Arithmetic of the CPU `linear` products: "f32" or "bf16".
    precision: String,
    batch: usize,
    runs: usize,
    threads: usize,
    build_s: f64,
    median_s_per_batch: f64,
    min_s_per_batch: f64,
    median_s_per_image: f64,
    min_s_per_image: f64,
    peak_rss_mib: Option<f64>,
    /// Peak GPU memory in use from the model build to the last run (whole device, as the driver
    /// reports it, sampled every ms); null on the CPU.
    peak_gpu_mib: Option<f64>,
    /// GPU memory in use before the model was built (the CUDA context and other processes).
    gpu_base_mib: Option<f64>,
    stages: StagesJson,
    checksum: f64,
}

#[derive(Serialize, Default)]
struct StagesJson {
    beit3: f64,
    swin: f64,
    pixel_decoder: f64,
    predictor: f64,
    aligner: f64,
    post: f64,
}

pub fn run(a: Args) -> Result<()> {
    anyhow::ensure!(a.batch > 0 && a.runs > 0, "--batch and --runs must be positive");
    super::threads::configure(None, None)?;
    let cfg = DerisConfig::from_name_or_path(&a.config).with_context(|| format!("loading config '{}'", a.config))?;
    let device = a.device.open()?;
    let precision = a.precision.unwrap_or(cfg.runtime.precision);
    deris::set_precision(precision).context("--precision")?;
    let gpu_watch = super::GpuMemWatch::start(&device)?;
    let gpu_base_mib = gpu_watch.as_ref().map(super::GpuMemWatch::first_mib);
    let t0 = Instant::now();
    let model = match &a.weights {
        Some(w) => {
            let ckpt = Checkpoint::open(w)?;
            checkpoint::load_strict(&ckpt, DType::F32, &device, &cfg.name, |vb| Deris::new(&cfg, vb))?
        }
        None => Deris::new(&cfg, checkpoint::random_var_builder(a.seed, DType::F32, &device))?,
    };
    let build_s = t0.elapsed().as_secs_f64();
    let inputs = random_inputs(&cfg, a.batch, a.seed, &device)?;
    model.check_inputs(&inputs)?;
    let params = PostParams::from(&cfg.runtime);

    let mut totals = Vec::with_capacity(a.runs);
    let mut stage_runs: Vec<(StageTimes, f64)> = Vec::with_capacity(a.runs);
    let mut checksum = 0.0;
    for i in 0..a.warmup + a.runs {
        let mut times = StageTimes::default();
        let start = Instant::now();
        let y = model.forward_timed(&inputs, cfg.runtime.batch_coupling, &mut Taps::off(), Some(&mut times))?;
        let tp = Instant::now();
        post::get_predictions_parts(&y.pred_refer_logits, &y.pred_boxes, &y.pred_masks, &y.pred_existence, &params, &mut Taps::off())?;
        let post_s = tp.elapsed().as_secs_f64();
        let total = start.elapsed().as_secs_f64();
        if i >= a.warmup {
            totals.push(total);
            stage_runs.push((times, post_s));
        }
        checksum = y.pred_masks.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?
            + y.pred_refer_logits.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?;
        if !a.json {
            eprintln!("run {}{}: {:.3} s", i + 1, if i < a.warmup { " (warm-up)" } else { "" }, total);
        }
    }
    let peak_gpu_mib = gpu_watch.map(super::GpuMemWatch::peak_mib);
    let med = |mut v: Vec<f64>| {
        v.sort_by(|x, y| x.total_cmp(y));
        v[v.len() / 2]
    };
    let stages = StagesJson {
        beit3: med(stage_runs.iter().map(|s| s.0.beit3).collect()),
        swin: med(stage_runs.iter().map(|s| s.0.swin).collect()),
        pixel_decoder: med(stage_runs.iter().map(|s| s.0.pixel_decoder).collect()),
        predictor: med(stage_runs.iter().map(|s| s.0.predictor).collect()),
        aligner: med(stage_runs.iter().map(|s| s.0.aligner).collect()),
        post: med(stage_runs.iter().map(|s| s.1).collect()),
    };
    let median = med(totals.clone());
    let min = totals.iter().cloned().fold(f64::INFINITY, f64::min);
    let report = Report {
        config: cfg.name.clone(),
        device: a.device.to_string(),
        precision: precision.to_string(),
        batch: a.batch,
        runs: a.runs,
        threads: candle_core::utils::get_num_threads(),
        build_s,
        median_s_per_batch: median,
        min_s_per_batch: min,
        median_s_per_image: median / a.batch as f64,
        min_s_per_image: min / a.batch as f64,
        peak_rss_mib: peak_rss_mib(),
        peak_gpu_mib,
        gpu_base_mib,
        stages,
        checksum,
    };
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_table(&report);
    }
    Ok(())
}

fn print_table(r: &Report) {
    println!(
        "{} · {} · {} · batch {} · {} runs · {} threads · built in {:.2} s",
        r.config, r.device, r.precision, r.batch, r.runs, r.threads, r.build_s
    );
    println!("| stage | median s |\n|---|---|");
    for (k, v) in [
        ("beit3", r.stages.beit3),
        ("swin", r.stages.swin),
        ("pixel_decoder", r.stages.pixel_decoder),
        ("predictor", r.stages.predictor),
        ("aligner", r.stages.aligner),
        ("post", r.stages.post),
    ] {
        println!("| {k} | {v:.3} |");
    }
    println!(
        "median {:.3} s/batch ({:.3} s/image), min {:.3} s/batch; peak RSS {}{}; checksum {:.6e}",
        r.median_s_per_batch,
        r.median_s_per_image,
        r.min_s_per_batch,
        r.peak_rss_mib.map_or("n/a".to_string(), |m| format!("{m:.0} MiB")),
        match (r.peak_gpu_mib, r.gpu_base_mib) {
            (Some(p), Some(b)) => format!("; peak GPU memory {p:.0} MiB (of which {b:.0} before the model)"),
            _ => String::new(),
        },
        r.checksum
    );
}

/// Deterministic inputs of the config's sizes: a smooth random image and a sentence of
/// `max_token / 2` random pieces.
fn random_inputs(cfg: &DerisConfig, b: usize, seed: u64, device: &Device) -> Result<ModelInputs> {
    let s = cfg.runtime.hier_img_size;
    let m = cfg.runtime.img_mini_size;
    let l = cfg.runtime.max_token;
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let mut next = move || {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (state >> 33) as u32
    };
    let img: Vec<f32> = (0..b * 3 * s * s).map(|_| (next() % 2000) as f32 / 1000.0 - 1.0).collect();
    let mini: Vec<f32> = (0..b * 3 * m * m).map(|_| (next() % 2000) as f32 / 1000.0 - 1.0).collect();
    let real = (l / 2).max(3);
    let mut ids = vec![1i64; b * l];
    let mut pad = vec![1i64; b * l];
    for i in 0..b {
        for j in 0..real {
            ids[i * l + j] = match j {
                0 => 0,
                _ if j + 1 == real => 2,
                _ => 4 + (next() as i64 % (cfg.beit3.vocab_size as i64 - 4)),
            };
            pad[i * l + j] = 0;
        }
    }
    Ok(ModelInputs {
        img: Tensor::from_vec(img, (b, 3, s, s), device)?,
        img_mini: Tensor::from_vec(mini, (b, 3, m, m), device)?,
        ref_expr_inds: Tensor::from_vec(ids, (b, l), device)?,
        text_attention_mask: Tensor::from_vec(pad, (b, l), device)?,
    })
}

/// Peak resident memory of this process (`VmHWM`), Linux only.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}
