//! `deris::eval::protocol::evaluate` with every object of the images (`EvalOptions::objects`):
//! the diagnosis of the embedded model on fresh `deris synth` scenes, and its errors.

use std::sync::Arc;

use candle_core::Device;
use deris::data::readers::coco::Instances;
use deris::data::synth::{self, SynthConfig};
use deris::data::{AnnotationSource, Layout, ObjectIndex, Split};
use deris::eval::protocol::{evaluate, EvalError, EvalOptions, EvalReport, Task, TaskReport};

fn scenes(dir: &std::path::Path) -> (Split, ObjectIndex) {
    let cfg = SynthConfig { seed: 4242, train_images: 1, val_images: 30, ..SynthConfig::default() };
    let data = synth::write(dir, &cfg).unwrap();
    let split = AnnotationSource::new(&data.annotations, &data.image_root).with_layout(Layout::DerisGrefs).read_split("val").unwrap();
    let objects = Instances::load(&data.objects).unwrap().objects_by_image().unwrap();
    (split, objects)
}

fn run(seg: &deris::Segmenter, split: &Split, options: &EvalOptions) -> Result<EvalReport, EvalError> {
    evaluate(seg, split, options, |_| Ok::<_, std::io::Error>(()))
}

#[test]
fn the_embedded_model_draws_better_than_it_selects() {
    let tmp = tempfile::tempdir().unwrap();
    let (split, objects) = scenes(tmp.path());
    let seg = deris::embedded::segmenter(&Device::Cpu).unwrap().with_query_masks(true);
    let plain = run(&seg, &split, &EvalOptions::new(Task::Gres)).unwrap();
    let options = EvalOptions { objects: Some(Arc::new(objects)), ..EvalOptions::new(Task::Gres) };
    let report = run(&seg, &split, &options).unwrap();
    // The diagnosis changes nothing of the evaluation.
    assert_eq!(report.metrics, plain.metrics);
    assert!(plain.diagnosis.is_none() && plain.to_json()["diagnosis"].is_null());
    let d = report.diagnosis.clone().unwrap();
    assert_eq!(d.sentences, report.evaluated);
    assert_eq!(report.to_json()["diagnosis"]["oracle_iou"].as_f64(), d.oracle_iou);
    let TaskReport::Gres(g) = &report.metrics else { panic!("not GRES") };
    let g_iou = g.g_iou.unwrap();
    // Measured (session 8's embedded model, these 90 sentences): best-query IoU 83.0, oracle 85.9
    // against gIoU 52.3, ranking AUC 87.3, top-1 on a referent 79.7 %, 1.19 selected queries per
    // sentence on other objects (session 7's model: 77.5, 81.0 against 44.6, 76.8, 50.6 %, 1.47).
    let (best, oracle, auc, top1) = (d.best_query_iou.unwrap(), d.oracle_iou.unwrap(), d.ranking_auc.unwrap(), d.top1_on_referent.unwrap());
    assert!(best > 65.0, "{d:?}");
    assert!(oracle > g_iou + 20.0, "the selection should be the weaker half: oracle {oracle:.1}, gIoU {g_iou:.1}");
    assert!(auc > 65.0 && top1 > 40.0, "the scores should rank referents above other objects: {d:?}");
    assert!(d.selected_on_other.unwrap() > 0.3, "{d:?}");
}

#[test]
fn diagnosis_errors_name_the_sample() {
    let tmp = tempfile::tempdir().unwrap();
    let (split, mut objects) = scenes(tmp.path());
    let seg = deris::embedded::segmenter(&Device::Cpu).unwrap();
    // without the query masks
    let options = EvalOptions { objects: Some(Arc::new(objects.clone())), limit: Some(2), ..EvalOptions::new(Task::Gres) };
    let err = run(&seg, &split, &options).unwrap_err();
    assert!(matches!(err, EvalError::Diagnosis { .. }) && err.to_string().contains("with_query_masks"), "{err}");
    // a referent missing from the objects
    let sample = split.samples.iter().find(|s| !s.targets.is_empty()).unwrap();
    let gone = sample.targets[0].ann_id;
    objects.get_mut(&sample.image_id).unwrap().retain(|o| o.target.ann_id != gone);
    let options = EvalOptions { objects: Some(Arc::new(objects)), ..EvalOptions::new(Task::Gres) };
    let err = run(&seg.with_query_masks(true), &split, &options).unwrap_err().to_string();
    assert!(err.contains(&format!("referent {}", gone.unwrap())) && err.contains(&format!("image {}", sample.image_id)), "{err}");
}
