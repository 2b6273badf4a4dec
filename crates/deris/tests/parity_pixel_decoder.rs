//! `perception_branch.pixel_decoder.*` against the tiny-a golden tensors: from the golden Swin
//! outputs `swin.res2..res5`, every `pixel_decoder.*` tap within 1e-4 (relative to
//! max(1, max|want|)). Run with `--nocapture` to see the max |Δ| of each tensor.

mod common;

use candle_core::{DType, Tensor};
use deris::perception::pixel_decoder::MSDeformAttnPixelDecoder;
use deris::Taps;

#[test]
fn pixel_decoder_matches_golden() {
    let golden = common::golden();
    let cfg = common::tiny_a_config();
    let vb = common::tiny_a_vb();
    let decoder = MSDeformAttnPixelDecoder::new(&cfg, vb.pp("perception_branch").pp("pixel_decoder")).unwrap();
    let feats: [Tensor; 4] = ["swin.res2", "swin.res3", "swin.res4", "swin.res5"].map(|n| common::get(&golden, n).clone());
    let mut taps = Taps::on();
    let out = decoder.forward(&feats, &mut taps).unwrap();

    let mut names: Vec<&String> = golden.keys().filter(|k| k.starts_with("pixel_decoder.")).collect();
    names.sort();
    assert!(names.len() >= 13, "expected every pixel_decoder.* golden tensor, found {names:?}");
    for name in names {
        let want = &golden[name.as_str()];
        let got = taps.get(name).unwrap_or_else(|| panic!("tap {name} was not recorded"));
        if want.dtype() == DType::I64 {
            assert_eq!(got.dtype(), DType::I64, "{name}");
            assert_eq!(got.flatten_all().unwrap().to_vec1::<i64>().unwrap(), want.flatten_all().unwrap().to_vec1::<i64>().unwrap(), "{name}");
            println!("{name:50} exact (int64)");
        } else {
            common::assert_close(name, got, want, 1e-4);
        }
    }
    // the returned tensors are the recorded ones
    common::assert_close("output.mask_features", &out.mask_features, common::get(&golden, "pixel_decoder.mask_features"), 1e-4);
    assert_eq!(out.multi_scale_features.len(), 3);
    for (l, m) in out.multi_scale_features.iter().enumerate() {
        common::assert_close(&format!("output.multi_scale_features.{l}"), m, common::get(&golden, &format!("pixel_decoder.multi_scale_features.{l}")), 1e-4);
    }
}

/// Batch 2 with two different images gives, per image, what batch 1 gives (no coupling).
#[test]
fn pixel_decoder_batch_is_independent() {
    let golden = common::golden();
    let cfg = common::tiny_a_config();
    let decoder = MSDeformAttnPixelDecoder::new(&cfg, common::tiny_a_vb().pp("perception_branch").pp("pixel_decoder")).unwrap();
    let one: [Tensor; 4] = ["swin.res2", "swin.res3", "swin.res4", "swin.res5"].map(|n| common::get(&golden, n).clone());
    let other: [Tensor; 4] = one.clone().map(|t| t.flip(&[2, 3]).unwrap().affine(0.7, 0.1).unwrap());
    let both: [Tensor; 4] = [0, 1, 2, 3].map(|i| Tensor::cat(&[&one[i], &other[i]], 0).unwrap());
    let out2 = decoder.forward(&both, &mut Taps::off()).unwrap();
    for (b, single) in [one, other].iter().enumerate() {
        let out1 = decoder.forward(single, &mut Taps::off()).unwrap();
        common::assert_close(&format!("batch2[{b}].mask_features"), &out2.mask_features.narrow(0, b, 1).unwrap(), &out1.mask_features, 1e-5);
        for l in 0..3 {
            common::assert_close(
                &format!("batch2[{b}].multi_scale_features.{l}"),
                &out2.multi_scale_features[l].narrow(0, b, 1).unwrap(),
                &out1.multi_scale_features[l],
                1e-5,
            );
        }
    }
}
