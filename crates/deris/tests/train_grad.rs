//! The whole model is differentiable: on the tiny-a weights every trainable weight gets a finite,
//! non-zero gradient from a loss over every output (except the keys listed below, which the
//! forward pass never reads), Swin stays frozen, and a plain SGD step along the gradient lowers
//! the loss of freshly initialised weights by what the gradient predicts.

mod common;

use std::collections::{BTreeMap, HashMap};

use candle_core::{DType, Device, Tensor};
use deris::train::params::{Group, TrainableWeights};
use deris::{BatchCoupling, DerisConfig, ModelInputs, Taps};

/// Keys the forward pass never reads: loaded only so that strict loading accepts the released
/// checkpoints. Their gradient must be absent (or zero).
const NEVER_READ: [(&str, &str); 6] = [
    // MODEL-SPEC §12.3: serves a `SEG_embedding` path the model never takes.
    ("perception_branch.predictor.SEG_proj.", "SEG_embedding path never taken"),
    // MODEL-SPEC §6.4: the relative-position MLP of GlobalCrossAttention; the authors always
    // pass cross_attn_mask=None.
    (".cross_attn.mapmlp.", "Q2TCA relative-position MLP, cross_attn_mask is always None"),
    // MODEL-SPEC §3.1: the perception branch's own existence head and query embedding.
    ("perception_branch.nt_embed.", "perception-branch existence head, unused"),
    ("perception_branch.perception_query_embed.", "perception-branch query embedding, unused"),
    // BEiT-3's masked-image-modelling token (pretraining only).
    ("understanding_branch.vis_enc.beit3.vision_embed.mask_token", "BEiT-3 pretraining token"),
    // The cognition branch's `logit_embed` is computed by the authors (`pred_logits` of
    // post_forward) but is neither a model output nor in the loss (TRAIN-EVAL-SPEC §5.1).
    ("understanding_branch.logit_embed.", "computed, never returned nor in the loss"),
];

/// Weights whose gradient is zero in exact arithmetic, so only rounding noise reaches them: the
/// key bias of `GlobalCrossAttention` (Q2TCA) adds `q·b_k`, the same for every key of a query,
/// which the softmax cancels. The same holds in PyTorch.
const ZERO_IN_EXACT_ARITHMETIC: [&str; 1] = [".cross_attn.k.bias"];

fn golden_inputs() -> ModelInputs {
    let g = common::golden();
    ModelInputs {
        img: common::get(&g, "input.img").clone(),
        img_mini: common::get(&g, "input.img_mini").clone(),
        ref_expr_inds: common::get(&g, "input.ref_expr_inds").clone(),
        text_attention_mask: common::get(&g, "input.text_attention_mask").clone(),
    }
}

/// Sum of the means of every output of the forward pass (final and auxiliary rounds).
fn loss(w: &TrainableWeights, cfg: &DerisConfig, x: &ModelInputs) -> Tensor {
    let model = w.build(cfg).unwrap();
    let y = model.forward(x, BatchCoupling::PerImage, &mut Taps::off()).unwrap();
    let mut terms = vec![&y.pred_masks, &y.pred_boxes, &y.pred_refer_logits, &y.pred_logits_perception, &y.pred_existence];
    for r in &y.aux {
        terms.extend([&r.pred_masks_lowres, &r.pred_boxes, &r.pred_logits, &r.pred_refer_logits]);
    }
    let means: Vec<Tensor> = terms.iter().map(|t| t.mean_all().unwrap()).collect();
    Tensor::stack(&means, 0).unwrap().sum_all().unwrap()
}

fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

/// `(max |g|, Σ g²)` of each trainable Var that received a gradient.
fn gradient_norms(w: &TrainableWeights, l: &Tensor) -> BTreeMap<String, (f64, f64)> {
    let grads = l.backward().unwrap();
    w.trainable()
        .iter()
        .filter_map(|(k, v)| {
            let g = grads.get(v.as_tensor())?;
            Some((k.clone(), (scalar(&g.abs().unwrap().max_all().unwrap()), scalar(&g.sqr().unwrap().sum_all().unwrap()))))
        })
        .collect()
}

#[test]
fn every_trainable_weight_gets_a_gradient() {
    let cfg = common::tiny_a_config();
    let w = TrainableWeights::load(&common::fixture("tiny-a/weights.safetensors"), &cfg, &Device::Cpu).unwrap();
    assert!(w.trainable().keys().all(|k| Group::of(k) != Group::HierVisionEncoder), "Swin must be frozen");
    assert!(w.frozen().keys().any(|k| k.starts_with("perception_branch.hier_vision_encoder.")));
    assert_eq!(w.trainable_in(Group::HierVisionEncoder).count(), 0);

    let l = loss(&w, &cfg, &golden_inputs());
    assert!(scalar(&l).is_finite());
    let norms = gradient_norms(&w, &l);
    let typical = norms.values().map(|&(m, _)| m).fold(0f64, f64::max);

    let mut bad = Vec::new();
    let mut exceptions_seen: HashMap<&str, usize> = HashMap::new();
    for name in w.trainable().keys() {
        let grad = norms.get(name).copied();
        if let Some((marker, _)) = NEVER_READ.iter().find(|(m, _)| name.contains(m)) {
            *exceptions_seen.entry(marker).or_default() += 1;
            if grad.is_some_and(|(m, _)| m != 0.0) {
                bad.push(format!("{name}: listed as never read, yet has a gradient {grad:?}"));
            }
            continue;
        }
        let Some((max, _)) = grad else {
            bad.push(format!("{name}: no gradient"));
            continue;
        };
        if let Some(marker) = ZERO_IN_EXACT_ARITHMETIC.iter().find(|m| name.contains(*m)) {
            *exceptions_seen.entry(marker).or_default() += 1;
            if max.is_nan() || max > 1e-4 * typical {
                bad.push(format!("{name}: gradient {max:e} should be rounding noise (typical {typical:e})"));
            }
            continue;
        }
        if !max.is_finite() || max == 0.0 {
            bad.push(format!("{name}: gradient max |g| = {max}"));
        }
    }
    assert!(bad.is_empty(), "{} bad gradients:\n{}", bad.len(), bad.join("\n"));
    // Every exception matches real keys (a renamed key must not silently widen the list).
    for (m, why) in NEVER_READ {
        assert!(exceptions_seen.contains_key(m), "never-read marker '{m}' ({why}) matches no trainable key");
    }
    for m in ZERO_IN_EXACT_ARITHMETIC {
        assert!(exceptions_seen.contains_key(m), "marker '{m}' matches no trainable key");
    }
    println!(
        "{} trainable tensors ({} scalars), {} with gradients; largest |g| = {typical:.3e}",
        w.trainable().len(),
        w.num_trainable(),
        norms.len()
    );
}

#[test]
fn load_reads_both_formats_strictly() {
    let cfg = common::tiny_a_config();
    let st = TrainableWeights::load(&common::fixture("tiny-a/weights.safetensors"), &cfg, &Device::Cpu).unwrap();
    let pth = TrainableWeights::load(&common::fixture("tiny-a/weights.pth"), &cfg, &Device::Cpu).unwrap();
    let (a, b) = (st.to_tensors(), pth.to_tensors());
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (k, t) in &a {
        assert!(deris::checkpoint::bit_identical(t, &b[k]).unwrap(), "{k} differs between .safetensors and .pth");
    }
    let mut wrong = cfg.clone();
    wrong.predictor.num_queries += 1;
    let e = TrainableWeights::load(&common::fixture("tiny-a/weights.safetensors"), &wrong, &Device::Cpu).err().unwrap();
    assert!(matches!(e, deris::Error::KeyMismatch { .. }), "{e}");
}

#[test]
fn an_sgd_step_lowers_the_loss_of_fresh_weights() {
    let cfg = common::tiny_a_config();
    let x = golden_inputs();
    let w = TrainableWeights::init(&cfg, 6666, &Device::Cpu).unwrap();
    let l0 = loss(&w, &cfg, &x);
    let grads = l0.backward().unwrap();
    let l0 = scalar(&l0);
    let sq: f64 = w.trainable().values().filter_map(|v| grads.get(v.as_tensor())).map(|g| scalar(&g.sqr().unwrap().sum_all().unwrap())).sum();
    assert!(l0.is_finite() && sq.is_finite() && sq > 0.0, "loss {l0}, |g|² {sq}");
    // A step whose first-order decrease is lr·|g|² = 0.01.
    let lr = 0.01 / sq;
    for v in w.trainable().values() {
        if let Some(g) = grads.get(v.as_tensor()) {
            v.set(&(v.as_tensor() - (g * lr).unwrap()).unwrap()).unwrap();
        }
    }
    let l1 = scalar(&loss(&w, &cfg, &x));
    let predicted = lr * sq;
    println!("loss {l0:.6} → {l1:.6}: decrease {:.3e}, first-order prediction {predicted:.3e}", l0 - l1);
    assert!(l1 < l0, "the step raised the loss: {l0} → {l1}");
    let ratio = (l0 - l1) / predicted;
    assert!((0.5..1.5).contains(&ratio), "decrease {:e} vs predicted {predicted:e} (ratio {ratio:.3})", l0 - l1);
}

/// One weight per kind of op on the way from the weights to the outputs (strided conv, embedding
/// lookups, multiway and plain LayerNorm, fused GELU Linear, attention with −inf / −100 / masked
/// biases, 1×1 and 3×3 conv, GroupNorm, deformable sampling offsets and weights, bilinear
/// resizes, post-norm sublayers).
const PROBES: [&str; 25] = [
    "understanding_branch.vis_enc.beit3.vision_embed.proj.weight",
    "understanding_branch.vis_enc.beit3.text_embed.weight",
    "understanding_branch.vis_enc.beit3.encoder.embed_positions.A.weight",
    "understanding_branch.vis_enc.beit3.encoder.layers.0.self_attn.inner_attn_ln.B.weight",
    "understanding_branch.vis_enc.beit3.encoder.layers.1.ffn.A.fc1.weight",
    "understanding_branch.init_query.weight",
    "understanding_branch.roialigner.TextCorrelation.layers.0.attentions.1.attn.in_proj_weight",
    "understanding_branch.nt_embed.weight",
    "perception_branch.pixel_decoder.input_proj.0.0.weight",
    "perception_branch.pixel_decoder.input_proj.0.1.weight",
    "perception_branch.pixel_decoder.transformer.encoder.layers.0.self_attn.sampling_offsets.weight",
    "perception_branch.pixel_decoder.transformer.encoder.layers.1.self_attn.attention_weights.weight",
    "perception_branch.pixel_decoder.transformer.encoder.layers.0.self_attn.value_proj.weight",
    "perception_branch.pixel_decoder.transformer.level_embed",
    "perception_branch.pixel_decoder.layer_1.0.weight",
    "perception_branch.pixel_decoder.adapter_1.1.bias",
    "perception_branch.pixel_decoder.mask_features.weight",
    "perception_branch.predictor.channel_proj_conv.weight",
    "perception_branch.predictor.transformer_cross_attention_layers.1.multihead_attn.in_proj_weight",
    "perception_branch.predictor.query_embed.weight",
    "perception_branch.predictor.level_embed.weight",
    "perception_branch.predictor.mask_embed.layers.2.weight",
    "perception_branch.predictor.query_SA.0.self_attn.in_proj_weight",
    "perception_branch.predictor.Q2TCA.1.norm3.weight",
    "perception_branch.predictor.refer_proj.1.weight",
];

/// For each probe weight `w` with gradient `g`: the central difference of the loss along
/// `d = g/|g|` must equal the directional derivative `g·d = |g|`.
///
/// The loss is only piecewise smooth: each round's masked-attention mask thresholds the previous
/// round's mask logits (detached, as in the reference), so a step that moves a logit across the
/// threshold adds a jump to the difference. Steps are therefore sized to change the loss by
/// 1e-3 … 5e-5 (f32 resolves ~1e-6 of it), and at least two of the four must agree with the
/// gradient within 2.5%: a jump gives an arbitrary ratio, a wrong gradient a consistently wrong one.
#[test]
fn gradients_match_directional_differences() {
    let cfg = common::tiny_a_config();
    let x = golden_inputs();
    let w = TrainableWeights::load(&common::fixture("tiny-a/weights.safetensors"), &cfg, &Device::Cpu).unwrap();
    let grads = loss(&w, &cfg, &x).backward().unwrap();
    let mut bad = Vec::new();
    for name in PROBES {
        let var = w.trainable().get(name).unwrap_or_else(|| panic!("{name} is not trainable"));
        let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{name}: no gradient"));
        let norm = scalar(&g.sqr().unwrap().sum_all().unwrap()).sqrt();
        let original = var.as_tensor().copy().unwrap();
        let at = |s: f64| {
            var.set(&(&original + (g * (s / norm)).unwrap()).unwrap()).unwrap();
            scalar(&loss(&w, &cfg, &x))
        };
        let ratios: Vec<f64> = [1e-3, 3e-4, 1e-4, 5e-5]
            .iter()
            .map(|dl| {
                let eps = dl / norm;
                (at(eps) - at(-eps)) / (2.0 * eps) / norm
            })
            .collect();
        var.set(&original).unwrap();
        let agree = ratios.iter().filter(|r| (*r - 1.0).abs() < 0.025).count();
        println!("{name:92} |g| = {norm:.3e}, (central difference)/|g| = {ratios:.3?}");
        if agree < 2 {
            bad.push(format!("{name}: |g| = {norm:e}, central differences / |g| = {ratios:?}"));
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}
