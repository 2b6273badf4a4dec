//! Training and fine-tuning (TRAIN-EVAL-SPEC §4–§6): trainable weights and parameter groups
//! ([`params`]), the DeRIS objective ([`matcher`], [`points`], [`loss`]), Adam with AMSGrad,
//! clipping and the epoch schedule ([`optim`], [`schedule`]), checkpoints that resume exactly
//! ([`state`]), batches with NSC ([`data`]), and the loop ([`trainer`]) that `deris train`
//! runs from a [`config`] file, drawing its [`curve`]; training-only [`heads`] (categories of
//! objects, ids of words) for a model learned from scratch.

pub mod config;
pub mod curve;
pub mod data;
pub mod heads;
pub mod loss;
pub mod matcher;
pub mod optim;
pub mod params;
pub mod points;
pub mod schedule;
pub mod state;
pub mod trainer;

pub use config::TrainConfig;
pub use trainer::{Event, StepRecord, StepTiming, TrainSummary, Trainer};
