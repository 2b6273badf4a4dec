//! CUDA launch glue for `kernels/ms_deform_attn.cu` (compiled to PTX by `build.rs`), f32 only.

use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDevice, WrapErr};
use candle_core::backend::BackendStorage;
use candle_core::{bail, CudaStorage, Layout, Result};

use super::Geometry;

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/ms_deform_attn.ptx"));
const MODULE: &str = "deris_ms_deform_attn";
const THREADS: u32 = 256;
/// Grid-stride loops cover anything beyond this many blocks.
const MAX_BLOCKS: usize = 1 << 16;

/// The contiguous f32 data of one input, or an error (never guess strides).
fn view<'a>(what: &str, (s, l): (&'a CudaStorage, &Layout)) -> Result<CudaView<'a, f32>> {
    let slice = match s.as_cuda_slice::<f32>() {
        Ok(slice) => slice,
        Err(_) => bail!("ms_deform_attn (cuda): {what} must be f32, got {:?}", s.dtype()),
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(slice.slice(a..b)),
        None => bail!("ms_deform_attn (cuda): {what} is not contiguous (call .contiguous() first)"),
    }
}

/// `(H, W, start)` per level, on the device.
fn levels(dev: &CudaDevice, g: &Geometry) -> Result<CudaSlice<i32>> {
    let mut v = Vec::with_capacity(3 * g.l());
    for lv in &g.levels {
        v.extend([int(lv.h)?, int(lv.w)?, int(lv.start)?]);
    }
    dev.clone_htod(&v)
}

fn int(n: usize) -> Result<i32> {
    match i32::try_from(n) {
        Ok(v) => Ok(v),
        Err(_) => bail!("ms_deform_attn (cuda): size {n} does not fit the kernel's 32-bit sizes"),
    }
}

/// `(B, S, M, Dh, Lq, L, P)` as kernel arguments.
fn sizes(g: &Geometry) -> Result<[i32; 7]> {
    Ok([int(g.b)?, int(g.s)?, int(g.m)?, int(g.dh)?, int(g.lq)?, int(g.l())?, int(g.p)?])
}

fn config(threads_needed: usize) -> LaunchConfig {
    let blocks = threads_needed.div_ceil(THREADS as usize).clamp(1, MAX_BLOCKS) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
}

/// Launches `name(a, b, c, levels, out, B, S, M, Dh, Lq, L, P)` over `threads` threads.
fn launch(
    dev: &CudaDevice,
    name: &str,
    inputs: [&CudaView<'_, f32>; 3],
    out: &mut CudaSlice<f32>,
    g: &Geometry,
    threads: usize,
) -> Result<()> {
    if threads == 0 {
        return Ok(());
    }
    let lv = levels(dev, g)?;
    let dims = sizes(g)?;
    let func = dev.get_or_load_custom_func(name, MODULE, PTX)?;
    let mut builder = func.builder();
    for x in inputs {
        builder.arg(x);
    }
    builder.arg(&lv);
    builder.arg(out);
    for d in &dims {
        builder.arg(d);
    }
    // SAFETY: the kernel reads exactly the contiguous extents checked above and writes `out`,
    // whose length is the op's output size.
    unsafe { builder.launch(config(threads)) }.w()?;
    Ok(())
}

pub(super) fn forward(
    g: &Geometry,
    value: (&CudaStorage, &Layout),
    loc: (&CudaStorage, &Layout),
    attn: (&CudaStorage, &Layout),
) -> Result<CudaStorage> {
    let dev = value.0.device.clone();
    let (v, l, a) = (view("value", value)?, view("sampling_locations", loc)?, view("attention_weights", attn)?);
    let n = g.b * g.lq * g.m * g.dh;
    let mut out = dev.alloc_zeros::<f32>(n)?;
    launch(&dev, "ms_deform_attn_fwd_f32", [&v, &l, &a], &mut out, g, n)?;
    Ok(CudaStorage::wrap_cuda_slice(out, dev))
}

pub(super) fn grad_value(
    g: &Geometry,
    loc: (&CudaStorage, &Layout),
    attn: (&CudaStorage, &Layout),
    grad: (&CudaStorage, &Layout),
) -> Result<CudaStorage> {
    let dev = loc.0.device.clone();
    let (l, a, gr) = (view("sampling_locations", loc)?, view("attention_weights", attn)?, view("grad_output", grad)?);
    let mut out = dev.alloc_zeros::<f32>(g.b * g.s * g.m * g.dh)?;
    launch(&dev, "ms_deform_attn_grad_value_f32", [&l, &a, &gr], &mut out, g, g.b * g.lq * g.m * g.dh)?;
    Ok(CudaStorage::wrap_cuda_slice(out, dev))
}

pub(super) fn grad_sampling(
    g: &Geometry,
    value: (&CudaStorage, &Layout),
    loc: (&CudaStorage, &Layout),
    grad: (&CudaStorage, &Layout),
) -> Result<CudaStorage> {
    let dev = value.0.device.clone();
    let (v, l, gr) = (view("value", value)?, view("sampling_locations", loc)?, view("grad_output", grad)?);
    let points = g.b * g.lq * g.m * g.l() * g.p;
    let mut out = dev.alloc_zeros::<f32>(points * 3)?;
    // one warp per sampling point
    launch(&dev, "ms_deform_attn_grad_sampling_f32", [&v, &l, &gr], &mut out, g, points * 32)?;
    Ok(CudaStorage::wrap_cuda_slice(out, dev))
}
