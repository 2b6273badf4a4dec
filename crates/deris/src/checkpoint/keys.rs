//! THE key mapping: where a checkpoint keeps the model's weights and how its key names become
//! the model's names. This is the only place that knows about `state_dict` nesting, DDP's
//! `module.` prefix and the training-state entries that sit beside the weights.
//!
//! The model's names are the authors' `state_dict()` keys verbatim
//! (`perception_branch.predictor.Q2TCA.0.norm1.weight`), as listed in `fixtures/keys/*.json`.

use std::collections::BTreeMap;

/// Top-level entries that may hold the model's weights, in order of preference.
/// `deris/utils/checkpoint.py` reads `ckpt["state_dict"]`; `model` and `module` are common elsewhere.
pub const NESTED_STATE_DICT_KEYS: [&str; 3] = ["state_dict", "model", "module"];

/// The prefix `DistributedDataParallel` puts in front of every key (stripped on load).
pub const DDP_PREFIX: &str = "module.";

/// Top-level entries the authors' training loop saves beside the weights; dropped silently.
/// Any other dropped entry is logged with a warning.
pub const TRAINING_STATE_KEYS: [&str; 9] =
    ["optimizer", "scheduler", "ema_state_dict", "meta", "epoch", "amp", "lr", "iter", "config"];

/// What a top-level entry of a pickled checkpoint is, as far as choosing the weights goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    /// A tensor (then the top level is itself a flat state_dict).
    Tensor,
    /// A dict with at least one tensor value under a string key.
    TensorDict,
    /// Anything else (numbers, strings, optimizer state, …).
    Other,
}

/// Where the weights were found and what was done to the names.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyLayout {
    /// The top-level entry that held the weights (`state_dict`, …); `None` for a flat file.
    pub nested_under: Option<String>,
    /// How many keys lost a leading `module.`.
    pub stripped_prefixes: usize,
    /// Top-level entries that are not model weights and were dropped (`optimizer`, `epoch`, …).
    pub ignored: Vec<String>,
}

/// Chooses the weights among the top-level entries of a pickled checkpoint; returns the layout
/// with `nested_under` and `ignored` filled in.
pub fn locate_state_dict(entries: &[(String, EntryKind)]) -> Result<KeyLayout, String> {
    let nested = NESTED_STATE_DICT_KEYS
        .iter()
        .find(|k| entries.iter().any(|(name, kind)| name == *k && *kind == EntryKind::TensorDict));
    if let Some(&key) = nested {
        let ignored = entries.iter().filter(|(n, _)| n != key).map(|(n, _)| n.clone()).collect();
        return Ok(KeyLayout { nested_under: Some(key.to_string()), stripped_prefixes: 0, ignored });
    }
    if entries.iter().any(|(_, kind)| *kind == EntryKind::Tensor) {
        let ignored = entries.iter().filter(|(_, k)| *k != EntryKind::Tensor).map(|(n, _)| n.clone()).collect();
        return Ok(KeyLayout { nested_under: None, stripped_prefixes: 0, ignored });
    }
    let listed: Vec<String> = entries.iter().take(12).map(|(n, _)| format!("'{n}'")).collect();
    Err(format!(
        "no model weights found: expected a state_dict, or one under {}; the top level has {} entries ({}{})",
        NESTED_STATE_DICT_KEYS.map(|k| format!("'{k}'")).join("/"),
        entries.len(),
        listed.join(", "),
        if entries.len() > 12 { ", …" } else { "" }
    ))
}

/// True for a dropped top-level entry that is ordinary training state (not worth a warning).
pub fn is_training_state(name: &str) -> bool {
    TRAINING_STATE_KEYS.contains(&name) || name.starts_with("best_")
}

/// Maps each file key to the model's name (drops a leading `module.`). Returns
/// `model name → file key` and the number of stripped prefixes; two file keys that map to the
/// same name are an error.
pub fn normalise<'a>(
    file_keys: impl IntoIterator<Item = &'a str>,
) -> Result<(BTreeMap<String, String>, usize), String> {
    let mut map = BTreeMap::new();
    let mut stripped = 0;
    for key in file_keys {
        let name = match key.strip_prefix(DDP_PREFIX) {
            Some(rest) => {
                stripped += 1;
                rest
            }
            None => key,
        };
        if let Some(previous) = map.insert(name.to_string(), key.to_string()) {
            return Err(format!("keys '{previous}' and '{key}' both name the model's '{name}'"));
        }
    }
    Ok((map, stripped))
}

/// True for the non-parameter entries of DeRIS's state_dict (MODEL-SPEC §11): Swin's int64
/// `relative_position_index` buffers and `head.criterion.empty_weight`.
pub fn is_buffer(name: &str) -> bool {
    name.ends_with(".relative_position_index") || name == "head.criterion.empty_weight"
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(n: &str, k: EntryKind) -> (String, EntryKind) {
        (n.to_string(), k)
    }

    #[test]
    fn nested_state_dict_wins_and_the_rest_is_ignored() {
        let entries = [
            e("epoch", EntryKind::Other),
            e("state_dict", EntryKind::TensorDict),
            e("optimizer", EntryKind::Other),
            e("ema_state_dict", EntryKind::TensorDict),
        ];
        let l = locate_state_dict(&entries).unwrap();
        assert_eq!(l.nested_under.as_deref(), Some("state_dict"));
        assert_eq!(l.ignored, ["epoch", "optimizer", "ema_state_dict"]);
    }

    #[test]
    fn flat_state_dict() {
        let l = locate_state_dict(&[e("a.weight", EntryKind::Tensor), e("b.weight", EntryKind::Tensor)]).unwrap();
        assert_eq!(l, KeyLayout::default());
    }

    #[test]
    fn model_key_and_no_weights() {
        let l = locate_state_dict(&[e("model", EntryKind::TensorDict), e("meta", EntryKind::Other)]).unwrap();
        assert_eq!(l.nested_under.as_deref(), Some("model"));
        let err = locate_state_dict(&[e("epoch", EntryKind::Other), e("state_dict", EntryKind::Other)]).unwrap_err();
        assert!(err.contains("'epoch', 'state_dict'"), "{err}");
    }

    #[test]
    fn strips_ddp_prefix_and_detects_collisions() {
        let (m, n) = normalise(["module.a.weight", "module.b.bias"]).unwrap();
        assert_eq!(n, 2);
        assert_eq!(m["a.weight"], "module.a.weight");
        let err = normalise(["module.a", "a"]).unwrap_err();
        assert!(err.contains("'module.a' and 'a'"), "{err}");
    }

    #[test]
    fn buffers() {
        assert!(is_buffer("perception_branch.hier_vision_encoder.layers.0.blocks.1.attn.relative_position_index"));
        assert!(is_buffer("head.criterion.empty_weight"));
        assert!(!is_buffer(
            "perception_branch.hier_vision_encoder.layers.0.blocks.1.attn.relative_position_bias_table"
        ));
    }
}
