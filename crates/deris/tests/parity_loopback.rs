//! Parity of the loopback decoder (`perception_branch.predictor.*`) and the post-processing with
//! the tiny-a golden tensors, and the batch semantics of `BatchCoupling`.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use deris::loopback::{BatchCoupling, MultiScaleMaskedTransformerDecoder, PredictorOutput};
use deris::post::{get_predictions_parts, PostParams};
use deris::Taps;

/// The predictor's inputs, batch-first.
#[derive(Clone)]
struct Inputs {
    multi_scale: Vec<Tensor>,
    mask_features: Tensor,
    query: Tensor,
    text_feat: Tensor,
    pad: Tensor,
    img_feat: Tensor,
}

impl Inputs {
    fn golden(g: &HashMap<String, Tensor>) -> Self {
        let t = |n: &str| common::get(g, n).clone();
        Self {
            multi_scale: (0..3).map(|l| t(&format!("pixel_decoder.multi_scale_features.{l}"))).collect(),
            mask_features: t("pixel_decoder.mask_features"),
            query: t("understanding.pre.query_feat"),
            text_feat: t("understanding.pre.text_feat"),
            pad: t("input.text_attention_mask"),
            img_feat: t("understanding.pre.img_feat"),
        }
    }

    /// A deterministic perturbation of every float input, and `real` real tokens of text.
    fn perturbed(&self, k: f32, real: usize) -> Self {
        let p = |t: &Tensor| -> Tensor {
            let n = t.elem_count();
            let noise: Vec<f32> = (0..n).map(|i| 0.3 * ((i as f32) * 0.37 * k + k).sin()).collect();
            let noise = Tensor::from_vec(noise, t.shape(), t.device()).unwrap();
            ((t * (1.0 + 0.1 * k as f64)).unwrap() + noise).unwrap()
        };
        let l = self.pad.dim(1).unwrap();
        let pad: Vec<i64> = (0..l).map(|j| i64::from(j >= real)).collect();
        Self {
            multi_scale: self.multi_scale.iter().map(p).collect(),
            mask_features: p(&self.mask_features),
            query: p(&self.query),
            text_feat: p(&self.text_feat),
            pad: Tensor::from_vec(pad, (1, l), &Device::Cpu).unwrap(),
            img_feat: p(&self.img_feat),
        }
    }

    fn cat(parts: &[&Inputs]) -> Self {
        let cat = |f: &dyn Fn(&Inputs) -> Tensor| -> Tensor {
            Tensor::cat(&parts.iter().map(|x| f(x)).collect::<Vec<_>>(), 0).unwrap()
        };
        Self {
            multi_scale: (0..3).map(|l| cat(&|x| x.multi_scale[l].clone())).collect(),
            mask_features: cat(&|x| x.mask_features.clone()),
            query: cat(&|x| x.query.clone()),
            text_feat: cat(&|x| x.text_feat.clone()),
            pad: cat(&|x| x.pad.clone()),
            img_feat: cat(&|x| x.img_feat.clone()),
        }
    }
}

fn predictor() -> MultiScaleMaskedTransformerDecoder {
    let cfg = common::tiny_a_config();
    let vb = common::tiny_a_vb().pp("perception_branch").pp("predictor");
    MultiScaleMaskedTransformerDecoder::new(&cfg, vb).unwrap()
}

fn run(
    p: &MultiScaleMaskedTransformerDecoder,
    x: &Inputs,
    coupling: BatchCoupling,
    taps: &mut Taps,
) -> PredictorOutput {
    p.forward(&x.multi_scale, &x.mask_features, &x.query, &x.text_feat, &x.pad, &x.img_feat, coupling, taps).unwrap()
}

/// The outputs compared in the batch tests, by name.
fn outputs(o: &PredictorOutput) -> Vec<(&'static str, Tensor)> {
    vec![
        ("pred_masks", o.pred_masks.clone()),
        ("pred_boxes", o.pred_boxes.clone()),
        ("pred_logits", o.pred_logits.clone()),
        ("pred_refer_logits", o.pred_refer_logits.clone()),
        ("query_feat", o.query_feat.clone()),
    ]
}

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    common::max_abs_diff(a, b).0
}

#[test]
fn predictor_matches_golden() {
    let g = common::golden();
    let p = predictor();
    let mut taps = Taps::on();
    let out = run(&p, &Inputs::golden(&g), BatchCoupling::PerImage, &mut taps);
    let cfg = common::tiny_a_config();
    assert_eq!(out.aux.len(), cfg.predictor.dec_layers);

    let mut names: Vec<&String> = g
        .keys()
        .filter(|k| k.starts_with("predictor.") || (k.starts_with("out.") && *k != "out.pred_existence"))
        .collect();
    names.sort();
    assert!(names.len() > 30, "expected every predictor tensor, found {}", names.len());
    for name in names {
        let want = common::get(&g, name);
        let got = taps.get(name).unwrap_or_else(|| panic!("tap '{name}' not recorded"));
        if want.dtype() == DType::U8 {
            assert_eq!(got.dtype(), DType::U8, "{name} dtype");
            assert_eq!(got.dims(), want.dims(), "{name} shape");
            let f = common::flip_fraction(got, want);
            println!("{name:50} flip fraction = {f:.2e}");
            assert!(f <= 1e-3, "{name}: flip fraction {f}");
        } else {
            common::assert_close(name, got, want, 1e-4);
        }
    }
}

#[test]
fn post_matches_golden() {
    let g = common::golden();
    let cfg = common::tiny_a_config();
    let params = PostParams::from(&cfg.runtime);
    let mut taps = Taps::on();
    let preds = get_predictions_parts(
        common::get(&g, "out.pred_refer_logits"),
        common::get(&g, "out.pred_boxes"),
        common::get(&g, "out.pred_masks"),
        common::get(&g, "out.pred_existence"),
        &params,
        &mut taps,
    )
    .unwrap();
    for name in ["post.scores", "post.boxes_xyxy", "post.pred_nt"] {
        common::assert_close(name, taps.get(name).unwrap(), common::get(&g, name), 1e-4);
    }
    let want = common::get(&g, "post.final_mask");
    let got = taps.get("post.final_mask").unwrap();
    assert_eq!(got.dtype(), DType::U8);
    let f = common::flip_fraction(got, want);
    println!("{:50} flip fraction = {f:.2e}", "post.final_mask");
    assert!(f <= 1e-3, "post.final_mask: flip fraction {f}");

    // The typed per-image result agrees with the tapped tensors.
    let (b, h, w) = want.dims3().unwrap();
    assert_eq!(preds.len(), b);
    let want_scores = common::get(&g, "post.scores").to_vec2::<f32>().unwrap();
    for (i, p) in preds.iter().enumerate() {
        assert_eq!((p.mask.height, p.mask.width), (h, w));
        assert_eq!(p.mask.data, got.get(i).unwrap().flatten_all().unwrap().to_vec1::<u8>().unwrap());
        assert_eq!(p.boxes.len(), p.scores.len());
        let passes = want_scores[i].iter().any(|&s| s > cfg.runtime.score_threshold as f32);
        assert_eq!(p.no_target, !passes);
        assert!((p.existence + p.pred_nt - 1.0).abs() < 1e-6);
    }
}

#[test]
fn batch_coupling_semantics() {
    let g = common::golden();
    let p = predictor();
    let base = Inputs::golden(&g);
    let l = base.pad.dim(1).unwrap();
    let singles = [base.clone(), base.perturbed(1.0, 3), base.perturbed(2.0, l)];
    let batch = Inputs::cat(&singles.iter().collect::<Vec<_>>());

    let alone: Vec<PredictorOutput> =
        singles.iter().map(|x| run(&p, x, BatchCoupling::PerImage, &mut Taps::off())).collect();
    let per_image = run(&p, &batch, BatchCoupling::PerImage, &mut Taps::off());
    let reference = run(&p, &batch, BatchCoupling::Reference, &mut Taps::off());

    // PerImage in a batch of 3 = each image run alone.
    let mut worst_per_image = 0f32;
    let mut worst_reference = 0f32;
    for (i, single) in alone.iter().enumerate() {
        for ((name, got), (_, want)) in outputs(&per_image).iter().zip(outputs(single)) {
            let d = max_abs(&got.narrow(0, i, 1).unwrap(), &want);
            println!("PerImage batch-3 vs alone, image {i}, {name:20} max|Δ| = {d:.3e}");
            assert!(d <= 1e-5, "PerImage image {i} {name}: {d}");
            worst_per_image = worst_per_image.max(d);
        }
        let d = max_abs(&reference.pred_refer_logits.narrow(0, i, 1).unwrap(), &single.pred_refer_logits);
        println!("Reference batch-3 vs alone, image {i}, pred_refer_logits max|Δ| = {d:.3e}");
        worst_reference = worst_reference.max(d);
    }
    println!("worst PerImage deviation {worst_per_image:.3e}; worst Reference deviation {worst_reference:.3e}");
    assert!(worst_reference > 1e-3, "Reference coupling should make batch-mates matter (max |Δ| {worst_reference})");

    // At batch 1 the two modes are the same computation.
    let x = &singles[1];
    let a = run(&p, x, BatchCoupling::PerImage, &mut Taps::off());
    let b = run(&p, x, BatchCoupling::Reference, &mut Taps::off());
    for ((name, ta), (_, tb)) in outputs(&a).iter().zip(outputs(&b)) {
        let d = max_abs(ta, &tb);
        println!("batch 1 PerImage vs Reference {name:20} max|Δ| = {d:.3e}");
        assert!(d <= 1e-6, "{name}: {d}");
    }
}
