//! The one error type of this crate: every way an RLE, a polygon list or a size can be wrong.

/// Errors from building, decoding or combining masks.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CocoError {
    /// A mask size with no pixels, or more pixels than a 32-bit run count can hold.
    #[error("invalid mask size {h}x{w} (both sides must be at least 1 and h*w must fit in 32 bits)")]
    InvalidSize { h: u64, w: u64 },

    /// Run counts that do not add up to `h * w`.
    #[error("RLE counts add up to {sum} pixels, but a {h}x{w} mask has {}", u64::from(*h) * u64::from(*w))]
    CountsSum { h: u32, w: u32, sum: u64 },

    /// A byte of a compressed counts string outside the alphabet `'0'..='o'` (48..=111).
    #[error("RLE string: byte {byte:#04x} at position {pos} is not a valid counts character ('0'..='o')")]
    BadCountsChar { pos: usize, byte: u8 },

    /// A compressed counts string whose last value is unfinished (continuation bit set) or too long.
    #[error("RLE string: value starting at position {pos} is {reason}")]
    BadCountsValue { pos: usize, reason: &'static str },

    /// A decoded run that is negative or does not fit in 32 bits.
    #[error("RLE string: run {index} decodes to {value}, which is not a pixel count")]
    BadRun { index: usize, value: i64 },

    /// A mask buffer whose length is not `h * w`.
    #[error("mask buffer has {len} bytes, expected {h}x{w}")]
    MaskLength { len: usize, h: u32, w: u32 },

    /// Two masks that should have the same size do not.
    #[error("mask sizes disagree: {a_h}x{a_w} vs {b_h}x{b_w}")]
    SizeMismatch { a_h: u32, a_w: u32, b_h: u32, b_w: u32 },

    /// `merge` of no masks (pycocotools returns a 0x0 mask, which nothing downstream accepts).
    #[error("cannot merge an empty list of masks")]
    EmptyMerge,

    /// `frPyObjects` on a list whose first polygon has exactly 4 coordinates: pycocotools reads the
    /// whole list as `[x, y, w, h]` boxes and raises `TypeError`.
    #[error("the first polygon has 4 coordinates; pycocotools frPyObjects takes such a list for [x, y, w, h] boxes and fails (TypeError)")]
    FirstPolygonIsBox,

    /// `frPyObjects` on a list it does not accept (empty, or a first polygon of fewer than 4 coordinates).
    #[error("polygon list not accepted by pycocotools frPyObjects: {reason}")]
    UnsupportedPolygons { reason: String },

    /// A coordinate that is not finite or so large that pycocotools' `int` arithmetic overflows.
    #[error("polygon {polygon}: coordinate {index} = {value} is not a finite pixel position (|5*c| must stay below 2^31)")]
    BadCoordinate { polygon: usize, index: usize, value: f64 },

    /// A polygon whose ×5 boundary walk has more points than we are willing to allocate.
    #[error("polygon {polygon}: its boundary walk has {points} points (limit {limit}); coordinates are far outside any image")]
    PolygonTooLarge { polygon: usize, points: u64, limit: u64 },
}

pub type Result<T, E = CocoError> = std::result::Result<T, E>;
