//! Custom tensor ops for deris, each a fast candle `CustomOp` with a slow twin built from
//! primitive candle ops (the oracle for forward and gradient tests).
//!
//! - [`ms_deform_attn`] / [`ms_deform_attn_reference`]: multi-scale deformable attention
//!   (Deformable DETR's `MSDeformAttnFunction`), forward and backward. The CPU path is
//!   multithreaded with rayon; with the `cuda` feature the op also runs CUDA kernels
//!   (`kernels/ms_deform_attn.cu`, compiled to PTX by `build.rs`). `kernels/check_cuda.py` checks
//!   those kernels on a GPU against PyTorch's `grid_sample` and autograd without building Rust;
//!   `tests/cuda.rs` compares the CUDA op with the CPU op when built with the feature.
//! - [`fused`]: the transformer layers' CPU kernels: [`fused::layer_norm`], [`fused::linear`]
//!   (bias, exact GELU and residual fused into the matrix product), [`fused::gelu_erf`] and
//!   [`fused::attention`] (softmax with additive biases, heads read in place), each next to its
//!   `_reference`. They run only where no gradient is needed and fall back to the reference
//!   otherwise.
//!
//! Features: `cuda` (CUDA kernels; needs `nvcc` at build time); `x86-v4` (AVX-512 matrix
//! microkernels in `gemm`: worth it on Intel Xeon, a loss on AMD Zen 4). Features change speed,
//! never results beyond float rounding.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used, clippy::todo, clippy::panic))]

pub mod fused;
pub mod ms_deform_attn;

pub use ms_deform_attn::{ms_deform_attn, ms_deform_attn_reference};
