//! NSC: the similarity bit-exact with `gold/nsc/sim_cases.json` (textdistance 4.6.2), and the
//! conversion's behaviour: realised rate, determinism per (seed, epoch, index), fresh draws per
//! epoch, the sample it produces, giving up, the `train_dict.json` bank.

mod common;

use std::path::PathBuf;

use deris::data::nsc::{accept, similarity, BankSentence, Nsc, NscBank, NscConfig, NscDraw, NscOutcome, NscStats};
use deris::data::{Sample, Segmentation, Target};
use serde_json::Value;

#[test]
fn similarity_matches_textdistance_bit_for_bit() {
    let text = std::fs::read_to_string(common::fixture("gold/nsc/sim_cases.json")).unwrap();
    let gold: Value = serde_json::from_str(&text).unwrap();
    let cases = gold["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 200);
    for c in cases {
        let (a, b) = (c["a"].as_str().unwrap(), c["b"].as_str().unwrap());
        let got = similarity(a, b);
        let tag = format!("case {} ({}) {a:?} / {b:?}", c["id"], c["tag"]);
        for (name, value) in [("jaccard", got.jaccard), ("cosine", got.cosine), ("mean", got.mean)] {
            let want = c[name].as_f64().unwrap();
            assert_eq!(value.to_bits(), want.to_bits(), "{tag}: {name} {value:e} vs {want:e}");
        }
        assert_eq!(accept(a, b), c["accept_lt_0.6"].as_bool().unwrap(), "{tag}: accept");
        assert_eq!(a.chars().count() as u64, c["len_a"].as_u64().unwrap(), "{tag}: len_a");
    }
}

#[test]
fn similarity_is_symmetric_and_shortcuts_apply() {
    assert_eq!(similarity("", "").mean, 1.0);
    assert_eq!(similarity("", "x").mean, 0.0);
    assert_eq!(similarity("dog", "god").mean, 1.0);
    for (a, b) in [("left dog", "right dog"), ("é", "e\u{301}"), ("aab", "abb")] {
        assert_eq!(similarity(a, b), similarity(b, a));
    }
}

fn sample(index: usize, text: &str, targets: usize) -> Sample {
    let target = Target { ann_id: Some(1), bbox: Some([0.0, 0.0, 2.0, 2.0]), segmentation: Segmentation::Polygons(vec![vec![0.0, 0.0, 2.0, 0.0, 2.0, 2.0]]) };
    Sample {
        label: format!("train item {index}"),
        image_id: index as u64,
        image_path: PathBuf::from(format!("{index}.jpg")),
        image_size: Some((4, 4)),
        expressions: vec![text.to_string()],
        sent_ids: vec![index as i64],
        ref_id: Some(index as i64),
        targets: vec![target; targets],
    }
}

fn sentence(raw: &str, id: i64) -> BankSentence {
    BankSentence { raw: raw.to_string(), sent_id: Some(id), ref_id: Some(id + 1000) }
}

/// A bank of short shape sentences, most dissimilar enough from "the big red circle".
fn bank() -> NscBank {
    let words = ["the blue square", "two green stars", "the yellow triangle on the left", "the big red circle", "all stars", "purple shapes"];
    let images = (0..20).map(|i| (format!("{i}"), (0..3).map(|k| sentence(words[(i + k) % words.len()], (i * 3 + k) as i64)).collect())).collect();
    NscBank::from_images(images)
}

#[test]
fn realised_rate_is_the_configured_rate() {
    let nsc = Nsc::new(NscConfig::default(), bank());
    let positive = sample(0, "the big red circle", 2);
    let n = 20_000u64;
    let mut stats = NscStats::default();
    for index in 0..n {
        stats.record(&nsc.decide(&positive, NscDraw { seed: 7, epoch: 3, index }));
    }
    assert_eq!(stats.eligible, n);
    assert_eq!(stats.gave_up, 0);
    // Binomial(20000, 0.15): sd 0.0025; 4 sd.
    let rate = stats.realised_rate();
    assert!((rate - 0.15).abs() < 0.01, "realised rate {rate}");
    // And it does not drift over epochs (the reference's sticky workers do).
    for epoch in 0..5 {
        let mut s = NscStats::default();
        (0..4000).for_each(|index| s.record(&nsc.decide(&positive, NscDraw { seed: 7, epoch, index })));
        assert!((s.realised_rate() - 0.15).abs() < 0.025, "epoch {epoch}: {}", s.realised_rate());
    }
}

#[test]
fn same_key_same_result_other_epoch_other_draws() {
    let nsc = Nsc::new(NscConfig::default(), bank());
    let positive = sample(0, "the big red circle", 1);
    let run = |seed, epoch| -> Vec<NscOutcome> { (0..2000).map(|index| nsc.decide(&positive, NscDraw { seed, epoch, index })).collect() };
    let (a, b) = (run(1, 0), run(1, 0));
    assert_eq!(a, b);
    let converted = |v: &[NscOutcome]| v.iter().enumerate().filter(|(_, o)| matches!(o, NscOutcome::Converted { .. })).map(|(i, _)| i).collect::<Vec<_>>();
    let (c0, c1, s2) = (converted(&a), converted(&run(1, 1)), converted(&run(2, 0)));
    assert!(!c0.is_empty());
    assert_ne!(c0, c1, "epoch 1 converts the same samples as epoch 0");
    assert_ne!(c0, s2, "seed 2 converts the same samples as seed 1");
    // Overlap is about what independence gives (0.15 of each set), not near 1.
    let overlap = c0.iter().filter(|i| c1.contains(i)).count() as f64 / c0.len() as f64;
    assert!(overlap < 0.35, "overlap {overlap}");
}

#[test]
fn converted_sample_has_no_target_and_a_dissimilar_bank_sentence() {
    let nsc = Nsc::new(NscConfig::default(), bank());
    let positive = sample(5, "the big red circle", 2);
    let mut seen = 0;
    for index in 0..500 {
        let draw = NscDraw { seed: 0, epoch: 0, index };
        let (s, outcome) = nsc.apply(&positive, draw);
        match outcome {
            NscOutcome::Converted { image, sentence, attempts } => {
                seen += 1;
                let b = nsc.bank.sentence(image, sentence).unwrap();
                assert!((1..=51).contains(&attempts));
                assert!(s.no_target() && s.targets.is_empty());
                assert_eq!(s.expressions, vec![b.raw.clone()]);
                assert!(similarity(&b.raw, "the big red circle").mean < 0.6);
                assert_eq!((s.sent_ids.clone(), s.ref_id), (vec![b.sent_id.unwrap()], b.ref_id));
                assert_eq!((s.image_id, &s.image_path), (positive.image_id, &positive.image_path));
                assert!(s.label.contains("NSC"));
            }
            NscOutcome::Kept => assert_eq!(s, positive),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(seen > 40, "{seen} conversions");
    // A no-target sample is never touched.
    let negative = sample(6, "the big red circle", 0);
    assert!((0..200).all(|index| nsc.decide(&negative, NscDraw { seed: 0, epoch: 0, index }) == NscOutcome::NoTarget));
}

#[test]
fn gives_up_after_51_attempts_when_nothing_is_dissimilar() {
    // Every candidate is an anagram of the sentence (similarity 1) or blank (refused by length).
    let images = vec![("1".to_string(), vec![sentence("cba", 1), sentence("   ", 2)])];
    let nsc = Nsc::new(NscConfig { rate: 1.0, ..Default::default() }, NscBank::from_images(images));
    let positive = sample(0, "abc", 1);
    let (s, outcome) = nsc.apply(&positive, NscDraw { seed: 0, epoch: 0, index: 0 });
    assert_eq!(outcome, NscOutcome::GaveUp { attempts: 51 });
    assert_eq!(s, positive);
    let empty = Nsc::new(NscConfig { rate: 1.0, ..Default::default() }, NscBank::default());
    assert_eq!(empty.decide(&positive, NscDraw { seed: 0, epoch: 0, index: 0 }), NscOutcome::GaveUp { attempts: 0 });
    // Rate 0 never fires.
    let never = Nsc::new(NscConfig { rate: 0.0, ..Default::default() }, bank());
    assert!((0..500).all(|index| never.decide(&positive, NscDraw { seed: 0, epoch: 0, index }) == NscOutcome::Kept));
}

#[test]
fn bank_reads_train_dict_json() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("train_dict.json");
    std::fs::write(
        &path,
        r#"{"581857": {"expressions": [{"raw": "man in red shirt", "sent_id": 3, "ref_id": 9}, {"raw": "left dog"}], "height": 4},
            "12": {"expressions": []}, "7": {"expressions": [{"raw": "a cat", "sent_id": 1}]}}"#,
    )
    .unwrap();
    let bank = NscBank::load(&path).unwrap();
    assert_eq!(bank.len(), 2, "the image without sentences is left out");
    let (key, sentences) = bank.image(0).unwrap();
    assert_eq!((key, sentences.len()), ("581857", 2));
    assert_eq!(sentences[0], BankSentence { raw: "man in red shirt".into(), sent_id: Some(3), ref_id: Some(9) });
    assert_eq!(bank.sentence(1, 0).unwrap().raw, "a cat");

    std::fs::write(&path, r#"{"1": {"expressions": [{"sent": "no raw"}]}}"#).unwrap();
    let err = NscBank::load(&path).unwrap_err().to_string();
    assert!(err.contains("train_dict.json") && err.contains("raw"), "{err}");

    let from_samples = NscBank::from_samples(&[sample(3, "a", 1), sample(4, "b", 0), sample(3, "c", 2)]);
    assert_eq!(from_samples.len(), 2);
    assert_eq!(from_samples.image(0).unwrap().1.iter().map(|s| s.raw.as_str()).collect::<Vec<_>>(), ["a", "c"]);
}
