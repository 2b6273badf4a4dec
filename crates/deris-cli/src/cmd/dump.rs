//! `deris dump`: run the model on the `input.*` tensors of a golden file and write every tensor
//! it computes under the golden names (the parity fixtures' table), for checking against the
//! reference.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};

use deris::checkpoint::{self, Checkpoint};
use deris::config::BatchCoupling;
use deris::model::{Deris, ModelInputs};
use deris::post::{self, PostParams};
use deris::{DerisConfig, Taps};

/// Arguments of `deris dump`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// A built-in model name (deris-b-refcoco, …) or a JSON config file (e.g. configs/tiny-a.json).
    #[arg(long)]
    config: String,
    /// Checkpoint: .pth (flat, nested under state_dict, module.-prefixed) or .safetensors.
    #[arg(long)]
    weights: PathBuf,
    /// Safetensors file holding input.img, input.img_mini, input.ref_expr_inds, input.text_attention_mask.
    #[arg(long)]
    inputs: PathBuf,
    /// Output safetensors file (written atomically).
    #[arg(long)]
    out: PathBuf,
    /// Reproduce the authors' batch-coupled query_SA (outputs depend on batch-mates).
    #[arg(long)]
    reference_batch_coupling: bool,
    /// Override the score threshold of the config.
    #[arg(long)]
    threshold: Option<f64>,
    /// For a batch of several images, do not also write `single<b>.*` (each image run alone).
    #[arg(long)]
    no_singles: bool,
    /// cpu, cuda or cuda:N (CUDA needs a build with the `cuda` feature).
    #[arg(long, default_value = "cpu")]
    device: super::DeviceArg,
}

const INPUTS: [&str; 4] = ["input.img", "input.img_mini", "input.ref_expr_inds", "input.text_attention_mask"];

pub fn run(a: Args) -> Result<()> {
    super::threads::configure(None, None)?;
    let mut cfg = DerisConfig::from_name_or_path(&a.config).with_context(|| format!("loading config '{}'", a.config))?;
    if let Some(t) = a.threshold {
        cfg.runtime.score_threshold = t;
    }
    if a.reference_batch_coupling {
        cfg.runtime.batch_coupling = BatchCoupling::Reference;
    }
    let device = a.device.open()?;
    let inputs = read_inputs(&a.inputs, &device)?;
    let ckpt = Checkpoint::open(&a.weights)?;
    let model = checkpoint::load_strict(&ckpt, DType::F32, &device, &cfg.name, |vb| Deris::new(&cfg, vb))?;
    model.check_inputs(&inputs).with_context(|| format!("checking {}", a.inputs.display()))?;

    let mut out = run_once(&model, &inputs, cfg.runtime.batch_coupling)?;
    let b = inputs.img.dim(0)?;
    if b > 1 && !a.no_singles {
        for i in 0..b {
            let one = ModelInputs {
                img: inputs.img.narrow(0, i, 1)?,
                img_mini: inputs.img_mini.narrow(0, i, 1)?,
                ref_expr_inds: inputs.ref_expr_inds.narrow(0, i, 1)?,
                text_attention_mask: inputs.text_attention_mask.narrow(0, i, 1)?,
            };
            for (k, v) in run_once(&model, &one, BatchCoupling::PerImage)? {
                out.insert(format!("single{i}.{k}"), v);
            }
        }
    }
    for name in INPUTS {
        let t = match name {
            "input.img" => &inputs.img,
            "input.img_mini" => &inputs.img_mini,
            "input.ref_expr_inds" => &inputs.ref_expr_inds,
            _ => &inputs.text_attention_mask,
        };
        out.insert(name.to_string(), t.to_device(&Device::Cpu)?);
    }
    let n = out.len();
    checkpoint::save_safetensors(&out, &a.out).with_context(|| format!("writing {}", a.out.display()))?;
    eprintln!("wrote {n} tensors to {}", a.out.display());
    Ok(())
}

/// One forward + post-processing with taps on: every named intermediate.
fn run_once(model: &Deris, x: &ModelInputs, coupling: BatchCoupling) -> Result<BTreeMap<String, Tensor>> {
    let mut taps = Taps::on();
    let y = model.forward(x, coupling, &mut taps)?;
    let params = PostParams::from(&model.config().runtime);
    post::get_predictions_parts(&y.pred_refer_logits, &y.pred_boxes, &y.pred_masks, &y.pred_existence, &params, &mut taps)?;
    // Everything the golden table lists that is produced above, as contiguous CPU copies so the
    // writer never sees strided views or device memory.
    taps.into_map()
        .into_iter()
        .map(|(k, v)| Ok((k, v.to_device(&Device::Cpu)?.contiguous()?)))
        .collect()
}

/// Reads and type-checks the four input tensors.
fn read_inputs(path: &std::path::Path, device: &Device) -> Result<ModelInputs> {
    let file = Checkpoint::open(path).with_context(|| format!("reading inputs {}", path.display()))?;
    let get = |name: &str, dtype: DType| -> Result<Tensor> {
        let t = file
            .get(name, device)
            .with_context(|| format!("{}: no tensor '{name}' (need {})", path.display(), INPUTS.join(", ")))?;
        let ok = match dtype {
            DType::F32 => t.dtype().is_float(),
            _ => t.dtype().is_int() || t.dtype() == DType::U8,
        };
        if !ok {
            bail!("{}: tensor '{name}' has dtype {:?}, expected {:?}", path.display(), t.dtype(), dtype);
        }
        Ok(t.to_dtype(dtype)?)
    };
    Ok(ModelInputs {
        img: get("input.img", DType::F32)?,
        img_mini: get("input.img_mini", DType::F32)?,
        ref_expr_inds: get("input.ref_expr_inds", DType::I64)?,
        text_attention_mask: get("input.text_attention_mask", DType::I64)?,
    })
}
