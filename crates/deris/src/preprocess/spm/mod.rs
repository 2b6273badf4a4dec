//! A sentencepiece unigram model (`.model`/`.spm`), encoding exactly as sentencepiece 0.2.3 (the
//! version the gold files were made with) does: its normaliser, then the optimised Viterbi of
//! `unigram_model.cc` (`EncodeOptimized`), then the merging of consecutive unknown pieces of
//! `SentencePieceProcessor::EncodeOptimized`. Only what `sp.encode(text, out_type=str)` and
//! `PieceToId` need is implemented; BPE, word and char models and byte fallback are rejected when
//! the model is loaded.

mod normalizer;
mod proto;
pub mod train;

use std::collections::HashMap;

use normalizer::Normalizer;
use proto::{ModelProto, ModelType, PieceType, Reason};

/// sentencepiece's `kUnkPenalty`: an unknown character scores `min_score - 10`.
const UNK_PENALTY: f32 = 10.0;
/// `kMaxPieceSize`: pieces of this many bytes or more are refused.
const MAX_PIECE_BYTES: usize = 8000;
/// `kScoreResetThreshold`: path scores beyond ±1e5 are rebased to keep float precision.
const SCORE_RESET_THRESHOLD: f32 = 100_000.0;

/// One vocabulary entry.
#[derive(Debug, Clone)]
struct Piece {
    score: f32,
    kind: PieceType,
}

/// A loaded unigram model.
#[derive(Debug, Clone)]
pub(super) struct SentencePiece {
    pieces: Vec<Piece>,
    /// Normal, user-defined and unused pieces: the ones the Viterbi lattice may use.
    vocab: HashMap<String, usize>,
    /// Unknown, control and byte pieces: found by `piece_to_id` only.
    reserved: HashMap<String, usize>,
    unk_id: usize,
    /// Lowest score of the normal pieces.
    min_score: f32,
    /// Longest vocab piece in bytes: no lattice edge is longer.
    max_piece_len: usize,
    normalizer: Normalizer,
}

impl SentencePiece {
    /// Decodes and checks a serialized `ModelProto`, with the checks of sentencepiece's
    /// `ModelInterface::InitializePieces`, `unigram::Model` and `Normalizer`, plus the
    /// unigram-only restriction.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, Reason> {
        let model = ModelProto::decode(bytes).map_err(|r| format!("not a sentencepiece model ({r})"))?;
        let unsupported = match model.trainer.model_type {
            ModelType::Unigram => None,
            ModelType::Bpe => Some("BPE"),
            ModelType::Word => Some("WORD"),
            ModelType::Char => Some("CHAR"),
        };
        if let Some(kind) = unsupported {
            return Err(format!("model type {kind} is not supported (only UNIGRAM models are)"));
        }
        if model.trainer.byte_fallback {
            return Err("byte_fallback models are not supported".into());
        }
        if model.pieces.is_empty() {
            return Err("the model has no pieces (is this a sentencepiece model file?)".into());
        }
        let mut vocab = HashMap::new();
        let mut reserved = HashMap::new();
        let mut unk_id = None;
        let mut user_defined = Vec::new();
        let mut min_score = f32::MAX;
        for (id, p) in model.pieces.iter().enumerate() {
            if p.piece.is_empty() || p.piece.len() >= MAX_PIECE_BYTES {
                return Err(format!("piece {id} has {} bytes", p.piece.len()));
            }
            if !p.score.is_finite() {
                return Err(format!("piece {:?} has the score {}", p.piece, p.score));
            }
            if p.piece == "\0" && p.kind == PieceType::Unused {
                continue; // sentencepiece skips an unused NUL piece
            }
            if p.piece.contains('\0') {
                return Err(format!("piece {id} contains a NUL character"));
            }
            let table = match p.kind {
                PieceType::Normal | PieceType::UserDefined | PieceType::Unused => &mut vocab,
                PieceType::Unknown | PieceType::Control | PieceType::Byte => &mut reserved,
            };
            if table.insert(p.piece.clone(), id).is_some() {
                return Err(format!("piece {:?} is defined twice", p.piece));
            }
            match p.kind {
                PieceType::Normal => min_score = min_score.min(p.score),
                PieceType::UserDefined => user_defined.push(p.piece.clone()),
                PieceType::Unknown if unk_id.is_some() => return Err("the unknown piece is defined twice".into()),
                PieceType::Unknown => unk_id = Some(id),
                PieceType::Byte => return Err(format!("byte piece {:?} in a model without byte_fallback", p.piece)),
                PieceType::Control | PieceType::Unused => {}
            }
        }
        let unk_id = unk_id.ok_or("the model defines no unknown piece")?;
        let max_piece_len = vocab.keys().map(String::len).max().unwrap_or(0);
        let normalizer = Normalizer::new(&model.normalizer, model.trainer.treat_whitespace_as_suffix, user_defined)?;
        let pieces = model.pieces.iter().map(|p| Piece { score: p.score, kind: p.kind }).collect();
        Ok(Self { pieces, vocab, reserved, unk_id, min_score, max_piece_len, normalizer })
    }

    /// Number of pieces (`len(sp)`), control and unknown pieces included.
    pub fn len(&self) -> usize {
        self.pieces.len()
    }

    /// `PieceToId`: the id of a piece string, or the unknown id.
    pub fn piece_to_id(&self, piece: &str) -> usize {
        self.reserved.get(piece).or_else(|| self.vocab.get(piece)).copied().unwrap_or(self.unk_id)
    }

    /// `sp.encode(text, out_type=str)`: the pieces of the best segmentation of the normalised
    /// text; a run of unknown characters is one piece.
    pub fn encode(&self, text: &str) -> Vec<String> {
        let normalized = self.normalizer.normalize(text);
        let mut pieces: Vec<String> = Vec::new();
        let mut prev_unk = false;
        for (start, end, id) in self.viterbi(&normalized) {
            let surface = &normalized[start..end];
            let unk = id == self.unk_id;
            match pieces.last_mut() {
                Some(last) if unk && prev_unk => last.push_str(surface),
                _ => pieces.push(surface.to_owned()),
            }
            prev_unk = unk;
        }
        pieces
    }

    /// Best-scoring segmentation as `(start, end, id)` byte spans, computed like `EncodeOptimized`
    /// in single precision: a piece adds its score, a user-defined piece `0.1 * (bytes - 1)`, a
    /// character no piece covers `min_score - 10`; ties keep the earlier candidate; path scores
    /// beyond ±1e5 are rebased. (The arithmetic matters: sums rounded differently pick the other
    /// of two equal segmentations such as `f`+`ff` / `ff`+`f`.)
    fn viterbi(&self, s: &str) -> Vec<(usize, usize, usize)> {
        #[derive(Clone, Copy)]
        struct Best {
            id: usize,
            score: f32,
            start: Option<usize>,
        }
        let n = s.len();
        let unk_score = self.min_score - UNK_PENALTY;
        let mut best = vec![Best { id: self.unk_id, score: 0.0, start: None }; n + 1];
        let mut max_frontier = 0;
        for (start, ch) in s.char_indices() {
            let mut here = best[start].score;
            if !(-SCORE_RESET_THRESHOLD..=SCORE_RESET_THRESHOLD).contains(&here) {
                let reached = best.get_mut(start..=max_frontier).unwrap_or_default();
                for (k, node) in reached.iter_mut().enumerate() {
                    if k == 0 || node.start.is_some() {
                        node.score -= here;
                    }
                }
                here = 0.0;
            }
            let mut has_single_char_piece = false;
            let last_end = n.min(start + self.max_piece_len);
            for end in (start + 1..=last_end).filter(|&e| s.is_char_boundary(e)) {
                let Some(&id) = self.vocab.get(&s[start..end]) else { continue };
                let length = end - start;
                let score = match self.pieces[id].kind {
                    PieceType::Unused => continue,
                    PieceType::UserDefined => (0.1 * f64::from(length as i32 - 1)) as f32,
                    _ => self.pieces[id].score,
                };
                max_frontier = max_frontier.max(end);
                let candidate = score + here;
                let target = &mut best[end];
                if target.start.is_none() || candidate > target.score {
                    *target = Best { id, score: candidate, start: Some(start) };
                }
                has_single_char_piece |= length == ch.len_utf8();
            }
            if !has_single_char_piece {
                let end = start + ch.len_utf8();
                max_frontier = max_frontier.max(end);
                let candidate = unk_score + here;
                let target = &mut best[end];
                if target.start.is_none() || candidate > target.score {
                    *target = Best { id: self.unk_id, score: candidate, start: Some(start) };
                }
            }
        }
        let mut path = Vec::new();
        let mut end = n;
        // Every character boundary is reached (by a piece or as unknown), so `start` is set.
        while let Some(start) = best[end].start {
            path.push((start, end, best[end].id));
            end = start;
        }
        path.reverse();
        path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let mut state = 0x2545_f491_u32;
        let garbage: Vec<u8> = (0..4096)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                state as u8
            })
            .collect();
        assert!(SentencePiece::from_bytes(&garbage).is_err());
        assert!(SentencePiece::from_bytes(b"").is_err());
        assert!(SentencePiece::from_bytes(b"{\"not\": \"a model\"}\n").is_err());
    }
}
