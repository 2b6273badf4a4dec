//! The whole model against every tensor of the tiny-a golden fixture, loaded through the strict
//! checkpoint path from both weight files, plus batch semantics at the model level.

mod common;

use candle_core::{DType, Device, Tensor};
use deris::checkpoint::{self, Checkpoint};
use deris::post::{self, PostParams};
use deris::{BatchCoupling, Deris, ModelInputs, Taps};

fn load(weights: &str) -> Deris {
    let cfg = common::tiny_a_config();
    let ckpt = Checkpoint::open(&common::fixture(weights)).unwrap();
    checkpoint::load_strict(&ckpt, DType::F32, &Device::Cpu, &cfg.name, |vb| Deris::new(&cfg, vb)).unwrap()
}

fn golden_inputs(g: &std::collections::HashMap<String, Tensor>) -> ModelInputs {
    ModelInputs {
        img: common::get(g, "input.img").clone(),
        img_mini: common::get(g, "input.img_mini").clone(),
        ref_expr_inds: common::get(g, "input.ref_expr_inds").clone(),
        text_attention_mask: common::get(g, "input.text_attention_mask").clone(),
    }
}

/// Every tensor the model and post-processing compute, by golden name.
fn run_all(model: &Deris, x: &ModelInputs, coupling: BatchCoupling) -> std::collections::BTreeMap<String, Tensor> {
    let mut taps = Taps::on();
    let y = model.forward(x, coupling, &mut taps).unwrap();
    let params = PostParams::from(&model.config().runtime);
    post::get_predictions_parts(&y.pred_refer_logits, &y.pred_boxes, &y.pred_masks, &y.pred_existence, &params, &mut taps)
        .unwrap();
    taps.into_map()
}

fn check_against_golden(weights: &str) {
    let g = common::golden();
    let model = load(weights);
    let x = golden_inputs(&g);
    model.check_inputs(&x).unwrap();
    let got = run_all(&model, &x, BatchCoupling::PerImage);
    let mut checked = 0;
    for (name, want) in g.iter().filter(|(k, _)| !k.starts_with("input.")) {
        let t = got.get(name).unwrap_or_else(|| panic!("the model does not produce golden tensor '{name}'"));
        if want.dtype() == DType::U8 {
            let f = common::flip_fraction(t, want);
            println!("{name:50} flipped {f:.2e}");
            assert!(f <= 1e-3, "{name}: {f} of entries flipped");
        } else {
            common::assert_close(name, t, want, 1e-4);
        }
        checked += 1;
    }
    assert!(checked > 70, "only {checked} golden tensors compared");
}

#[test]
fn tiny_a_from_safetensors() {
    check_against_golden("tiny-a/weights.safetensors");
}

#[test]
fn tiny_a_from_pth() {
    check_against_golden("tiny-a/weights.pth");
}

/// A batch of 3 different images and texts (different text lengths) gives, in the default mode,
/// the outputs of three batch-1 runs (to 1e-5 of each tensor's scale); the reference coupling makes them depend on each other.
#[test]
fn batch_of_three_equals_three_singles() {
    let g = common::golden();
    let model = load("tiny-a/weights.safetensors");
    let base = golden_inputs(&g);
    let l = base.ref_expr_inds.dim(1).unwrap();
    let mut imgs = vec![];
    let mut minis = vec![];
    let mut ids = vec![];
    let mut pads = vec![];
    for (i, real) in [(0usize, 7usize), (1, 4), (2, 10)] {
        let flip = |t: &Tensor| -> Tensor {
            let t = (t * (1.0 - 0.2 * i as f64)).unwrap();
            if i == 1 { t.flip(&[3]).unwrap() } else { t }
        };
        imgs.push(flip(&base.img));
        minis.push(flip(&base.img_mini));
        let mut row: Vec<i64> = (0..l).map(|j| if j < real { 5 + (7 * j + 3 * i) as i64 % 500 } else { 1 }).collect();
        row[0] = 0;
        row[real - 1] = 2;
        ids.push(row);
        pads.push((0..l).map(|j| i64::from(j >= real)).collect::<Vec<_>>());
    }
    let to2 = |v: &Vec<Vec<i64>>| Tensor::new(v.clone(), &Device::Cpu).unwrap();
    let batch = ModelInputs {
        img: Tensor::cat(&imgs, 0).unwrap(),
        img_mini: Tensor::cat(&minis, 0).unwrap(),
        ref_expr_inds: to2(&ids),
        text_attention_mask: to2(&pads),
    };
    model.check_inputs(&batch).unwrap();
    let together = model.forward(&batch, BatchCoupling::PerImage, &mut Taps::off()).unwrap();
    let coupled = model.forward(&batch, BatchCoupling::Reference, &mut Taps::off()).unwrap();
    let mut coupled_differs = 0f32;
    for i in 0..3 {
        let one = ModelInputs {
            img: batch.img.narrow(0, i, 1).unwrap(),
            img_mini: batch.img_mini.narrow(0, i, 1).unwrap(),
            ref_expr_inds: batch.ref_expr_inds.narrow(0, i, 1).unwrap(),
            text_attention_mask: batch.text_attention_mask.narrow(0, i, 1).unwrap(),
        };
        let alone = model.forward(&one, BatchCoupling::PerImage, &mut Taps::off()).unwrap();
        for (name, a, b) in [
            ("pred_masks", &together.pred_masks, &alone.pred_masks),
            ("pred_refer_logits", &together.pred_refer_logits, &alone.pred_refer_logits),
            ("pred_boxes", &together.pred_boxes, &alone.pred_boxes),
            ("pred_existence", &together.pred_existence, &alone.pred_existence),
            ("query_feat", &together.query_feat, &alone.query_feat),
        ] {
            // 1e-5 relative to the tensor's scale (mask logits reach ~10): the CPU kernels split
            // their work by batch size, so sums may round differently, never more than that.
            let scale = b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap().max(1.0);
            let (d, _) = common::max_abs_diff(&a.narrow(0, i, 1).unwrap(), b);
            assert!(d <= 1e-5 * scale, "sample {i} {name}: batch vs alone differ by {d} (scale {scale})");
        }
        let (d, _) = common::max_abs_diff(&coupled.pred_refer_logits.narrow(0, i, 1).unwrap(), &alone.pred_refer_logits);
        coupled_differs = coupled_differs.max(d);
    }
    assert!(coupled_differs > 1e-3, "the reference coupling should make batch-mates interact");
}

/// Bad inputs are reported with the tensor name and the rule, not a panic.
#[test]
fn bad_inputs_are_reported() {
    let g = common::golden();
    let model = load("tiny-a/weights.safetensors");
    let x = golden_inputs(&g);
    let cases: Vec<(ModelInputs, &str)> = vec![
        (ModelInputs { img: x.img.narrow(2, 0, 120).unwrap(), ..x.clone() }, "multiples of 16"),
        (ModelInputs { img_mini: x.img.clone(), ..x.clone() }, "img_mini"),
        (ModelInputs { ref_expr_inds: x.ref_expr_inds.to_dtype(DType::F32).unwrap(), ..x.clone() }, "dtype"),
        (
            ModelInputs {
                ref_expr_inds: Tensor::zeros((1, 11), DType::I64, &Device::Cpu).unwrap(),
                text_attention_mask: Tensor::zeros((1, 11), DType::I64, &Device::Cpu).unwrap(),
                ..x.clone()
            },
            "max_token",
        ),
        (ModelInputs { ref_expr_inds: (x.ref_expr_inds.clone() + 100000.0).unwrap(), ..x.clone() }, "vocabulary"),
    ];
    for (bad, needle) in cases {
        let e = model.check_inputs(&bad).unwrap_err().to_string();
        assert!(e.contains(needle), "error '{e}' should mention '{needle}'");
    }
}
