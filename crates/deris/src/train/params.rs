//! The weights of a model being trained (TRAIN-EVAL-SPEC §6.2–§6.4): trainable ones as candle
//! [`Var`]s, frozen ones as plain tensors, the parameter group of each key, and a fresh
//! deterministic initialisation for training from scratch.
//!
//! Keys: every key of the model (checkpoint names, e.g. `perception_branch.predictor.SEG_cls.weight`).
//!
//! Frozen by default: Swin (`perception_branch.hier_vision_encoder.*`, `requires_grad = False` in
//! the reference), integer buffers (Swin's `relative_position_index`) and the loss's class-weight
//! buffer `head.criterion.empty_weight` ([`keys::is_buffer`]).
//!
//! The model is rebuilt on the weights once per training step ([`TrainableWeights::build`]):
//! constructors derive tensors from the weights (split `in_proj_weight`, Swin's gathered
//! relative-position bias, the halves of `channel_proj_conv`), and those would not follow an
//! in-place optimizer update.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;

use crate::checkpoint::random::{fnv1a, SplitMix};
use crate::checkpoint::{self, keys, Checkpoint};
use crate::config::DerisConfig;
use crate::model::Deris;
use crate::perception::swin::windows::relative_position_index;

/// Parameter group of a checkpoint key (TRAIN-EVAL-SPEC §6.2), first matching rule wins:
/// contains `vis_enc` → [`Group::VisEnc`], `lan_enc` → [`Group::LanEnc`], `hier_vision_encoder` →
/// [`Group::HierVisionEncoder`], `pixel_decoder` → [`Group::PixelDecoder`], else [`Group::Rest`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Group {
    /// BEiT-3 (`understanding_branch.vis_enc.*`), base lr / 2.
    VisEnc,
    /// A language encoder (`lan_enc`): empty in DeRIS, base lr / 10.
    LanEnc,
    /// Swin (`perception_branch.hier_vision_encoder.*`): frozen, so empty in practice; base lr / 10.
    HierVisionEncoder,
    /// The MSDeformAttn pixel decoder, base lr.
    PixelDecoder,
    /// Everything else, base lr.
    Rest,
}

impl Group {
    /// Every group in the reference's order (group index 0..4).
    pub const ALL: [Group; 5] = [Group::VisEnc, Group::LanEnc, Group::HierVisionEncoder, Group::PixelDecoder, Group::Rest];

    /// The group of a checkpoint key.
    pub fn of(name: &str) -> Group {
        const RULES: [(&str, Group); 4] = [
            ("vis_enc", Group::VisEnc),
            ("lan_enc", Group::LanEnc),
            ("hier_vision_encoder", Group::HierVisionEncoder),
            ("pixel_decoder", Group::PixelDecoder),
        ];
        RULES.iter().find(|(sub, _)| name.contains(sub)).map_or(Group::Rest, |&(_, g)| g)
    }

    /// The rule's substring (`"rest"` for [`Group::Rest`]).
    pub fn name(self) -> &'static str {
        match self {
            Group::VisEnc => "vis_enc",
            Group::LanEnc => "lan_enc",
            Group::HierVisionEncoder => "hier_vision_encoder",
            Group::PixelDecoder => "pixel_decoder",
            Group::Rest => "rest",
        }
    }
}

/// The reference's frozen float weights: all of Swin (TRAIN-EVAL-SPEC §6.3).
pub fn frozen_by_default(name: &str) -> bool {
    Group::of(name) == Group::HierVisionEncoder
}

/// Substrings of the embedding tables and learned tokens, initialised `N(0, 0.02)` by
/// [`TrainableWeights::init`]. `vis_enc.beit3.text_embed` is BEiT-3's token table (the
/// understanding branch's own `text_embed` is a Linear); `init_query` is an `nn.Embedding`.
const EMBEDDING_MARKERS: [&str; 11] = [
    "embed_tokens",
    "embed_positions",
    "beit3.text_embed",
    "query_feat",
    "query_embed",
    "init_query",
    "level_embed",
    "cls_token",
    "mask_token",
    "pos_embed",
    "relative_position_bias_table",
];

/// Standard deviation of the embedding tables' initialisation.
const EMBEDDING_STD: f32 = 0.02;

/// All weights of a model being trained: trainable ones as candle [`Var`]s, frozen ones (Swin,
/// integer buffers, `head.criterion.empty_weight`) as plain tensors. See the module docs.
pub struct TrainableWeights {
    trainable: BTreeMap<String, Var>,
    frozen: BTreeMap<String, Tensor>,
    device: Device,
}

impl TrainableWeights {
    /// From named tensors (checkpoint key names). Float tensors become [`Var`]s (copies, in
    /// their dtype) unless `frozen(name)` or they are buffers ([`keys::is_buffer`]); integer
    /// tensors are always frozen.
    pub fn from_tensors(
        tensors: impl IntoIterator<Item = (String, Tensor)>,
        frozen: &dyn Fn(&str) -> bool,
    ) -> candle_core::Result<Self> {
        let mut trainable = BTreeMap::new();
        let mut fixed = BTreeMap::new();
        let mut device = Device::Cpu;
        for (name, t) in tensors {
            device = t.device().clone();
            if t.dtype().is_float() && !keys::is_buffer(&name) && !frozen(&name) {
                // `detach` first: `Var::from_tensor` would share a Var's storage instead of copying.
                trainable.insert(name, Var::from_tensor(&t.detach())?);
            } else {
                fixed.insert(name, t.detach());
            }
        }
        Ok(Self { trainable, frozen: fixed, device })
    }

    /// Loads a checkpoint (`.safetensors` or `.pth`) strictly against `cfg` (every key the model
    /// requests, no other, with the right shapes: the audit of [`checkpoint::load_strict`]).
    /// Float weights are converted to f32; Swin is frozen ([`frozen_by_default`]).
    pub fn load(path: &Path, cfg: &DerisConfig, device: &Device) -> crate::Result<Self> {
        let ckpt = Checkpoint::open(path)?;
        checkpoint::audit(&ckpt, |vb| Deris::new(cfg, vb))?.into_result(&ckpt, &cfg.name)?;
        let tensors = ckpt
            .load_all(device)?
            .into_iter()
            .map(|(name, t)| {
                let t = if t.dtype().is_float() { t.to_dtype(DType::F32)? } else { t };
                Ok((name, t))
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let weights = Self::from_tensors(tensors, &frozen_by_default)?;
        tracing::info!(
            path = %path.display(),
            trainable = weights.num_trainable(),
            tensors = weights.trainable.len() + weights.frozen.len(),
            "loaded weights for training"
        );
        Ok(weights)
    }

    /// Fresh weights for training from scratch: every key the model requests for `cfg` (a
    /// [`checkpoint::dry_run`] of [`Deris::new`]), f32, each a function of `(seed, key name)`
    /// only (SplitMix64 seeded with `seed ^ fnv1a(name)`), so the result does not depend on
    /// construction order. Rules, first match wins:
    ///
    /// - integer buffers: Swin's `relative_position_index` holds the real index of its window
    ///   (the model would also accept zeros, but a checkpoint written from these weights must
    ///   load into the reference); any other integer buffer is zeros;
    /// - `head.criterion.empty_weight`: `[1.0, 0.1]` (the loss's class weights);
    /// - embedding tables and learned tokens (names containing one of `embed_tokens`,
    ///   `embed_positions`, `beit3.text_embed`, `query_feat`, `query_embed`, `init_query`,
    ///   `level_embed`, `cls_token`, `mask_token`, `pos_embed`, `relative_position_bias_table`):
    ///   `N(0, 0.02²)`;
    /// - 1-D `*.weight`: 1 (in DeRIS every 1-D weight is a LayerNorm or GroupNorm scale; Linear
    ///   and conv weights are ≥ 2-D); every other 1-D tensor (biases): 0;
    /// - ≥ 2-D weights: Xavier-uniform, `U(−b, b)` with `b = √(6 / (fan_in + fan_out))`,
    ///   `fan_in = dims[1]·dims[2..]`, `fan_out = dims[0]·dims[2..]`.
    pub fn init(cfg: &DerisConfig, seed: u64, device: &Device) -> crate::Result<Self> {
        let (_, requests) = checkpoint::dry_run(|vb| Deris::new(cfg, vb))?;
        let mut shapes: BTreeMap<String, (Vec<usize>, DType)> = BTreeMap::new();
        for (name, shape, dtype) in requests {
            shapes.insert(name, (shape, dtype));
        }
        let tensors = shapes
            .into_iter()
            .map(|(name, (shape, dtype))| Ok((name.clone(), init_tensor(&name, &shape, dtype, seed, device)?)))
            .collect::<crate::Result<Vec<_>>>()?;
        Ok(Self::from_tensors(tensors, &frozen_by_default)?)
    }

    /// A VarBuilder over all weights. Trainable weights are the [`Var`]s' own tensors (same
    /// storage), so gradients of anything built from it reach the Vars.
    pub fn var_builder(&self) -> VarBuilder<'static> {
        let all: HashMap<String, Tensor> = self
            .trainable
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .chain(self.frozen.iter().map(|(k, t)| (k.clone(), t.clone())))
            .collect();
        VarBuilder::from_tensors(all, DType::F32, &self.device)
    }

    /// Builds the model on these weights. Call it once per training step: an optimizer step
    /// updates the Vars in place ([`Var::set`]), and what the model derived from the weights at
    /// construction would be stale.
    pub fn build(&self, cfg: &DerisConfig) -> candle_core::Result<Deris> {
        Deris::new(cfg, self.var_builder())
    }

    /// The trainable Vars by key name, sorted.
    pub fn trainable(&self) -> &BTreeMap<String, Var> {
        &self.trainable
    }

    /// The trainable Vars of one parameter group, sorted by name.
    pub fn trainable_in(&self, group: Group) -> impl Iterator<Item = (&str, &Var)> {
        self.trainable.iter().filter(move |(k, _)| Group::of(k) == group).map(|(k, v)| (k.as_str(), v))
    }

    /// The frozen weights and buffers by key name, sorted.
    pub fn frozen(&self) -> &BTreeMap<String, Tensor> {
        &self.frozen
    }

    /// Every weight (trainable and frozen) by checkpoint key name: what a checkpoint file stores.
    /// Trainable values are copied, so later optimizer steps do not change the returned map.
    pub fn to_tensors(&self) -> BTreeMap<String, Tensor> {
        let mut all = self.frozen.clone();
        for (k, v) in &self.trainable {
            // A copy of a tensor that is valid by construction cannot fail short of running out
            // of memory; fall back to sharing the storage (detached) rather than dropping a key.
            let t = v.as_tensor().detach();
            all.insert(k.clone(), t.copy().unwrap_or(t));
        }
        all
    }

    /// Number of trainable scalar parameters.
    pub fn num_trainable(&self) -> usize {
        self.trainable.values().map(|v| v.elem_count()).sum()
    }

    pub fn device(&self) -> &Device {
        &self.device
    }
}

/// One tensor of [`TrainableWeights::init`] (see its rules).
pub(crate) fn init_tensor(name: &str, shape: &[usize], dtype: DType, seed: u64, device: &Device) -> crate::Result<Tensor> {
    if dtype.is_int() {
        if name.ends_with(".relative_position_index") {
            let n = shape.first().copied().unwrap_or(0);
            let ws = (n as f64).sqrt().round() as usize;
            if shape != [n, n] || ws * ws != n {
                return Err(crate::Error::Config {
                    field: name.to_string(),
                    reason: format!("relative_position_index of shape {shape:?} is not [ws², ws²]"),
                });
            }
            let index: Vec<i64> = relative_position_index(ws).into_iter().map(i64::from).collect();
            return Ok(Tensor::from_vec(index, (n, n), device)?.to_dtype(dtype)?);
        }
        return Ok(Tensor::zeros(shape, dtype, device)?);
    }
    let n: usize = shape.iter().product();
    let mut rng = SplitMix(seed ^ fnv1a(name));
    let data: Vec<f32> = if name == "head.criterion.empty_weight" {
        (0..n).map(|i| if i + 1 == n { 0.1 } else { 1.0 }).collect()
    } else if EMBEDDING_MARKERS.iter().any(|m| name.contains(m)) {
        (0..n).map(|_| EMBEDDING_STD * rng.normal()).collect()
    } else if shape.len() <= 1 {
        vec![if name.ends_with("weight") { 1.0 } else { 0.0 }; n]
    } else {
        let receptive: usize = shape[2..].iter().product();
        let (fan_in, fan_out) = (shape[1] * receptive, shape[0] * receptive);
        let bound = (6.0 / (fan_in + fan_out).max(1) as f32).sqrt();
        // unit() is in (0, 1]: 2u − 1 is in (−1, 1].
        (0..n).map(|_| bound * (2.0 * rng.unit() - 1.0)).collect()
    };
    Ok(Tensor::from_vec(data, shape, device)?.to_dtype(dtype)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Key names and shapes of a released checkpoint (`fixtures/keys/*.json`).
    fn released_keys(file: &str) -> BTreeMap<String, Vec<usize>> {
        let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
        let candidates = [root.join("fixtures/keys").join(file), root.join("../shared/fixtures/keys").join(file)];
        let path = candidates.iter().find(|p| p.exists()).unwrap_or_else(|| panic!("fixture missing: {}", candidates[0].display()));
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    fn tiny_a() -> DerisConfig {
        let p = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../configs/tiny-a.json");
        DerisConfig::from_file(&p).unwrap()
    }

    #[test]
    fn groups_of_released_keys() {
        let keys = released_keys("keys-DERIS-B-refcoco.json");
        let mut count: BTreeMap<Group, usize> = BTreeMap::new();
        for name in keys.keys() {
            let g = Group::of(name);
            *count.entry(g).or_default() += 1;
            let want = if name.starts_with("understanding_branch.vis_enc.") {
                Group::VisEnc
            } else if name.starts_with("perception_branch.hier_vision_encoder.") {
                Group::HierVisionEncoder
            } else if name.starts_with("perception_branch.pixel_decoder.") {
                Group::PixelDecoder
            } else {
                Group::Rest
            };
            assert_eq!(g, want, "{name}");
        }
        println!("{count:?}");
        assert_eq!(count.get(&Group::LanEnc), None, "DeRIS has no lan_enc");
        assert!(count[&Group::VisEnc] > 100 && count[&Group::PixelDecoder] > 20 && count[&Group::Rest] > 100);
        // Spot checks of the rules on real names.
        assert_eq!(Group::of("understanding_branch.vis_enc.beit3.text_embed.weight"), Group::VisEnc);
        assert_eq!(Group::of("understanding_branch.text_embed.weight"), Group::Rest);
        assert_eq!(Group::of("perception_branch.predictor.level_embed.weight"), Group::Rest);
        assert_eq!(Group::of("perception_branch.pixel_decoder.transformer.level_embed"), Group::PixelDecoder);
        assert_eq!(Group::of("head.criterion.empty_weight"), Group::Rest);
        assert_eq!(Group::of("x.lan_enc.vis_enc.w"), Group::VisEnc, "first matching rule wins");
        let names: Vec<&str> = Group::ALL.iter().map(|g| g.name()).collect();
        assert_eq!(names, ["vis_enc", "lan_enc", "hier_vision_encoder", "pixel_decoder", "rest"]);
    }

    #[test]
    fn init_covers_the_model_and_freezes_swin() {
        let cfg = tiny_a();
        let w = TrainableWeights::init(&cfg, 7, &Device::Cpu).unwrap();
        let (_, requests) = checkpoint::dry_run(|vb| Deris::new(&cfg, vb)).unwrap();
        let all = w.to_tensors();
        for (name, shape, dtype) in &requests {
            let t = all.get(name).unwrap_or_else(|| panic!("{name} missing"));
            assert_eq!(t.dims(), shape.as_slice(), "{name}");
            assert_eq!(t.dtype(), *dtype, "{name}");
        }
        assert_eq!(all.len(), requests.iter().map(|r| &r.0).collect::<std::collections::BTreeSet<_>>().len());
        assert!(w.trainable().keys().all(|k| !k.contains("hier_vision_encoder")));
        assert!(w.frozen().keys().any(|k| k.contains("hier_vision_encoder")));
        assert!(!w.trainable().contains_key("head.criterion.empty_weight"));
        assert_eq!(w.num_trainable(), w.trainable().values().map(|v| v.elem_count()).sum::<usize>());
        assert_eq!(w.trainable_in(Group::HierVisionEncoder).count(), 0);
        assert_eq!(
            w.trainable_in(Group::VisEnc).count() + w.trainable_in(Group::PixelDecoder).count() + w.trainable_in(Group::Rest).count(),
            w.trainable().len()
        );
        // The model builds on these weights.
        w.build(&cfg).unwrap();
    }

    #[test]
    fn init_is_deterministic_per_seed_and_key() {
        let cfg = tiny_a();
        let a = TrainableWeights::init(&cfg, 1, &Device::Cpu).unwrap().to_tensors();
        let b = TrainableWeights::init(&cfg, 1, &Device::Cpu).unwrap().to_tensors();
        let c = TrainableWeights::init(&cfg, 2, &Device::Cpu).unwrap().to_tensors();
        for (k, t) in &a {
            assert!(checkpoint::bit_identical(t, &b[k]).unwrap(), "{k} differs between equal seeds");
            // Every drawn tensor (the ≥ 2-D float ones) depends on the seed; the rest are constants.
            let drawn = t.dtype().is_float() && t.rank() >= 2;
            assert_eq!(!checkpoint::bit_identical(t, &c[k]).unwrap(), drawn, "{k}");
        }
    }

    fn values(t: &Tensor) -> Vec<f32> {
        t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap()
    }

    #[test]
    fn init_rules() {
        let cfg = tiny_a();
        let all = TrainableWeights::init(&cfg, 3, &Device::Cpu).unwrap().to_tensors();
        let get = |k: &str| values(all.get(k).unwrap_or_else(|| panic!("{k} missing")));

        // Norm scales 1, biases 0 (LayerNorm, multiway LayerNorm, GroupNorm).
        for k in [
            "perception_branch.predictor.decoder_norm.weight",
            "understanding_branch.vis_enc.beit3.encoder.layer_norm.A.weight",
            "perception_branch.pixel_decoder.adapter_1.1.weight",
            "perception_branch.hier_vision_encoder.norm0.weight",
        ] {
            assert!(get(k).iter().all(|&v| v == 1.0), "{k}");
        }
        for k in [
            "perception_branch.predictor.decoder_norm.bias",
            "perception_branch.predictor.SEG_cls.bias",
            "perception_branch.pixel_decoder.layer_1.0.bias",
        ] {
            assert!(get(k).iter().all(|&v| v == 0.0), "{k}");
        }
        // Every 1-D weight is a norm scale.
        for (k, t) in &all {
            if t.rank() == 1 && k.ends_with("weight") && k != "head.criterion.empty_weight" {
                assert!(k.contains("norm") || k.contains("_ln") || k.contains("layernorm") || k.contains(".1.weight"), "{k}");
            }
        }
        assert_eq!(get("head.criterion.empty_weight"), [1.0, 0.1]);

        // Xavier-uniform: inside the bound, and spread over it.
        let check_xavier = |k: &str| {
            let t = &all[k];
            let d = t.dims();
            let r: usize = d[2..].iter().product();
            let bound = (6.0 / (d[1] * r + d[0] * r) as f32).sqrt();
            let v = values(t);
            let max = v.iter().fold(0f32, |m, x| m.max(x.abs()));
            assert!(max <= bound && max > 0.9 * bound, "{k}: max {max} vs bound {bound}");
            let var = v.iter().map(|x| x * x).sum::<f32>() / v.len() as f32;
            assert!((var / (bound * bound / 3.0) - 1.0).abs() < 0.15, "{k}: variance {var} vs {}", bound * bound / 3.0);
        };
        check_xavier("perception_branch.predictor.transformer_ffn_layers.0.linear1.weight");
        check_xavier("perception_branch.pixel_decoder.layer_1.0.weight"); // conv 3×3
        check_xavier("understanding_branch.vis_enc.beit3.vision_embed.proj.weight"); // conv 16×16

        // Embedding tables N(0, 0.02²); the understanding branch's Linear `text_embed` is not one.
        for k in [
            "understanding_branch.vis_enc.beit3.text_embed.weight",
            "understanding_branch.vis_enc.beit3.encoder.embed_positions.A.weight",
            "understanding_branch.init_query.weight",
            "perception_branch.predictor.query_embed.weight",
            "perception_branch.predictor.level_embed.weight",
            "perception_branch.pixel_decoder.transformer.level_embed",
        ] {
            let v = get(k);
            let std = (v.iter().map(|x| x * x).sum::<f32>() / v.len() as f32).sqrt();
            assert!((0.01..0.03).contains(&std), "{k}: std {std}");
        }
        let lin = get("understanding_branch.text_embed.weight");
        assert!(lin.iter().fold(0f32, |m, x| m.max(x.abs())) > 0.1, "text_embed (Linear) must be Xavier");

        // Swin's relative_position_index holds the real index.
        let (k, t) = all.iter().find(|(k, _)| k.ends_with("relative_position_index")).unwrap();
        assert_eq!(t.dtype(), DType::I64, "{k}");
        let ws = cfg.swin.window_size;
        let got: Vec<i64> = t.flatten_all().unwrap().to_vec1().unwrap();
        let want: Vec<i64> = relative_position_index(ws).into_iter().map(i64::from).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn vars_share_storage_with_the_var_builder() {
        let w = TrainableWeights::from_tensors(
            [
                ("a.weight".to_string(), Tensor::ones((2, 3), DType::F32, &Device::Cpu).unwrap()),
                ("b.idx".to_string(), Tensor::zeros(4, DType::I64, &Device::Cpu).unwrap()),
                ("frozen.weight".to_string(), Tensor::ones(3, DType::F32, &Device::Cpu).unwrap()),
            ],
            &|n| n.starts_with("frozen"),
        )
        .unwrap();
        assert_eq!(w.trainable().keys().collect::<Vec<_>>(), ["a.weight"]);
        assert_eq!(w.num_trainable(), 6);
        let vb = w.var_builder();
        let a = vb.get((2, 3), "a.weight").unwrap();
        let snapshot = w.to_tensors();
        w.trainable()["a.weight"].set(&Tensor::full(5f32, (2, 3), &Device::Cpu).unwrap()).unwrap();
        assert_eq!(values(&a), [5.0; 6], "the VarBuilder's tensor is the Var's storage");
        assert_eq!(values(&snapshot["a.weight"]), [1.0; 6], "to_tensors is a snapshot");
        // Gradients reach the Var through the VarBuilder's tensor.
        let grads = a.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        assert!(grads.get(w.trainable()["a.weight"].as_tensor()).is_some());
        assert!(!vb.get(3, "frozen.weight").unwrap().track_op());
    }
}
