//! # deris
//!
//! DeRIS (ICCV 2025) referring image segmentation in Rust, on candle. It loads the authors'
//! released checkpoints (`.pth` or `.safetensors`) and reproduces their outputs.
//!
//! The layout follows the paper's figure:
//! - [`cognition`]: BEiT-3 and the multi-grain aligner (`understanding_branch.*`);
//! - [`perception`]: Swin, the deformable pixel decoder (`perception_branch.*`);
//! - [`loopback`]: the loopback decoder (`perception_branch.predictor.*`);
//! - [`post`]: scores, masks, the no-target decision;
//! - [`preprocess`]: OpenCV-exact image resizing and the BEiT-3 tokenizer;
//! - [`checkpoint`]: the one place that maps checkpoint files and keys to modules;
//! - [`pipeline`]: [`Segmenter`], image + sentence in, [`Prediction`] ([`output`]) out;
//! - [`viz`]: the overlay picture of a prediction (draws, never runs a model).
//!
//! Features: `cuda` (CUDA device and kernels), `mkl` (Intel MKL matmuls). Features change speed,
//! never results.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used, clippy::todo, clippy::panic))]

pub mod checkpoint;
pub mod cognition;
pub mod config;
pub mod data;
pub mod embedded;
pub mod error;
pub mod eval;
pub mod loopback;
pub mod model;
pub mod nn;
pub mod output;
pub mod perception;
pub mod pipeline;
pub mod post;
pub mod preprocess;
pub mod taps;
pub mod train;
pub mod viz;

pub use config::{set_precision, BatchCoupling, DerisConfig, Preset};
pub use deris_kernels::Precision;
pub use model::{Deris, DerisOutput, ModelInputs};
pub use output::Prediction;
pub use pipeline::{Segmenter, Weights};
pub use error::{Error, Result};
pub use taps::Taps;
