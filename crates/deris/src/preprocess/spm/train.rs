//! Making a small sentencepiece unigram model from a corpus: the tokenizer of a model trained
//! from scratch on a closed vocabulary (e.g. `deris synth` sentences).
//!
//! The model is word-level: every word seen at least `min_count` times becomes the piece
//! `▁word` scored by its log relative frequency, and every character seen becomes a piece (alone
//! and after `▁`) scored below the rarest word, so unseen words still encode, character by
//! character, and a word in the vocabulary is always one piece. The normaliser is the identity
//! (no charsmap) with sentencepiece's whitespace rules. The output is a standard `ModelProto`
//! that sentencepiece itself loads.

use std::collections::{BTreeMap, BTreeSet};

/// Pieces 0..3 of every model: the unknown piece and the two control pieces, as in XLM-R's
/// model (so the fairseq id mapping of [`crate::preprocess::text::Tokenizer`] applies).
const SPECIAL: [(&str, u64); 3] = [("<unk>", 2), ("<s>", 3), ("</s>", 3)];
/// `▁`, sentencepiece's visible space.
const SPACE: char = '\u{2581}';
/// How far below the rarest word a character piece scores.
const CHAR_PENALTY: f32 = 5.0;

/// Options of [`train_word_unigram`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WordUnigramOptions {
    /// A word needs this many occurrences to become a piece.
    pub min_count: usize,
    /// At most this many word pieces (the most frequent).
    pub max_words: usize,
}

impl Default for WordUnigramOptions {
    fn default() -> Self {
        Self { min_count: 1, max_words: 8000 }
    }
}

/// Builds the serialized `ModelProto` of a word-level unigram model of `sentences` (already
/// cleaned; words are separated by whitespace). Deterministic: the same corpus gives the same
/// bytes.
pub fn train_word_unigram<S: AsRef<str>>(sentences: &[S], opts: WordUnigramOptions) -> Vec<u8> {
    let mut words: BTreeMap<&str, usize> = BTreeMap::new();
    let mut chars: BTreeSet<char> = BTreeSet::new();
    for s in sentences {
        for w in s.as_ref().split_whitespace() {
            *words.entry(w).or_default() += 1;
            chars.extend(w.chars());
        }
    }
    let mut kept: Vec<(&str, usize)> = words.into_iter().filter(|&(_, c)| c >= opts.min_count.max(1)).collect();
    kept.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    kept.truncate(opts.max_words);
    let total: usize = kept.iter().map(|&(_, c)| c).sum::<usize>().max(1);

    let mut pieces: Vec<(String, f32, u64)> = SPECIAL.iter().map(|&(p, t)| (p.to_string(), 0.0, t)).collect();
    let mut min_score = 0f32;
    for &(w, c) in &kept {
        let score = (c as f64 / total as f64).ln() as f32;
        min_score = min_score.min(score);
        pieces.push((format!("{SPACE}{w}"), score, 1));
    }
    let char_score = min_score - CHAR_PENALTY;
    let mut seen: BTreeSet<String> = pieces.iter().map(|p| p.0.clone()).collect();
    for piece in std::iter::once(SPACE.to_string()).chain(chars.iter().flat_map(|&c| [c.to_string(), format!("{SPACE}{c}")])) {
        if seen.insert(piece.clone()) {
            pieces.push((piece, char_score, 1));
        }
    }

    let mut out = Vec::new();
    for (piece, score, kind) in &pieces {
        let mut m = Vec::new();
        bytes_field(&mut m, 1, piece.as_bytes());
        key(&mut m, 2, 5);
        m.extend_from_slice(&score.to_bits().to_le_bytes());
        varint_field(&mut m, 3, *kind);
        bytes_field(&mut out, 1, &m);
    }
    let mut trainer = Vec::new();
    varint_field(&mut trainer, 3, 1); // model_type: UNIGRAM
    varint_field(&mut trainer, 4, pieces.len() as u64); // vocab_size
    bytes_field(&mut out, 2, &trainer);
    let mut normalizer = Vec::new();
    bytes_field(&mut normalizer, 1, b"identity");
    varint_field(&mut normalizer, 3, 1); // add_dummy_prefix
    varint_field(&mut normalizer, 4, 1); // remove_extra_whitespaces
    varint_field(&mut normalizer, 5, 1); // escape_whitespaces
    bytes_field(&mut out, 3, &normalizer);
    out
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A field key: number and wire type (0 varint, 2 length-delimited, 5 fixed32).
fn key(out: &mut Vec<u8>, number: u64, wire: u64) {
    varint(out, (number << 3) | wire);
}

fn varint_field(out: &mut Vec<u8>, number: u64, v: u64) {
    key(out, number, 0);
    varint(out, v);
}

fn bytes_field(out: &mut Vec<u8>, number: u64, bytes: &[u8]) {
    key(out, number, 2);
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

#[cfg(test)]
mod tests {
    use super::super::SentencePiece;
    use super::*;

    #[test]
    fn words_are_single_pieces_and_unseen_words_spell_out() {
        let corpus = ["the red circle", "all red squares", "the blue star left of the circle"];
        let bytes = train_word_unigram(&corpus, WordUnigramOptions::default());
        let sp = SentencePiece::from_bytes(&bytes).unwrap();
        assert_eq!(sp.encode("the red  circle"), ["▁the", "▁red", "▁circle"]);
        assert_eq!(sp.encode("the bed"), ["▁the", "▁b", "e", "d"]);
        // a character never seen ('z') is the unknown piece
        assert_eq!(sp.encode("z"), ["▁", "z"]);
        assert_eq!(sp.piece_to_id("z"), 0);
        assert_ne!(sp.piece_to_id("▁q"), 0, "'q' of 'squares' is a character piece");
        assert_eq!(sp.piece_to_id("<s>"), 1);
        assert_eq!(bytes, train_word_unigram(&corpus, WordUnigramOptions::default()));
    }

    #[test]
    fn rare_words_can_be_left_out() {
        let corpus = ["a a a b"];
        let sp = SentencePiece::from_bytes(&train_word_unigram(&corpus, WordUnigramOptions { min_count: 2, max_words: 10 })).unwrap();
        assert_eq!(sp.encode("a b"), ["▁a", "▁b"]); // "▁b" exists as a character piece
        let sp = SentencePiece::from_bytes(&train_word_unigram(&["aa aa bb"], WordUnigramOptions { min_count: 2, max_words: 10 })).unwrap();
        assert_eq!(sp.encode("aa bb"), ["▁aa", "▁b", "b"]);
    }
}
