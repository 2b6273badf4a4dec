//! sentencepiece 0.2.3's normaliser (`normalizer.cc`): the precompiled charsmap (a darts-clone
//! double-array trie over UTF-8 bytes whose leaves point at NUL-terminated replacement strings),
//! longest-match rewriting, then whitespace handling: leading, trailing and repeated spaces
//! removed, the dummy `▁` prefix, and spaces escaped as `▁`.
//!
//! The charsmap is checked when the model is loaded (the checks of `DecodePrecompiledCharsMap` and
//! darts-clone's `validate`, plus UTF-8 replacements), so normalising never fails.

use super::proto::{NormalizerProto, Reason};

/// U+2581 LOWER ONE EIGHTH BLOCK, sentencepiece's visible space.
const SPACE_SYMBOL: &str = "\u{2581}";
/// What a byte that does not start a valid UTF-8 character becomes.
const REPLACEMENT_CHARACTER: &str = "\u{fffd}";
/// `Normalizer::kMaxTrieResultsSize`: only the first 32 charsmap matches of a prefix count.
const MAX_TRIE_RESULTS: usize = 32;

/// The rules and flags of one model's normaliser.
#[derive(Debug, Clone)]
pub(super) struct Normalizer {
    charsmap: Option<CharsMap>,
    /// User-defined pieces: they pass through the normaliser untouched (longest match first).
    user_defined: Vec<String>,
    add_dummy_prefix: bool,
    remove_extra_whitespaces: bool,
    escape_whitespaces: bool,
    treat_whitespace_as_suffix: bool,
}

impl Normalizer {
    pub fn new(
        spec: &NormalizerProto,
        treat_whitespace_as_suffix: bool,
        user_defined: Vec<String>,
    ) -> Result<Self, Reason> {
        let charsmap = if spec.precompiled_charsmap.is_empty() {
            None
        } else {
            Some(CharsMap::parse(&spec.precompiled_charsmap)?)
        };
        Ok(Self {
            charsmap,
            user_defined,
            add_dummy_prefix: spec.add_dummy_prefix,
            remove_extra_whitespaces: spec.remove_extra_whitespaces,
            escape_whitespaces: spec.escape_whitespaces,
            treat_whitespace_as_suffix,
        })
    }

    /// The normalised form of `input`, exactly as `Normalizer::Normalize` builds it.
    pub fn normalize(&self, input: &str) -> String {
        let mut rest = input.as_bytes();
        if self.remove_extra_whitespaces {
            while !rest.is_empty() {
                let (replacement, consumed) = self.normalize_prefix(rest);
                if replacement != b" " {
                    break;
                }
                rest = &rest[consumed..];
            }
        }
        if rest.is_empty() {
            return String::new();
        }
        let space = if self.escape_whitespaces { SPACE_SYMBOL.as_bytes() } else { b" " };
        let mut out = Vec::with_capacity(rest.len() * 3 / 2);
        if !self.treat_whitespace_as_suffix && self.add_dummy_prefix {
            out.extend_from_slice(space);
        }
        let mut is_prev_space = self.remove_extra_whitespaces;
        while !rest.is_empty() {
            let (mut replacement, consumed) = self.normalize_prefix(rest);
            while let (true, [b' ', tail @ ..]) = (is_prev_space, replacement) {
                replacement = tail;
            }
            if !replacement.is_empty() {
                for &b in replacement {
                    if b == b' ' {
                        out.extend_from_slice(space);
                    } else {
                        out.push(b);
                    }
                }
                is_prev_space = replacement.ends_with(b" ");
            }
            rest = &rest[consumed..];
            if !self.remove_extra_whitespaces {
                is_prev_space = false;
            }
        }
        if self.remove_extra_whitespaces {
            while out.ends_with(space) {
                out.truncate(out.len() - space.len());
            }
        }
        if self.treat_whitespace_as_suffix && self.add_dummy_prefix {
            out.extend_from_slice(space);
        }
        // Every byte comes from valid UTF-8 (the input, checked replacements, U+FFFD), so this is
        // never lossy.
        String::from_utf8(out).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
    }

    /// The replacement for the start of `input` and how many bytes it consumes: a user-defined
    /// piece verbatim, else the longest charsmap rule, else the first character unchanged (U+FFFD
    /// for one byte that starts no valid character).
    fn normalize_prefix<'s>(&'s self, input: &'s [u8]) -> (&'s [u8], usize) {
        let user_defined = self.user_defined.iter().filter(|p| input.starts_with(p.as_bytes())).max_by_key(|p| p.len());
        if let Some(piece) = user_defined {
            return (&input[..piece.len()], piece.len());
        }
        if let Some((len, replacement)) = self.charsmap.as_ref().and_then(|m| m.longest_match(input)) {
            return (replacement, len);
        }
        match utf8_char_len(input) {
            Some(len) => (&input[..len], len),
            None => (REPLACEMENT_CHARACTER.as_bytes(), 1),
        }
    }
}

/// Length of the valid UTF-8 character at the start of `bytes`, if there is one.
fn utf8_char_len(bytes: &[u8]) -> Option<usize> {
    let len = match bytes.first()? {
        0x00..=0x7f => 1,
        0xc0..=0xdf => 2,
        0xe0..=0xef => 3,
        0xf0..=0xf7 => 4,
        _ => return None,
    };
    std::str::from_utf8(bytes.get(..len)?).ok().map(|_| len)
}

/// `<u32 LE trie size><double-array units><NUL-separated replacement strings>`.
#[derive(Debug, Clone)]
struct CharsMap {
    units: Vec<u32>,
    replacements: Vec<u8>,
}

impl CharsMap {
    fn parse(blob: &[u8]) -> Result<Self, Reason> {
        let broken = |what: &str| format!("the precompiled charsmap is broken ({what})");
        let (size, rest) = match blob {
            [a, b, c, d, rest @ ..] if !rest.is_empty() => (u32::from_le_bytes([*a, *b, *c, *d]) as usize, rest),
            _ => return Err(broken("shorter than its header")),
        };
        if size >= rest.len() {
            return Err(broken(&format!("its trie of {size} bytes exceeds the {}-byte blob", blob.len())));
        }
        if size < 1024 || size % 1024 != 0 {
            return Err(broken(&format!("its trie of {size} bytes is not a positive multiple of 1024")));
        }
        let (trie, replacements) = rest.split_at(size);
        if replacements.last() != Some(&0) {
            return Err(broken("the replacement strings are not NUL-terminated"));
        }
        let map = Self {
            units: trie.chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            replacements: replacements.to_vec(),
        };
        map.validate()?;
        Ok(map)
    }

    /// darts-clone `validate(max_value)`: every child and leaf index stays inside the array and
    /// every value points into the replacement strings; in addition every replacement is UTF-8.
    fn validate(&self) -> Result<(), Reason> {
        let invalid = |at: usize| Err(format!("the precompiled charsmap is invalid (trie unit {at})"));
        let size = self.units.len();
        let root = self.units[0]; // size >= 256 units, checked by `parse`
        if label(root) != 0 || has_leaf(root) || offset(root) == 0 || (offset(root) | 0xff) >= size {
            return invalid(0);
        }
        for (i, &unit) in self.units.iter().enumerate().skip(1) {
            if label(unit) <= 0xff {
                let child = i ^ offset(unit);
                if (child | 0xff) >= size || (has_leaf(unit) && label(self.units[child]) <= 0xff) {
                    return invalid(i);
                }
            } else {
                let at = value(unit);
                let replacement = self.replacements.get(at..).and_then(|tail| tail.split(|&b| b == 0).next());
                match replacement {
                    Some(r) if at < self.replacements.len() && std::str::from_utf8(r).is_ok() => {}
                    _ => return invalid(i),
                }
            }
        }
        Ok(())
    }

    /// darts-clone `commonPrefixSearch` over the first [`MAX_TRIE_RESULTS`] matches, keeping the
    /// longest: `(key length, replacement)`.
    fn longest_match(&self, key: &[u8]) -> Option<(usize, &[u8])> {
        let mut node = offset(*self.units.first()?);
        let (mut best, mut matches) = (None, 0);
        for (i, &byte) in key.iter().enumerate() {
            node ^= usize::from(byte);
            let unit = match self.units.get(node) {
                Some(&unit) if label(unit) == u32::from(byte) => unit,
                _ => break,
            };
            node ^= offset(unit);
            if has_leaf(unit) {
                if let (true, Some(&leaf)) = (matches < MAX_TRIE_RESULTS, self.units.get(node)) {
                    best = Some((i + 1, value(leaf)));
                }
                matches += 1;
            }
        }
        let (len, at) = best?;
        let tail = self.replacements.get(at..)?;
        let end = tail.iter().position(|&b| b == 0)?;
        Some((len, &tail[..end]))
    }
}

fn has_leaf(unit: u32) -> bool {
    (unit >> 8) & 1 == 1
}

fn label(unit: u32) -> u32 {
    unit & ((1 << 31) | 0xff)
}

fn offset(unit: u32) -> usize {
    ((unit >> 10) << ((unit & (1 << 9)) >> 6)) as usize
}

fn value(unit: u32) -> usize {
    (unit & 0x7fff_ffff) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob(trie_bytes: u32, units: &[u32], strings: &[u8]) -> Vec<u8> {
        let mut b = trie_bytes.to_le_bytes().to_vec();
        b.extend(units.iter().flat_map(|u| u.to_le_bytes()));
        b.extend_from_slice(strings);
        b
    }

    #[test]
    fn malformed_charsmaps_are_rejected() {
        assert!(CharsMap::parse(&[1, 0, 0]).is_err());
        assert!(CharsMap::parse(&blob(8, &[0, 0], b"a\0")).is_err(), "trie not a multiple of 1024 bytes");
        assert!(CharsMap::parse(&blob(4096, &[0; 16], b"a\0")).is_err(), "trie larger than the blob");
        assert!(CharsMap::parse(&blob(1024, &[0; 256], b"a")).is_err(), "strings not NUL-terminated");
        assert!(CharsMap::parse(&blob(1024, &[0; 256], b"a\0")).is_err(), "root without children");
        // Root with offset 1 (children at 1 ^ byte), and one leaf value beyond the strings.
        let mut units = [0u32; 256];
        units[0] = 1 << 10;
        units[1 ^ usize::from(b'a')] = u32::from(b'a') | (1 << 8) | (0x61 << 10);
        units[(1 ^ usize::from(b'a')) ^ 0x61] = (1 << 31) | 99;
        assert!(CharsMap::parse(&blob(1024, &units, b"b\0")).is_err(), "value out of range");
        units[(1 ^ usize::from(b'a')) ^ 0x61] = 1 << 31;
        let map = CharsMap::parse(&blob(1024, &units, b"b\0")).unwrap();
        assert_eq!(map.longest_match(b"ax"), Some((1, &b"b"[..])));
        assert_eq!(map.longest_match(b"xa"), None);
        assert!(CharsMap::parse(&blob(1024, &units, b"\xff\0")).is_err(), "replacement not UTF-8");
    }

    #[test]
    fn utf8_lengths() {
        assert_eq!(utf8_char_len(b"a"), Some(1));
        assert_eq!(utf8_char_len("é".as_bytes()), Some(2));
        assert_eq!(utf8_char_len("🦒x".as_bytes()), Some(4));
        assert_eq!(utf8_char_len(&"é".as_bytes()[1..]), None);
        assert_eq!(utf8_char_len(&"🦒".as_bytes()[..2]), None);
        assert_eq!(utf8_char_len(b""), None);
    }
}
