//! The training objective (TRAIN-EVAL-SPEC §5) against an independent scalar oracle: every
//! sampled value, cost, assignment and loss term is recomputed here in f64 from the formulas of
//! the spec (grid_sample with zero padding, brute-force assignment, weighted CE, point BCE and
//! dice, clamped existence BCE), replaying the loss's documented random draws.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, Var};
use deris::data::rng::SplitMix64;
use deris::loopback::RoundOutput;
use deris::train::loss::{deris_loss, deris_loss_part, word_loss, HeadOutputs, LossConfig, Normalizers, Target, WordLogits};
use deris::train::matcher::{match_round, overlap_positives};
use deris::train::points::uniform_points;
use deris::DerisOutput;

const H: usize = 8;
const W: usize = 8;
const N: usize = 3;

type Map = Vec<f64>; // H·W, row-major

fn softplus(x: f64) -> f64 {
    x.max(0.0) + (-x.abs()).exp().ln_1p()
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// `grid_sample(bilinear, zeros, align_corners=False)` at one normalised point.
fn sample(map: &[f64], h: usize, w: usize, x: f64, y: f64) -> f64 {
    let u = x * w as f64 - 0.5;
    let v = y * h as f64 - 0.5;
    let (u0, v0) = (u.floor(), v.floor());
    let px = |c: f64, r: f64| {
        if c < 0.0 || r < 0.0 || c >= w as f64 || r >= h as f64 {
            0.0
        } else {
            map[r as usize * w + c as usize]
        }
    };
    let (fu, fv) = (u - u0, v - v0);
    px(u0, v0) * (1.0 - fu) * (1.0 - fv)
        + px(u0 + 1.0, v0) * fu * (1.0 - fv)
        + px(u0, v0 + 1.0) * (1.0 - fu) * fv
        + px(u0 + 1.0, v0 + 1.0) * fu * fv
}

/// Bilinear upsampling with `align_corners=True`, one axis at a time.
fn upsample_ac(src: &[f64], hi: usize, wi: usize, ho: usize, wo: usize) -> Map {
    let taps = |o: usize, n_in: usize, n_out: usize| {
        let s = if n_out > 1 { o as f64 * (n_in - 1) as f64 / (n_out - 1) as f64 } else { 0.0 };
        let i0 = (s.floor() as usize).min(n_in - 1);
        let i1 = (i0 + 1).min(n_in - 1);
        (i0, i1, s - i0 as f64)
    };
    let mut out = vec![0.0; ho * wo];
    for r in 0..ho {
        let (r0, r1, fr) = taps(r, hi, ho);
        for c in 0..wo {
            let (c0, c1, fc) = taps(c, wi, wo);
            let top = src[r0 * wi + c0] * (1.0 - fc) + src[r0 * wi + c1] * fc;
            let bot = src[r1 * wi + c0] * (1.0 - fc) + src[r1 * wi + c1] * fc;
            out[r * wo + c] = top * (1.0 - fr) + bot * fr;
        }
    }
    out
}

fn points_vec(t: &Tensor) -> Vec<[f64; 2]> {
    let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    v.chunks(2).map(|c| [c[0] as f64, c[1] as f64]).collect()
}

/// One prediction round as plain numbers: `masks[b][q]` at H×W, `refer[b][q]` logits.
struct Round {
    masks: Vec<Vec<Map>>,
    refer: Vec<Vec<[f64; 2]>>,
}

/// The oracle's three terms of a round; draws exactly what the loss draws, in the same order.
fn oracle_round(round: &Round, targets: &[Vec<Map>], cfg: &LossConfig, num_masks: f64, rng: &mut SplitMix64) -> [f64; 3] {
    let p = cfg.num_points;
    let p_ref = |b: usize, q: usize| {
        let [a, c] = round.refer[b][q];
        (a.exp()) / (a.exp() + c.exp())
    };
    // matching: brute force over injective maps target → query (M ≤ N here)
    let mut pairs: Vec<(usize, usize, usize)> = Vec::new(); // (image, query, target)
    for (b, tg) in targets.iter().enumerate() {
        let m = tg.len();
        if m == 0 {
            continue;
        }
        let pts = points_vec(&uniform_points(1, p, rng).unwrap());
        let x: Vec<Vec<f64>> = (0..N).map(|q| pts.iter().map(|&[px, py]| sample(&round.masks[b][q], H, W, px, py)).collect()).collect();
        let y: Vec<Vec<f64>> = tg.iter().map(|t| pts.iter().map(|&[px, py]| sample(t, H, W, px, py)).collect()).collect();
        let cost = |q: usize, t: usize| {
            let bce: f64 = (0..p).map(|i| y[t][i] * softplus(-x[q][i]) + (1.0 - y[t][i]) * softplus(x[q][i])).sum::<f64>() / p as f64;
            let s: Vec<f64> = x[q].iter().map(|&v| sigmoid(v)).collect();
            let inter: f64 = (0..p).map(|i| s[i] * y[t][i]).sum();
            let dice = 1.0 - (2.0 * inter + 1.0) / (s.iter().sum::<f64>() + y[t].iter().sum::<f64>() + 1.0);
            5.0 * bce - 2.0 * p_ref(b, q) + 5.0 * dice
        };
        let mut best = (f64::INFINITY, Vec::new());
        let mut assign = vec![0usize; m];
        fn rec(t: usize, m: usize, assign: &mut Vec<usize>, best: &mut (f64, Vec<usize>), cost: &dyn Fn(usize, usize) -> f64) {
            if t == m {
                let c: f64 = (0..m).map(|j| cost(assign[j], j)).sum();
                if c < best.0 {
                    *best = (c, assign.clone());
                }
                return;
            }
            for q in 0..N {
                if !assign[..t].contains(&q) {
                    assign[t] = q;
                    rec(t + 1, m, assign, best, cost);
                }
            }
        }
        rec(0, m, &mut assign, &mut best, &cost);
        let mut image_pairs: Vec<(usize, usize, usize)> = best.1.iter().enumerate().map(|(t, &q)| (b, q, t)).collect();
        image_pairs.sort();
        pairs.extend(image_pairs);
    }

    // weighted CE
    let (mut num, mut den) = (0.0, 0.0);
    for b in 0..targets.len() {
        for q in 0..N {
            let matched = pairs.iter().any(|&(pb, pq, _)| pb == b && pq == q);
            let (wt, pr) = if matched { (1.0, p_ref(b, q)) } else { (cfg.no_object_weight, 1.0 - p_ref(b, q)) };
            num += wt * -pr.ln();
            den += wt;
        }
    }
    let cls = num / den;

    // mask terms with importance sampling: candidates of all pairs, then fresh points of all pairs
    let k = pairs.len();
    if k == 0 {
        return [cls, 0.0, 0.0];
    }
    let s_count = (p as f64 * cfg.oversample_ratio) as usize;
    let n_unc = (cfg.importance_sample_ratio * p as f64) as usize;
    let cand = points_vec(&uniform_points(k, s_count, rng).unwrap());
    let fresh = points_vec(&uniform_points(k, p - n_unc, rng).unwrap());
    let (mut bce_sum, mut dice_sum) = (0.0, 0.0);
    for (j, &(b, q, t)) in pairs.iter().enumerate() {
        let map = &round.masks[b][q];
        let cj = &cand[j * s_count..(j + 1) * s_count];
        let mut order: Vec<usize> = (0..s_count).collect();
        let unc: Vec<f64> = cj.iter().map(|&[px, py]| sample(map, H, W, px, py).abs()).collect();
        order.sort_by(|&a, &c| unc[a].total_cmp(&unc[c]));
        let pts: Vec<[f64; 2]> = order[..n_unc].iter().map(|&i| cj[i]).chain(fresh[j * (p - n_unc)..(j + 1) * (p - n_unc)].iter().copied()).collect();
        let x: Vec<f64> = pts.iter().map(|&[px, py]| sample(map, H, W, px, py)).collect();
        let y: Vec<f64> = pts.iter().map(|&[px, py]| sample(&targets[b][t], H, W, px, py)).collect();
        bce_sum += (0..p).map(|i| softplus(x[i]) - x[i] * y[i]).sum::<f64>() / p as f64;
        let s: Vec<f64> = x.iter().map(|&v| sigmoid(v)).collect();
        let inter: f64 = (0..p).map(|i| s[i] * y[i]).sum();
        dice_sum += 1.0 - (2.0 * inter + 1.0) / (s.iter().sum::<f64>() + y.iter().sum::<f64>() + 1.0);
    }
    [cls, bce_sum / num_masks, dice_sum / num_masks]
}

fn t4(v: &[Vec<Map>], h: usize, w: usize) -> Tensor {
    let flat: Vec<f32> = v.iter().flatten().flatten().map(|&x| x as f32).collect();
    Tensor::from_vec(flat, (v.len(), v[0].len(), h, w), &Device::Cpu).unwrap()
}

fn t3(v: &[Vec<[f64; 2]>]) -> Tensor {
    let flat: Vec<f32> = v.iter().flatten().flatten().map(|&x| x as f32).collect();
    Tensor::from_vec(flat, (v.len(), v[0].len(), 2), &Device::Cpu).unwrap()
}

fn target_tensor(masks: &[Map]) -> Target {
    let flat: Vec<f32> = masks.iter().flatten().map(|&x| x as f32).collect();
    Target { masks: Tensor::from_vec(flat, (masks.len(), H, W), &Device::Cpu).unwrap(), objects: None, object_categories: Vec::new() }
}

fn map(f: impl Fn(usize, usize) -> f64) -> Map {
    (0..H * W).map(|i| f(i / W, i % W)).collect()
}

fn output(final_masks: Tensor, refer: Tensor, existence: Tensor, aux: Vec<(Tensor, Tensor)>) -> DerisOutput {
    let (b, n) = (refer.dim(0).unwrap(), refer.dim(1).unwrap());
    let zeros = |c: usize| Tensor::zeros((b, n, c), DType::F32, &Device::Cpu).unwrap();
    DerisOutput {
        pred_masks: final_masks,
        pred_boxes: zeros(4),
        pred_refer_logits: refer,
        pred_logits_perception: zeros(2),
        pred_existence: existence,
        query_feat: zeros(8),
        query_norm: zeros(8),
        text_feat: Tensor::zeros((b, 5, 8), DType::F32, &Device::Cpu).unwrap(),
        aux: aux
            .into_iter()
            .map(|(m, r)| RoundOutput { pred_masks_lowres: m, pred_boxes: zeros(4), pred_logits: zeros(2), pred_refer_logits: r, query_norm: zeros(8) })
            .collect(),
    }
}

/// Image 0: two targets (left half; bottom-right quadrant) and queries 1, 2 shaped like them;
/// image 1: no target. An aux round at stride 4 (2×2 logits) with the same story.
struct Batch {
    fin: Round,
    aux_low: Vec<Vec<Vec<f64>>>, // [b][q] 2×2
    aux: Round,
    targets: Vec<Vec<Map>>,
    existence: [f64; 2],
}

fn batch() -> Batch {
    let wiggle = |r: usize, c: usize| 0.03 * ((r * 5 + c * 3) % 7) as f64;
    let left = map(|_, c| if c < 4 { 1.0 } else { 0.0 });
    let quad = map(|r, c| if r >= 4 && c >= 4 { 1.0 } else { 0.0 });
    let fin = Round {
        masks: vec![
            vec![
                map(|r, c| -3.0 + 0.01 * (r * W + c) as f64),
                map(|r, c| if c < 4 { 4.0 } else { -5.0 } + wiggle(r, c)),
                map(|r, c| if r >= 4 && c >= 4 { 3.0 } else { -4.0 } - wiggle(r, c)),
            ],
            vec![
                map(|r, c| ((r * 3 + c * 7) % 11) as f64 * 0.4 - 2.0),
                map(|r, c| 1.5 - 0.2 * r as f64 + wiggle(r, c)),
                map(|r, c| -0.5 + 0.1 * c as f64 - wiggle(r, c)),
            ],
        ],
        refer: vec![vec![[-1.0, 2.0], [2.0, -1.0], [1.5, 0.5]], vec![[0.3, 0.1], [-0.5, 1.0], [0.0, 0.0]]],
    };
    let aux_low = vec![
        vec![vec![-3.0, -2.5, -2.0, -3.5], vec![4.0, -4.0, 3.5, -4.5], vec![-4.0, -3.0, -3.5, 4.0]],
        vec![vec![1.0, -1.0, 0.5, 2.0], vec![-2.0, 0.3, 0.7, -0.1], vec![0.0, 1.0, -1.0, 0.2]],
    ];
    let aux = Round {
        masks: aux_low.iter().map(|qs| qs.iter().map(|m| upsample_ac(m, 2, 2, H, W)).collect()).collect(),
        refer: vec![vec![[0.2, 0.9], [1.1, -0.3], [0.4, 0.6]], vec![[-0.2, 0.8], [0.5, 0.5], [1.0, -1.0]]],
    };
    Batch { fin, aux_low, aux, targets: vec![vec![left, quad], vec![]], existence: [2.0, -1.0] }
}

fn batch_output(bt: &Batch) -> (DerisOutput, Vec<Target>) {
    let low = t4(&bt.aux_low, 2, 2);
    let out = output(
        t4(&bt.fin.masks, H, W),
        t3(&bt.fin.refer),
        Tensor::new(&[[bt.existence[0] as f32], [bt.existence[1] as f32]], &Device::Cpu).unwrap(),
        vec![(low, t3(&bt.aux.refer))],
    );
    let targets = vec![
        target_tensor(&bt.targets[0]),
        Target { masks: Tensor::zeros((0, H, W), DType::F32, &Device::Cpu).unwrap(), objects: None, object_categories: Vec::new() },
    ];
    (out, targets)
}

fn small_cfg() -> LossConfig {
    LossConfig { num_points: 64, ..LossConfig::default() }
}

fn assert_term(terms: &BTreeMap<String, f64>, name: &str, want: f64) {
    let got = terms[name];
    let tol = 1e-4 * want.abs().max(1.0);
    assert!((got - want).abs() <= tol, "{name}: got {got}, want {want}");
}

#[test]
fn loss_matches_the_scalar_oracle() {
    let bt = batch();
    let (out, targets) = batch_output(&bt);
    let cfg = small_cfg();
    for seed in [1u64, 2, 3] {
        let mut rng = SplitMix64::new(seed);
        let mut replay = rng.clone();
        let loss = deris_loss(&out, &targets, &cfg, &mut rng).unwrap();
        assert_eq!(loss.num_masks, 2.0);

        let fin = oracle_round(&bt.fin, &bt.targets, &cfg, 2.0, &mut replay);
        let aux = oracle_round(&bt.aux, &bt.targets, &cfg, 2.0, &mut replay);
        assert_eq!(rng, replay, "the loss drew a different number of points than documented");
        let exist = (softplus(-bt.existence[0]) + softplus(bt.existence[1])) / 2.0;
        for (suffix, t) in [("", fin), ("_0", aux)] {
            assert_term(&loss.terms, &format!("loss_cls{suffix}"), t[0]);
            assert_term(&loss.terms, &format!("loss_bce{suffix}"), t[1]);
            assert_term(&loss.terms, &format!("loss_dice{suffix}"), t[2]);
        }
        assert_term(&loss.terms, "loss_exist", exist);
        let total = 2.0 * fin[0] + 5.0 * fin[1] + 5.0 * fin[2] + 0.2 * (2.0 * aux[0] + 5.0 * aux[1] + 5.0 * aux[2]) + exist;
        assert_term(&loss.terms, "total", total);
        let t = loss.total.to_scalar::<f32>().unwrap() as f64;
        assert!((t - total).abs() < 1e-4 * total, "total tensor {t} vs {total}");
        assert_eq!(loss.terms.len(), 8, "{:?}", loss.terms.keys());
    }
}

#[test]
fn cross_entropy_of_the_obvious_matching_in_closed_form() {
    // the final round's matching is q1 → target 0, q2 → target 1: the CE needs no points
    let bt = batch();
    let (out, targets) = batch_output(&bt);
    let loss = deris_loss(&out, &targets, &small_cfg(), &mut SplitMix64::new(9)).unwrap();
    let lse = |[a, b]: [f64; 2]| (a.exp() + b.exp()).ln();
    let r = &bt.fin.refer;
    let matched = (lse(r[0][1]) - r[0][1][0]) + (lse(r[0][2]) - r[0][2][0]);
    let unmatched: f64 = [r[0][0], r[1][0], r[1][1], r[1][2]].iter().map(|&l| lse(l) - l[1]).sum();
    let want = (matched + 0.1 * unmatched) / (2.0 + 0.1 * 4.0);
    assert_term(&loss.terms, "loss_cls", want);
}

#[test]
fn matching_picks_the_obvious_queries() {
    let cfg = LossConfig { num_points: 256, ..LossConfig::default() };
    let bt = batch();
    let (out, targets) = batch_output(&bt);
    let mut rng = SplitMix64::new(4);
    let pairs = match_round(&out.pred_masks, &out.pred_refer_logits, &targets, &cfg, &mut rng).unwrap();
    assert_eq!(pairs, vec![vec![(1, 0), (2, 1)], vec![]]);

    // more targets than queries: two queries, three targets; each query takes its look-alike
    let a = map(|_, c| if c < 3 { 1.0 } else { 0.0 });
    let b = map(|r, _| if r >= 5 { 1.0 } else { 0.0 });
    let c = map(|r, c| if r < 2 && c >= 6 { 1.0 } else { 0.0 });
    let logits = |m: &Map| m.iter().map(|&v| if v > 0.5 { 6.0 } else { -6.0 }).collect::<Map>();
    let masks = t4(&[vec![logits(&b), logits(&c)]], H, W);
    let refer = t3(&[vec![[1.0, 0.0], [1.0, 0.0]]]);
    let pairs = match_round(&masks, &refer, &[target_tensor(&[a, b, c])], &cfg, &mut rng).unwrap();
    assert_eq!(pairs, vec![vec![(0, 1), (1, 2)]]);

    // identical masks: the class cost decides (query 2 is the more confident referent)
    let m = map(|r, c| if r < 4 && c < 4 { 5.0 } else { -5.0 });
    let masks = t4(&[vec![m.clone(), m.clone(), m.clone()]], H, W);
    let refer = t3(&[vec![[0.0, 1.0], [0.5, 0.0], [3.0, 0.0]]]);
    let tgt = target_tensor(&[map(|r, c| if r < 4 && c < 4 { 1.0 } else { 0.0 })]);
    let pairs = match_round(&masks, &refer, &[tgt], &cfg, &mut rng).unwrap();
    assert_eq!(pairs, vec![vec![(2, 0)]]);
}

#[test]
fn gradients_reach_every_scored_output_and_are_finite() {
    let bt = batch();
    let (out, targets) = batch_output(&bt);
    let vars: Vec<Var> = [&out.pred_masks, &out.pred_refer_logits, &out.pred_existence, &out.aux[0].pred_masks_lowres, &out.aux[0].pred_refer_logits]
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let out = output(
        vars[0].as_tensor().clone(),
        vars[1].as_tensor().clone(),
        vars[2].as_tensor().clone(),
        vec![(vars[3].as_tensor().clone(), vars[4].as_tensor().clone())],
    );
    let loss = deris_loss(&out, &targets, &small_cfg(), &mut SplitMix64::new(7)).unwrap();
    let grads = loss.total.backward().unwrap();
    for (name, v) in ["pred_masks", "pred_refer_logits", "pred_existence", "aux.pred_masks_lowres", "aux.pred_refer_logits"].iter().zip(&vars) {
        let g = grads.get(v.as_tensor()).unwrap_or_else(|| panic!("no gradient for {name}"));
        let g = g.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(g.iter().all(|x| x.is_finite()), "{name}: non-finite gradient");
        assert!(g.iter().any(|&x| x != 0.0), "{name}: zero gradient");
    }
    // the existence gradient is d/dz mean BCE = (σ(z) − y) / B
    let g = grads.get(vars[2].as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let want = [(sigmoid(2.0) - 1.0) / 2.0, sigmoid(-1.0) / 2.0];
    for (g, w) in g.iter().zip(want) {
        assert!((*g as f64 - w).abs() < 1e-5, "existence grad {g} vs {w}");
    }
    // image 1 has no target: its masks get no gradient (only matched masks are scored)
    let gm = grads.get(vars[0].as_tensor()).unwrap().get(1).unwrap().abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
    assert_eq!(gm, 0.0);
}

#[test]
fn a_batch_without_targets_scores_only_no_object_and_existence() {
    let bt = batch();
    let (out, _) = batch_output(&bt);
    let empty = || Target { masks: Tensor::zeros((0, H, W), DType::F32, &Device::Cpu).unwrap(), objects: None, object_categories: Vec::new() };
    let targets = vec![empty(), empty()];
    assert!(!targets[0].exists());
    let loss = deris_loss(&out, &targets, &LossConfig::default(), &mut SplitMix64::new(1)).unwrap();
    assert_eq!(loss.num_masks, 1.0);
    let plain_ce = |refer: &[Vec<[f64; 2]>]| {
        let all: Vec<f64> = refer.iter().flatten().map(|&[a, b]| (a.exp() + b.exp()).ln() - b).collect();
        all.iter().sum::<f64>() / all.len() as f64
    };
    assert_term(&loss.terms, "loss_cls", plain_ce(&bt.fin.refer));
    assert_term(&loss.terms, "loss_cls_0", plain_ce(&bt.aux.refer));
    for k in ["loss_bce", "loss_dice", "loss_bce_0", "loss_dice_0"] {
        assert_eq!(loss.terms[k], 0.0, "{k}");
    }
    let exist = (softplus(bt.existence[0]) + softplus(bt.existence[1])) / 2.0;
    assert_term(&loss.terms, "loss_exist", exist);
    let total = 2.0 * plain_ce(&bt.fin.refer) + 0.2 * 2.0 * plain_ce(&bt.aux.refer) + exist;
    assert_term(&loss.terms, "total", total);
}

/// Sample `i` of a batch's outputs.
fn sample_output(out: &DerisOutput, i: usize) -> DerisOutput {
    let cut = |t: &Tensor| t.narrow(0, i, 1).unwrap();
    DerisOutput {
        pred_masks: cut(&out.pred_masks),
        pred_boxes: cut(&out.pred_boxes),
        pred_refer_logits: cut(&out.pred_refer_logits),
        pred_logits_perception: cut(&out.pred_logits_perception),
        pred_existence: cut(&out.pred_existence),
        query_feat: cut(&out.query_feat),
        query_norm: cut(&out.query_norm),
        text_feat: cut(&out.text_feat),
        aux: out
            .aux
            .iter()
            .map(|r| RoundOutput {
                pred_masks_lowres: cut(&r.pred_masks_lowres),
                pred_boxes: cut(&r.pred_boxes),
                pred_logits: cut(&r.pred_logits),
                pred_refer_logits: cut(&r.pred_refer_logits),
                query_norm: cut(&r.query_norm),
            })
            .collect(),
    }
}

#[test]
fn chunks_scored_with_the_batch_divisors_add_up_to_the_batch_loss() {
    // Image 0 holds every target, so its chunk draws the same points as the whole batch (the
    // draws are per image with a target, from the same seed), and every term must add up.
    let cfg = small_cfg();
    let bt = batch();
    let (out, targets) = batch_output(&bt);
    let whole = deris_loss(&out, &targets, &cfg, &mut SplitMix64::new(3)).unwrap();
    let norm = Normalizers::of_batch(&targets, 3, cfg.no_object_weight);
    // no object lists: the perception divisors are those of zero objects
    assert_eq!(norm, Normalizers { num_masks: 2.0, class_weight_sum: 2.0 + 4.0 * 0.1, samples: 2.0, num_objects: 1.0, object_weight_sum: 6.0 * 0.1 });
    let parts: Vec<_> = (0..2)
        .map(|i| deris_loss_part(&sample_output(&out, i), &targets[i..i + 1], &cfg, &norm, &HeadOutputs::default(), &mut SplitMix64::new(3)).unwrap())
        .collect();
    for (name, want) in &whole.terms {
        let got: f64 = parts.iter().map(|p| p.terms[name]).sum();
        assert!((got - want).abs() <= 1e-6 * want.abs().max(1.0), "{name}: chunks add up to {got}, the batch scores {want}");
    }
    // On its own, the target-free image would be scored with its own divisors instead.
    let alone = deris_loss(&sample_output(&out, 1), &targets[1..], &cfg, &mut SplitMix64::new(3)).unwrap();
    assert!((alone.terms["loss_exist"] - 2.0 * parts[1].terms["loss_exist"]).abs() < 1e-6);
}

#[test]
fn existence_log_is_clamped_at_minus_100() {
    // z = −300 with a target: −log σ(z) ≈ 300, clamped to 100 (PyTorch's binary_cross_entropy)
    let bt = batch();
    let (mut out, targets) = batch_output(&bt);
    out.pred_existence = Tensor::new(&[[-300f32], [-300.0]], &Device::Cpu).unwrap();
    let loss = deris_loss(&out, &targets, &small_cfg(), &mut SplitMix64::new(1)).unwrap();
    assert_term(&loss.terms, "loss_exist", (100.0 + softplus(-300.0)) / 2.0);
}

#[test]
fn loss_config_defaults_fill_missing_fields() {
    let cfg: LossConfig = serde_json::from_str(r#"{"num_points": 100}"#).unwrap();
    assert_eq!(cfg, LossConfig { num_points: 100, ..LossConfig::default() });
    assert_eq!((cfg.class_weight, cfg.mask_weight, cfg.dice_weight, cfg.no_object_weight, cfg.aux_weight), (2.0, 5.0, 5.0, 0.1, 0.2));
}

/// The batch with object lists (image 0: the two targets and a third object; image 1, which has
/// no target: one object) and perception logits for both rounds.
fn batch_with_objects(bt: &Batch) -> (DerisOutput, Vec<Target>, Vec<Vec<Map>>, [Vec<Vec<[f64; 2]>>; 2]) {
    let (mut out, mut targets) = batch_output(bt);
    let top_right = map(|r, c| if r < 3 && c >= 5 { 1.0 } else { 0.0 });
    let centre = map(|r, c| if (2..6).contains(&r) && (2..6).contains(&c) { 1.0 } else { 0.0 });
    let objects = vec![vec![bt.targets[0][0].clone(), bt.targets[0][1].clone(), top_right], vec![centre]];
    for (t, o) in targets.iter_mut().zip(&objects) {
        t.objects = Some(target_tensor(o).masks);
    }
    let perception = [
        vec![vec![[0.5, -0.5], [1.0, 0.2], [-0.3, 0.4]], vec![[0.1, 0.9], [0.7, -0.2], [-1.0, 0.5]]],
        vec![vec![[-0.4, 0.3], [0.8, 0.1], [0.2, -0.6]], vec![[1.2, 0.0], [-0.3, 0.3], [0.0, 0.5]]],
    ];
    out.pred_logits_perception = t3(&perception[0]);
    out.aux[0].pred_logits = t3(&perception[1]);
    (out, targets, objects, perception)
}

#[test]
fn perception_terms_score_every_object_with_the_perception_logits() {
    let bt = batch();
    let (out, targets, objects, perception) = batch_with_objects(&bt);
    let cfg = LossConfig { perception_weight: 0.5, ..small_cfg() };
    let mut rng = SplitMix64::new(5);
    let mut replay = rng.clone();
    let loss = deris_loss(&out, &targets, &cfg, &mut rng).unwrap();

    // per round: the referring terms on the targets, then the perception terms on the objects
    // (4 in the batch), the perception logits in place of the referring ones
    let fin = oracle_round(&bt.fin, &bt.targets, &cfg, 2.0, &mut replay);
    let fin_p = oracle_round(&Round { masks: bt.fin.masks.clone(), refer: perception[0].clone() }, &objects, &cfg, 4.0, &mut replay);
    let aux = oracle_round(&bt.aux, &bt.targets, &cfg, 2.0, &mut replay);
    let aux_p = oracle_round(&Round { masks: bt.aux.masks.clone(), refer: perception[1].clone() }, &objects, &cfg, 4.0, &mut replay);
    assert_eq!(rng, replay, "the loss drew a different number of points than documented");
    for (name, t) in [("", fin), ("_0", aux), ("p", fin_p), ("p_0", aux_p)] {
        let (prefix, suffix) = name.split_at(usize::from(name.starts_with('p')));
        assert_term(&loss.terms, &format!("loss_{prefix}cls{suffix}"), t[0]);
        assert_term(&loss.terms, &format!("loss_{prefix}bce{suffix}"), t[1]);
        assert_term(&loss.terms, &format!("loss_{prefix}dice{suffix}"), t[2]);
    }
    let weighted = |t: [f64; 3]| 2.0 * t[0] + 5.0 * t[1] + 5.0 * t[2];
    let exist = (softplus(-bt.existence[0]) + softplus(bt.existence[1])) / 2.0;
    let total = weighted(fin) + 0.5 * weighted(fin_p) + 0.2 * (weighted(aux) + 0.5 * weighted(aux_p)) + exist;
    assert_term(&loss.terms, "total", total);
    assert_eq!(loss.terms.len(), 14, "{:?}", loss.terms.keys());

    // the perception terms need every sample's objects
    let mut missing = targets.clone();
    missing[1].objects = None;
    let err = deris_loss(&out, &missing, &cfg, &mut SplitMix64::new(5)).unwrap_err().to_string();
    assert!(err.contains("objects") && err.contains("sample 1"), "{err}");
    // and weight 0 (the authors' objective) ignores them: the same terms as without objects
    let plain = deris_loss(&out, &targets, &small_cfg(), &mut SplitMix64::new(5)).unwrap();
    let (out0, targets0) = batch_output(&bt);
    let without = deris_loss(&out0, &targets0, &small_cfg(), &mut SplitMix64::new(5)).unwrap();
    assert_eq!(plain.terms, without.terms);
}

#[test]
fn overlap_positives_label_every_query_on_a_referent() {
    // Query 0 of image 0 now covers three of target 0's four columns (IoU 0.75); queries 1 and 2
    // are the two targets exactly. Image 1 has no target.
    let mut bt = batch();
    bt.fin.masks[0][0] = map(|_, c| if c < 3 { 2.0 } else { -2.0 });
    let (out, targets) = batch_output(&bt);
    assert_eq!(overlap_positives(&out.pred_masks, &targets, 0.5).unwrap(), vec![vec![0, 1, 2], vec![]]);
    assert_eq!(overlap_positives(&out.pred_masks, &targets, 0.8).unwrap(), vec![vec![1, 2], vec![]]);

    // The cross entropy labels query 0 "referred" too (weight 1); the divisor stays that of the
    // one-to-one labels (2 matched + 4 × 0.1).
    let cfg = LossConfig { positive_iou: Some(0.5), ..small_cfg() };
    let loss = deris_loss(&out, &targets, &cfg, &mut SplitMix64::new(9)).unwrap();
    let lse = |[a, b]: [f64; 2]| (a.exp() + b.exp()).ln();
    let r = &bt.fin.refer;
    let referred: f64 = (0..3).map(|q| lse(r[0][q]) - r[0][q][0]).sum();
    let rest: f64 = r[1].iter().map(|&l| lse(l) - l[1]).sum();
    assert_term(&loss.terms, "loss_cls", (referred + 0.1 * rest) / (2.0 + 0.1 * 4.0));
    // the mask terms stay one-to-one: the same as with the authors' labels
    let one_to_one = deris_loss(&out, &targets, &small_cfg(), &mut SplitMix64::new(9)).unwrap();
    for term in ["loss_bce", "loss_dice", "loss_bce_0", "loss_dice_0"] {
        assert_eq!(loss.terms[term], one_to_one.terms[term], "{term}");
    }
}

#[test]
fn category_terms_name_the_matched_objects_categories() {
    // The perception matching of both rounds is the obvious one in image 0 (query 1 → the left
    // half, query 2 → the quadrant, query 0 → the top-right block); image 1's category logits
    // are the same for every query, so its one object scores the same whichever query it gets.
    let bt = batch();
    let (out, mut targets, _, _) = batch_with_objects(&bt);
    targets[0].object_categories = vec![2, 0, 3];
    targets[1].object_categories = vec![1];
    let logits = [
        vec![vec![[0.2, 1.0, -0.5, 0.3], [1.5, 0.1, 0.0, -1.0], [0.0, 0.4, 0.9, 0.2]], vec![[0.3, -0.2, 0.8, 0.1]; 3]],
        vec![vec![[-0.1, 0.6, 0.2, 0.0], [0.9, 0.9, -0.4, 0.3], [0.1, -0.3, 0.5, 1.1]], vec![[0.5, 0.5, -0.5, 0.0]; 3]],
    ];
    let t = |l: &Vec<Vec<[f64; 4]>>| {
        let flat: Vec<f32> = l.iter().flatten().flatten().map(|&x| x as f32).collect();
        Tensor::from_vec(flat, (2, 3, 4), &Device::Cpu).unwrap()
    };
    let ce = |row: [f64; 4], label: usize| row.iter().map(|v| v.exp()).sum::<f64>().ln() - row[label];
    let want = |l: &Vec<Vec<[f64; 4]>>| (ce(l[0][0], 3) + ce(l[0][1], 2) + ce(l[0][2], 0) + ce(l[1][0], 1)) / 4.0;

    let cfg = LossConfig { perception_weight: 0.5, category_weight: 0.7, ..small_cfg() };
    let norm = Normalizers::of_batch(&targets, 3, cfg.no_object_weight);
    let rounds = HeadOutputs { categories: vec![t(&logits[0]), t(&logits[1])], words: None };
    let with = deris_loss_part(&out, &targets, &cfg, &norm, &rounds, &mut SplitMix64::new(5)).unwrap();
    assert_term(&with.terms, "loss_pcat", want(&logits[0]));
    assert_term(&with.terms, "loss_pcat_0", want(&logits[1]));
    // the other terms are those of the same loss without categories, the total adds them
    let cfg0 = LossConfig { category_weight: 0.0, ..cfg.clone() };
    let without = deris_loss_part(&out, &targets, &cfg0, &norm, &HeadOutputs::default(), &mut SplitMix64::new(5)).unwrap();
    for (k, v) in &without.terms {
        if k != "total" {
            assert_eq!(with.terms[k], *v, "{k}");
        }
    }
    assert_term(&with.terms, "total", without.terms["total"] + 0.7 * want(&logits[0]) + 0.2 * 0.7 * want(&logits[1]));

    // categories the head does not have, and missing logits, are errors
    let mut bad = targets.clone();
    bad[1].object_categories = vec![4];
    let err = deris_loss_part(&out, &bad, &cfg, &norm, &rounds, &mut SplitMix64::new(5)).unwrap_err().to_string();
    assert!(err.contains("category 4"), "{err}");
    let one_round = HeadOutputs { categories: rounds.categories[..1].to_vec(), words: None };
    let err = deris_loss_part(&out, &targets, &cfg, &norm, &one_round, &mut SplitMix64::new(5)).unwrap_err().to_string();
    assert!(err.contains("category logits"), "{err}");
}

#[test]
fn box_term_regresses_the_matched_objects_boxes() {
    // The perception matching as in the category test; image 1's boxes are the same for every
    // query, so its one object gets the same box whichever query it is matched to.
    let bt = batch();
    let (mut out, targets, _, _) = batch_with_objects(&bt);
    let boxes = [
        vec![vec![[0.7, 0.2, 0.3, 0.4], [0.3, 0.5, 0.4, 0.9], [0.6, 0.8, 0.5, 0.4]], vec![[0.5, 0.4, 0.6, 0.5]; 3]],
        vec![vec![[0.9, 0.1, 0.2, 0.2], [0.2, 0.4, 0.6, 0.8], [0.8, 0.7, 0.4, 0.6]], vec![[0.4, 0.6, 0.3, 0.5]; 3]],
    ];
    let t = |l: &Vec<Vec<[f64; 4]>>| {
        let flat: Vec<f32> = l.iter().flatten().flatten().map(|&x| x as f32).collect();
        Tensor::from_vec(flat, (2, 3, 4), &Device::Cpu).unwrap()
    };
    out.pred_boxes = t(&boxes[0]);
    out.aux[0].pred_boxes = t(&boxes[1]);
    // the objects' boxes (cx, cy, w, h) on the 8×8 grid: left half, bottom-right quadrant,
    // rows 0..3 × columns 5..8, and image 1's centre block rows and columns 2..6
    let (left, quad, top_right, centre) = ([0.25, 0.5, 0.5, 1.0], [0.75, 0.75, 0.5, 0.5], [0.8125, 0.1875, 0.375, 0.375], [0.5, 0.5, 0.5, 0.5]);
    let l1 = |a: [f64; 4], b: [f64; 4]| a.iter().zip(&b).map(|(x, y)| (x - y).abs()).sum::<f64>();
    let want = |l: &Vec<Vec<[f64; 4]>>| (l1(l[0][1], left) + l1(l[0][2], quad) + l1(l[0][0], top_right) + l1(l[1][0], centre)) / 4.0;

    let cfg = LossConfig { perception_weight: 0.5, box_weight: 3.0, ..small_cfg() };
    let norm = Normalizers::of_batch(&targets, 3, cfg.no_object_weight);
    let with = deris_loss_part(&out, &targets, &cfg, &norm, &HeadOutputs::default(), &mut SplitMix64::new(5)).unwrap();
    assert_term(&with.terms, "loss_pbox", want(&boxes[0]));
    assert_term(&with.terms, "loss_pbox_0", want(&boxes[1]));
    let without = deris_loss_part(&out, &targets, &LossConfig { box_weight: 0.0, ..cfg.clone() }, &norm, &HeadOutputs::default(), &mut SplitMix64::new(5)).unwrap();
    assert_term(&with.terms, "total", without.terms["total"] + 3.0 * want(&boxes[0]) + 0.2 * 3.0 * want(&boxes[1]));
    let alone = LossConfig { perception_weight: 0.0, ..cfg };
    let err = deris_loss_part(&out, &targets, &alone, &norm, &HeadOutputs::default(), &mut SplitMix64::new(5)).unwrap_err().to_string();
    assert!(err.contains("box_weight"), "{err}");
}

#[test]
fn word_term_names_each_real_token() {
    // Two sentences of 4 and 2 real tokens, padded to 5; a vocabulary of 3.
    let logits: Vec<Vec<[f64; 3]>> = vec![
        vec![[0.1, 1.2, -0.3], [0.7, 0.0, 0.4], [-1.0, 0.5, 2.0], [0.3, 0.3, 0.3], [9.0, -9.0, 0.0]],
        vec![[1.0, -0.5, 0.2], [0.0, 0.8, -0.6], [5.0, 5.0, 5.0], [-2.0, 0.0, 1.0], [0.4, 0.1, 0.9]],
    ];
    let ids = [[0i64, 2, 1, 2, 1], [1, 0, 1, 1, 1]];
    let padding = [[0i64, 0, 0, 0, 1], [0, 0, 1, 1, 1]];
    let dev = Device::Cpu;
    let flat: Vec<f32> = logits.iter().flatten().flatten().map(|&x| x as f32).collect();
    let words = WordLogits {
        logits: Tensor::from_vec(flat, (2, 5, 3), &dev).unwrap(),
        ids: Tensor::from_vec(ids.concat(), (2, 5), &dev).unwrap(),
        padding: Tensor::from_vec(padding.concat(), (2, 5), &dev).unwrap(),
    };
    let ce = |row: [f64; 3], label: i64| row.iter().map(|v| v.exp()).sum::<f64>().ln() - row[label as usize];
    let mean = |b: usize| {
        let real: Vec<usize> = (0..5).filter(|&j| padding[b][j] == 0).collect();
        real.iter().map(|&j| ce(logits[b][j], ids[b][j])).sum::<f64>() / real.len() as f64
    };
    let want = (mean(0) + mean(1)) / 4.0; // divided by 4 samples (a part of a batch of 4)
    let got = word_loss(&words, 4.0).unwrap().to_scalar::<f32>().unwrap() as f64;
    assert!((got - want).abs() < 1e-5 * want, "word loss {got} vs {want}");

    // in the whole loss: `loss_word`, added to the total with its weight; needed when weighted
    let (out, targets) = batch_output(&batch());
    let cfg = LossConfig { word_weight: 0.3, ..small_cfg() };
    let norm = Normalizers::of_batch(&targets, 3, cfg.no_object_weight);
    let heads = HeadOutputs { categories: Vec::new(), words: Some(words.clone()) };
    let with = deris_loss_part(&out, &targets, &cfg, &norm, &heads, &mut SplitMix64::new(5)).unwrap();
    let without = deris_loss_part(&out, &targets, &small_cfg(), &norm, &HeadOutputs::default(), &mut SplitMix64::new(5)).unwrap();
    let word = (mean(0) + mean(1)) / 2.0;
    assert_term(&with.terms, "loss_word", word);
    assert_term(&with.terms, "total", without.terms["total"] + 0.3 * word);
    let err = deris_loss_part(&out, &targets, &cfg, &norm, &HeadOutputs::default(), &mut SplitMix64::new(5)).unwrap_err().to_string();
    assert!(err.contains("word head"), "{err}");
    // an id outside the head's vocabulary is an error
    let bad = WordLogits { ids: Tensor::from_vec(vec![0i64, 3, 1, 2, 1, 1, 0, 1, 1, 1], (2, 5), &dev).unwrap(), ..words };
    assert!(word_loss(&bad, 2.0).unwrap_err().to_string().contains("id 3"));
}
