//! Custom tensor ops for deris, each a fast candle `CustomOp` with a slow twin built from
//! primitive candle ops (the oracle for forward and gradient tests).
//!
//! - [`ms_deform_attn`] / [`ms_deform_attn_reference`]: multi-scale deformable attention
//!   (Deformable DETR's `MSDeformAttnFunction`), forward and backward. The CPU path is
//!   multithreaded with rayon; with the `cuda` feature the op also runs CUDA kernels
//!   (`kernels/ms_deform_attn.cu`, compiled to PTX by `build.rs`). `kernels/check_cuda.py` checks
//!   those kernels on a GPU against PyTorch's `grid_sample` and autograd without building Rust;
//!   `tests/cuda.rs` compares the CUDA op with the CPU op when built with the feature.
//!
//! Features: `cuda` (CUDA kernels; needs `nvcc` at build time). Features change speed, never
//! results beyond float rounding.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used, clippy::todo, clippy::panic))]

pub mod conv2d;
mod cpu_gemm;
pub mod group_norm;
pub mod linear;
pub mod ms_deform_attn;
pub mod post_norm;
pub mod resize;
mod simd;

pub use conv2d::{conv2d, conv2d_reference};
pub use group_norm::{group_norm, group_norm_reference};
pub use linear::{linear, linear_reference};
pub use ms_deform_attn::{ms_deform_attn, ms_deform_attn_reference};
pub use resize::{resize_bilinear, resize_bilinear_reference};
