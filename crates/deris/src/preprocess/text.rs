//! DeRIS text preprocessing: `clean_string` and `_load_expression_tokenize_beit3`
//! (`deris/datasets/pipelines/loading.py`) with the BEiT-3 tokenizer, i.e. transformers 4.44's slow
//! `XLMRobertaTokenizer` over a sentencepiece unigram model (`beit3.spm`).
//!
//! The pipeline, pinned down by `fixtures/gold/tokenizer` (README §1):
//! 1. [`clean_string`]: Python `str.lower()`, delete `.,'!?"()*#:;`, `-` and `/` become spaces;
//! 2. [`Tokenizer::pieces`]: split on the literal special tokens `<s> <pad> </s> <unk> <mask>`
//!    (`<mask>` also strips the whitespace before it), sentencepiece-encode every other chunk on
//!    its own;
//! 3. [`Tokenizer::tokenize`]: fairseq ids (specials 0..=3, `<mask>` = `len(spm) + 1`, any other
//!    piece `spm_id + 1`, unknown pieces 3);
//! 4. [`Tokenizer::encode`]: at least one id, truncate to `max_token - 2`, add BOS/EOS, pad with
//!    `<pad>`; the mask is a *padding* mask (1 = padding).

use std::path::Path;

use serde::Serialize;

pub use super::spm::train::WordUnigramOptions;
use super::spm::train::train_word_unigram;
use super::spm::SentencePiece;
use crate::error::{Error, Result};

/// `<s>`: the first id of every sequence.
pub const BOS_ID: i64 = 0;
/// `<pad>`: fills the sequence up to `max_token`.
pub const PAD_ID: i64 = 1;
/// `</s>`: closes the sequence.
pub const EOS_ID: i64 = 2;
/// `<unk>`: any piece sentencepiece does not know.
pub const UNK_ID: i64 = 3;

/// The literal strings the slow tokenizer never splits, and whether each strips the whitespace
/// before it (`lstrip`; only `<mask>` does).
const SPECIAL_TOKENS: [(&str, bool); 5] =
    [("<s>", false), ("<pad>", false), ("</s>", false), ("<unk>", false), ("<mask>", true)];

/// The BEiT-3 / XLM-R tokenizer as DeRIS uses it.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    spm: SentencePiece,
}

/// One tokenized sentence, `max_token` long.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Encoded {
    /// `[BOS, ids.., EOS, PAD..]`.
    pub ids: Vec<i64>,
    /// Padding mask (DeRIS' `text_attention_mask`): 0 for BOS, the tokens and EOS, 1 for padding.
    pub attention_mask: Vec<i64>,
}

/// A piece of text between special tokens, or a special token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk<'a> {
    Text(&'a str),
    Special(&'static str),
}

impl Tokenizer {
    /// Loads a sentencepiece unigram model file (`beit3.spm`).
    ///
    /// Errors: [`Error::Io`] if it cannot be read, [`Error::Tokenizer`] if it is not a valid
    /// unigram model (truncated, garbage, BPE, byte fallback, no unknown piece, ...).
    pub fn from_file(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|err| Error::Io { path: path.to_path_buf(), err })?;
        let tok = Self::from_bytes(&bytes, path)?;
        tracing::info!(path = %path.display(), pieces = tok.spm.len(), "loaded sentencepiece model");
        Ok(tok)
    }

    /// Loads a sentencepiece unigram model from memory; `name` only labels errors.
    ///
    /// Errors: [`Error::Tokenizer`] if the bytes are not a valid unigram model.
    pub fn from_bytes(bytes: &[u8], name: &Path) -> Result<Self> {
        let spm = SentencePiece::from_bytes(bytes).map_err(|reason| Error::Tokenizer { path: name.to_path_buf(), reason })?;
        Ok(Self { spm })
    }

    /// Makes a word-level unigram model of `sentences` (cleaned with [`clean_string`] first) for
    /// a model trained from scratch: the tokenizer and its `.spm` file bytes (see
    /// [`super::spm::train`]).
    pub fn train_word_level<S: AsRef<str>>(sentences: &[S], opts: WordUnigramOptions) -> Result<(Self, Vec<u8>)> {
        let cleaned: Vec<String> = sentences.iter().map(|s| clean_string(s.as_ref())).collect();
        let bytes = train_word_unigram(&cleaned, opts);
        let tok = Self::from_bytes(&bytes, Path::new("<trained tokenizer>"))?;
        Ok((tok, bytes))
    }

    /// `XLMRobertaTokenizer.vocab_size`: the sentencepiece pieces, the fairseq offset and `<mask>`.
    pub fn xlmr_vocab_size(&self) -> usize {
        self.spm.len() + 2
    }

    /// Id of `<mask>`: `len(spm) + 1`.
    pub fn mask_id(&self) -> i64 {
        self.spm.len() as i64 + 1
    }

    /// `XLMRobertaTokenizer.tokenize(cleaned)`: the token strings, untruncated. Special-token
    /// literals are tokens of their own; every other chunk gets sentencepiece's own `▁` prefix.
    pub fn pieces(&self, cleaned: &str) -> Vec<String> {
        let mut chunks = split_on_special_tokens(cleaned);
        for i in 1..chunks.len() {
            let lstrip = matches!(chunks[i], Chunk::Special(s) if SPECIAL_TOKENS.contains(&(s, true)));
            if let (true, Chunk::Text(left)) = (lstrip, chunks[i - 1]) {
                chunks[i - 1] = Chunk::Text(left.trim_end_matches(is_python_whitespace));
            }
        }
        let mut pieces = Vec::new();
        for chunk in chunks {
            match chunk {
                Chunk::Special(s) => pieces.push(s.to_owned()),
                Chunk::Text("") => {}
                Chunk::Text(t) => pieces.extend(self.spm.encode(t)),
            }
        }
        pieces
    }

    /// `convert_tokens_to_ids(tokenize(cleaned))`: untruncated ids, no BOS/EOS.
    pub fn tokenize(&self, cleaned: &str) -> Vec<i64> {
        self.pieces(cleaned).iter().map(|p| self.token_to_id(p)).collect()
    }

    /// The id of one token string: the special tokens first, then `spm_id + 1`, with sentencepiece's
    /// unknown id 0 mapped to [`UNK_ID`].
    pub fn token_to_id(&self, token: &str) -> i64 {
        match token {
            "<s>" => BOS_ID,
            "<pad>" => PAD_ID,
            "</s>" => EOS_ID,
            "<unk>" => UNK_ID,
            "<mask>" => self.mask_id(),
            _ => match self.spm.piece_to_id(token) {
                0 => UNK_ID,
                id => id as i64 + 1,
            },
        }
    }

    /// DeRIS' model input for one sentence: clean, tokenize, truncate to `max_token - 2`, add
    /// BOS/EOS, pad to `max_token`.
    ///
    /// Errors: [`Error::Text`] when `max_token < 3` or when no token is left after cleaning (the
    /// authors raise `RuntimeError` there).
    pub fn encode(&self, text: &str, max_token: usize) -> Result<Encoded> {
        if max_token < 3 {
            return Err(Error::Text {
                reason: format!("max_token must be at least 3 (BOS, a token, EOS), got {max_token}"),
            });
        }
        let mut tokens = self.tokenize(&clean_string(text));
        if tokens.is_empty() {
            return Err(Error::Text { reason: "the text contains no tokens after cleaning".into() });
        }
        tokens.truncate(max_token - 2);
        let real = tokens.len() + 2;
        let mut ids = Vec::with_capacity(max_token);
        ids.push(BOS_ID);
        ids.extend(tokens);
        ids.push(EOS_ID);
        ids.resize(max_token, PAD_ID);
        let mut attention_mask = vec![0; real];
        attention_mask.resize(max_token, 1);
        Ok(Encoded { ids, attention_mask })
    }

    /// [`encode`](Self::encode) for a batch: `(ids, attention_mask)`, each flat row-major
    /// `[B, max_token]`. The first failing text fails the batch, naming its index.
    pub fn encode_batch(&self, texts: &[&str], max_token: usize) -> Result<(Vec<i64>, Vec<i64>)> {
        let mut ids = Vec::with_capacity(texts.len() * max_token);
        let mut mask = Vec::with_capacity(texts.len() * max_token);
        for (i, text) in texts.iter().enumerate() {
            let e = self.encode(text, max_token).map_err(|e| match e {
                Error::Text { reason } => Error::Text { reason: format!("text {i} of the batch: {reason}") },
                other => other,
            })?;
            ids.extend(e.ids);
            mask.extend(e.attention_mask);
        }
        Ok((ids, mask))
    }
}

/// DeRIS `clean_string`: Python `str.lower()` (full Unicode lowercasing: `İ` → `i̇`, word-final
/// `Σ` → `ς`), delete `. , ' ! ? " ( ) * # : ;`, then `-` and `/` become spaces. Nothing else
/// changes; whitespace is not collapsed.
///
/// Lowercasing uses Rust's Unicode tables, which are newer than Python 3.11's (Unicode 14): the
/// only differences are the 55 code points that gained a lowercase mapping since (Garay, Latin
/// Extended-D additions, ...), which Python 3.11 leaves unchanged.
pub fn clean_string(text: &str) -> String {
    text.to_lowercase()
        .chars()
        .filter(|c| !matches!(c, '.' | ',' | '\'' | '!' | '?' | '"' | '(' | ')' | '*' | '#' | ':' | ';'))
        .map(|c| if c == '-' || c == '/' { ' ' } else { c })
        .collect()
}

/// transformers' `Trie.split` on the special tokens (none is a prefix of another, so this is a
/// leftmost scan); empty text chunks are dropped, as `cut_text` does.
fn split_on_special_tokens(text: &str) -> Vec<Chunk<'_>> {
    let bytes = text.as_bytes();
    let mut chunks = Vec::new();
    let (mut text_start, mut i) = (0, 0);
    while i < bytes.len() {
        let special = SPECIAL_TOKENS.iter().map(|&(s, _)| s).find(|s| bytes[i..].starts_with(s.as_bytes()));
        match special {
            Some(s) => {
                // `s` starts with the ASCII `<`, so `i` is a char boundary.
                if text_start < i {
                    chunks.push(Chunk::Text(&text[text_start..i]));
                }
                chunks.push(Chunk::Special(s));
                i += s.len();
                text_start = i;
            }
            None => i += 1,
        }
    }
    if text_start < bytes.len() {
        chunks.push(Chunk::Text(&text[text_start..]));
    }
    chunks
}

/// Python's `str.isspace`: Unicode White_Space plus the separators U+001C..U+001F.
fn is_python_whitespace(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_string_follows_python() {
        assert_eq!(clean_string("The MAN's (left) hat: red/blue-ish!"), "the mans left hat red blue ish");
        assert_eq!(clean_string("İ"), "i\u{307}");
        assert_eq!(clean_string("ΟΔΟΣ ΣΑ"), "οδο\u{3c2} \u{3c3}α");
        assert_eq!(clean_string("a\t\u{a0}“b” <c>"), "a\t\u{a0}“b” <c>");
    }

    #[test]
    fn special_tokens_split_leftmost() {
        use Chunk::*;
        assert_eq!(split_on_special_tokens("a<s>b"), [Text("a"), Special("<s>"), Text("b")]);
        assert_eq!(
            split_on_special_tokens("<<pad><mask>x<"),
            [Text("<"), Special("<pad>"), Special("<mask>"), Text("x<")]
        );
        assert_eq!(split_on_special_tokens("red< s>"), [Text("red< s>")]);
        assert_eq!(split_on_special_tokens(""), []);
    }

    #[test]
    fn python_whitespace() {
        for c in [' ', '\t', '\u{1c}', '\u{1f}', '\u{85}', '\u{a0}', '\u{3000}', '\u{2028}'] {
            assert!(is_python_whitespace(c), "{c:?}");
        }
        for c in ['\u{200b}', '\u{180e}', 'a', '\u{2581}'] {
            assert!(!is_python_whitespace(c), "{c:?}");
        }
    }
}
