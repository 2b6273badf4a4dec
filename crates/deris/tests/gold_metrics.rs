//! The RIS and GRES metrics against `fixtures/gold/metrics/{ris,gres}_cases.json`: every sample
//! (pixel counts, IoU, threshold flags, the GRES confusion cell) and every group (sums exact,
//! f64 metrics to 1e-6, the authors' float32 means to 1e-4, undefined values as `None`).

mod common;

use deris::eval::{GresMetrics, NtCase, RisMetrics};
use deris_coco::Rle;
use serde_json::Value;

fn load(rel: &str) -> Value {
    let p = common::fixture(rel);
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn mask(sample: &Value, which: &str) -> Rle {
    let (h, w) = (sample["h"].as_u64().unwrap() as u32, sample["w"].as_u64().unwrap() as u32);
    let rle = Rle::from_counts_string(sample[&format!("{which}_rle_counts")].as_str().unwrap(), h, w).unwrap();
    let rowmajor: Vec<u8> = sample[which].as_str().unwrap().bytes().map(|b| u8::from(b == b'1')).collect();
    assert_eq!(rle.to_rowmajor(), rowmajor, "sample {}: {which} RLE and 0/1 string disagree", sample["id"]);
    rle
}

fn ids(group: &Value) -> Vec<usize> {
    group["sample_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect()
}

fn close(name: &str, got: Option<f64>, want: &Value, tol: f64) {
    match (got, want.as_f64()) {
        (Some(g), Some(w)) => assert!((g - w).abs() <= tol, "{name}: got {g}, want {w} (|Δ| = {:e})", (g - w).abs()),
        (None, None) => {}
        (g, _) => panic!("{name}: got {g:?}, want {want}"),
    }
}

#[test]
fn ris_samples_and_groups() {
    let gold = load("gold/metrics/ris_cases.json");
    let samples = gold["samples"].as_array().unwrap();
    let mut all = Vec::new();
    for s in samples {
        let mut m = RisMetrics::new();
        let got = m.add_masks(&mask(s, "pred"), &mask(s, "gt")).unwrap();
        let id = &s["id"];
        assert_eq!(got.i, s["I"].as_u64().unwrap(), "sample {id}: I");
        assert_eq!(got.u, s["U"].as_u64().unwrap(), "sample {id}: U");
        assert_eq!(got.iou_f32, s["iou_f32"].as_f64().unwrap() as f32, "sample {id}: iou_f32");
        assert_eq!(got.iou_f64, s["iou_f64"].as_f64().unwrap(), "sample {id}: iou_f64");
        let ge: Vec<bool> = s["iou_ge"].as_array().unwrap().iter().map(|b| b.as_bool().unwrap()).collect();
        assert_eq!(got.iou_ge.to_vec(), ge, "sample {id}: iou >= thresholds");
        all.push(got);
    }
    let (mut worst_f64, mut worst_f32) = (0f64, 0f64);
    for g in gold["groups"].as_array().unwrap() {
        let name = g["name"].as_str().unwrap();
        let mut m = RisMetrics::new();
        for i in ids(g) {
            m.add(all[i]);
        }
        let r = m.report();
        assert_eq!(r.n as u64, g["n"].as_u64().unwrap(), "{name}: n");
        assert_eq!(r.sum_i, g["sum_I"].as_u64().unwrap(), "{name}: sum_I");
        assert_eq!(r.sum_u, g["sum_U"].as_u64().unwrap(), "{name}: sum_U");
        let counts: Vec<u64> = g["count_iou_ge"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
        assert_eq!(r.count_iou_ge.to_vec(), counts, "{name}: count_iou_ge");
        assert_eq!(r.oiou.is_none(), g["error"].is_string(), "{name}: oIoU is undefined exactly where Python raises");
        for (key, ref_f64, ref_f32) in [("mIoU", &g["mIoU"], &g["f32"]["mIoU"]), ("oIoU", &g["oIoU"], &g["f32"]["oIoU"])] {
            let got = if key == "mIoU" { r.miou } else { r.oiou };
            close(&format!("{name}: {key}"), got, ref_f64, 1e-6);
            close(&format!("{name}: {key} (authors' float32)"), got, ref_f32, 1e-4);
            if let (Some(x), Some(a), Some(b)) = (got, ref_f64.as_f64(), ref_f32.as_f64()) {
                worst_f64 = worst_f64.max((x - a).abs());
                worst_f32 = worst_f32.max((x - b).abs());
            }
        }
        for k in 0..5 {
            close(&format!("{name}: MaskACC[{k}]"), r.pr[k], &g["MaskACC"][k], 1e-6);
            close(&format!("{name}: MaskACC[{k}] (float32)"), r.pr[k], &g["f32"]["MaskACC"][k], 1e-4);
        }
        let summary = serde_json::to_value(r.summary()).unwrap();
        assert_eq!(summary.as_object().unwrap().keys().count(), 7, "{name}: summary keys");
        assert_eq!(summary["oIoU"].is_null(), r.oiou.is_none());
    }
    println!("RIS: {} samples exact; groups max |Δ| {worst_f64:e} vs f64 reference, {worst_f32:e} vs float32", samples.len());
}

#[test]
fn gres_samples_and_groups() {
    let gold = load("gold/metrics/gres_cases.json");
    let samples = gold["samples"].as_array().unwrap();
    let mut scored = Vec::new();
    for s in samples {
        let threshold = s["threshold"].as_f64().unwrap();
        let scores: Vec<f32> = s["scores"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
        let gt_nt = s["gt_nt"].as_bool().unwrap();
        let mut m = GresMetrics::new(threshold);
        let got = m.add_masks(&mask(s, "pred"), &mask(s, "gt"), gt_nt, &scores).unwrap();
        let e = &s["expected"];
        let id = &s["id"];
        assert_eq!(got.pred_no_target, e["pred_nt"].as_bool().unwrap(), "sample {id}: pred_nt");
        let case = match e["case"].as_str().unwrap() {
            "TP" => NtCase::Tp,
            "FN" => NtCase::Fn,
            "FP" => NtCase::Fp,
            "TN" => NtCase::Tn,
            other => panic!("unknown case {other}"),
        };
        assert_eq!(got.case, case, "sample {id}: case");
        assert_eq!(got.i, e["I"].as_u64().unwrap(), "sample {id}: I");
        assert_eq!(got.u, e["U"].as_u64().unwrap(), "sample {id}: U");
        assert_eq!(got.iou, e["iou"].as_f64().unwrap(), "sample {id}: iou");
        scored.push((threshold, got));
    }
    for g in gold["groups"].as_array().unwrap() {
        let name = g["name"].as_str().unwrap();
        let threshold = g["threshold"].as_f64().unwrap();
        let mut m = GresMetrics::new(threshold);
        for i in ids(g) {
            assert_eq!(scored[i].0, threshold, "{name}: sample {i} was scored under another threshold");
            m.add(scored[i].1);
        }
        let r = m.report();
        let ge = &g["gres_evaluate"];
        let c = &ge["counts"];
        assert_eq!(
            (r.counts.tp, r.counts.tn, r.counts.fp, r.counts.fn_),
            (c["TP"].as_u64().unwrap(), c["TN"].as_u64().unwrap(), c["FP"].as_u64().unwrap(), c["FN"].as_u64().unwrap()),
            "{name}: gres counts"
        );
        assert_eq!(r.sum_i, ge["sum_I"].as_u64().unwrap(), "{name}: sum_I");
        assert_eq!(r.sum_u, ge["sum_U"].as_u64().unwrap(), "{name}: sum_U");
        assert_eq!(r.sum_iou, ge["sum_IoU"].as_f64().unwrap(), "{name}: sum_IoU");
        assert_eq!(r.total, ge["total_count"].as_u64().unwrap(), "{name}: total");
        assert_eq!(r.not_empty, ge["not_empty_count"].as_u64().unwrap(), "{name}: not_empty");
        assert_eq!(r.empty, ge["empty_count"].as_u64().unwrap(), "{name}: empty");
        for (k, key) in ["0.7", "0.8", "0.9"].iter().enumerate() {
            assert_eq!(r.pr_count[k], ge["pr_count"][key].as_u64().unwrap(), "{name}: pr_count {key}");
        }
        close(&format!("{name}: gIoU"), r.g_iou, &ge["gIoU"], 1e-6);
        close(&format!("{name}: cIoU"), r.c_iou, &ge.get("cIoU").cloned().unwrap_or(Value::Null), 1e-6);
        let error = ge["error"].as_str();
        match error {
            None => {
                close(&format!("{name}: gres T_acc"), r.gres_t_acc, &ge["T_acc"], 1e-6);
                close(&format!("{name}: gres N_acc"), r.gres_n_acc, &ge["N_acc"], 1e-6);
                for (k, key) in ["Pr@0.7", "Pr@0.8", "Pr@0.9"].iter().enumerate() {
                    close(&format!("{name}: {key}"), r.pr[k], &ge[key], 1e-6);
                }
            }
            // Python stopped at the first division by zero: cIoU (ΣU = 0) or T_acc (no target sample).
            Some(_) => assert!(r.c_iou.is_none() || r.gres_t_acc.is_none(), "{name}: an undefined value must be None"),
        }
        if ge.get("cIoU").is_none() {
            assert_eq!(r.c_iou, None, "{name}: cIoU with ΣU = 0");
        }
        let grec = &g["grec_evaluate_f1_nacc"];
        let gc = &grec["counts"];
        assert_eq!(
            (r.grec_counts.tp, r.grec_counts.tn, r.grec_counts.fp, r.grec_counts.fn_),
            (gc["TP"].as_f64().unwrap() as u64, gc["TN"].as_f64().unwrap() as u64, gc["FP"].as_f64().unwrap() as u64, gc["FN"].as_f64().unwrap() as u64),
            "{name}: grec counts"
        );
        close(&format!("{name}: N-acc"), Some(r.n_acc), &grec["N_acc"], 1e-6);
        close(&format!("{name}: T-acc"), Some(r.t_acc), &grec["T_acc"], 1e-6);
        let summary = serde_json::to_value(r.summary()).unwrap();
        assert_eq!(summary["N-acc"].as_f64(), Some(r.n_acc), "{name}: summary N-acc");
        assert_eq!(summary["cIoU"].is_null(), r.c_iou.is_none(), "{name}: summary cIoU");
    }
    println!("GRES: {} samples exact, {} groups", samples.len(), gold["groups"].as_array().unwrap().len());
}
