//! `deris::data::synth`: same seed → byte-identical files; the gRefCOCO reader reads back what was
//! written (sentences, no-target flags, masks equal to the painted shapes); referent sets agree
//! with an independent reading of the sentences; kind proportions; the NSC bank.

use std::collections::BTreeMap;
use std::path::Path;

use deris::data::nsc::NscBank;
use deris::data::readers::coco::Instances;
use deris::data::synth::expr::Kind;
use deris::data::synth::scene::{Colour, Object, ShapeKind, SizeClass};
use deris::data::synth::{self, SynthConfig, SynthError};
use deris::preprocess::image::load_image;

fn config(seed: u64, train: usize, val: usize) -> SynthConfig {
    SynthConfig { seed, train_images: train, val_images: val, ..Default::default() }
}

/// Every file under `dir`, by relative path.
fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.insert(p.strip_prefix(dir).unwrap().display().to_string(), std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

#[test]
fn same_seed_writes_identical_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(11, 12, 4);
    synth::write(&tmp.path().join("a"), &cfg).unwrap();
    synth::write(&tmp.path().join("b"), &cfg).unwrap();
    let (a, b) = (files(&tmp.path().join("a")), files(&tmp.path().join("b")));
    assert_eq!(a.len(), 16 + 3, "16 images, the two grefs files, coco/instances.json, no temporary files: {:?}", a.keys());
    assert!(a == b, "two runs with the same seed differ");
    synth::write(&tmp.path().join("c"), &config(12, 12, 4)).unwrap();
    let c = files(&tmp.path().join("c"));
    assert_ne!(a["grefs/instances.json"], c["grefs/instances.json"]);
}

#[test]
fn reader_reads_back_scenes_sentences_and_masks() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(3, 20, 6);
    let written = synth::write(tmp.path(), &cfg).unwrap();
    let source = written.source();
    assert_eq!(source.splits().unwrap(), ["train", "val"]);
    for (split, counts, first_id) in [("train", written.train, 1u64), ("val", written.val, 21)] {
        let samples = source.read_split(split).unwrap().samples;
        assert_eq!(samples.len(), counts.items);
        assert_eq!(counts.images * cfg.sentences_per_image, counts.items);
        assert_eq!(samples.iter().filter(|s| s.no_target()).count(), counts.no_target);
        assert_eq!(samples.iter().filter(|s| s.targets.len() >= 2).count(), counts.multi);
        for (k, s) in samples.iter().enumerate() {
            let image_id = first_id + (k / cfg.sentences_per_image) as u64;
            let want = synth::image(&cfg, image_id).unwrap();
            let r = &want.sentences[k % cfg.sentences_per_image];
            assert_eq!(s.image_id, image_id);
            assert_eq!(s.expressions, std::slice::from_ref(&r.text));
            assert_eq!(s.targets.len(), r.targets.len(), "{}", s.label);
            let img = load_image(&s.image_path).unwrap();
            let size = cfg.size;
            assert_eq!((img.h, img.w, s.image_size), (size as usize, size as usize, Some((size, size))));
            let masks = want.scene.masks().unwrap();
            let got = s.target_masks(size, size).unwrap();
            for (m, &t) in got.iter().zip(&r.targets) {
                assert_eq!(m, &masks[t], "{}: target {t} mask", s.label);
                let object = &want.scene.objects[t];
                let (area, poly) = (m.area() as f64, object.polygon_area());
                assert!(area > 0.0 && (area - poly).abs() < 0.15 * poly, "{}: mask area {area} vs polygon {poly}", s.label);
                // The picture has the object's colour on every pixel of its mask.
                for (i, &v) in m.to_rowmajor().iter().enumerate() {
                    if v != 0 {
                        assert_eq!(img.data[3 * i..3 * i + 3], object.rgb, "{}: pixel {i}", s.label);
                    }
                }
            }
            if s.no_target() {
                assert_eq!(s.gt_mask(size, size).unwrap().area(), 0);
            }
        }
    }
}

#[test]
fn shapes_do_not_overlap_and_fit_in_the_image() {
    for id in 1..200 {
        let img = synth::image(&config(5, 0, 0), id).unwrap();
        let masks = img.scene.masks().unwrap();
        assert!((2..=6).contains(&img.scene.objects.len()), "image {id}: {} objects", img.scene.objects.len());
        for (i, a) in masks.iter().enumerate() {
            let [x, y, w, h] = img.scene.objects[i].bbox();
            assert!(x >= 0.0 && y >= 0.0 && x + w <= 128.0 && y + h <= 128.0);
            for b in &masks[i + 1..] {
                assert_eq!(a.intersection_union(b).unwrap().0, 0, "image {id}: shapes overlap");
            }
        }
    }
}

/// An independent reading of a description ("big red circles", "green shape").
fn parse_desc(words: &[&str]) -> impl Fn(&Object) -> bool {
    let size = SizeClass::ALL.into_iter().find(|s| words.contains(&s.name()));
    let colour = Colour::ALL.into_iter().find(|c| words.contains(&c.name()));
    let shape = ShapeKind::ALL.into_iter().find(|s| words.iter().any(|w| w.trim_end_matches('s') == s.name()));
    move |o: &Object| size.is_none_or(|s| s == o.size) && colour.is_none_or(|c| c == o.colour) && shape.is_none_or(|s| s == o.shape)
}

/// The referents of a plain, plural or relation sentence, computed from the words alone; `None`
/// for the other families.
fn referents(text: &str, objects: &[Object]) -> Option<Vec<usize>> {
    const RELATIONS: [(&str, usize, f64); 7] = [
        (" to the left of the ", 0, -1.0),
        (" to the right of the ", 0, 1.0),
        (" left of the ", 0, -1.0),
        (" right of the ", 0, 1.0),
        (" above the ", 1, -1.0),
        (" below the ", 1, 1.0),
        (" under the ", 1, 1.0),
    ];
    let coord = |o: &Object, axis: usize| if axis == 0 { o.centre.0 } else { o.centre.1 };
    if text.contains(" and the ") || ["leftmost", "rightmost", "topmost", "bottommost"].iter().any(|w| text.contains(w)) {
        return None;
    }
    if let Some(&(phrase, axis, sign)) = RELATIONS.iter().find(|r| text.contains(r.0)) {
        let (head, anchor) = text.split_once(phrase).unwrap();
        let desc = parse_desc(&head.split(' ').collect::<Vec<_>>());
        let anchor_desc = parse_desc(&anchor.split(' ').collect::<Vec<_>>());
        let anchors: Vec<&Object> = objects.iter().filter(|o| anchor_desc(o)).collect();
        assert_eq!(anchors.len(), 1, "{text}: the anchor is not unique");
        let a = anchors[0];
        return Some((0..objects.len()).filter(|&i| desc(&objects[i]) && (coord(&objects[i], axis) - coord(a, axis)) * sign > 0.0 && &objects[i] != a).collect());
    }
    let words: Vec<&str> = text.split(' ').collect();
    Some((0..objects.len()).filter(|&i| parse_desc(&words)(&objects[i])).collect())
}

#[test]
fn referent_sets_follow_the_words_and_kinds_follow_the_proportions() {
    let cfg = config(9, 0, 0);
    let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
    let mut families: BTreeMap<(&str, &str), usize> = BTreeMap::new();
    let mut checked = 0;
    let images = 2000;
    for id in 1..=images {
        let img = synth::image(&cfg, id).unwrap();
        let mut texts: Vec<&str> = img.sentences.iter().map(|r| r.text.as_str()).collect();
        texts.sort_unstable();
        texts.dedup();
        assert!(texts.len() + 1 >= img.sentences.len(), "image {id}: repeated sentences {texts:?}");
        for r in &img.sentences {
            *kinds.entry(r.kind.name()).or_default() += 1;
            *families.entry((r.kind.name(), r.family)).or_default() += 1;
            match r.kind {
                Kind::Single => assert_eq!(r.targets.len(), 1, "{}", r.text),
                Kind::Multi => assert!(r.targets.len() >= 2, "{}", r.text),
                Kind::NoTarget => assert!(r.targets.is_empty(), "{}", r.text),
            }
            if let Some(want) = referents(&r.text, &img.scene.objects) {
                assert_eq!(r.targets, want, "image {id}: {:?}", r.text);
                checked += 1;
            }
        }
    }
    let n = (images * 3) as f64;
    let share = |k: &str| kinds[k] as f64 / n;
    // 6000 draws: sd ≤ 0.0065; 4 sd.
    for (kind, p) in [("single", 0.55), ("multi", 0.30), ("no_target", 0.15)] {
        assert!((share(kind) - p).abs() < 0.026, "{kind}: {} (want {p})", share(kind));
    }
    assert_eq!(families.len(), 8, "every family is used: {families:?}");
    assert!(checked > 3000, "only {checked} sentences checked independently");
}

#[test]
fn bank_holds_the_train_sentences() {
    let tmp = tempfile::tempdir().unwrap();
    let written = synth::write(tmp.path(), &config(1, 10, 3)).unwrap();
    let bank = NscBank::load(&written.train_dict).unwrap();
    assert_eq!(bank.len(), 10);
    let train = written.source().read_split("train").unwrap().samples;
    let mut from_bank: Vec<String> = (0..bank.len()).flat_map(|i| bank.image(i).unwrap().1.iter().map(|s| s.raw.clone())).collect();
    let mut from_split: Vec<String> = train.iter().map(|s| s.expressions[0].clone()).collect();
    from_bank.sort();
    from_split.sort();
    assert_eq!(from_bank, from_split);
    assert_eq!(NscBank::from_samples(&train).len(), 10);
}

#[test]
fn bad_options_fail_before_writing() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("x");
    let err = synth::write(&out, &SynthConfig { size: 16, ..config(0, 1, 1) }).unwrap_err();
    assert!(matches!(err, SynthError::Option { option: "size", .. }), "{err}");
    let err = synth::write(&out, &SynthConfig { sentences_per_image: 0, ..config(0, 1, 1) }).unwrap_err();
    assert!(err.to_string().contains("sentences_per_image"), "{err}");
    assert!(!out.exists());
}

#[test]
fn the_coco_file_lists_every_object_under_the_referring_ids() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(4, 12, 3);
    let written = synth::write(tmp.path(), &cfg).unwrap();
    assert_eq!(written.objects, tmp.path().join("coco").join("instances.json"));
    let instances = Instances::load(&written.objects).unwrap();
    let by_image = instances.objects_by_image().unwrap();
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&written.objects).unwrap()).unwrap();
    let categories: BTreeMap<u64, String> =
        json["categories"].as_array().unwrap().iter().map(|c| (c["id"].as_u64().unwrap(), c["name"].as_str().unwrap().to_string())).collect();
    assert_eq!(categories.len(), 48);
    assert_eq!(instances.images.len(), 15);
    for split in ["train", "val"] {
        for s in written.source().read_split(split).unwrap().samples {
            let want = synth::image(&cfg, s.image_id).unwrap();
            let objects = &by_image[&s.image_id];
            // every object of the scene, in scene order, with its exact mask
            assert_eq!(objects.len(), want.scene.objects.len(), "{}", s.label);
            assert_eq!(s.masks_of(objects.iter().map(|o| &o.target), cfg.size, cfg.size).unwrap(), want.scene.masks().unwrap(), "{}", s.label);
            // each object's category is its (size, colour, shape) kind
            for (o, object) in objects.iter().zip(&want.scene.objects) {
                let name = format!("{} {} {}", object.size.name(), object.colour.name(), object.shape.name());
                assert_eq!(categories[&o.category_id.unwrap()], name, "{}", s.label);
            }
            // a referred object has the same annotation id in both files
            for t in &s.targets {
                assert!(objects.iter().any(|o| o.target.ann_id == t.ann_id && o.target.segmentation == t.segmentation), "{}: {:?}", s.label, t.ann_id);
            }
            let image = instances.image(s.image_id, &s.label).unwrap();
            assert_eq!(tmp.path().join("images").join(&image.file_name), s.image_path);
        }
    }
}
