//! Evaluation as the authors run it (TRAIN-EVAL-SPEC §7).
//!
//! - [`metrics`]: the RIS and GRES accumulators. They take masks as [`deris_coco::Rle`] at the
//!   evaluation resolution (384×384 under the reference protocol: the ground truth rasterised at
//!   the image size, then nearest-resized with [`deris_coco::Rle::resize_nearest`]) plus, for GRES,
//!   the no-target flag and the per-query scores, and report the authors' numbers.
//! - [`records`]: the JSON-lines record of one sample, written by `deris eval --save-predictions`
//!   and read by `deris metrics`.
//! - [`diagnosis`]: with every object of the images, how much of the shortfall is the queries'
//!   masks and how much their selection (`deris eval --objects`; not the authors' protocol).
//! - [`protocol`]: a whole split through a [`crate::Segmenter`] (`deris eval`), under the
//!   reference (384²) or the original-resolution protocol.
//!
//! A split evaluation (`deris eval`) is a loop on top: read the split with [`crate::data`] (one
//! sample per sentence), build each sample's ground truth with [`crate::data::Sample::gt_mask`],
//! run the model, and feed the union mask of the queries above the threshold to
//! [`RisMetrics::add_masks`] or [`GresMetrics::add_masks`] in split order; `report().summary()`
//! gives the JSON that `deris metrics` prints.

pub mod diagnosis;
pub mod metrics;
pub mod protocol;
pub mod records;

pub use diagnosis::{Diagnosis, DiagnosisReport, DiagnosisSample};
pub use metrics::{GresMetrics, GresReport, GresSample, GresSummary, NtCase, NtCounts, RisMetrics, RisReport, RisSample, RisSummary};
pub use records::{PredictionRecord, RleJson};
