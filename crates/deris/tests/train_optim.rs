//! Adam/AMSGrad, clipping, the epoch schedule and resumable checkpoints (TRAIN-EVAL-SPEC §6.1,
//! §6.5, §6.6, §6.9), against a scalar f64 re-implementation of torch's formulas.

use std::collections::BTreeMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use deris::train::optim::{Adam, AdamConfig};
use deris::train::schedule::Schedule;
use deris::train::state::{latest_checkpoint, load_checkpoint, prune_checkpoints, save_checkpoint, TrainerState};

/// torch.optim.Adam + clip_grad_norm_ in f64, one element at a time.
struct RefParam {
    p: Vec<f64>,
    m: Vec<f64>,
    v: Vec<f64>,
    vmax: Vec<f64>,
    step: u64,
    lr_scale: f64,
}

struct RefAdam {
    cfg: AdamConfig,
    params: Vec<RefParam>,
}

impl RefAdam {
    fn new(init: &[(Vec<f64>, f64)], cfg: AdamConfig) -> Self {
        let params = init
            .iter()
            .map(|(p, s)| RefParam {
                p: p.clone(),
                m: vec![0.0; p.len()],
                v: vec![0.0; p.len()],
                vmax: vec![0.0; p.len()],
                step: 0,
                lr_scale: *s,
            })
            .collect();
        RefAdam { cfg, params }
    }

    /// `grads[i]` = None: parameter i has no gradient this step. Returns (norm, clipped).
    fn step(&mut self, grads: &[Option<Vec<f64>>], lr_factor: f64) -> (f64, bool) {
        let norm = grads.iter().flatten().flat_map(|g| g.iter()).map(|x| x * x).sum::<f64>().sqrt();
        let coef = self.cfg.max_grad_norm.map_or(1.0, |m| m / (norm + 1e-6));
        let clipped = coef < 1.0;
        let c = &self.cfg;
        for (p, g) in self.params.iter_mut().zip(grads) {
            let Some(g) = g else { continue };
            p.step += 1;
            let t = p.step as f64;
            let lr = c.lr * lr_factor * p.lr_scale;
            for (i, &g) in g.iter().enumerate() {
                let mut gi = if clipped { g * coef } else { g };
                gi += c.weight_decay * p.p[i];
                p.m[i] = c.beta1 * p.m[i] + (1.0 - c.beta1) * gi;
                p.v[i] = c.beta2 * p.v[i] + (1.0 - c.beta2) * gi * gi;
                p.vmax[i] = p.vmax[i].max(p.v[i]);
                let second = if c.amsgrad { p.vmax[i] } else { p.v[i] };
                let denom = second.sqrt() / (1.0 - c.beta2.powf(t)).sqrt() + c.eps;
                p.p[i] -= lr / (1.0 - c.beta1.powf(t)) * p.m[i] / denom;
            }
        }
        (norm, clipped)
    }
}

fn flat(t: &Tensor) -> Vec<f64> {
    t.flatten_all().unwrap().to_dtype(DType::F64).unwrap().to_vec1().unwrap()
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|x| x.to_bits()).collect()
}

/// Three parameters: `a` [4] (lr ×1), `b` [2,3] (lr ×0.5, the BEiT-3 group), `c` [3] (lr ×1, no
/// gradient on some steps). Gradients: large at first, then small (so AMSGrad's max matters),
/// signs changing.
fn setup(cfg: &AdamConfig) -> (Vec<Var>, Adam, RefAdam) {
    let dev = Device::Cpu;
    let inits: Vec<(Vec<f64>, f64, Vec<usize>)> = vec![
        (vec![0.5, -1.0, 2.0, 0.0], 1.0, vec![4]),
        (vec![1.0, 2.0, 3.0, -4.0, -5.0, 6.0], 0.5, vec![2, 3]),
        (vec![0.25, 0.75, -0.5], 1.0, vec![3]),
    ];
    let mut vars = Vec::new();
    let mut named = Vec::new();
    for (i, (p, scale, shape)) in inits.iter().enumerate() {
        let p32: Vec<f32> = p.iter().map(|&x| x as f32).collect();
        let var = Var::from_tensor(&Tensor::from_vec(p32, shape.as_slice(), &dev).unwrap()).unwrap();
        named.push((["a", "b", "c"][i].to_string(), var.clone(), *scale));
        vars.push(var);
    }
    // The reference starts from the f32-rounded values too.
    let ref_init: Vec<(Vec<f64>, f64)> =
        inits.iter().map(|(p, s, _)| (p.iter().map(|&x| x as f32 as f64).collect(), *s)).collect();
    (vars, Adam::new(named, cfg.clone()).unwrap(), RefAdam::new(&ref_init, cfg.clone()))
}

/// Deterministic gradient of parameter `i` (length n) at step `k`; None where c has none.
fn grad_for(i: usize, n: usize, k: usize) -> Option<Vec<f64>> {
    if i == 2 && (k == 1 || k == 4) {
        return None;
    }
    let amp = if k < 2 { 3.0 } else { 0.2 / (k as f64) };
    Some(
        (0..n)
            .map(|j| {
                let sign = if (i + j + k).is_multiple_of(3) { -1.0 } else { 1.0 };
                // f32-representable so that both sides see the same gradient
                (sign * amp * (1.0 + 0.37 * j as f64 + 0.11 * i as f64)) as f32 as f64
            })
            .collect(),
    )
}

fn grad_store(vars: &[Var], k: usize) -> (GradStore, Vec<Option<Vec<f64>>>) {
    let mut store = GradStore::default();
    let mut gs = Vec::new();
    for (i, v) in vars.iter().enumerate() {
        let g = grad_for(i, v.elem_count(), k);
        if let Some(g) = &g {
            let g32: Vec<f32> = g.iter().map(|&x| x as f32).collect();
            store.insert(v.as_tensor(), Tensor::from_vec(g32, v.shape(), v.device()).unwrap());
        }
        gs.push(g);
    }
    (store, gs)
}

fn run_against_reference(cfg: AdamConfig, steps: usize) -> (Vec<Var>, Adam, RefAdam, Vec<(f64, bool)>) {
    let (vars, mut adam, mut reference) = setup(&cfg);
    let mut clips = Vec::new();
    for k in 0..steps {
        let lr_factor = if k < 3 { 1.0 } else { 0.1 };
        let (store, gs) = grad_store(&vars, k);
        let stats = adam.step(&store, lr_factor).unwrap();
        let (norm, clipped) = reference.step(&gs, lr_factor);
        assert!((stats.grad_norm - norm).abs() <= 1e-9 * norm.max(1.0), "step {k}: norm {} vs {norm}", stats.grad_norm);
        assert_eq!(stats.clipped, clipped, "step {k}: clipped");
        assert_eq!(stats.updated, gs.iter().flatten().count(), "step {k}: updated");
        for (i, v) in vars.iter().enumerate() {
            let got = flat(v.as_tensor());
            for (j, (g, w)) in got.iter().zip(&reference.params[i].p).enumerate() {
                assert!((g - w).abs() <= 2e-6 * w.abs().max(1.0), "step {k} param {i}[{j}]: {g} vs {w}");
            }
        }
        clips.push((norm, clipped));
    }
    (vars, adam, reference, clips)
}

#[test]
fn adam_amsgrad_matches_torch_formulas() {
    let cfg = AdamConfig { lr: 0.05, max_grad_norm: None, ..AdamConfig::default() };
    let (_, adam, reference, _) = run_against_reference(cfg.clone(), 7);
    // AMSGrad mattered: the max is above the current second moment somewhere, and a run without
    // it ends elsewhere.
    assert!(reference.params.iter().any(|p| p.vmax.iter().zip(&p.v).any(|(m, v)| *m > 1.05 * v)));
    let (_, _, plain, _) = run_against_reference(AdamConfig { amsgrad: false, ..cfg }, 7);
    let diff = reference.params[0].p.iter().zip(&plain.params[0].p).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
    assert!(diff > 1e-4, "amsgrad made no difference ({diff})");
    // per-parameter steps: `c` had no gradient at steps 1 and 4
    assert_eq!(adam.param_step("a"), Some(7));
    assert_eq!(adam.param_step("b"), Some(7));
    assert_eq!(adam.param_step("c"), Some(5));
    let (tensors, steps) = adam.state();
    assert_eq!(steps, BTreeMap::from([("a".into(), 7), ("b".into(), 7), ("c".into(), 5)]));
    assert_eq!(tensors.len(), 9);
    let vmax_c = flat(&tensors["max_exp_avg_sq.c"]);
    for (g, w) in vmax_c.iter().zip(&reference.params[2].vmax) {
        assert!((g - w).abs() <= 1e-6 * w.max(1e-3), "max_exp_avg_sq.c {g} vs {w}");
    }
}

#[test]
fn adam_with_weight_decay_matches_torch_formulas() {
    run_against_reference(AdamConfig { lr: 0.01, weight_decay: 0.1, max_grad_norm: None, ..AdamConfig::default() }, 5);
}

#[test]
fn clipping_fires_only_above_max_norm() {
    // Norms fall from ~10 to ~0.1 over the steps; a max of 0.5 clips the first ones only.
    let cfg = AdamConfig { lr: 0.05, max_grad_norm: Some(0.5), ..AdamConfig::default() };
    let (_, _, _, clips) = run_against_reference(cfg, 8);
    assert!(clips.iter().any(|c| c.1) && clips.iter().any(|c| !c.1), "{clips:?}");
    for (norm, clipped) in clips {
        assert_eq!(clipped, norm > 0.5, "norm {norm}");
    }
}

#[test]
fn clip_scales_every_gradient_by_the_global_norm() {
    // Two parameters with gradients [3, 0] and [4]: global norm 5. With lr tiny compared with
    // the moments, the first Adam step is sign-like, so check the second moments instead.
    let dev = Device::Cpu;
    let a = Var::from_tensor(&Tensor::new(&[1f32, 1.0], &dev).unwrap()).unwrap();
    let b = Var::from_tensor(&Tensor::new(&[1f32], &dev).unwrap()).unwrap();
    let cfg = AdamConfig { max_grad_norm: Some(0.15), ..AdamConfig::default() };
    let mut adam = Adam::new(vec![("a".into(), a.clone(), 1.0), ("b".into(), b.clone(), 1.0)], cfg).unwrap();
    let mut store = GradStore::default();
    store.insert(a.as_tensor(), Tensor::new(&[3f32, 0.0], &dev).unwrap());
    store.insert(b.as_tensor(), Tensor::new(&[4f32], &dev).unwrap());
    let stats = adam.step(&store, 1.0).unwrap();
    assert!((stats.grad_norm - 5.0).abs() < 1e-12 && stats.clipped && stats.updated == 2);
    let coef = 0.15 / (5.0 + 1e-6);
    let (t, _) = adam.state();
    let m_a = flat(&t["exp_avg.a"]);
    let m_b = flat(&t["exp_avg.b"]);
    assert!((m_a[0] - 0.1 * 3.0 * coef).abs() < 1e-8 && m_a[1] == 0.0, "{m_a:?}");
    assert!((m_b[0] - 0.1 * 4.0 * coef).abs() < 1e-8, "{m_b:?}");
    // the all-zero gradient entry did not move its parameter
    assert_eq!(flat(a.as_tensor())[1], 1.0);

    // below the threshold: untouched gradients
    let mut store = GradStore::default();
    store.insert(a.as_tensor(), Tensor::new(&[0.03f32, 0.04], &dev).unwrap());
    let stats = adam.step(&store, 1.0).unwrap();
    assert!((stats.grad_norm - 0.05).abs() < 1e-8 && !stats.clipped && stats.updated == 1);
    assert_eq!(adam.param_step("a"), Some(2));
    assert_eq!(adam.param_step("b"), Some(1));

    // a non-finite norm is an error and changes nothing
    let before = bits(a.as_tensor());
    let mut store = GradStore::default();
    store.insert(a.as_tensor(), Tensor::new(&[f32::NAN, 0.0], &dev).unwrap());
    let err = adam.step(&store, 1.0).unwrap_err().to_string();
    assert!(err.contains("NaN"), "{err}");
    assert_eq!(bits(a.as_tensor()), before);
    assert_eq!(adam.param_step("a"), Some(2));
}

#[test]
fn schedule_tables() {
    let r = Schedule::refcoco();
    let got: Vec<f64> = (0..20).map(|e| r.factor(e)).collect();
    let mut want = vec![0.5];
    want.extend([1.0; 13]);
    want.extend([0.1; 4]);
    want.extend([0.1 * 0.1; 2]);
    assert_eq!(got, want);
    let g = Schedule::grefcoco();
    assert_eq!((0..6).map(|e| g.factor(e)).collect::<Vec<_>>(), vec![1.0, 1.0, 1.0, 1.0, 1.0, 0.1]);
    assert_eq!(Schedule::default(), g);
    // serde fills the missing fields from the default (gRefCOCO)
    let s: Schedule = serde_json::from_str(r#"{"warmup_epochs": 3}"#).unwrap();
    assert_eq!((0..7).map(|e| s.factor(e)).collect::<Vec<_>>(), vec![0.25, 0.5, 0.75, 1.0, 1.0, 0.1, 0.1]);
}

// ---------------------------------------------------------------------------------------------
// Checkpoints

const TOTAL_STEPS: u64 = 12;
const STEPS_PER_EPOCH: u64 = 3;

/// A toy trainer: quadratic objective Σ k_s·(w − target)² whose weights change per step; `frozen`
/// is saved but never optimised; `w2` gets no gradient on every 4th step.
struct Toy {
    w1: Var,
    w2: Var,
    frozen: Tensor,
    adam: Adam,
    state: TrainerState,
}

fn toy_weights(t: &Toy) -> BTreeMap<String, Tensor> {
    BTreeMap::from([
        ("head.w1".to_string(), t.w1.as_tensor().clone()),
        ("head.w2".to_string(), t.w2.as_tensor().clone()),
        ("backbone.frozen".to_string(), t.frozen.clone()),
    ])
}

fn toy_from_weights(weights: &BTreeMap<String, Tensor>, state: TrainerState) -> Toy {
    let w1 = Var::from_tensor(&weights["head.w1"]).unwrap();
    let w2 = Var::from_tensor(&weights["head.w2"]).unwrap();
    let cfg = AdamConfig { lr: 0.02, max_grad_norm: Some(0.15), ..AdamConfig::default() };
    let adam = Adam::new(vec![("head.w1".into(), w1.clone(), 1.0), ("head.w2".into(), w2.clone(), 0.5)], cfg).unwrap();
    Toy { w1, w2, frozen: weights["backbone.frozen"].clone(), adam, state }
}

fn toy_new() -> Toy {
    let dev = Device::Cpu;
    let weights = BTreeMap::from([
        ("head.w1".to_string(), Tensor::new(&[0.3f32, -0.7, 1.1, 0.0, 2.5], &dev).unwrap()),
        ("head.w2".to_string(), Tensor::new(&[[1f32, -2.0, 0.5], [0.25, 3.0, -1.5]], &dev).unwrap()),
        ("backbone.frozen".to_string(), Tensor::new(&[[7f32, 8.0]], &dev).unwrap()),
    ]);
    let state = TrainerState { seed: 6666, config: serde_json::json!({"lr": 0.02}), ..TrainerState::default() };
    toy_from_weights(&weights, state)
}

fn toy_step(t: &mut Toy) {
    let s = t.state.step;
    let dev = Device::Cpu;
    let k = 1.0 + 0.5 * (s % 5) as f64;
    let target1 = Tensor::new(&[1f32, 2.0, 3.0, 4.0, 5.0], &dev).unwrap().affine(1.0, -(s as f64) * 0.1).unwrap();
    let mut loss = (t.w1.as_tensor() - target1).unwrap().sqr().unwrap().sum_all().unwrap().affine(k, 0.0).unwrap();
    if s % 4 != 3 {
        let l2 = t.w2.as_tensor().affine(1.0, -0.5).unwrap().sqr().unwrap().sum_all().unwrap();
        loss = (loss + l2).unwrap();
    }
    let grads = loss.backward().unwrap();
    let epoch = (s / STEPS_PER_EPOCH) as usize;
    let stats = t.adam.step(&grads, Schedule::refcoco().factor(epoch)).unwrap();
    t.state.step += 1;
    t.state.batch_in_epoch = (t.state.step % STEPS_PER_EPOCH) as usize;
    t.state.epoch = (t.state.step / STEPS_PER_EPOCH) as usize;
    let record = serde_json::json!({"step": s, "loss": loss.to_scalar::<f32>().unwrap(), "grad_norm": stats.grad_norm});
    t.state.history.push(record);
}

fn save(dir: &std::path::Path, t: &Toy) -> std::path::PathBuf {
    save_checkpoint(dir, &toy_weights(t), &t.adam, &t.state).unwrap()
}

fn resume(path: &std::path::Path) -> Toy {
    let loaded = load_checkpoint(path, &Device::Cpu).unwrap();
    let mut t = toy_from_weights(&loaded.weights, loaded.state);
    t.adam.load_state(loaded.optim_tensors, loaded.optim_steps).unwrap();
    t
}

#[test]
fn save_load_continue_is_bit_identical() {
    let mut straight = toy_new();
    for _ in 0..TOTAL_STEPS {
        toy_step(&mut straight);
    }

    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ckpt");
    let mut t = toy_new();
    for _ in 0..5 {
        toy_step(&mut t);
    }
    let first = save(&dir, &t);
    assert_eq!(first, dir.join("step-00000005"));
    assert_eq!(latest_checkpoint(&dir).unwrap(), Some(first.clone()));
    drop(t);

    // resume through DIR/latest, go on, save again, resume from the step directory itself
    let mut t = resume(&dir);
    assert_eq!((t.state.step, t.state.epoch, t.state.batch_in_epoch), (5, 1, 2));
    for _ in 5..9 {
        toy_step(&mut t);
    }
    let second = save(&dir, &t);
    assert_eq!(latest_checkpoint(&dir).unwrap(), Some(second.clone()));
    let mut t = resume(&second);
    while t.state.step < TOTAL_STEPS {
        toy_step(&mut t);
    }

    assert_eq!(bits(t.w1.as_tensor()), bits(straight.w1.as_tensor()));
    assert_eq!(bits(t.w2.as_tensor()), bits(straight.w2.as_tensor()));
    assert_eq!(bits(&t.frozen), bits(&straight.frozen));
    let (ta, sa) = t.adam.state();
    let (tb, sb) = straight.adam.state();
    assert_eq!(sa, sb);
    assert_eq!(sb["head.w2"], TOTAL_STEPS - 3); // no gradient at steps 3, 7, 11
    for (name, x) in &ta {
        assert_eq!(bits(x), bits(&tb[name]), "{name}");
    }
    assert_eq!(t.state, straight.state);
    assert_eq!(t.state.history.len(), TOTAL_STEPS as usize);

    // model.safetensors is an ordinary weights file
    let ck = deris::checkpoint::Checkpoint::open(&second.join("model.safetensors")).unwrap();
    assert_eq!(ck.names().collect::<Vec<_>>(), vec!["backbone.frozen", "head.w1", "head.w2"]);

    // saving the same step again replaces it; no temporary leftovers
    save(&dir, &t);
    save(&dir, &t);
    let mut names: Vec<String> =
        std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    assert_eq!(names, vec!["latest", "step-00000005", "step-00000009", "step-00000012"]);

    let removed = prune_checkpoints(&dir, 2).unwrap();
    assert_eq!(removed, vec![dir.join("step-00000005")]);
    let removed = prune_checkpoints(&dir, 0).unwrap();
    assert_eq!(removed, vec![dir.join("step-00000009")], "the latest one is kept");
}

#[test]
fn load_errors_name_the_path() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ckpt");

    let missing = tmp.path().join("nowhere");
    let err = load_checkpoint(&missing, &Device::Cpu).err().unwrap().to_string();
    assert!(err.contains(&missing.display().to_string()), "{err}");

    std::fs::create_dir_all(&dir).unwrap();
    let err = load_checkpoint(&dir, &Device::Cpu).err().unwrap().to_string();
    assert!(err.contains(&dir.display().to_string()) && err.contains("latest"), "{err}");

    let mut t = toy_new();
    toy_step(&mut t);
    let step_dir = save(&dir, &t);

    // corrupt optimizer file
    let optim = step_dir.join("optimizer.safetensors");
    let good = std::fs::read(&optim).unwrap();
    std::fs::write(&optim, b"not a safetensors file").unwrap();
    let err = load_checkpoint(&dir, &Device::Cpu).err().unwrap().to_string();
    assert!(err.contains(&optim.display().to_string()), "{err}");
    std::fs::write(&optim, good).unwrap();

    // truncated model file
    let model = step_dir.join("model.safetensors");
    let bytes = std::fs::read(&model).unwrap();
    std::fs::write(&model, &bytes[..bytes.len() - 4]).unwrap();
    let err = load_checkpoint(&step_dir, &Device::Cpu).err().unwrap().to_string();
    assert!(err.contains(&model.display().to_string()), "{err}");
    std::fs::write(&model, bytes).unwrap();

    // broken trainer.json
    let trainer = step_dir.join("trainer.json");
    let text = std::fs::read(&trainer).unwrap();
    std::fs::write(&trainer, b"{\"step\": ").unwrap();
    let err = load_checkpoint(&step_dir, &Device::Cpu).err().unwrap().to_string();
    assert!(err.contains(&trainer.display().to_string()), "{err}");
    std::fs::write(&trainer, text).unwrap();

    // latest names a directory that is gone
    std::fs::write(dir.join("latest"), "step-00000042\n").unwrap();
    let err = load_checkpoint(&dir, &Device::Cpu).err().unwrap().to_string();
    assert!(err.contains("step-00000042"), "{err}");
    std::fs::write(dir.join("latest"), "../elsewhere\n").unwrap();
    let err = load_checkpoint(&dir, &Device::Cpu).err().unwrap().to_string();
    assert!(err.contains("latest") && err.contains("../elsewhere"), "{err}");

    // optimizer state that does not match the parameters: everything listed, nothing changed
    let loaded = load_checkpoint(&step_dir, &Device::Cpu).unwrap();
    let mut tensors = loaded.optim_tensors.clone();
    tensors.remove("exp_avg.head.w1");
    tensors.insert("exp_avg_sq.head.w2".into(), Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap());
    tensors.insert("exp_avg.head.extra".into(), Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap());
    let mut steps = loaded.optim_steps.clone();
    steps.remove("head.w2");
    let mut fresh = toy_from_weights(&loaded.weights, loaded.state.clone());
    let err = fresh.adam.load_state(tensors, steps).unwrap_err().to_string();
    for needle in [
        "missing 'exp_avg.head.w1'",
        "'exp_avg_sq.head.w2' has shape [4]",
        "unexpected 'exp_avg.head.extra'",
        "step count of 'head.w2'",
    ] {
        assert!(err.contains(needle), "{needle} not in {err}");
    }
    assert_eq!(fresh.adam.param_step("head.w1"), Some(0));
    fresh.adam.load_state(loaded.optim_tensors, loaded.optim_steps).unwrap();
    assert_eq!(fresh.adam.param_step("head.w1"), Some(1));
}
