//! Parity of the cognition branch (`understanding_branch.*`) with the tiny-a golden tensors:
//! BEiT-3 + `pre_forward` and the aligner + existence head (`post_forward`), from both weight
//! files, plus padding and batch invariance.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::VarBuilder;
use deris::cognition::CognitionBranch;
use deris::Taps;

const TOL: f32 = 1e-4;

fn pth_vb() -> VarBuilder<'static> {
    VarBuilder::from_pth(common::fixture("tiny-a/weights.pth"), DType::F32, &Device::Cpu).unwrap()
}

fn branch(vb: VarBuilder) -> CognitionBranch {
    CognitionBranch::new(&common::tiny_a_config(), vb.pp("understanding_branch")).unwrap()
}

/// Every tap `pre_forward` records, against its golden tensor.
fn check_pre(vb: VarBuilder, label: &str) {
    let g = common::golden();
    let cfg = common::tiny_a_config();
    let model = branch(vb);
    let mut taps = Taps::on();
    let out = model
        .pre_forward(
            common::get(&g, "input.img_mini"),
            common::get(&g, "input.ref_expr_inds"),
            common::get(&g, "input.text_attention_mask"),
            &mut taps,
        )
        .unwrap();
    let mut names: Vec<String> = ["beit.vision_embed", "beit.text_embed"].map(String::from).to_vec();
    names.extend((0..cfg.beit3.num_layers).map(|i| format!("beit.layer{i}")));
    names.extend(["beit.encoder_out", "beit.img_feat", "beit.text_feat", "beit.cls_feat"].map(String::from));
    names.extend(["img_feat", "text_feat", "cls_feat", "query_feat"].map(|n| format!("understanding.pre.{n}")));
    println!("-- pre_forward ({label})");
    for name in &names {
        let got = taps.get(name).unwrap_or_else(|| panic!("tap {name} not recorded"));
        common::assert_close(name, got, common::get(&g, name), TOL);
    }
    // The returned tensors are the recorded ones.
    common::assert_close("PreForward.img_feat", &out.img_feat, common::get(&g, "understanding.pre.img_feat"), TOL);
    common::assert_close("PreForward.text_feat", &out.text_feat, common::get(&g, "understanding.pre.text_feat"), TOL);
    common::assert_close(
        "PreForward.query_feat",
        &out.query_feat,
        common::get(&g, "understanding.pre.query_feat"),
        TOL,
    );
    common::assert_close("PreForward.cls_feat", &out.cls_feat, common::get(&g, "understanding.pre.cls_feat"), TOL);
}

fn check_post(vb: VarBuilder, label: &str) {
    let g = common::golden();
    let cfg = common::tiny_a_config();
    let model = branch(vb);
    let mut taps = Taps::on();
    let out = model
        .post_forward(
            common::get(&g, "out.query_feat"),
            common::get(&g, "understanding.pre.text_feat"),
            common::get(&g, "input.text_attention_mask"),
            &mut taps,
        )
        .unwrap();
    println!("-- post_forward ({label})");
    let mut names: Vec<String> =
        (0..cfg.understanding.aligner_layers).map(|i| format!("understanding.aligner.layer{i}")).collect();
    names.extend(
        ["understanding.post.query_feat", "understanding.post.pred_logits", "out.pred_existence"].map(String::from),
    );
    for name in &names {
        let got = taps.get(name).unwrap_or_else(|| panic!("tap {name} not recorded"));
        common::assert_close(name, got, common::get(&g, name), TOL);
    }
    common::assert_close("PostForward.pred_existence", &out.pred_existence, common::get(&g, "out.pred_existence"), TOL);
    common::assert_close(
        "PostForward.pred_logits",
        &out.pred_logits,
        common::get(&g, "understanding.post.pred_logits"),
        TOL,
    );
}

#[test]
fn pre_forward_matches_golden_safetensors() {
    check_pre(common::tiny_a_vb(), "weights.safetensors");
}

#[test]
fn pre_forward_matches_golden_pth() {
    check_pre(pth_vb(), "weights.pth");
}

#[test]
fn post_forward_matches_golden_safetensors() {
    check_post(common::tiny_a_vb(), "weights.safetensors");
}

#[test]
fn post_forward_matches_golden_pth() {
    check_post(pth_vb(), "weights.pth");
}

fn ids_and_pad(ids: &[i64], real: usize) -> (Tensor, Tensor) {
    let pad: Vec<i64> = (0..ids.len()).map(|i| i64::from(i >= real)).collect();
    (
        Tensor::new(ids, &Device::Cpu).unwrap().unsqueeze(0).unwrap(),
        Tensor::new(pad, &Device::Cpu).unwrap().unsqueeze(0).unwrap(),
    )
}

fn run_pre(model: &CognitionBranch, img: &Tensor, ids: &Tensor, pad: &Tensor) -> HashMap<String, Tensor> {
    let mut taps = Taps::on();
    model.pre_forward(img, ids, pad, &mut taps).unwrap();
    taps.into_map().into_iter().collect()
}

fn assert_bit_equal(name: &str, a: &Tensor, b: &Tensor) {
    let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(a, b, "{name} changed");
}

#[test]
fn padding_and_batch_invariance() {
    let g = common::golden();
    let model = branch(common::tiny_a_vb());
    let img = common::get(&g, "input.img_mini").clone();
    let ids = common::get(&g, "input.ref_expr_inds").squeeze(0).unwrap().to_vec1::<i64>().unwrap();
    let pad = common::get(&g, "input.text_attention_mask").squeeze(0).unwrap().to_vec1::<i64>().unwrap();
    let real = pad.iter().filter(|p| **p == 0).count();
    assert!(real < ids.len(), "the golden sample should be padded");

    // 1. Ids at padded positions change nothing, bit for bit (except the raw lookup tap).
    let (ids_a, pad_a) = ids_and_pad(&ids, real);
    let mut other = ids.clone();
    for (i, id) in other.iter_mut().enumerate().skip(real) {
        *id = 5 + 37 * i as i64;
    }
    let (ids_b, _) = ids_and_pad(&other, real);
    let ta = run_pre(&model, &img, &ids_a, &pad_a);
    let tb = run_pre(&model, &img, &ids_b, &pad_a);
    for (name, t) in &ta {
        if name != "beit.text_embed" {
            assert_bit_equal(name, t, &tb[name]);
        }
    }

    // 2. Batch 2 (golden sample + a shorter text) equals the two batch-1 runs.
    let real2 = 4;
    let mut ids2 = ids.clone();
    ids2[real2 - 1] = 2; // EOS
    for id in ids2.iter_mut().skip(real2) {
        *id = 1; // PAD
    }
    let (ids2, pad2) = ids_and_pad(&ids2, real2);
    let t2 = run_pre(&model, &img, &ids2, &pad2);
    let img_b = Tensor::cat(&[&img, &img], 0).unwrap();
    let ids_b2 = Tensor::cat(&[&ids_a, &ids2], 0).unwrap();
    let pad_b2 = Tensor::cat(&[&pad_a, &pad2], 0).unwrap();
    let tboth = run_pre(&model, &img_b, &ids_b2, &pad_b2);
    println!("-- batch 2 vs batch 1 (pre_forward)");
    for (name, t) in &tboth {
        for (s, single) in [(0usize, &ta), (1, &t2)] {
            let want = &single[name];
            let got = t.narrow(0, s, 1).unwrap(); // every tap is batch-first
            common::assert_close(&format!("{name}[{s}]"), &got, want, 1e-5);
        }
    }

    // post_forward: two different query sets, each sample with its own text.
    let q0 = common::get(&g, "out.query_feat").clone();
    let q1 = ((&q0 * 0.5).unwrap() + 0.1).unwrap();
    let post = |q: &Tensor, text: &Tensor, pad: &Tensor| {
        let mut taps = Taps::on();
        model.post_forward(q, text, pad, &mut taps).unwrap();
        taps.into_map()
    };
    let p0 = post(&q0, &ta["understanding.pre.text_feat"], &pad_a);
    let p1 = post(&q1, &t2["understanding.pre.text_feat"], &pad2);
    let pboth = post(&Tensor::cat(&[&q0, &q1], 0).unwrap(), &tboth["understanding.pre.text_feat"], &pad_b2);
    println!("-- batch 2 vs batch 1 (post_forward)");
    for (name, t) in &pboth {
        for (s, single) in [(0usize, &p0), (1, &p1)] {
            common::assert_close(&format!("{name}[{s}]"), &t.narrow(0, s, 1).unwrap(), &single[name], 1e-5);
        }
    }
}

#[test]
fn bad_sizes_are_reported() {
    let g = common::golden();
    let model = branch(common::tiny_a_vb());
    let ids = common::get(&g, "input.ref_expr_inds");
    let pad = common::get(&g, "input.text_attention_mask");
    let img = Tensor::zeros((1, 3, 80, 80), DType::F32, &Device::Cpu).unwrap();
    let e = model.pre_forward(&img, ids, pad, &mut Taps::off()).unwrap_err().to_string();
    assert!(e.contains("64") && e.contains("80"), "{e}");

    let img = common::get(&g, "input.img_mini");
    let long = Tensor::zeros((1, 31), DType::I64, &Device::Cpu).unwrap();
    let e = model.pre_forward(img, &long, &long, &mut Taps::off()).unwrap_err().to_string();
    assert!(e.contains("31") && e.contains("30"), "{e}");

    let big_id = (ids.clone() + 600.0).unwrap();
    let e = model.pre_forward(img, &big_id, pad, &mut Taps::off()).unwrap_err().to_string();
    assert!(e.contains("512"), "{e}");
}

/// The tiny-a tensors, remembering which names the model asked for.
struct Recording {
    tensors: HashMap<String, Tensor>,
    asked: Arc<Mutex<BTreeSet<String>>>,
}

impl candle_nn::var_builder::SimpleBackend for Recording {
    fn get(&self, s: Shape, name: &str, h: candle_nn::Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.asked.lock().unwrap().insert(name.to_string());
        candle_nn::var_builder::SimpleBackend::get(&self.tensors, s, name, h, dtype, dev)
    }
    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.asked.lock().unwrap().insert(name.to_string());
        candle_nn::var_builder::SimpleBackend::get_unchecked(&self.tensors, name, dtype, dev)
    }
    fn contains_tensor(&self, name: &str) -> bool {
        candle_nn::var_builder::SimpleBackend::contains_tensor(&self.tensors, name)
    }
}

#[test]
fn every_understanding_key_is_loaded() {
    let tensors = common::load_tensors("tiny-a/weights.safetensors");
    let want: BTreeSet<String> = tensors.keys().filter(|k| k.starts_with("understanding_branch.")).cloned().collect();
    let asked = Arc::new(Mutex::new(BTreeSet::new()));
    let backend: Box<dyn candle_nn::var_builder::SimpleBackend> = Box::new(Recording { tensors, asked: asked.clone() });
    branch(VarBuilder::from_backend(backend, DType::F32, Device::Cpu));
    let asked = asked.lock().unwrap().clone();
    let missing: Vec<_> = want.difference(&asked).collect();
    let extra: Vec<_> = asked.difference(&want).collect();
    assert!(missing.is_empty() && extra.is_empty(), "not loaded: {missing:?}; not in the checkpoint: {extra:?}");
    println!("{} understanding_branch keys, all loaded", want.len());
}
