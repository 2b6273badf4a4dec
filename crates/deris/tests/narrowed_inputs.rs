//! The model reads the inputs it is given, wherever they start in their storage: the second half
//! of a batch, cut with `narrow` (as the trainer's replicas and a split batch are), gives the same
//! outputs as the same samples in tensors of their own, with and without gradient tracking.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use deris::model::Deris;
use deris::train::params::TrainableWeights;
use deris::{BatchCoupling, DerisConfig, ModelInputs, Taps};

/// The training tests' small model (64² perception, 32² cognition images).
fn config() -> DerisConfig {
    serde_json::from_value(common::tiny_train_model()).unwrap()
}

/// Four samples with different images and sentences (the last two padded differently).
fn batch(dev: &Device) -> ModelInputs {
    let img = Tensor::randn(0f32, 1.0, (4, 3, 64, 64), dev).unwrap();
    let img_mini = Tensor::randn(0f32, 1.0, (4, 3, 32, 32), dev).unwrap();
    let ids: Vec<i64> = (0..32).map(|i| (i * 7 + 3) % 60 + 2).collect();
    let pad: Vec<i64> = [[0, 0, 0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, 0, 0, 0], [0, 0, 0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 1, 1]].concat();
    ModelInputs {
        img,
        img_mini,
        ref_expr_inds: Tensor::from_vec(ids, (4, 8), dev).unwrap(),
        text_attention_mask: Tensor::from_vec(pad, (4, 8), dev).unwrap(),
    }
}

/// Samples 2..4: cut out of the batch (`narrow`, sharing its storage), or copied into tensors of
/// their own.
fn second_half(x: &ModelInputs, own_storage: bool) -> ModelInputs {
    let cut = |t: &Tensor| {
        let t = t.narrow(0, 2, 2).unwrap();
        if own_storage {
            Tensor::from_vec(t.flatten_all().unwrap().to_vec1::<f32>().unwrap(), t.dims(), t.device()).unwrap()
        } else {
            t
        }
    };
    let cut_ids = |t: &Tensor| {
        let t = t.narrow(0, 2, 2).unwrap();
        if own_storage {
            Tensor::from_vec(t.flatten_all().unwrap().to_vec1::<i64>().unwrap(), t.dims(), t.device()).unwrap()
        } else {
            t
        }
    };
    ModelInputs { img: cut(&x.img), img_mini: cut(&x.img_mini), ref_expr_inds: cut_ids(&x.ref_expr_inds), text_attention_mask: cut_ids(&x.text_attention_mask) }
}

/// Every output of the forward pass, flattened.
fn outputs(w: &TrainableWeights, cfg: &DerisConfig, x: &ModelInputs, tracked: bool) -> Vec<(String, Vec<f32>)> {
    let model = if tracked {
        w.build(cfg).unwrap()
    } else {
        let tensors: HashMap<String, Tensor> = w.to_tensors().into_iter().collect();
        Deris::new(cfg, VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu)).unwrap()
    };
    let y = model.forward(x, BatchCoupling::PerImage, &mut Taps::off()).unwrap();
    let flat = |t: &Tensor| t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    vec![
        ("pred_masks".into(), flat(&y.pred_masks)),
        ("pred_refer_logits".into(), flat(&y.pred_refer_logits)),
        ("pred_existence".into(), flat(&y.pred_existence)),
        ("pred_boxes".into(), flat(&y.pred_boxes)),
    ]
}

#[test]
fn a_narrowed_batch_gives_the_outputs_of_its_samples() {
    let dev = Device::Cpu;
    let cfg = config();
    let w = TrainableWeights::init(&cfg, 11, &dev).unwrap();
    let x = batch(&dev);
    for tracked in [true, false] {
        let want = outputs(&w, &cfg, &second_half(&x, true), tracked);
        let got = outputs(&w, &cfg, &second_half(&x, false), tracked);
        for ((name, g), (_, e)) in got.iter().zip(&want) {
            let worst = g.iter().zip(e).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(worst <= 1e-5, "{name} (gradients tracked: {tracked}): narrowed inputs differ from copied ones by {worst}");
        }
    }
}
