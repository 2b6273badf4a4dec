//! The library's error type: everything a user can get wrong, with the input that caused it.

use std::path::PathBuf;

/// Errors from loading, preprocessing and running DeRIS.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written. (`err` is not a `source`: the message already
    /// says it, and error chains would print it twice.)
    #[error("{}: {err}", path.display())]
    Io { path: PathBuf, err: std::io::Error },

    /// A checkpoint file is unreadable, or does not match the model (strict loading).
    #[error("checkpoint {}: {reason}", path.display())]
    Checkpoint { path: PathBuf, reason: String },

    /// A checkpoint's keys do not match the model built from the config.
    #[error("checkpoint {} does not match the model '{model}':{}", path.display(), mismatch_report(missing, unexpected, mismatched))]
    KeyMismatch {
        path: PathBuf,
        model: String,
        /// Keys the model needs that the file lacks.
        missing: Vec<String>,
        /// Keys in the file that the model does not use.
        unexpected: Vec<String>,
        /// `name: file shape vs model shape`.
        mismatched: Vec<String>,
    },

    /// An image could not be decoded.
    #[error("image {}: {reason}", path.display())]
    Image { path: PathBuf, reason: String },

    /// A sentence cannot be tokenized.
    #[error("text: {reason}")]
    Text { reason: String },

    /// A sentencepiece model file is invalid.
    #[error("tokenizer {}: {reason}", path.display())]
    Tokenizer { path: PathBuf, reason: String },

    /// A config field is invalid.
    #[error("config field '{field}': {reason}")]
    Config { field: String, reason: String },

    /// Model inputs of the wrong shape, dtype or size.
    #[error("input '{name}': {reason}")]
    Input { name: String, reason: String },

    /// Training stopped: a non-finite loss or gradient, or data that cannot be used.
    #[error("training, step {step}: {reason}")]
    Training { step: u64, reason: String },

    /// An error inside the tensor engine.
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

fn mismatch_report(missing: &[String], unexpected: &[String], mismatched: &[String]) -> String {
    let mut s = String::new();
    for (what, list) in [("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)] {
        if list.is_empty() {
            continue;
        }
        s.push_str(&format!("\n  {} {what} key(s):", list.len()));
        for k in list.iter().take(20) {
            s.push_str(&format!("\n    {k}"));
        }
        if list.len() > 20 {
            s.push_str(&format!("\n    … and {} more", list.len() - 20));
        }
    }
    s
}
