//! Checkpoint files: both formats of tiny-a agree bit for bit, nested/prefixed training
//! checkpoints load the same tensors, broken files are errors that name the file, and the strict
//! audit reports every key problem in one error.
//!
//! The `fixtures/checkpoints/*.pth` files come from `fixtures/checkpoints/make_checkpoints.py`.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use deris::checkpoint::{self, bit_identical, Checkpoint, Format};
use deris::Error;

/// Our own committed fixtures (always in the repository, unlike the shared ones).
fn ckpt_fixture(name: &str) -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/checkpoints").join(name);
    assert!(p.exists(), "fixture missing: {}", p.display());
    p
}

/// A fresh temporary folder for one test.
fn temp_dir(test: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("deris-checkpoint-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn tiny_a() -> Checkpoint {
    Checkpoint::open(&common::fixture("tiny-a/weights.safetensors")).unwrap()
}

fn assert_same_tensor(name: &str, got: &Tensor, want: &Tensor) {
    assert_eq!(got.dtype(), want.dtype(), "{name}: dtype");
    assert_eq!(got.dims(), want.dims(), "{name}: shape");
    assert!(bit_identical(got, want).unwrap(), "{name}: values differ");
}

#[test]
fn safetensors_and_pth_of_tiny_a_are_bit_identical() {
    let st = tiny_a();
    let pth = Checkpoint::open(&common::fixture("tiny-a/weights.pth")).unwrap();
    assert_eq!(st.format(), Format::Safetensors);
    assert_eq!(pth.format(), Format::TorchZip);
    assert_eq!(st.len(), 562);
    assert_eq!(pth.len(), 562);
    assert_eq!(pth.layout().nested_under, None);
    assert_eq!(pth.layout().stripped_prefixes, 0);

    // The names are exactly the authors' state_dict keys.
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(common::fixture("tiny-a/config.json")).unwrap()).unwrap();
    let mut keys: Vec<&str> =
        config["state_dict_keys_in_order"].as_array().unwrap().iter().map(|k| k.as_str().unwrap()).collect();
    keys.sort();
    assert_eq!(st.names().collect::<Vec<_>>(), keys);
    assert_eq!(pth.names().collect::<Vec<_>>(), keys);

    let mut i64_buffers = 0;
    for name in st.names() {
        assert_eq!(st.meta(name), pth.meta(name), "{name}: metadata");
        let a = st.get(name, &Device::Cpu).unwrap();
        let b = pth.get(name, &Device::Cpu).unwrap();
        assert_same_tensor(name, &b, &a);
        if name.ends_with("relative_position_index") {
            assert_eq!(b.dtype(), DType::I64, "{name}");
            i64_buffers += 1;
        }
    }
    assert_eq!(i64_buffers, 8);
    let s = pth.summary();
    assert_eq!((s.tensors, s.buffers), (562, 9));
    // MODEL-SPEC §11 counts parameters without any buffer; the fixture's `param_count` keeps the
    // 2-element float buffer `head.criterion.empty_weight`.
    assert_eq!(s.parameter_count as u64 + 2, config["param_count"].as_u64().unwrap());
}

#[test]
fn our_reader_agrees_with_candles_on_the_torch_written_file() {
    // candle's own pickle reader as a second opinion. (It cannot read nested.pth: it panics on
    // the int beyond 64 bits in `meta` and knows no protocol-4 opcodes; hence our own reader.)
    let ours = Checkpoint::open(&common::fixture("tiny-a/weights.pth")).unwrap();
    let theirs = candle_core::pickle::read_all(common::fixture("tiny-a/weights.pth")).unwrap();
    assert_eq!(theirs.len(), 562);
    for (name, t) in &theirs {
        assert_same_tensor(name, &ours.get(name, &Device::Cpu).unwrap(), t);
    }
}

#[test]
fn nested_prefixed_training_checkpoint_loads_the_same_tensors() {
    let st = tiny_a();
    let ckpt = Checkpoint::open(&ckpt_fixture("nested.pth")).unwrap();
    let layout = ckpt.layout();
    assert_eq!(layout.nested_under.as_deref(), Some("state_dict"));
    assert_eq!(layout.stripped_prefixes, ckpt.len());
    for dropped in ["epoch", "optimizer", "scheduler", "lr", "best_mIoU", "meta", "ema_state_dict"] {
        assert!(layout.ignored.iter().any(|n| n == dropped), "{dropped} not in {:?}", layout.ignored);
    }
    assert_eq!(ckpt.len(), 27);
    let tensors = ckpt.load_all(&Device::Cpu).unwrap();
    for (name, t) in &tensors {
        assert!(!name.starts_with("module."), "{name}");
        assert_same_tensor(name, t, &st.get(name, &Device::Cpu).unwrap());
    }
    // The strided, shared-storage, parameter-wrapped and int64 cases are all in there.
    for name in [
        "perception_branch.predictor.box_embed.layers.2.weight",
        "perception_branch.predictor.SEG_cls.weight",
        "perception_branch.predictor.SEG_cls.bias",
        "understanding_branch.nt_embed.weight",
        "perception_branch.hier_vision_encoder.layers.0.blocks.0.attn.relative_position_index",
    ] {
        assert!(tensors.contains_key(name), "{name}");
    }
}

#[test]
fn protocol4_checkpoint_under_model() {
    let st = tiny_a();
    let ckpt = Checkpoint::open(&ckpt_fixture("proto4_model.pth")).unwrap();
    assert_eq!(ckpt.layout().nested_under.as_deref(), Some("model"));
    assert_eq!(ckpt.len(), 2);
    for (name, t) in ckpt.load_all(&Device::Cpu).unwrap() {
        assert_same_tensor(&name, &t, &st.get(&name, &Device::Cpu).unwrap());
    }
}

/// Opens `path`, expects `Error::Checkpoint` naming it, returns the reason.
fn open_err(path: &Path) -> String {
    match Checkpoint::open(path) {
        Err(e @ Error::Checkpoint { .. }) => {
            let Error::Checkpoint { path: p, reason } = &e else { unreachable!() };
            assert_eq!(p, path);
            assert!(e.to_string().contains(&path.display().to_string()), "{e}");
            println!("{e}");
            reason.clone()
        }
        Err(e) => panic!("{}: wrong error kind: {e}", path.display()),
        Ok(c) => panic!("{}: opened a broken file: {c:?}", path.display()),
    }
}

/// A safetensors file with a hand-written header and `data_len` zero bytes of data.
fn write_safetensors(path: &Path, header: &str, data_len: usize) {
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.resize(bytes.len() + data_len, 0);
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn broken_files_are_errors_that_name_the_file() {
    assert!(open_err(&ckpt_fixture("truncated.pth")).contains("broken zip archive"));
    assert!(open_err(&ckpt_fixture("not_a_checkpoint.pth")).contains("without data.pkl"));

    let dir = temp_dir("broken");
    assert_eq!(open_err(&dir.join("missing.pth")), "file not found");
    assert!(open_err(&dir).contains("directory"));
    let empty = dir.join("empty.safetensors");
    std::fs::write(&empty, b"").unwrap();
    assert_eq!(open_err(&empty), "empty file");
    let garbage = dir.join("garbage.pth");
    std::fs::write(&garbage, b"this is not a checkpoint at all").unwrap();
    assert!(open_err(&garbage).contains("not a checkpoint"));
    let legacy = dir.join("legacy.pth");
    std::fs::write(&legacy, b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19.").unwrap();
    assert!(open_err(&legacy).contains("legacy"));

    // Headers that lie about sizes.
    let too_long = dir.join("header_too_long.safetensors");
    std::fs::write(&too_long, [&1_000_000u64.to_le_bytes()[..], b"{}"].concat()).unwrap();
    assert!(open_err(&too_long).contains("header claims 1000000 bytes"));
    let past_end = dir.join("past_end.safetensors");
    write_safetensors(&past_end, r#"{"w":{"dtype":"F32","shape":[1000,1000],"data_offsets":[0,4000000]}}"#, 16);
    assert!(open_err(&past_end).contains("lies outside the file's 16 data bytes"));
    let wrong_size = dir.join("wrong_size.safetensors");
    write_safetensors(&wrong_size, r#"{"w":{"dtype":"F32","shape":[3,3],"data_offsets":[0,16]}}"#, 16);
    assert!(open_err(&wrong_size).contains("needs 36 bytes"));
    let bad_dtype = dir.join("bad_dtype.safetensors");
    write_safetensors(&bad_dtype, r#"{"w":{"dtype":"C64","shape":[2],"data_offsets":[0,16]}}"#, 16);
    assert!(open_err(&bad_dtype).contains("unsupported dtype"));
    let bad_json = dir.join("bad_json.safetensors");
    write_safetensors(&bad_json, r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}"#, 8);
    assert!(open_err(&bad_json).contains("not a JSON object"));

    // Real files cut short.
    for (src, name) in [("tiny-a/weights.safetensors", "cut.safetensors"), ("tiny-a/weights.pth", "cut.pth")] {
        let bytes = std::fs::read(common::fixture(src)).unwrap();
        let cut = dir.join(name);
        std::fs::write(&cut, &bytes[..bytes.len() - 1000]).unwrap();
        open_err(&cut);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn short_storage_is_rejected_at_open() {
    let reason = open_err(&ckpt_fixture("short_storage.pth"));
    assert!(reason.contains("reaches element 15 of a 2-element storage"), "{reason}");
}

/// Requests a few real tiny-a keys (one with a wrong shape), a fake key, and an int64 buffer.
fn bad_builder(ckpt: &Checkpoint) -> impl FnOnce(candle_nn::VarBuilder<'_>) -> candle_core::Result<Vec<Tensor>> {
    let shape = |n: &str| ckpt.meta(n).unwrap().shape.clone();
    let cls = shape("perception_branch.predictor.SEG_cls.weight");
    let idx = shape("perception_branch.hier_vision_encoder.layers.0.blocks.0.attn.relative_position_index");
    let bias = shape("perception_branch.predictor.SEG_cls.bias");
    move |vb| {
        let p = vb.pp("perception_branch");
        Ok(vec![
            p.pp("predictor.SEG_cls").get(cls.clone(), "weight")?,
            p.pp("predictor.SEG_cls").get(bias[0] + 1, "bias")?,
            p.pp("predictor").get((3, 7), "not_a_key")?,
            p.pp("hier_vision_encoder.layers.0.blocks.0.attn").get_with_hints_dtype(
                idx.clone(),
                "relative_position_index",
                Default::default(),
                DType::I64,
            )?,
        ])
    }
}

#[test]
fn strict_audit_reports_every_problem_in_one_error() {
    let ckpt = tiny_a();
    let err = checkpoint::load_strict(&ckpt, DType::F32, &Device::Cpu, "tiny-a", bad_builder(&ckpt)).unwrap_err();
    println!("{err}");
    let Error::KeyMismatch { path, model, missing, unexpected, mismatched } = &err else { panic!("{err}") };
    assert_eq!(path, ckpt.path());
    assert_eq!(model, "tiny-a");
    assert_eq!(missing, &["perception_branch.predictor.not_a_key"]);
    let bias = ckpt.meta("perception_branch.predictor.SEG_cls.bias").unwrap().shape[0];
    assert_eq!(
        mismatched,
        &[format!("perception_branch.predictor.SEG_cls.bias: file [{bias}] vs model [{}]", bias + 1)]
    );
    // Everything but the three real keys requested.
    assert_eq!(unexpected.len(), 562 - 3);
    for used in [
        "perception_branch.predictor.SEG_cls.weight",
        "perception_branch.predictor.SEG_cls.bias",
        "perception_branch.hier_vision_encoder.layers.0.blocks.0.attn.relative_position_index",
    ] {
        assert!(!unexpected.iter().any(|k| k == used), "{used} reported unexpected");
    }
    let text = err.to_string();
    assert!(
        text.contains("1 missing key(s)")
            && text.contains("559 unexpected key(s)")
            && text.contains("1 wrong shape key(s)"),
        "{text}"
    );
}

#[test]
fn lenient_load_returns_the_model_and_the_report() {
    let ckpt = tiny_a();
    let (tensors, report) =
        checkpoint::load_lenient(&ckpt, DType::F32, &Device::Cpu, "tiny-a", bad_builder(&ckpt)).unwrap();
    assert!(!report.is_clean());
    assert_eq!(report.missing.len(), 1);
    assert_eq!(report.mismatched.len(), 1);
    assert_eq!(report.requested.len(), 4);
    // Missing and mismatched tensors are zeros of the requested shape; the rest are real.
    assert_eq!(tensors[2].dims(), [3, 7]);
    assert_eq!(tensors[2].abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
    assert_same_tensor(
        "SEG_cls.weight",
        &tensors[0],
        &ckpt.get("perception_branch.predictor.SEG_cls.weight", &Device::Cpu).unwrap(),
    );
    assert_eq!(tensors[3].dtype(), DType::I64);
}

/// Requests every key of the file with its shape (int64 buffers as I64).
fn full_builder(
    ckpt: &Checkpoint,
) -> impl FnOnce(candle_nn::VarBuilder<'_>) -> candle_core::Result<BTreeMap<String, Tensor>> + '_ {
    move |vb| {
        ckpt.names()
            .map(|n| {
                let m = ckpt.meta(n).unwrap();
                let dtype = if m.dtype == DType::I64 { DType::I64 } else { vb.dtype() };
                Ok((n.to_string(), vb.get_with_hints_dtype(m.shape.clone(), n, Default::default(), dtype)?))
            })
            .collect()
    }
}

#[test]
fn strict_load_of_matching_keys_converts_float_dtype_only() {
    let ckpt = Checkpoint::open(&common::fixture("tiny-a/weights.pth")).unwrap();
    let loaded = checkpoint::load_strict(&ckpt, DType::F64, &Device::Cpu, "tiny-a", full_builder(&ckpt)).unwrap();
    assert_eq!(loaded.len(), 562);
    for (name, t) in &loaded {
        let want = ckpt.get(name, &Device::Cpu).unwrap();
        if want.dtype() == DType::I64 {
            assert_same_tensor(name, t, &want);
        } else {
            assert_eq!(t.dtype(), DType::F64, "{name}");
            assert_same_tensor(name, &t.to_dtype(DType::F32).unwrap(), &want);
        }
    }
}

#[test]
fn audit_checks_keys_without_reading_weights() {
    let ckpt = tiny_a();
    let report = checkpoint::audit(&ckpt, full_builder(&ckpt)).unwrap();
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(report.requested.len(), 562);
    let report = checkpoint::audit(&ckpt, bad_builder(&ckpt)).unwrap();
    assert_eq!((report.missing.len(), report.mismatched.len(), report.unexpected.len()), (1, 1, 559));
}

#[test]
fn save_safetensors_round_trips_dtypes_and_never_leaves_partial_files() {
    let dir = temp_dir("save");
    let mut tensors = Checkpoint::open(&ckpt_fixture("nested.pth")).unwrap().load_all(&Device::Cpu).unwrap();
    tensors.insert("mask".into(), Tensor::new(&[0u8, 1, 255], &Device::Cpu).unwrap());
    let out = dir.join("out.safetensors");
    checkpoint::save_safetensors(&tensors, &out).unwrap();
    let back = Checkpoint::open(&out).unwrap();
    assert_eq!(back.len(), tensors.len());
    for (name, t) in &tensors {
        assert_same_tensor(name, &back.get(name, &Device::Cpu).unwrap(), t);
    }
    let dtypes: std::collections::BTreeSet<String> = tensors.values().map(|t| format!("{:?}", t.dtype())).collect();
    assert_eq!(dtypes.into_iter().collect::<Vec<_>>(), ["F32", "I64", "U8"]);
    let files: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(files, ["out.safetensors"], "temporary files left behind");

    // Into a folder that does not exist: an error, and nothing written.
    let err = checkpoint::save_safetensors(&tensors, &dir.join("nope/out.safetensors")).unwrap_err();
    assert!(err.to_string().contains("nope/out.safetensors"), "{err}");
    assert!(!dir.join("nope").exists());
    let _ = std::fs::remove_dir_all(&dir);
}
