//! `deris prepare`: decode an image and build the two model image inputs exactly as the authors'
//! test pipeline does (OpenCV resize, mmcv normalisation); print a summary, optionally save them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use candle_core::{Device, Tensor};
use deris::preprocess::image::{load_image, preprocess, stack_batch};

/// Arguments.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The image (JPEG or PNG).
    #[arg(long)]
    image: PathBuf,
    /// Side of the Swin input `img` (the config's `hier_img_size`).
    #[arg(long, default_value_t = 384)]
    size: usize,
    /// Side of the BEiT-3 input `img_mini` (the config's `img_mini_size`).
    #[arg(long, default_value_t = 224)]
    mini_size: usize,
    /// Write `input.img` [1,3,S,S] and `input.img_mini` [1,3,s,s] to this safetensors file.
    #[arg(long)]
    out: Option<PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let image = load_image(&args.image)?;
    let pre = preprocess(&image, args.size, args.mini_size, &Device::Cpu)
        .with_context(|| format!("preprocessing {}", args.image.display()))?;
    let (img, img_mini) = stack_batch(std::slice::from_ref(&pre))?; // [1, 3, S, S], [1, 3, s, s]

    println!("image     {}: {}x{} (h x w)", args.image.display(), pre.orig_h, pre.orig_w);
    for (name, t) in [("img", &img), ("img_mini", &img_mini)] {
        let side = t.dim(3)? as f64;
        let mean = t.mean_keepdim(3)?.mean_keepdim(2)?.flatten_all()?.to_vec1::<f32>()?; // [3]
        println!(
            "{name:9} {:?}  scale x {:.6} y {:.6}  mean R {:+.6} G {:+.6} B {:+.6}",
            t.dims(),
            side / pre.orig_w as f64,
            side / pre.orig_h as f64,
            mean[0],
            mean[1],
            mean[2]
        );
    }
    if let Some(out) = &args.out {
        write_atomically(out, &[("input.img", img), ("input.img_mini", img_mini)])
            .with_context(|| format!("writing {}", out.display()))?;
        println!("wrote     {}", out.display());
    }
    Ok(())
}

/// Saves tensors to a temporary file beside `out`, then renames it: never a partial `out`.
fn write_atomically(out: &Path, tensors: &[(&str, Tensor)]) -> anyhow::Result<()> {
    let file_name = out.file_name().with_context(|| "the output path has no file name")?;
    let tmp = out.with_file_name(format!(".{}.tmp-{}", file_name.to_string_lossy(), std::process::id()));
    let map: HashMap<String, Tensor> = tensors.iter().map(|(k, t)| (k.to_string(), t.clone())).collect();
    let written = candle_core::safetensors::save(&map, &tmp).map_err(anyhow::Error::from).and_then(|()| Ok(std::fs::rename(&tmp, out)?));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}
