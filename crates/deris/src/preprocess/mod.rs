//! Turning user inputs into model inputs exactly as the authors' pipeline does.

pub mod image;
pub mod resize;
pub mod text;
