//! `deris::train::Trainer` end to end on a small `deris synth` dataset and a very small model:
//! the loss falls over a few dozen steps; a run stopped and resumed from its checkpoint follows
//! the uninterrupted run's loss trajectory exactly; the outputs (log, curve, model folder) are
//! written and the exported model loads into a `Segmenter`.

mod common;

use std::path::Path;

use candle_core::Device;
use deris::data::synth::{self, SynthConfig};
use deris::train::{Event, TrainConfig, Trainer};
use serde_json::json;

fn config(data: &Path, steps: u64) -> TrainConfig {
    let v = json!({
        "model": common::tiny_train_model(),
        "data": {"annotations": data.join("grefs/instances.json"), "image_root": data.join("images"), "layout": "deris_grefs", "val_limit": 8},
        "batch_size": 4,
        "epochs": 100,
        "max_steps": steps,
        "optimizer": {"lr": 0.001, "max_grad_norm": 1.0},
        "loss": {"num_points": 256},
        "freeze": [],
        "seed": 5,
        "checkpoint_every": 3,
        "eval_every": 1000,
        "log_every": 1
    });
    serde_json::from_value(v).unwrap()
}

fn dataset(dir: &Path) {
    synth::write(dir, &SynthConfig { seed: 1, train_images: 4, val_images: 2, size: 64, sentences_per_image: 2, ..Default::default() }).unwrap();
}

/// A run of `cfg(head)` steps, then the same run resumed from its checkpoints up to
/// `cfg(total)` steps: the losses of both parts, in order.
fn interrupted(cfg: impl Fn(u64) -> TrainConfig, out: &Path, head: u64, total: u64) -> (Vec<(u64, f64)>, Vec<(u64, f64)>) {
    let first = losses(cfg(head), out, None);
    let rest = losses(cfg(total), out, Some(&out.join("checkpoints")));
    (first, rest)
}

/// Runs a config and returns the losses per step.
fn losses(cfg: TrainConfig, out: &Path, resume: Option<&Path>) -> Vec<(u64, f64)> {
    let mut trainer = Trainer::new(cfg, out, resume, &Device::Cpu).unwrap();
    let mut seen = Vec::new();
    trainer
        .run(&mut |e| {
            if let Event::Step(r) = e {
                seen.push((r.step, r.loss));
            }
        })
        .unwrap();
    seen
}

#[test]
fn loss_falls_on_a_small_dataset() {
    let tmp = tempfile::tempdir().unwrap();
    dataset(&tmp.path().join("data"));
    let out = tmp.path().join("run");
    let l = losses(config(&tmp.path().join("data"), 40), &out, None);
    assert_eq!(l.len(), 40);
    let mean = |s: &[(u64, f64)]| s.iter().map(|p| p.1).sum::<f64>() / s.len() as f64;
    let (first, last) = (mean(&l[..8]), mean(&l[32..]));
    println!("mean loss, first 8 steps {first:.3}, last 8 steps {last:.3}");
    assert!(last < 0.8 * first, "the loss did not fall: {first:.3} → {last:.3}");

    // outputs: log lines, the curve, a model folder that loads and segments
    let log = std::fs::read_to_string(out.join("log.jsonl")).unwrap();
    assert!(log.lines().filter(|l| l.contains("\"step\"")).count() >= 40);
    assert!(log.lines().any(|l| l.contains("\"eval\"")), "the final validation is logged");
    assert!(!log.contains("\"diagnosis\""), "no object list, no diagnosis");
    assert!(std::fs::metadata(out.join("curve.png")).unwrap().len() > 1000);
    let dir = out.join("model");
    let cfg = deris::DerisConfig::from_file(&dir.join("config.json")).unwrap();
    let seg = deris::Segmenter::load(&cfg, &deris::Weights::File(dir.join("model.safetensors")), &dir.join("tokenizer.spm"), &Device::Cpu).unwrap();
    let img = deris::preprocess::image::load_image(&tmp.path().join("data/images/COCO_train2014_000000000001.jpg")).unwrap();
    let p = seg.segment(&img, "the big shape").unwrap();
    assert_eq!((p.mask.height, p.mask.width), (64, 64));
}

#[test]
fn resume_continues_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    dataset(&data);
    let whole = losses(config(&data, 8), &tmp.path().join("whole"), None);
    // checkpoints at steps 3 and 5 (the end); resume from the run's latest
    let (first, rest) = interrupted(|steps| config(&data, steps), &tmp.path().join("split"), 5, 8);
    assert_eq!(first.len(), 5);
    assert_eq!(rest.first().map(|p| p.0), Some(6));
    let joined: Vec<(u64, f64)> = first.into_iter().chain(rest).collect();
    assert_eq!(joined, whole, "resumed trajectory differs from the uninterrupted one");
}

/// The first step's terms of a run.
fn first_terms(cfg: TrainConfig, out: &Path) -> std::collections::BTreeMap<String, f64> {
    let mut trainer = Trainer::new(TrainConfig { max_steps: Some(1), ..cfg }, out, None, &Device::Cpu).unwrap();
    let mut terms = None;
    trainer
        .run(&mut |e| {
            if let Event::Step(r) = e {
                terms = Some(r.terms.clone());
            }
        })
        .unwrap();
    terms.unwrap()
}

/// Two data-parallel replicas of two chunks each (threads; chunk gradients summed, replica
/// gradients averaged): the loss falls, the run is deterministic (resume reproduces it bit for
/// bit although the parts race), a batch that does not split evenly is refused, and chunks
/// score with their replica's divisors: the terms that draw no random points equal the
/// unchunked step's.
#[test]
fn replicas_and_chunks_train_deterministically() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    dataset(&data);
    let parallel = |steps| TrainConfig { replicas: 2, chunks: 2, ..config(&data, steps) };
    let whole = losses(parallel(24), &tmp.path().join("whole"), None);
    let mean = |s: &[(u64, f64)]| s.iter().map(|p| p.1).sum::<f64>() / s.len() as f64;
    let (first, last) = (mean(&whole[..6]), mean(&whole[18..]));
    assert!(last < 0.85 * first, "the loss did not fall with 2 replicas × 2 chunks: {first:.3} → {last:.3}");
    let (head, rest) = interrupted(parallel, &tmp.path().join("split"), 5, 24);
    let joined: Vec<(u64, f64)> = head.into_iter().chain(rest).collect();
    assert_eq!(joined, whole, "a 2-replica, 2-chunk run is not reproducible");

    let one = first_terms(config(&data, 1), &tmp.path().join("one"));
    let chunked = first_terms(TrainConfig { chunks: 4, ..config(&data, 1) }, &tmp.path().join("chunked"));
    for name in ["loss_cls", "loss_cls_0", "loss_cls_1", "loss_exist"] {
        let (a, b) = (one[name], chunked[name]);
        assert!((a - b).abs() <= 1e-5 * a.abs().max(1.0), "{name}: 4 chunks score {b}, one part {a}");
    }

    let odd = TrainConfig { replicas: 3, ..config(&data, 2) };
    let err = odd.validate().expect_err("4 samples do not split over 3 replicas");
    assert!(err.to_string().contains("replicas"), "{err}");
    let odd = TrainConfig { replicas: 2, chunks: 3, ..config(&data, 2) };
    let err = odd.validate().expect_err("2 samples per replica do not split into 3 chunks");
    assert!(err.to_string().contains("chunks"), "{err}");
}

#[test]
fn resume_refuses_another_config() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    dataset(&data);
    let out = tmp.path().join("run");
    losses(config(&data, 3), &out, None);
    let mut other = config(&data, 6);
    other.optimizer.lr = 0.01;
    let err = Trainer::new(other, &out, Some(&out.join("checkpoints")), &Device::Cpu).err().expect("a config change must be refused");
    assert!(err.to_string().contains("another config"), "{err}");
}

#[test]
fn a_non_finite_loss_stops_the_run_and_keeps_the_last_good_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    dataset(&data);
    let out = tmp.path().join("run");
    // an absurd learning rate without clipping: the weights overflow after the first steps
    let mut cfg = config(&data, 30);
    cfg.optimizer.lr = 1e30;
    cfg.optimizer.max_grad_norm = None;
    cfg.checkpoint_every = 1000;
    let mut trainer = Trainer::new(cfg, &out, None, &Device::Cpu).unwrap();
    let mut last = 0;
    let err = trainer
        .run(&mut |e| {
            if let Event::Step(r) = e {
                last = r.step;
            }
        })
        .err()
        .expect("the run must stop");
    let msg = err.to_string();
    println!("{msg}");
    assert!(msg.contains(&format!("step {}", last + 1)), "the message names the failing step: {msg}");
    assert!(msg.contains("not finite") || msg.contains("NaN") || msg.contains("inf"), "{msg}");
    assert!(msg.contains("samples ["), "the message names the batch's samples: {msg}");
    // the last good weights are saved: a checkpoint at the last completed step
    let ck = deris::train::state::load_checkpoint(&out.join("checkpoints"), &Device::Cpu).unwrap();
    assert_eq!(ck.state.step, last);
    assert!(ck.weights.values().all(|t| t.flatten_all().unwrap().to_vec1::<f32>().map_or(true, |v| v.iter().all(|x| x.is_finite()))));
}

/// With the synthetic dataset's object list (`data.objects`), the perception terms are scored
/// on every object of the image; the loss still falls, the run resumes exactly, and a
/// perception weight without an object list is refused before training.
#[test]
fn perception_loss_on_every_object_trains_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    dataset(&data);
    let with_objects = |steps| {
        let mut cfg = config(&data, steps);
        cfg.data.objects = Some(data.join("coco/instances.json"));
        cfg.loss.perception_weight = 1.0;
        cfg.loss.positive_iou = Some(0.5);
        cfg.loss.category_weight = 1.0;
        cfg.loss.word_weight = 1.0;
        cfg.loss.box_weight = 1.0;
        cfg
    };
    let terms = first_terms(with_objects(1), &tmp.path().join("first"));
    for name in ["loss_pcls", "loss_pbce", "loss_pdice", "loss_pcls_0", "loss_pdice_2", "loss_pcat", "loss_pcat_2", "loss_word", "loss_pbox", "loss_pbox_2"] {
        assert!(terms[name].is_finite() && terms[name] > 0.0, "{name}: {:?}", terms.get(name));
    }
    let whole = losses(with_objects(24), &tmp.path().join("whole"), None);
    // with every val object listed, validation also diagnoses the masks against the selection
    let log = std::fs::read_to_string(tmp.path().join("whole/log.jsonl")).unwrap();
    let evals: Vec<serde_json::Value> = log.lines().map(|l| serde_json::from_str(l).unwrap()).filter(|v: &serde_json::Value| v["type"] == "eval").collect();
    let last = evals.last().expect("the final validation is logged");
    assert_eq!(last["diagnosis"]["sentences"], last["samples"], "{last}");
    assert!(last["diagnosis"]["best_query_iou"].as_f64().is_some_and(|v| (0.0..=100.0).contains(&v)), "{last}");
    let mean = |s: &[(u64, f64)]| s.iter().map(|p| p.1).sum::<f64>() / s.len() as f64;
    let (first, last) = (mean(&whole[..6]), mean(&whole[18..]));
    assert!(last < 0.85 * first, "the loss did not fall with the perception terms: {first:.3} → {last:.3}");
    let split = tmp.path().join("split");
    let (head, rest) = interrupted(with_objects, &split, 7, 24);
    assert_eq!(head.into_iter().chain(rest).collect::<Vec<_>>(), whole, "a run with the perception terms is not reproducible");
    // the category and word heads are checkpointed (for the resume above) but not exported with the model
    let keys = |p: &Path| deris::checkpoint::Checkpoint::open(p).unwrap().names().filter(|k| k.starts_with("train.")).count();
    let latest = std::fs::read_to_string(split.join("checkpoints/latest")).unwrap();
    let step_dir = split.join("checkpoints").join(latest.trim());
    assert_eq!(keys(&step_dir.join("training_heads.safetensors")), 4);
    assert_eq!(keys(&step_dir.join("model.safetensors")), 0);
    assert_eq!(keys(&split.join("model/model.safetensors")), 0);

    let refused: [(fn(&mut TrainConfig), &str); 4] = [
        (|c| c.loss.positive_iou = Some(1.5), "positive_iou"),
        (|c| c.loss.perception_weight = 0.0, "category_weight"),
        (|c| c.loss.word_weight = f64::NAN, "word_weight"),
        (|c| (c.loss.perception_weight, c.loss.category_weight) = (0.0, 0.0), "box_weight"),
    ];
    for (spoil, field) in refused {
        let mut bad = with_objects(1);
        spoil(&mut bad);
        assert!(bad.validate().unwrap_err().to_string().contains(field), "{field}");
    }
    let mut no_list = with_objects(1);
    no_list.data.objects = None;
    let err = Trainer::new(no_list, &tmp.path().join("refused"), None, &Device::Cpu).err().expect("perception_weight without objects");
    assert!(err.to_string().contains("data.objects"), "{err}");
}

/// An epoch whose last batch is short (8 samples in batches of 6: the second has 2) still runs
/// with more chunks than that batch has samples, and with 2 replicas.
#[test]
fn a_short_last_batch_runs_with_chunks_and_replicas() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    dataset(&data);
    for (replicas, chunks) in [(1, 3), (2, 3)] {
        let cfg = TrainConfig { batch_size: 6, replicas, chunks, ..config(&data, 2) };
        let l = losses(cfg, &tmp.path().join(format!("run-{replicas}-{chunks}")), None);
        assert_eq!(l.len(), 2, "{replicas} replicas × {chunks} chunks");
        assert!(l.iter().all(|(_, v)| v.is_finite()));
    }
}
