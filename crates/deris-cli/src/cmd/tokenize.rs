//! `deris tokenize`: JSON lines `{"text": "..."}` on stdin, one JSON line per input line on stdout:
//! `{"ids": [...], "attention_mask": [...]}` (DeRIS' model input, mask 1 = padding) or
//! `{"error": "..."}`. A bad line never stops the others; an unreadable model file is fatal.

use std::io::{BufRead, BufWriter, Write};
use std::path::PathBuf;

use anyhow::Context;
use deris::preprocess::text::Tokenizer;
use serde::Deserialize;

/// Arguments of `deris tokenize`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The sentencepiece model file (BEiT-3's `beit3.spm`).
    #[arg(long, value_name = "FILE")]
    spm: PathBuf,
    /// Sequence length L of every output: BOS, at most L-2 tokens, EOS, then padding.
    /// 20 for the RefCOCO configs, 50 for gRefCOCO.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(3..))]
    max_token: u32,
}

/// One input line.
#[derive(Deserialize)]
struct Input {
    text: String,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let tokenizer = Tokenizer::from_file(&args.spm).context("loading the sentencepiece model")?;
    let max_token = args.max_token as usize;
    let mut out = BufWriter::new(std::io::stdout().lock());
    let (mut lines, mut failed) = (0usize, 0usize);
    for (n, line) in std::io::stdin().lock().split(b'\n').enumerate() {
        let line = line.context("reading stdin")?;
        let reply = match tokenize_line(&tokenizer, &line, max_token) {
            Ok(json) => json,
            Err(message) => {
                failed += 1;
                serde_json::json!({ "error": format!("line {}: {message}", n + 1) }).to_string()
            }
        };
        lines += 1;
        if let Err(e) = writeln!(out, "{reply}") {
            return ignore_broken_pipe(e);
        }
    }
    if let Err(e) = out.flush() {
        return ignore_broken_pipe(e);
    }
    if failed > 0 {
        tracing::warn!("{failed} of {lines} lines could not be tokenized; their output lines hold the error");
    }
    Ok(())
}

/// The output JSON for one input line, or the message of its `{"error"}` line.
fn tokenize_line(tokenizer: &Tokenizer, line: &[u8], max_token: usize) -> Result<String, String> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let input: Input =
        serde_json::from_slice(line).map_err(|e| format!("invalid input (want {{\"text\": \"...\"}}): {e}"))?;
    let encoded = tokenizer.encode(&input.text, max_token).map_err(|e| e.to_string())?;
    serde_json::to_string(&encoded).map_err(|e| e.to_string())
}

/// A closed stdout (`deris tokenize ... | head`) ends the run normally.
fn ignore_broken_pipe(e: std::io::Error) -> anyhow::Result<()> {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        Ok(())
    } else {
        Err(e).context("writing stdout")
    }
}
