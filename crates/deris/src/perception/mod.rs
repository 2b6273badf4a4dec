//! Perception branch (`perception_branch.*`): Swin backbone and the deformable pixel decoder.

pub mod msdeform;
pub mod pixel_decoder;
pub mod swin;
