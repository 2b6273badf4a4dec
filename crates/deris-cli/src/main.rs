//! The `deris` command. `main` only parses, dispatches and reports: every error is printed with
//! its full context chain and the process exits with status 2.

#[cfg(feature = "mkl")]
extern crate intel_mkl_src;

mod cmd;

use clap::{Parser, Subcommand};

/// DeRIS referring image segmentation.
#[derive(Parser, Debug)]
#[command(name = "deris", version, about)]
struct Cli {
    /// More logging (-v info, -vv debug); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Segment the object a sentence refers to: mask.png, overlay.png and result.json per input.
    Segment(cmd::segment::Args),
    /// Tokenize JSON lines `{"text": ...}` from stdin into `{"ids", "attention_mask"}` lines.
    Tokenize(cmd::tokenize::Args),
    /// Run the model on the `input.*` tensors of a golden file and write every intermediate.
    Dump(cmd::dump::Args),
    /// Convert a `.pth` checkpoint into a clean `.safetensors` of the model weights.
    Convert(cmd::convert::Args),
    /// Time a full-size model (random weights by default) at the real input sizes.
    Bench(cmd::bench::Args),
    /// Preprocess an image into the model's two input tensors and describe them.
    Prepare(cmd::prepare::Args),
    /// Compute the authors' RIS or GRES metrics from a JSON-lines file of predictions.
    Metrics(cmd::metrics::Args),
    /// Evaluate a model on a dataset split with the authors' protocol and metrics.
    Eval(cmd::eval::Args),
    /// Write a synthetic GRES dataset (shapes, referring expressions) in the DeRIS gRefCOCO layout.
    Synth(cmd::synth::Args),
    /// Segment sentences about a fresh synthetic scene with the embedded model; write overlays.
    Demo(cmd::demo::Args),
    /// Train or fine-tune DeRIS from a training config (progress, log, checkpoints, curve).
    Train(cmd::train::Args),
}

fn main() {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    let result = match cli.command {
        Command::Segment(a) => cmd::segment::run(a),
        Command::Tokenize(a) => cmd::tokenize::run(a),
        Command::Dump(a) => cmd::dump::run(a),
        Command::Convert(a) => cmd::convert::run(a),
        Command::Bench(a) => cmd::bench::run(a),
        Command::Prepare(a) => cmd::prepare::run(a),
        Command::Metrics(a) => cmd::metrics::run(a),
        Command::Eval(a) => cmd::eval::run(a),
        Command::Synth(a) => cmd::synth::run(a),
        Command::Train(a) => cmd::train::run(a),
        Command::Demo(a) => cmd::demo::run(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(2);
    }
}

fn init_logging(verbose: u8) {
    use tracing_subscriber::EnvFilter;
    let level = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}
