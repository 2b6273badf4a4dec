//! The CUDA kernels against the CPU kernels, forward and backward (f32). Built only with
//! `--features cuda`; needs a GPU (`cargo test -p deris-kernels --features cuda --test cuda`).
#![cfg(feature = "cuda")]

mod common;

use candle_core::{DType, Device, Result};
use common::{cotangent, grads, inputs, max_abs_diff, Locs, Sizes, NAMES, SHAPES_A};
use deris_kernels::ms_deform_attn;

#[test]
fn cuda_matches_cpu() -> Result<()> {
    let gpu = Device::new_cuda(0)?;
    let real = &[(12, 12), (24, 24), (48, 48)];
    let cases = [
        (Sizes { b: 2, shapes: SHAPES_A, m: 3, dh: 5, lq: 7, p: 3 }, Locs::Borders),
        (Sizes { b: 2, shapes: &[(4, 6), (2, 3)], m: 2, dh: 40, lq: 33, p: 2 }, Locs::Random),
        (Sizes { b: 2, shapes: real, m: 8, dh: 32, lq: 3024, p: 4 }, Locs::Random),
    ];
    for (i, (sz, locs)) in cases.into_iter().enumerate() {
        let (v, l, a) = inputs(sz, locs, DType::F32, 500 + i as u64)?;
        let r = cotangent(sz, DType::F32, 600 + i as u64)?;
        let on_gpu = |t: &candle_core::Tensor| t.to_device(&gpu);
        let cpu_out = ms_deform_attn(&v, sz.shapes, &l, &a)?;
        let gpu_out = ms_deform_attn(&on_gpu(&v)?, sz.shapes, &on_gpu(&l)?, &on_gpu(&a)?)?.to_device(&Device::Cpu)?;
        let d = max_abs_diff(&gpu_out, &cpu_out)?;
        println!("case {i} forward: max|cuda - cpu| = {d:.3e}");
        assert!(d < 1e-5, "case {i}: forward differs by {d:e}");
        let cpu_g = grads(ms_deform_attn, sz.shapes, (&v, &l, &a), &r)?;
        let gpu_g = grads(ms_deform_attn, sz.shapes, (&on_gpu(&v)?, &on_gpu(&l)?, &on_gpu(&a)?), &on_gpu(&r)?)?;
        for k in 0..3 {
            let d = max_abs_diff(&gpu_g[k].to_device(&Device::Cpu)?, &cpu_g[k])?;
            println!("case {i} d/d{}: max|cuda - cpu| = {d:.3e}", NAMES[k]);
            assert!(d < 1e-4, "case {i}: gradient for {} differs by {d:e}", NAMES[k]);
        }
    }
    Ok(())
}
