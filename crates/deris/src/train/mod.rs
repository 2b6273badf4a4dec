//! Training and fine-tuning (TRAIN-EVAL-SPEC §4–§6): trainable weights and parameter groups
//! ([`params`]), the DeRIS objective ([`matcher`], [`points`], [`loss`]), Adam with AMSGrad,
//! clipping and the epoch schedule ([`optim`], [`schedule`]), checkpoints that resume exactly
//! ([`state`]).

pub mod loss;
pub mod matcher;
pub mod optim;
pub mod params;
pub mod points;
pub mod schedule;
pub mod state;
