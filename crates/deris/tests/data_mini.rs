//! The four annotation readers on the generated mini datasets (`deris::data::mini`), written to a
//! temporary folder and read back: samples, sentences, targets, images and ground-truth masks, the
//! agreement between layouts that describe the same data, layout detection, and bad input.

use std::path::Path;

use deris::data::mini::{self, MiniDataset};
use deris::data::{AnnotationSource, DataError, Layout, Sample, Split};
use deris::preprocess::image::load_image;
use deris_coco::{CocoError, Rle};

const LAYOUTS: [Layout; 4] = [Layout::SeqtrMixedSeg, Layout::DerisGrefs, Layout::ReferPickle, Layout::RelaGrefs];

fn write(dir: &Path, layout: Layout) -> MiniDataset {
    mini::write(&dir.join(format!("{layout:?}")), layout).unwrap()
}

/// The ground truth a sample must have: the union of its targets' annotation masks.
fn expected_gt(sample: &Sample, h: u32, w: u32) -> Rle {
    let masks: Vec<Rle> = sample.targets.iter().map(|t| MiniDataset::annotation_mask(t.ann_id.unwrap()).unwrap()).collect();
    if masks.is_empty() {
        Rle::zeros(h, w).unwrap()
    } else {
        Rle::merge(&masks).unwrap()
    }
}

#[test]
fn every_layout_reads_back_what_was_written() {
    let tmp = tempfile::tempdir().unwrap();
    for layout in LAYOUTS {
        let mini = write(tmp.path(), layout);
        assert_eq!(mini.source.splits().unwrap().len(), 3, "{layout:?}: splits");
        let mut total = 0;
        for split in &mini.splits {
            let read = mini.source.read_split(split).unwrap();
            assert_eq!(read.layout, layout);
            let read = read.per_sentence();
            let expected = mini.expected(split);
            assert!(!expected.is_empty(), "{layout:?} {split}: the mini dataset has samples");
            assert_eq!(read.len(), expected.len(), "{layout:?} {split}: number of sentences");
            assert!(read.missing_images().is_empty(), "{layout:?} {split}: images exist");
            for (s, e) in read.samples.iter().zip(&expected) {
                let what = format!("{layout:?} {split} {}", s.label);
                assert_eq!(s.image_id, e.image_id, "{what}: image");
                assert_eq!(s.expressions, vec![e.expression.clone()], "{what}: sentence");
                let ann_ids: Vec<i64> = s.targets.iter().map(|t| t.ann_id.unwrap()).collect();
                assert_eq!(ann_ids, e.ann_ids, "{what}: targets");
                assert_eq!(s.no_target(), e.ann_ids.is_empty(), "{what}: no-target flag");
                assert!(s.targets.iter().all(|t| t.bbox.is_some()), "{what}: boxes");
                // Ground truth at the decoded image's size.
                let img = load_image(&s.image_path).unwrap();
                let (h, w) = (img.h as u32, img.w as u32);
                assert_eq!(s.image_size, Some((h, w)), "{what}: size in the annotation");
                let gt = s.gt_mask(h, w).unwrap();
                assert_eq!(gt, expected_gt(s, h, w), "{what}: union ground truth");
                assert_eq!(gt.area() == 0, s.no_target(), "{what}: a target has pixels");
                let parts = s.target_masks(h, w).unwrap();
                assert_eq!(parts.len(), s.targets.len(), "{what}: one mask per target");
                assert_eq!(s.gt_boxes_xyxy(h, w).len(), s.targets.len(), "{what}: one box per target");
                assert_eq!(gt.resize_nearest(384, 384).unwrap().size(), (384, 384));
            }
            total += read.len();
        }
        println!("{layout:?}: {total} sentences over {} splits read back", mini.splits.len());
    }
}

#[test]
fn layouts_of_the_same_data_agree() {
    let tmp = tempfile::tempdir().unwrap();
    let read = |layout, split: &str| -> Split { write(tmp.path(), layout).source.read_split(split).unwrap().per_sentence() };
    for (a, b, pairs) in [
        (Layout::SeqtrMixedSeg, Layout::ReferPickle, [("train", "train"), ("val_refcoco_unc", "val"), ("testA_refcoco_unc", "testA")]),
        (Layout::DerisGrefs, Layout::RelaGrefs, [("train", "train"), ("val", "val"), ("testA", "testA")]),
    ] {
        for (sa, sb) in pairs {
            let (x, y) = (read(a, sa), read(b, sb));
            assert_eq!(x.len(), y.len(), "{a:?} {sa} vs {b:?} {sb}");
            for (p, q) in x.samples.iter().zip(&y.samples) {
                assert_eq!((p.image_id, &p.expressions, p.image_path.file_name()), (q.image_id, &q.expressions, q.image_path.file_name()));
                assert_eq!(p.targets, q.targets, "{a:?} vs {b:?}: {}", p.label);
                let (h, w) = p.image_size.unwrap_or_else(|| q.image_size.unwrap());
                assert_eq!(p.gt_mask(h, w).unwrap(), q.gt_mask(h, w).unwrap());
            }
        }
    }
}

#[test]
fn layout_is_detected() {
    let tmp = tempfile::tempdir().unwrap();
    for layout in LAYOUTS {
        let mini = write(tmp.path(), layout);
        let auto = AnnotationSource::new(&mini.source.annotations, &mini.source.image_root);
        let split = &mini.splits[1];
        let detected = auto.read_split(split).unwrap();
        assert_eq!(detected.layout, layout);
        assert_eq!(detected, mini.source.read_split(split).unwrap());
    }
}

#[test]
fn a_missing_split_lists_the_available_ones() {
    let tmp = tempfile::tempdir().unwrap();
    for layout in LAYOUTS {
        let mini = write(tmp.path(), layout);
        let err = mini.source.read_split("testB").unwrap_err();
        let DataError::MissingSplit { available, .. } = &err else { panic!("{layout:?}: {err}") };
        let mut want = mini.splits.clone();
        let mut got = available.clone();
        want.sort();
        got.sort();
        assert_eq!(got, want, "{layout:?}");
        let msg = err.to_string();
        assert!(msg.contains("testB") && msg.contains(&mini.splits[1]), "{msg}");
    }
}

#[test]
fn missing_images_are_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let mini = write(tmp.path(), Layout::DerisGrefs);
    let split = mini.source.read_split("val").unwrap();
    std::fs::remove_file(&split.samples[0].image_path).unwrap();
    let missing = split.missing_images();
    assert!(missing.contains(&0));
    assert!(missing.iter().all(|&i| split.samples[i].image_id == split.samples[0].image_id));
}

/// Writes `text` as the annotation file of a fresh folder and reads `split` with `layout`.
fn read_text(dir: &Path, name: &str, text: &str, layout: Option<Layout>, split: &str) -> Result<Split, DataError> {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    let mut source = AnnotationSource::new(&path, dir);
    source.layout = layout;
    source.read_split(split)
}

#[test]
fn bad_annotation_files_name_the_file_and_the_item() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let seqtr = Some(Layout::SeqtrMixedSeg);

    let err = read_text(dir, "broken.json", "{\"val\": [", seqtr, "val").unwrap_err();
    assert!(matches!(err, DataError::Format { .. }) && err.to_string().contains("broken.json"), "{err}");

    let item = |mask: &str, id: i64| format!(r#"{{"val": [{{"image_id": 7, "expressions": ["x"], "bbox": [0,0,1,1], "mask": {mask}, "id": {id}}}]}}"#);
    let err = read_text(dir, "rle.json", &item(r#"{"size": [4, 4], "counts": "1 "}"#, 5), seqtr, "val").unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("rle.json") && msg.contains("val item 0") && msg.contains("RLE"), "{msg}");

    let err = read_text(dir, "id.json", &item("[[0,0,2,0,2,2]]", 0), seqtr, "val").unwrap_err();
    assert!(err.to_string().contains("id 0"), "{err}");

    let err = read_text(dir, "fields.json", r#"{"val": [{"image_id": 7}]}"#, seqtr, "val").unwrap_err();
    assert!(err.to_string().contains("val item 0"), "{err}");

    // Readable, but pycocotools cannot rasterise it: the error comes with the sample.
    let split = read_text(dir, "quirk.json", &item("[[1,1,5,5]]", 9), seqtr, "val").unwrap();
    let err = split.samples[0].gt_mask(10, 10).unwrap_err();
    assert!(matches!(err, DataError::Mask { source: CocoError::FirstPolygonIsBox, .. }), "{err}");
    assert!(err.to_string().contains("val item 0 (image 7, ann 9)"), "{err}");

    // An RLE whose size is not the image's.
    let split = read_text(dir, "size.json", &item(r#"{"size": [2, 2], "counts": "04"}"#, 9), seqtr, "val").unwrap();
    let err = split.samples[0].gt_mask(3, 3).unwrap_err();
    assert!(matches!(err, DataError::Mask { source: CocoError::SizeMismatch { .. }, .. }), "{err}");

    // gRefCOCO items that mix a placeholder with targets.
    let gres = r#"{"val": [{"image_id": 7, "expressions": {"raw": "x"}, "annotations": [
        {"id": 3, "bbox": [0,0,1,1], "segmentation": [[0,0,2,0,2,2]]}, {"id": -1, "empty": true}]}]}"#;
    let err = read_text(dir, "gres.json", gres, None, "val").unwrap_err();
    assert!(err.to_string().contains("placeholder"), "{err}");

    // A pickle that is not one.
    let err = read_text(dir, "refs(unc).p", "not a pickle", None, "val").unwrap_err();
    assert!(matches!(err, DataError::Format { .. }) && err.to_string().contains("refs(unc).p"), "{err}");
}

#[test]
fn refs_pointing_at_unknown_annotations_are_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let mini = write(tmp.path(), Layout::RelaGrefs);
    let text = std::fs::read_to_string(&mini.source.annotations).unwrap().replace("1002", "9999");
    std::fs::write(&mini.source.annotations, text).unwrap();
    let err = mini.source.read_split("val").unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("ref 11") && msg.contains("annotation 9999"), "{msg}");
    // The instances file is required beside the refs.
    std::fs::remove_file(mini.source.instances_path()).unwrap();
    assert!(matches!(mini.source.read_split("val"), Err(DataError::Io { .. })));
}
