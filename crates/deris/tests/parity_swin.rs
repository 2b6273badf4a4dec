//! Swin backbone (`perception_branch.hier_vision_encoder.*`) against the tiny-a golden tensors,
//! at another (non-square, padded) input size, and batched.

mod common;

use candle_core::{Device, Tensor};
use deris::perception::swin::SwinTransformer;
use deris::Taps;

fn swin() -> SwinTransformer {
    let cfg = common::tiny_a_config();
    let vb = common::tiny_a_vb();
    SwinTransformer::new(&cfg, vb.pp("perception_branch").pp("hier_vision_encoder")).unwrap()
}

#[test]
fn swin_matches_golden() {
    let g = common::golden();
    let model = swin();
    let img = common::get(&g, "input.img");
    let mut taps = Taps::on();
    let outs = model.forward(img, &mut taps).unwrap();
    common::assert_close("swin.patch_embed", taps.get("swin.patch_embed").unwrap(), common::get(&g, "swin.patch_embed"), 1e-4);
    for (i, out) in outs.iter().enumerate() {
        let name = format!("swin.res{}", i + 2);
        common::assert_close(&name, out, common::get(&g, &name), 1e-4);
        assert_eq!(taps.get(&name).unwrap().dims(), out.dims(), "{name} tap");
    }
}

#[test]
fn swin_other_input_size_shapes() {
    let cfg = common::tiny_a_config();
    let model = swin();
    // 96×160 → 24×40, 12×20, 6×10, 3×5: every stage pads (window 7), the last one to a single
    // window. 90×150 also exercises the patch padding and odd PatchMerging inputs.
    for (h, w) in [(96usize, 160usize), (90, 150)] {
        let img = Tensor::randn(0f32, 1., (1, 3, h, w), &Device::Cpu).unwrap();
        let outs = model.forward(&img, &mut Taps::off()).unwrap();
        let (mut gh, mut gw) = (h.div_ceil(4), w.div_ceil(4));
        for (i, out) in outs.iter().enumerate() {
            assert_eq!(out.dims(), &[1, cfg.swin_channels(i), gh, gw], "{h}x{w} res{}", i + 2);
            let finite = out.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().all(|v| v.is_finite());
            assert!(finite, "{h}x{w} res{} has non-finite values", i + 2);
            (gh, gw) = (gh.div_ceil(2), gw.div_ceil(2));
        }
    }
}

#[test]
fn swin_batch_matches_single() {
    let g = common::golden();
    let model = swin();
    let a = common::get(&g, "input.img").clone();
    // A second, different image: the first one flipped left-right and scaled.
    let b = (a.flip(&[3]).unwrap() * 0.7).unwrap();
    let batch = Tensor::cat(&[&a, &b], 0).unwrap();
    let both = model.forward(&batch, &mut Taps::off()).unwrap();
    for (s, single) in [&a, &b].into_iter().enumerate() {
        let alone = model.forward(single, &mut Taps::off()).unwrap();
        for (i, (x, y)) in both.iter().zip(&alone).enumerate() {
            let name = format!("batch sample {s} swin.res{}", i + 2);
            common::assert_close(&name, &x.narrow(0, s, 1).unwrap(), y, 1e-5);
        }
    }
}

/// A literal, slow Swin written straight from MODEL-SPEC §4 with plain tensor ops (conv2d,
/// pad, roll, window reshapes, a mask built band by band, strided PatchMerging by index), to check
/// the gather-based model at sizes the golden fixture does not cover.
mod literal {
    use candle_core::{DType, Device, IndexOp, Module, Tensor, D};
    use candle_nn::{Conv2dConfig, VarBuilder};

    fn ln(x: &Tensor, dim: usize, eps: f64, vb: VarBuilder) -> Tensor {
        deris::nn::layer_norm(dim, eps, vb).unwrap().forward(x).unwrap()
    }

    fn lin(x: &Tensor, i: usize, o: usize, bias: bool, vb: VarBuilder) -> Tensor {
        let l = if bias { candle_nn::linear(i, o, vb) } else { candle_nn::linear_no_bias(i, o, vb) };
        l.unwrap().forward(x).unwrap()
    }

    /// [B, Hp, Wp, C] → [B·nW, ws², C]
    fn partition(x: &Tensor, ws: usize) -> Tensor {
        let (b, hp, wp, c) = x.dims4().unwrap();
        x.reshape((b, hp / ws, ws, wp / ws, ws, c)).unwrap().permute((0, 1, 3, 2, 4, 5)).unwrap().reshape(((), ws * ws, c)).unwrap()
    }

    fn region_mask(hp: usize, wp: usize, ws: usize, shift: usize) -> Tensor {
        let bands = |len: usize| [(0, len - ws), (len - ws, len - shift), (len - shift, len)];
        let mut m = vec![0f32; hp * wp];
        let mut label = 0f32;
        for (y0, y1) in bands(hp) {
            for (x0, x1) in bands(wp) {
                for y in y0..y1 {
                    for x in x0..x1 {
                        m[y * wp + x] = label;
                    }
                }
                label += 1.0;
            }
        }
        let m = partition(&Tensor::from_vec(m, (1, hp, wp, 1), &Device::Cpu).unwrap(), ws).squeeze(2).unwrap(); // [nW, N]
        let d = m.unsqueeze(1).unwrap().broadcast_sub(&m.unsqueeze(2).unwrap()).unwrap();
        d.ne(0f32).unwrap().where_cond(&Tensor::full(-100f32, d.shape(), &Device::Cpu).unwrap(), &d.zeros_like().unwrap()).unwrap()
    }

    #[allow(clippy::too_many_arguments)]
    fn block(x: &Tensor, h: usize, w: usize, dim: usize, heads: usize, ws: usize, shift: usize, eps: f64, vb: VarBuilder) -> Tensor {
        let (b, _, c) = x.dims3().unwrap();
        let t = ln(x, dim, eps, vb.pp("norm1")).reshape((b, h, w, c)).unwrap();
        let (hp, wp) = (h.div_ceil(ws) * ws, w.div_ceil(ws) * ws);
        let t = t.pad_with_zeros(1, 0, hp - h).unwrap().pad_with_zeros(2, 0, wp - w).unwrap();
        let t = t.roll(-(shift as i32), 1).unwrap().roll(-(shift as i32), 2).unwrap();
        let win = partition(&t, ws); // [B·nW, N, C]
        let n = ws * ws;
        let hd = dim / heads;
        let qkv = lin(&win, dim, 3 * dim, true, vb.pp("attn.qkv"));
        let qkv = qkv.reshape(((), n, 3, heads, hd)).unwrap().permute((2, 0, 3, 1, 4)).unwrap();
        let (q, k, v) = (qkv.i(0).unwrap(), qkv.i(1).unwrap(), qkv.i(2).unwrap().contiguous().unwrap());
        let q = (q * (hd as f64).powf(-0.5)).unwrap().contiguous().unwrap();
        let mut a = q.matmul(&k.t().unwrap().contiguous().unwrap()).unwrap(); // [B·nW, heads, N, N]
        let table = vb.pp("attn").get(((2 * ws - 1) * (2 * ws - 1), heads), "relative_position_bias_table").unwrap();
        let index = vb.pp("attn").get_with_hints_dtype((n, n), "relative_position_index", Default::default(), DType::I64).unwrap();
        let rpb = table.index_select(&index.flatten_all().unwrap(), 0).unwrap().reshape((n, n, heads)).unwrap().permute((2, 0, 1)).unwrap();
        a = a.broadcast_add(&rpb).unwrap();
        if shift > 0 {
            let mask = region_mask(hp, wp, ws, shift); // [nW, N, N]
            let nw = mask.dim(0).unwrap();
            a = a.reshape((b, nw, heads, n, n)).unwrap().broadcast_add(&mask.unsqueeze(1).unwrap()).unwrap().reshape(((), heads, n, n)).unwrap();
        }
        let a = candle_nn::ops::softmax(&a, D::Minus1).unwrap();
        let o = a.matmul(&v).unwrap().transpose(1, 2).unwrap().reshape(((), n, dim)).unwrap();
        let o = lin(&o, dim, dim, true, vb.pp("attn.proj"));
        let o = o.reshape((b, hp / ws, wp / ws, ws, ws, dim)).unwrap().permute((0, 1, 3, 2, 4, 5)).unwrap().reshape((b, hp, wp, dim)).unwrap();
        let o = o.roll(shift as i32, 1).unwrap().roll(shift as i32, 2).unwrap();
        let o = o.narrow(1, 0, h).unwrap().narrow(2, 0, w).unwrap().reshape((b, h * w, dim)).unwrap();
        let x = (x + o).unwrap();
        let hidden = (dim as f64 * 4.0) as usize;
        let m = lin(&ln(&x, dim, eps, vb.pp("norm2")), dim, hidden, true, vb.pp("mlp.fc1")).gelu_erf().unwrap();
        (&x + lin(&m, hidden, dim, true, vb.pp("mlp.fc2"))).unwrap()
    }

    fn merge(x: &Tensor, h: usize, w: usize, dim: usize, eps: f64, vb: VarBuilder) -> Tensor {
        let (b, _, c) = x.dims3().unwrap();
        let x = x.reshape((b, h, w, c)).unwrap().pad_with_zeros(1, 0, h % 2).unwrap().pad_with_zeros(2, 0, w % 2).unwrap();
        let pick = |len: usize, start: u32| Tensor::arange_step(start, len as u32, 2, &Device::Cpu).unwrap();
        let (hp, wp) = (h + h % 2, w + w % 2);
        let sub = |dy: u32, dx: u32| x.index_select(&pick(hp, dy), 1).unwrap().index_select(&pick(wp, dx), 2).unwrap();
        let cat = Tensor::cat(&[sub(0, 0), sub(1, 0), sub(0, 1), sub(1, 1)], 3).unwrap();
        let cat = cat.reshape((b, (), 4 * c)).unwrap();
        lin(&ln(&cat, 4 * dim, eps, vb.pp("norm")), 4 * dim, 2 * dim, false, vb.pp("reduction"))
    }

    pub fn swin(img: &Tensor, cfg: &deris::DerisConfig, vb: VarBuilder) -> Vec<Tensor> {
        let s = &cfg.swin;
        let (p, c0, ws, eps) = (s.patch_size, s.embed_dim, s.window_size, s.layernorm_eps);
        let (b, _, ih, iw) = img.dims4().unwrap();
        let img = img.pad_with_zeros(3, 0, (p - iw % p) % p).unwrap().pad_with_zeros(2, 0, (p - ih % p) % p).unwrap();
        let cw = vb.pp("patch_embed.proj").get((c0, 3, p, p), "weight").unwrap();
        let cb = vb.pp("patch_embed.proj").get(c0, "bias").unwrap();
        let conv = candle_nn::Conv2d::new(cw, Some(cb), Conv2dConfig { stride: p, ..Default::default() });
        let x = conv.forward(&img).unwrap(); // [B, C0, H, W]
        let (mut h, mut w) = (x.dim(2).unwrap(), x.dim(3).unwrap());
        let mut x = ln(&x.flatten_from(2).unwrap().transpose(1, 2).unwrap(), c0, eps, vb.pp("patch_embed.norm"));
        let mut outs = Vec::new();
        for i in 0..4 {
            let dim = c0 << i;
            let vl = vb.pp("layers").pp(i);
            for j in 0..s.depths[i] {
                let shift = if j % 2 == 1 { ws / 2 } else { 0 };
                x = block(&x, h, w, dim, s.num_heads[i], ws, shift, eps, vl.pp("blocks").pp(j));
            }
            let o = ln(&x, dim, eps, vb.pp(format!("norm{i}")));
            outs.push(o.reshape((b, h, w, dim)).unwrap().permute((0, 3, 1, 2)).unwrap());
            if i < 3 {
                x = merge(&x, h, w, dim, eps, vl.pp("downsample"));
                (h, w) = (h.div_ceil(2), w.div_ceil(2));
            }
        }
        outs
    }
}

#[test]
fn swin_literal_reference_agrees() {
    let cfg = common::tiny_a_config();
    let vb = common::tiny_a_vb().pp("perception_branch").pp("hier_vision_encoder");
    let model = swin();
    let g = common::golden();
    // The literal version against the golden first, so it is itself trusted.
    let img = common::get(&g, "input.img");
    for (i, want) in literal::swin(img, &cfg, vb.clone()).iter().enumerate() {
        common::assert_close(&format!("literal swin.res{} vs golden", i + 2), want, common::get(&g, &format!("swin.res{}", i + 2)), 1e-4);
    }
    // 90×150: patch padding, odd PatchMerging inputs (23×38 → 12×19 → 6×10 → 3×5), non-square;
    // 176×176: a square size whose third stage (11×11) is odd.
    for (h, w) in [(90usize, 150usize), (176, 176)] {
        let img = Tensor::randn(0f32, 1., (2, 3, h, w), &Device::Cpu).unwrap();
        let got = model.forward(&img, &mut Taps::off()).unwrap();
        for (i, want) in literal::swin(&img, &cfg, vb.clone()).iter().enumerate() {
            common::assert_close(&format!("{h}x{w} swin.res{} vs literal", i + 2), &got[i], want, 1e-4);
        }
    }
}
