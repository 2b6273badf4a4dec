//! Times the two transformer backbones alone (BEiT-3 and Swin) with random weights at the real
//! input sizes of a config, without the rest of the model: a quicker loop than `deris bench` for
//! work on the attention, norm and GELU kernels.
//!
//! `cargo run --release -p deris --example tf_bench -- [config] [runs] [beit3|swin|both]`
//! prints min and median seconds per stage and a checksum of each output.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use deris::checkpoint::random_var_builder;
use deris::cognition::beit3::Beit3;
use deris::perception::swin::SwinTransformer;
use deris::{DerisConfig, Taps};

/// CPU seconds used so far by all threads of this process (`/proc/self/task/*/schedstat`).
fn cpu_seconds() -> f64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return f64::NAN };
    let mut ns = 0u64;
    for t in tasks.flatten() {
        if let Ok(s) = std::fs::read_to_string(t.path().join("schedstat")) {
            ns += s.split_whitespace().next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        }
    }
    ns as f64 * 1e-9
}

/// Deterministic values in `[-1, 1)`.
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((state >> 33) % 2000) as f32 / 1000.0 - 1.0
        })
        .collect()
}

fn stats(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    (v[0], v[v.len() / 2])
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let cfg = DerisConfig::from_name_or_path(args.get(1).map_or("deris-b-refcoco", |s| s.as_str()))?;
    let runs: usize = args.get(2).map_or(Ok(5), |s| s.parse())?;
    let which = args.get(3).map_or("both", |s| s.as_str());
    let batch: usize = args.get(4).map_or(Ok(1), |s| s.parse())?;
    let dev = Device::Cpu;
    let vb = random_var_builder(0, DType::F32, &dev);
    let (s, m, l) = (cfg.runtime.hier_img_size, cfg.runtime.img_mini_size, cfg.runtime.max_token);
    let img = Tensor::from_vec(values(batch * 3 * s * s, 1), (batch, 3, s, s), &dev)?;
    let mini = Tensor::from_vec(values(batch * 3 * m * m, 2), (batch, 3, m, m), &dev)?;
    let real = (l / 2).max(3);
    let ids: Vec<i64> = (0..batch * l).map(|i| if i % l < real { 4 + (i as i64 * 7919) % 60000 } else { 1 }).collect();
    let pad: Vec<i64> = (0..batch * l).map(|i| i64::from(i % l >= real)).collect();
    let ids = Tensor::from_vec(ids, (batch, l), &dev)?;
    let pad = Tensor::from_vec(pad, (batch, l), &dev)?;

    if which != "swin" {
        let beit = Beit3::new(&cfg, vb.pp("understanding_branch.vis_enc.beit3"))?;
        let mut times = Vec::new();
        let mut cpu = Vec::new();
        let mut sum = 0.0;
        for i in 0..runs + 1 {
            let (t, c) = (Instant::now(), cpu_seconds());
            let o = beit.forward(&mini, &ids, &pad, &mut Taps::off())?;
            let dt = t.elapsed().as_secs_f64();
            if i > 0 {
                times.push(dt);
                cpu.push(cpu_seconds() - c);
            }
            sum = o.img_feat.sum_all()?.to_scalar::<f32>()? as f64
                + o.text_feat.abs()?.sum_all()?.to_scalar::<f32>()? as f64;
        }
        let (min, med) = stats(times);
        let (cmin, cmed) = stats(cpu);
        println!("beit3 min {min:.4} s  median {med:.4} s  cpu min {cmin:.4} median {cmed:.4} s  checksum {sum:.6e}");
    }
    if which != "beit3" {
        let swin = SwinTransformer::new(&cfg, vb.pp("perception_branch.hier_vision_encoder"))?;
        let mut times = Vec::new();
        let mut cpu = Vec::new();
        let mut sum = 0.0;
        for i in 0..runs + 1 {
            let (t, c) = (Instant::now(), cpu_seconds());
            let o = swin.forward(&img, &mut Taps::off())?;
            let dt = t.elapsed().as_secs_f64();
            if i > 0 {
                times.push(dt);
                cpu.push(cpu_seconds() - c);
            }
            sum = o
                .iter()
                .map(|t| {
                    t.abs().and_then(|a| a.sum_all()).and_then(|s| s.to_scalar::<f32>()).unwrap_or(f32::NAN) as f64
                })
                .sum();
        }
        let (min, med) = stats(times);
        let (cmin, cmed) = stats(cpu);
        println!("swin  min {min:.4} s  median {med:.4} s  cpu min {cmin:.4} median {cmed:.4} s  checksum {sum:.6e}");
    }
    Ok(())
}
