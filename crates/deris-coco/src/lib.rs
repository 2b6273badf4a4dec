//! # deris-coco
//!
//! COCO masks exactly as pycocotools 2.0.x computes them (its `maskApi.c` and `_mask.pyx`), in pure
//! Rust with no tensor dependency. This is what DeRIS uses to turn annotations into ground truth
//! and to score predictions:
//!
//! - [`Rle`]: a run-length encoded binary mask (`h`×`w`, runs counted down the columns, the first run
//!   counting zeros); [`Rle::from_rowmajor`]/[`Rle::from_colmajor`] (`encode`),
//!   [`Rle::to_rowmajor`]/[`Rle::to_colmajor`] (`decode`), [`Rle::merge`] (union), [`Rle::area`],
//!   [`Rle::to_bbox`], [`Rle::intersection_union`] and [`Rle::iou`];
//! - the compressed `counts` string of COCO JSON files: [`Rle::to_counts_string`] and
//!   [`Rle::from_counts_string`] (`rleToString` / `rleFrString`);
//! - polygon rasterisation: [`fr_poly`] (`rleFrPoly`, bit-exact: ×5 upsampling, edge walk, sampling)
//!   and [`fr_polygons`] (`frPyObjects` on a list of polygons, quirks included);
//! - [`Rle::resize_nearest`]: OpenCV 4.10 `INTER_NEAREST`, which DeRIS applies to the ground truth
//!   to bring it to the model resolution, with its index rule [`nearest_index`].
//!
//! Nothing here panics on bad input: malformed strings, sizes that disagree, coordinates that are
//! not numbers or lists pycocotools rejects all return a [`CocoError`].
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used, clippy::todo, clippy::panic))]

mod codec;
mod error;
mod poly;
mod resize;
mod rle;

pub use error::{CocoError, Result};
pub use poly::{fr_poly, fr_polygons};
pub use resize::nearest_index;
pub use rle::Rle;
