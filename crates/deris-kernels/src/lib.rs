//! Custom tensor ops for deris, each a fast candle `CustomOp` with a slow twin built from
//! primitive candle ops (the oracle for forward and gradient tests).
//!
//! - [`ms_deform_attn`](fn@ms_deform_attn) / [`ms_deform_attn_reference`]: multi-scale
//!   deformable attention (Deformable DETR's `MSDeformAttnFunction`), forward and backward. The
//!   CPU path is multithreaded with rayon; with the `cuda` feature the op also runs CUDA kernels
//!   (`kernels/ms_deform_attn.cu`, compiled to PTX by `build.rs`). `kernels/check_cuda.py` checks
//!   those kernels on a GPU against PyTorch's `grid_sample` and autograd without building Rust;
//!   `tests/cuda.rs` compares the CUDA op with the CPU op when built with the feature.
//!   [`ms_deform_attn::sampling_inputs`] derives the op's locations and softmaxed weights from
//!   the module's projections in one pass.
//! - [`fused`]: the transformer layers' CPU kernels: [`fused::layer_norm`], [`fused::linear`]
//!   (bias, exact GELU and residual fused into the matrix product), [`fused::gelu_erf`] and
//!   [`fused::attention`] (softmax with additive biases, heads read in place), each next to its
//!   `_reference`. They run only where no gradient is needed; on the CPU with gradients they
//!   use the ops of `autograd` (hand-written backward), elsewhere the reference.
//! - [`post_norm`](mod@post_norm): the post-norm sublayers `LayerNorm(residual + linear(x))` and
//!   `LayerNorm(x + FFN(x))` (ReLU) by blocks of rows, each block on one thread.
//! - [`conv2d`](fn@conv2d): stride-1 convolution with its bias as GEMMs on the NCHW layout (1×1:
//!   one product; 3×3: Winograd `F(2×2, 3×3)`; other kernels: one product per tap), no im2col.
//! - [`group_norm`](fn@group_norm): `nn.GroupNorm` (+ ReLU) in two passes per group.
//! - [`resize_bilinear`](fn@resize_bilinear): `F.interpolate(mode="bilinear")` as a direct
//!   separable kernel.
//! - [`bf16`]: products with bf16 operands and f32 sums (AVX512-BF16), which [`fused::linear`]
//!   uses when the process-wide [`Precision`] is `Bf16` ([`set_precision`]; f32 by default), and
//!   [`fused::linear_bf16`] always, on a weight packed to bf16 once ([`fused::pack_weight`]).
//!
//! The last four take their fast path for f32/f64 CPU tensors that track no gradient. When an
//! input tracks a gradient on the CPU (training), linear, layer_norm, attention, conv2d's bias,
//! group_norm and resize use ops with a hand-written backward (`autograd`, `GroupNormOp`,
//! `Resize`); on other devices they run their `_reference` twin, built from candle's primitive
//! ops, which has candle's gradients. Their hand-written loops are
//! compiled for AVX2+FMA and picked at run time when the CPU has them (the same arithmetic,
//! wider registers); the products are the `gemm` crate's.
//!
//! Features: `cuda` (CUDA kernels; needs `nvcc` at build time); `x86-v4` (AVX-512 matrix
//! microkernels in `gemm`: worth it on Intel Xeon, a loss on AMD Zen 4). Features change speed,
//! never results beyond float rounding.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used, clippy::todo, clippy::panic))]

mod autograd;
pub mod bf16;
pub mod conv2d;
mod cpu_gemm;
pub mod fused;
pub mod group_norm;
pub mod ms_deform_attn;
pub mod post_norm;
pub mod precision;
pub mod resize;
mod simd;
mod storage;

pub use conv2d::{conv2d, conv2d_reference};
pub use group_norm::{group_norm, group_norm_reference};
pub use ms_deform_attn::{ms_deform_attn, ms_deform_attn_reference};
pub use precision::{precision, set_precision, Precision};
pub use resize::{resize_bilinear, resize_bilinear_reference};
