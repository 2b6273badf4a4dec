//! Turning user inputs into model inputs exactly as the authors' pipeline does.

pub mod image;
pub mod resize;
mod spm;
pub mod text;
