//! One module per subcommand: its clap `Args` and its `run`.

pub mod bench;
pub mod convert;
pub mod dump;
pub mod metrics;
pub mod prepare;
pub mod segment;
pub mod synth;
pub mod tokenize;
