//! The key audit: VarBuilder backends that record every tensor a constructor requests.
//!
//! candle's VarBuilder fails at the first missing key and never reports keys that nobody asked
//! for. The recording backend here answers a missing or wrongly shaped key with zeros of the
//! requested shape, so construction goes on and every problem is collected; at the end, keys in
//! the file that were never requested are "unexpected". [`load_strict`] turns any problem into
//! one [`Error::KeyMismatch`].

use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};

use super::Checkpoint;
use crate::error::{Error, Result};

/// One requested tensor: name, shape, dtype.
pub type Request = (String, Vec<usize>, DType);

/// What a constructor requested from a checkpoint, and every disagreement.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AuditReport {
    /// Every request in order (a name requested twice appears twice).
    pub requested: Vec<Request>,
    /// Requested names the file lacks, in request order.
    pub missing: Vec<String>,
    /// Names in the file that were never requested, sorted.
    pub unexpected: Vec<String>,
    /// `name: file [..] vs model [..]`, in request order.
    pub mismatched: Vec<String>,
}

impl AuditReport {
    /// True when the file and the model agree exactly.
    pub fn is_clean(&self) -> bool {
        self.missing.is_empty() && self.unexpected.is_empty() && self.mismatched.is_empty()
    }

    /// `Ok(())` when clean, else one [`Error::KeyMismatch`] with every problem.
    pub fn into_result(self, ckpt: &Checkpoint, model: &str) -> Result<()> {
        if self.is_clean() {
            Ok(())
        } else {
            Err(self.into_error(ckpt, model))
        }
    }

    fn into_error(self, ckpt: &Checkpoint, model: &str) -> Error {
        Error::KeyMismatch {
            path: ckpt.path().to_path_buf(),
            model: model.to_string(),
            missing: self.missing,
            unexpected: self.unexpected,
            mismatched: self.mismatched,
        }
    }

    fn warn(&self, ckpt: &Checkpoint, model: &str) {
        let path = ckpt.path().display();
        for k in &self.missing {
            tracing::warn!("{path}: model '{model}' needs '{k}', which the file lacks (zeros used)");
        }
        for k in &self.mismatched {
            tracing::warn!("{path}: wrong shape for model '{model}': {k} (zeros used)");
        }
        for k in &self.unexpected {
            tracing::warn!("{path}: '{k}' is not used by model '{model}'");
        }
    }
}

/// Largest tensor a placeholder allocates for real; anything bigger is a broadcast zero scalar.
const PLACEHOLDER_MAX_ELEMS: usize = 1 << 16;

/// Zeros of `shape` that cost no memory when large. Up to [`PLACEHOLDER_MAX_ELEMS`] elements
/// they are real zeros, so that constructors may index, reshape or narrow them (e.g. a Swin
/// `relative_position_index`); above that they are a scalar broadcast to `shape` (stride 0).
fn placeholder(shape: &Shape, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
    let small =
        shape.dims().iter().try_fold(1usize, |a, &d| a.checked_mul(d)).is_some_and(|n| n <= PLACEHOLDER_MAX_ELEMS);
    if small {
        Tensor::zeros(shape, dtype, dev)
    } else {
        Tensor::zeros((), dtype, dev)?.broadcast_as(shape)
    }
}

fn lock<T>(m: &Mutex<T>) -> candle_core::Result<MutexGuard<'_, T>> {
    m.lock().map_err(|_| candle_core::Error::Msg("audit log poisoned by an earlier panic".into()))
}

#[derive(Default)]
struct Log {
    requested: Vec<Request>,
    seen: HashSet<String>,
    missing: Vec<String>,
    mismatched: Vec<String>,
    /// The first failure to read a present tensor (a broken file, not a key problem).
    read_error: Option<Error>,
}

/// Whether the recorder serves the file's tensors or zero placeholders (keys and shapes only).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Fill {
    Weights,
    Placeholders,
}

struct Recorder<'c> {
    ckpt: &'c Checkpoint,
    fill: Fill,
    log: Arc<Mutex<Log>>,
}

impl Recorder<'_> {
    fn serve(&self, name: &str, dtype: DType, dev: &Device, shape: &Shape) -> candle_core::Result<Tensor> {
        if self.fill == Fill::Placeholders {
            return placeholder(shape, dtype, dev);
        }
        match self.ckpt.get(name, dev) {
            Ok(t) => t.to_dtype(dtype),
            Err(e) => {
                let msg = e.to_string();
                lock(&self.log)?.read_error.get_or_insert(e);
                Err(candle_core::Error::Msg(msg))
            }
        }
    }
}

impl SimpleBackend for Recorder<'_> {
    fn get(&self, s: Shape, name: &str, _: Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        {
            let mut log = lock(&self.log)?;
            log.requested.push((name.to_string(), s.dims().to_vec(), dtype));
            let first = log.seen.insert(name.to_string());
            match self.ckpt.meta(name) {
                None => {
                    if first {
                        log.missing.push(name.to_string());
                    }
                    return placeholder(&s, dtype, dev);
                }
                Some(m) if m.shape != s.dims() => {
                    let msg = format!("{name}: file {:?} vs model {:?}", m.shape, s.dims());
                    if !log.mismatched.contains(&msg) {
                        log.mismatched.push(msg);
                    }
                    return placeholder(&s, dtype, dev);
                }
                Some(_) => {}
            }
        }
        self.serve(name, dtype, dev, &s)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let shape = {
            let mut log = lock(&self.log)?;
            let first = log.seen.insert(name.to_string());
            let Some(m) = self.ckpt.meta(name) else {
                if first {
                    log.missing.push(name.to_string());
                }
                candle_core::bail!("'{name}' is not in the checkpoint (requested without a shape)")
            };
            log.requested.push((name.to_string(), m.shape.clone(), dtype));
            Shape::from(m.shape.clone())
        };
        self.serve(name, dtype, dev, &shape)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.ckpt.contains(name)
    }
}

/// Runs `build` over a recording backend; returns its result and the report.
fn record<T>(
    ckpt: &Checkpoint,
    fill: Fill,
    dtype: DType,
    device: &Device,
    build: impl FnOnce(VarBuilder<'_>) -> candle_core::Result<T>,
) -> Result<(candle_core::Result<T>, AuditReport)> {
    let log = Arc::new(Mutex::new(Log::default()));
    let backend = Recorder { ckpt, fill, log: log.clone() };
    let built = build(VarBuilder::from_backend(Box::new(backend), dtype, device.clone()));
    let mut log = std::mem::take(&mut *lock(&log)?);
    if let Some(e) = log.read_error.take() {
        return Err(e);
    }
    let unexpected = ckpt.names().filter(|n| !log.seen.contains(*n)).map(String::from).collect();
    let report = AuditReport { requested: log.requested, missing: log.missing, unexpected, mismatched: log.mismatched };
    Ok((built, report))
}

/// Builds a model from `ckpt`, requiring the file's keys and shapes to match what the
/// constructor requests exactly. Float weights are converted to the requested dtype (`dtype`
/// unless a constructor asks otherwise, e.g. `DType::I64` for `relative_position_index`).
///
/// Errors: [`Error::KeyMismatch`] listing every missing, unexpected and wrongly shaped key at
/// once; [`Error::Checkpoint`] when a tensor cannot be read; [`Error::Tensor`] when the
/// constructor itself fails.
pub fn load_strict<T>(
    ckpt: &Checkpoint,
    dtype: DType,
    device: &Device,
    model_name: &str,
    build: impl FnOnce(VarBuilder<'_>) -> candle_core::Result<T>,
) -> Result<T> {
    let (built, report) = record(ckpt, Fill::Weights, dtype, device, build)?;
    report.into_result(ckpt, model_name)?;
    Ok(built?)
}

/// Like [`load_strict`], but key problems only warn (`tracing::warn!`): missing or wrongly
/// shaped tensors are zeros. Returns the model and the report.
pub fn load_lenient<T>(
    ckpt: &Checkpoint,
    dtype: DType,
    device: &Device,
    model_name: &str,
    build: impl FnOnce(VarBuilder<'_>) -> candle_core::Result<T>,
) -> Result<(T, AuditReport)> {
    let (built, report) = record(ckpt, Fill::Weights, dtype, device, build)?;
    match built {
        Ok(model) => {
            report.warn(ckpt, model_name);
            Ok((model, report))
        }
        Err(e) if report.is_clean() => Err(e.into()),
        // A constructor that failed on zeros is explained best by the key problems.
        Err(_) => Err(report.into_error(ckpt, model_name)),
    }
}

/// Checks `ckpt`'s keys and shapes against what `build` requests, without reading any weight
/// (the constructor gets zero placeholders). Returns the report, clean or not; a constructor
/// error is returned only when the keys agree (otherwise the report explains it).
pub fn audit<T>(
    ckpt: &Checkpoint,
    build: impl FnOnce(VarBuilder<'_>) -> candle_core::Result<T>,
) -> Result<AuditReport> {
    let (built, report) = record(ckpt, Fill::Placeholders, DType::F32, &Device::Cpu, build)?;
    match built {
        Err(e) if report.is_clean() => Err(e.into()),
        _ => Ok(report),
    }
}

struct DryRun {
    log: Arc<Mutex<Vec<Request>>>,
}

impl SimpleBackend for DryRun {
    fn get(&self, s: Shape, name: &str, _: Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        lock(&self.log)?.push((name.to_string(), s.dims().to_vec(), dtype));
        placeholder(&s, dtype, dev)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("dry run: '{name}' requested without a shape")
    }

    /// Every key "exists", so optional branches are taken and listed.
    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

/// Runs a constructor without any file and lists every tensor it requests, in request order
/// (a name requested twice appears twice), with shape and dtype. Weights are zero placeholders
/// (F32 on the CPU unless requested otherwise); large ones take no memory, so even DeRIS-L
/// builds in a few megabytes.
pub fn dry_run<T>(
    build: impl FnOnce(VarBuilder<'_>) -> candle_core::Result<T>,
) -> candle_core::Result<(T, Vec<Request>)> {
    let log = Arc::new(Mutex::new(Vec::new()));
    let vb = VarBuilder::from_backend(Box::new(DryRun { log: log.clone() }), DType::F32, Device::Cpu);
    let built = build(vb)?;
    let requests = std::mem::take(&mut *lock(&log)?);
    Ok((built, requests))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dry_run_lists_requests_in_order_without_allocating() {
        let (huge, requests) = dry_run(|vb| {
            let a = candle_nn::linear(3, 4, vb.pp("a"))?;
            let _b = candle_nn::linear_no_bias(4, 2, vb.pp("b"))?;
            let idx = vb.get_with_hints_dtype((5, 5), "idx", Init::Const(0.), DType::I64)?;
            assert_eq!(idx.dtype(), DType::I64);
            // 10^10 f32 would be 40 GB if it were allocated.
            let huge = vb.get((100_000, 100_000), "huge")?;
            assert_eq!(a.weight().dims(), [4, 3]);
            Ok(huge)
        })
        .unwrap();
        assert_eq!(huge.dims(), [100_000, 100_000]);
        assert_eq!(huge.stride(), [0, 0], "large placeholders must be broadcasts");
        let names: Vec<(&str, &[usize], DType)> =
            requests.iter().map(|(n, s, d)| (n.as_str(), s.as_slice(), *d)).collect();
        assert_eq!(
            names,
            [
                ("a.weight", &[4, 3][..], DType::F32),
                ("a.bias", &[4][..], DType::F32),
                ("b.weight", &[2, 4][..], DType::F32),
                ("idx", &[5, 5][..], DType::I64),
                ("huge", &[100_000, 100_000][..], DType::F32),
            ]
        );
    }

    #[test]
    fn placeholders_are_zero() {
        let small = placeholder(&Shape::from((2, 3)), DType::F32, &Device::Cpu).unwrap();
        assert!(small.is_contiguous());
        assert_eq!(small.sum_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
        let big = placeholder(&Shape::from((1000, 1000)), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(big.narrow(0, 7, 2).unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
    }
}
