//! Non-referent sample conversion (NSC; DeRIS `turn_hard_negative`, TRAIN-EVAL-SPEC §4): a
//! training sample with targets is, with probability `rate`, turned into a no-target sample whose
//! sentence comes from the bank (`train_dict.json`) and is dissimilar enough from its own.
//!
//! The reference draws from Python's global RNG and edits the dataset in place, so conversions
//! stick inside each loader worker and the rate drifts upwards over epochs (§4.5). Here a
//! conversion is a pure function of the sample, the bank, the config and an [`NscDraw`]
//! `(seed, epoch, index)`: the same key gives the same result, every epoch converts afresh, and
//! the rate stays the configured one. [`NscStats`] counts what happened, to log the realised rate.
//!
//! The candidate search follows the reference: draw an image uniformly, then one of its sentences
//! uniformly; each draw counts as an attempt (the reference's "different image" test never
//! succeeds, §4.2, so a sentence of the sample's own image may be drawn, as there); a sentence of
//! at most `min_words` words is refused; accept iff [`similarity`] with the sample's raw sentence
//! is below `threshold`; after `max_attempts` refusals the sample stays as it is.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use super::readers::{parse_json, read_text};
use super::rng::SplitMix64;
use super::{Result, Sample};

/// Textdistance's Jaccard and cosine similarities of two strings and their mean, as DeRIS compares
/// sentences (`evaluate_similarity`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Similarity {
    pub jaccard: f64,
    pub cosine: f64,
    /// `(jaccard + cosine) / 2`.
    pub mean: f64,
}

/// `textdistance.jaccard.similarity` and `textdistance.cosine.similarity` with their defaults
/// (`qval = 1`, `as_set = False`): each string is the multiset of its Unicode code points (raw,
/// case-sensitive; spaces and punctuation count). With `I = Σ min(countA, countB)` and
/// `U = Σ max(countA, countB)`: jaccard `= I / U`, cosine `= I / sqrt(len a · len b)`.
/// Identical strings (two empty ones included) score 1; otherwise an empty string scores 0.
pub fn similarity(a: &str, b: &str) -> Similarity {
    let both = |v: f64| Similarity { jaccard: v, cosine: v, mean: v };
    if a == b {
        return both(1.0);
    }
    if a.is_empty() || b.is_empty() {
        return both(0.0);
    }
    let (mut ca, mut cb): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    ca.sort_unstable();
    cb.sort_unstable();
    // Merge the sorted code points: a shared one adds to I and U once, an unshared one to U.
    let (mut i, mut j, mut inter, mut union) = (0, 0, 0u64, 0u64);
    while i < ca.len() && j < cb.len() {
        union += 1;
        match ca[i].cmp(&cb[j]) {
            std::cmp::Ordering::Equal => {
                inter += 1;
                i += 1;
                j += 1;
            }
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
        }
    }
    union += (ca.len() - i + cb.len() - j) as u64;
    let jaccard = inter as f64 / union as f64;
    let cosine = inter as f64 / ((ca.len() as u128 * cb.len() as u128) as f64).sqrt();
    Similarity { jaccard, cosine, mean: (jaccard + cosine) / 2.0 }
}

/// Whether DeRIS accepts `candidate` as the non-referent replacement of `current`: mean
/// similarity strictly below the released threshold 0.6.
pub fn accept(candidate: &str, current: &str) -> bool {
    similarity(candidate, current).mean < NscConfig::default().threshold
}

/// NSC settings; the default is the released gRefCOCO config.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NscConfig {
    /// Probability that a target-bearing sample is converted (0.15).
    pub rate: f64,
    /// A candidate is accepted iff its mean similarity is below this (0.6).
    pub threshold: f64,
    /// A candidate needs more whitespace-separated words than this (0: any non-blank sentence).
    pub min_words: usize,
    /// Counted draws before giving up (51: the reference stops once its counter exceeds 50).
    pub max_attempts: u32,
}

impl Default for NscConfig {
    fn default() -> Self {
        Self { rate: 0.15, threshold: 0.6, min_words: 0, max_attempts: 51 }
    }
}

/// A sentence of the bank.
#[derive(Debug, Clone, PartialEq)]
pub struct BankSentence {
    pub raw: String,
    pub sent_id: Option<i64>,
    pub ref_id: Option<i64>,
}

/// The replacement sentences, grouped by image (`train_dict.json`, TRAIN-EVAL-SPEC §2.4).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct NscBank {
    /// `(image key, sentences)`; only images with at least one sentence.
    images: Vec<(String, Vec<BankSentence>)>,
}

#[derive(Deserialize)]
struct BankImageJson {
    expressions: Vec<BankSentenceJson>,
}

#[derive(Deserialize)]
struct BankSentenceJson {
    raw: String,
    #[serde(default)]
    sent_id: Option<serde_json::Value>,
    #[serde(default)]
    ref_id: Option<serde_json::Value>,
}

impl NscBank {
    /// Reads a `train_dict.json`: `{"<image id>": {"expressions": [{"raw": …, "sent_id"?, …}], …}}`.
    /// Images come in key order (sorted as strings); images without sentences are left out (the
    /// reference would fail on drawing one).
    pub fn load(path: &Path) -> Result<Self> {
        let text = read_text(path)?;
        let map: BTreeMap<String, BankImageJson> = parse_json(path, &text, "train_dict.json (image id → {expressions: [{raw}]})")?;
        let images = map
            .into_iter()
            .map(|(key, img)| {
                let sentences = img
                    .expressions
                    .into_iter()
                    .map(|s| BankSentence {
                        raw: s.raw,
                        sent_id: s.sent_id.as_ref().and_then(serde_json::Value::as_i64),
                        ref_id: s.ref_id.as_ref().and_then(serde_json::Value::as_i64),
                    })
                    .collect();
                (key, sentences)
            })
            .collect();
        Ok(Self::from_images(images))
    }

    /// A bank from samples (e.g. a train split when there is no `train_dict.json`): every
    /// sentence, grouped by image id, images in order of first appearance.
    pub fn from_samples(samples: &[Sample]) -> Self {
        let mut images: Vec<(String, Vec<BankSentence>)> = Vec::new();
        let mut position: BTreeMap<u64, usize> = BTreeMap::new();
        for s in samples {
            let k = *position.entry(s.image_id).or_insert_with(|| {
                images.push((s.image_id.to_string(), Vec::new()));
                images.len() - 1
            });
            let sentences = s.expressions.iter().enumerate().map(|(n, raw)| BankSentence {
                raw: raw.clone(),
                sent_id: if s.expressions.len() == s.sent_ids.len() { s.sent_ids.get(n).copied() } else { None },
                ref_id: s.ref_id,
            });
            if let Some((_, list)) = images.get_mut(k) {
                list.extend(sentences);
            }
        }
        Self::from_images(images)
    }

    /// A bank from `(image key, sentences)`; images without sentences are left out.
    pub fn from_images(images: Vec<(String, Vec<BankSentence>)>) -> Self {
        Self { images: images.into_iter().filter(|(_, s)| !s.is_empty()).collect() }
    }

    /// Number of images (with at least one sentence).
    pub fn len(&self) -> usize {
        self.images.len()
    }

    pub fn is_empty(&self) -> bool {
        self.images.is_empty()
    }

    /// `(image key, sentences)` of image `index`.
    pub fn image(&self, index: usize) -> Option<(&str, &[BankSentence])> {
        self.images.get(index).map(|(k, s)| (k.as_str(), s.as_slice()))
    }

    /// Sentence `sentence` of image `image`.
    pub fn sentence(&self, image: usize, sentence: usize) -> Option<&BankSentence> {
        self.images.get(image).and_then(|(_, s)| s.get(sentence))
    }
}

/// The key of one NSC decision: the run's seed, the epoch and the sample's index in its split.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NscDraw {
    pub seed: u64,
    pub epoch: u64,
    pub index: u64,
}

/// What NSC did to one sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NscOutcome {
    /// The sample has no target: NSC leaves it alone.
    NoTarget,
    /// The rate draw did not fire.
    Kept,
    /// Replaced by sentence `sentence` of bank image `image`, found at draw `attempts`.
    Converted { image: usize, sentence: usize, attempts: u32 },
    /// No candidate accepted in `attempts` draws (or an empty bank): the sample stays positive.
    GaveUp { attempts: u32 },
}

/// Separates NSC's random streams from any other user of the same seed.
const NSC_STREAM: u64 = u64::from_le_bytes(*b"DeRISnsc");

/// Non-referent sample conversion with its config and bank.
#[derive(Debug, Clone)]
pub struct Nsc {
    pub config: NscConfig,
    pub bank: NscBank,
}

impl Nsc {
    pub fn new(config: NscConfig, bank: NscBank) -> Self {
        Self { config, bank }
    }

    /// The decision for `sample` under `draw`; a pure function of its arguments. The sentence
    /// compared is the sample's first raw sentence (DeRIS gRefCOCO samples have exactly one).
    pub fn decide(&self, sample: &Sample, draw: NscDraw) -> NscOutcome {
        if sample.no_target() {
            return NscOutcome::NoTarget;
        }
        let mut rng = SplitMix64::from_key(&[NSC_STREAM, draw.seed, draw.epoch, draw.index]);
        if rng.next_f64() > self.config.rate {
            return NscOutcome::Kept; // the reference fires on `random() <= rate`
        }
        if self.bank.is_empty() {
            return NscOutcome::GaveUp { attempts: 0 };
        }
        let current = sample.expressions.first().map_or("", String::as_str);
        let mut attempts = 0;
        while attempts < self.config.max_attempts {
            attempts += 1;
            let image = rng.below(self.bank.len());
            let Some((_, sentences)) = self.bank.image(image) else { break };
            let sentence = rng.below(sentences.len());
            let Some(candidate) = sentences.get(sentence) else { break };
            if candidate.raw.split_whitespace().count() > self.config.min_words
                && similarity(&candidate.raw, current).mean < self.config.threshold
            {
                return NscOutcome::Converted { image, sentence, attempts };
            }
        }
        NscOutcome::GaveUp { attempts }
    }

    /// The sample as training sees it under `draw`, with the decision: a converted sample has the
    /// bank sentence (its `sent_id`/`ref_id`), no targets, and a label that says where the
    /// sentence came from; any other sample is returned unchanged.
    pub fn apply(&self, sample: &Sample, draw: NscDraw) -> (Sample, NscOutcome) {
        let outcome = self.decide(sample, draw);
        let NscOutcome::Converted { image, sentence, .. } = outcome else { return (sample.clone(), outcome) };
        let (Some((key, _)), Some(s)) = (self.bank.image(image), self.bank.sentence(image, sentence)) else {
            return (sample.clone(), outcome);
        };
        let converted = Sample {
            label: format!("{} (NSC: sentence {sentence} of bank image {key})", sample.label),
            expressions: vec![s.raw.clone()],
            sent_ids: s.sent_id.into_iter().collect(),
            ref_id: s.ref_id,
            targets: Vec::new(),
            ..sample.clone()
        };
        (converted, outcome)
    }
}

/// Counts of NSC outcomes, for the realised rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NscStats {
    /// Samples that had targets (eligible).
    pub eligible: u64,
    pub converted: u64,
    /// Eligible samples whose rate draw fired but found no accepted candidate.
    pub gave_up: u64,
    /// Samples without targets (left alone).
    pub no_target: u64,
}

impl NscStats {
    pub fn record(&mut self, outcome: &NscOutcome) {
        match outcome {
            NscOutcome::NoTarget => self.no_target += 1,
            NscOutcome::Kept => self.eligible += 1,
            NscOutcome::Converted { .. } => {
                self.eligible += 1;
                self.converted += 1;
            }
            NscOutcome::GaveUp { .. } => {
                self.eligible += 1;
                self.gave_up += 1;
            }
        }
    }

    /// Converted / eligible (0 when nothing was eligible).
    pub fn realised_rate(&self) -> f64 {
        if self.eligible == 0 {
            0.0
        } else {
            self.converted as f64 / self.eligible as f64
        }
    }
}
