//! PyTorch's zip checkpoint format (`torch.save` since 1.6): `<dir>/data.pkl` is the pickled
//! object, in which each tensor is a `torch._utils._rebuild_tensor_v2(storage, offset, size,
//! stride, …)` call whose storage is a persistent id `('storage', torch.FloatStorage, key,
//! location, numel)`; `<dir>/data/<key>` holds that storage's raw little-endian bytes.
//!
//! Everything is validated when the archive is opened (tensor extents against storage sizes,
//! storage sizes against the zip entries), so reading a tensor later cannot go out of bounds.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;
use std::sync::Mutex;

use candle_core::{DType, Device, Tensor};

use super::keys::EntryKind;
use super::pickle::{self, Value};

type Zip = zip::ZipArchive<BufReader<File>>;

/// Where one tensor's elements are: a strided view into a storage.
#[derive(Debug, Clone)]
pub struct TensorRef {
    storage: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    stride: Vec<usize>,
    /// In elements.
    offset: usize,
}

/// An open torch zip archive and the tensors of its top-level dict.
pub struct Archive {
    zip: Mutex<Zip>,
    /// The folder inside the zip that holds `data.pkl` (e.g. `archive`).
    dir: String,
}

/// One top-level entry of the pickled dict: a tensor, a dict of tensors (name → tensor), or
/// anything else (with a one-line description for logs).
pub enum TopEntry {
    Tensor(TensorRef),
    TensorDict(Vec<(String, TensorRef)>),
    Other(String),
}

impl TopEntry {
    pub fn kind(&self) -> EntryKind {
        match self {
            TopEntry::Tensor(_) => EntryKind::Tensor,
            TopEntry::TensorDict(_) => EntryKind::TensorDict,
            TopEntry::Other(_) => EntryKind::Other,
        }
    }
}

fn storage_dtype(class: &str) -> Option<DType> {
    Some(match class {
        "FloatStorage" => DType::F32,
        "DoubleStorage" => DType::F64,
        "HalfStorage" => DType::F16,
        "BFloat16Storage" => DType::BF16,
        "LongStorage" => DType::I64,
        "IntStorage" => DType::I32,
        "ShortStorage" => DType::I16,
        "ByteStorage" | "BoolStorage" => DType::U8,
        _ => return None,
    })
}

fn usize_of(v: &Value, what: &str) -> Result<usize, String> {
    match v {
        Value::Int(i) => usize::try_from(*i).map_err(|_| format!("{what} is negative ({i})")),
        other => Err(format!("{what} is a {}, not an int", other.kind())),
    }
}

fn usizes(v: &Value, what: &str) -> Result<Vec<usize>, String> {
    match v {
        Value::Tuple(items) => items.iter().map(|i| usize_of(i, what)).collect(),
        Value::List(items) => items.borrow().iter().map(|i| usize_of(i, what)).collect(),
        other => Err(format!("{what} is a {}, not a tuple", other.kind())),
    }
}

/// `Some(ref)` if `v` is a pickled tensor, `None` if it is something else.
fn tensor_ref(v: &Value) -> Result<Option<TensorRef>, String> {
    let Value::Call { func, args } = v else { return Ok(None) };
    let Some((module, name)) = func.as_global() else { return Ok(None) };
    let Value::Tuple(args) = &**args else { return Ok(None) };
    match (module, name) {
        ("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state") => {
            // (data, requires_grad, backward_hooks[, state]): the data is the tensor.
            args.first().map_or(Ok(None), tensor_ref)
        }
        ("torch._tensor", "_rebuild_from_type_v2") => {
            // (func, type, args, state): func(*args) is the tensor.
            match (args.first(), args.get(2)) {
                (Some(f), Some(a)) => tensor_ref(&Value::Call { func: f.clone().into(), args: a.clone().into() }),
                _ => Err("malformed _rebuild_from_type_v2 call".into()),
            }
        }
        ("torch._utils", "_rebuild_tensor_v2" | "_rebuild_tensor") => {
            let [storage, offset, size, stride, ..] = &args[..] else {
                return Err(format!("{name} with {} arguments", args.len()));
            };
            let (storage, dtype) = storage_ref(storage)?;
            Ok(Some(TensorRef {
                storage,
                dtype,
                shape: usizes(size, "tensor size")?,
                stride: usizes(stride, "tensor stride")?,
                offset: usize_of(offset, "storage offset")?,
            }))
        }
        ("torch._utils", other) if other.starts_with("_rebuild") => {
            Err(format!("tensors stored with torch._utils.{other} (quantized, sparse or meta) are not supported"))
        }
        _ => Ok(None),
    }
}

/// `(storage key, dtype)` from a persistent id `('storage', torch.XStorage, key, location, numel)`.
/// The element count is not trusted: the zip entry's real size is checked instead.
fn storage_ref(v: &Value) -> Result<(String, DType), String> {
    let Value::PersistentId(id) = v else { return Err(format!("tensor storage is a {}", v.kind())) };
    let Value::Tuple(t) = &**id else { return Err(format!("storage id is a {}", id.kind())) };
    let [Value::Str(tag), class, Value::Str(key), _location, _numel] = &t[..] else {
        return Err("storage id is not ('storage', type, key, location, numel)".into());
    };
    if &**tag != "storage" {
        return Err(format!("unknown persistent id '{tag}'"));
    }
    let class = class.as_global().map(|(_, n)| n).unwrap_or_default();
    let dtype = storage_dtype(class).ok_or_else(|| format!("unsupported storage type '{class}'"))?;
    Ok((key.to_string(), dtype))
}

/// Checks a tensor's extent against its storage: returns a message naming the problem.
fn check_extent(t: &TensorRef, storage_numel: usize) -> Result<(), String> {
    if t.stride.len() != t.shape.len() {
        return Err(format!("shape {:?} with stride {:?}", t.shape, t.stride));
    }
    let mut numel: usize = 1;
    let mut last = t.offset;
    for (&n, &s) in t.shape.iter().zip(&t.stride) {
        numel = numel.checked_mul(n).ok_or("element count overflows")?;
        if n > 0 {
            last = (n - 1).checked_mul(s).and_then(|d| last.checked_add(d)).ok_or("extent overflows")?;
        }
    }
    if t.offset > storage_numel || (numel > 0 && last >= storage_numel) {
        return Err(format!(
            "shape {:?}, stride {:?} at offset {} reaches element {last} of a {storage_numel}-element storage",
            t.shape, t.stride, t.offset
        ));
    }
    Ok(())
}

fn dict_of_tensors(items: &[(Value, Value)]) -> Result<Vec<(String, TensorRef)>, String> {
    let mut out = Vec::new();
    for (k, v) in items {
        let Value::Str(name) = k else { continue };
        match tensor_ref(v).map_err(|e| format!("'{name}': {e}"))? {
            Some(t) => out.push((name.to_string(), t)),
            None => tracing::debug!("skipping non-tensor entry '{name}' ({})", v.describe()),
        }
    }
    Ok(out)
}

impl Archive {
    /// Opens a torch zip archive and reads its top-level dict.
    pub fn open(path: &Path) -> Result<(Archive, Vec<(String, TopEntry)>), String> {
        let file = File::open(path).map_err(|e| e.to_string())?;
        let mut zip =
            Zip::new(BufReader::new(file)).map_err(|e| format!("broken zip archive (truncated or corrupt?): {e}"))?;
        let pkls: Vec<String> = zip
            .file_names_raw()
            .filter(|n| *n == b"data.pkl" || n.ends_with(b"/data.pkl"))
            .map(|n| String::from_utf8_lossy(n).into_owned())
            .collect();
        let pkl = match &pkls[..] {
            [one] => one.clone(),
            [] => return Err("a zip archive without data.pkl: not a PyTorch checkpoint".into()),
            _ => {
                return Err(format!(
                    "a zip archive with several pickles ({}): not a torch.save checkpoint",
                    pkls.join(", ")
                ))
            }
        };
        let dir = pkl.strip_suffix("data.pkl").unwrap_or_default().trim_end_matches('/').to_string();
        let data = read_entry(&mut zip, &pkl)?;
        let byteorder = if dir.is_empty() { "byteorder".to_string() } else { format!("{dir}/byteorder") };
        if zip.index_for_name(&byteorder).is_some() {
            let order = read_entry(&mut zip, &byteorder)?;
            if order.trim_ascii() != b"little" {
                return Err(format!("byte order '{}' is not supported", String::from_utf8_lossy(&order)));
            }
        }

        let top = pickle::load(&data).map_err(|e| format!("{pkl}: {e}"))?;
        let entries = top_entries(&top).map_err(|e| format!("{pkl}: {e}"))?;
        Ok((Archive { zip: Mutex::new(zip), dir }, entries))
    }

    fn storage_entry(&self, key: &str) -> String {
        if self.dir.is_empty() {
            format!("data/{key}")
        } else {
            format!("{}/data/{key}", self.dir)
        }
    }

    /// Checks that the storages of the chosen tensors exist and hold every element they view,
    /// so that [`Archive::read`] cannot fail on a consistent archive.
    pub fn check_tensors<'a>(&self, tensors: impl Iterator<Item = &'a TensorRef>) -> Result<(), String> {
        let mut zip = self.zip.lock().map_err(|_| "checkpoint reader poisoned by an earlier failure".to_string())?;
        let mut sizes: HashMap<&str, u64> = HashMap::new();
        for t in tensors {
            let entry = self.storage_entry(&t.storage);
            let size = match sizes.get(t.storage.as_str()) {
                Some(&s) => s,
                None => {
                    let s = zip.by_name(&entry).map_err(|e| format!("storage {entry}: {e}"))?.size();
                    sizes.insert(&t.storage, s);
                    s
                }
            };
            let numel = usize::try_from(size).unwrap_or(usize::MAX) / t.dtype.size_in_bytes();
            check_extent(t, numel).map_err(|e| format!("storage {entry}: {e}"))?;
        }
        Ok(())
    }

    /// Reads one tensor (its own dtype) onto `device`.
    pub fn read(&self, t: &TensorRef, device: &Device) -> Result<Tensor, String> {
        let entry = self.storage_entry(&t.storage);
        let bytes = {
            let mut zip =
                self.zip.lock().map_err(|_| "checkpoint reader poisoned by an earlier failure".to_string())?;
            read_entry(&mut zip, &entry)?
        };
        let es = t.dtype.size_in_bytes();
        let numel: usize = t.shape.iter().product();
        let contiguous = is_row_major(&t.shape, &t.stride);
        let data = if contiguous {
            let start = t.offset * es;
            bytes
                .get(start..start + numel * es)
                .ok_or_else(|| format!("storage {entry} is shorter than its tensor"))?
                .to_vec()
        } else {
            gather(&bytes, t, es).ok_or_else(|| format!("storage {entry} is shorter than its tensor"))?
        };
        Tensor::from_raw_buffer(&data, t.dtype, &t.shape, device).map_err(|e| format!("storage {entry}: {e}"))
    }
}

/// Classifies the entries of the unpickled top-level object.
fn top_entries(top: &Value) -> Result<Vec<(String, TopEntry)>, String> {
    let Value::Dict(items) = top else {
        return Err(format!(
            "holds a {} rather than a dict of tensors (save `model.state_dict()`, not the module)",
            top.kind()
        ));
    };
    let mut entries = Vec::new();
    for (k, v) in items.borrow().iter() {
        let Value::Str(name) = k else { continue };
        let entry = if let Some(t) = tensor_ref(v).map_err(|e| format!("'{name}': {e}"))? {
            TopEntry::Tensor(t)
        } else if let Value::Dict(d) = v {
            // Training state (optimizer, …) may hold tensors in odd encodings: only the entry
            // chosen as the weights has to be readable.
            match dict_of_tensors(&d.borrow()) {
                Ok(ts) if !ts.is_empty() => TopEntry::TensorDict(ts),
                _ => TopEntry::Other(v.describe()),
            }
        } else {
            TopEntry::Other(v.describe())
        };
        entries.push((name.to_string(), entry));
    }
    Ok(entries)
}

fn read_entry(zip: &mut Zip, name: &str) -> Result<Vec<u8>, String> {
    let mut f = zip.by_name(name).map_err(|e| format!("{name}: {e}"))?;
    let mut buf = Vec::with_capacity(usize::try_from(f.size()).unwrap_or(0));
    // Reading to the end also checks the entry's CRC.
    f.read_to_end(&mut buf).map_err(|e| format!("{name}: {e}"))?;
    Ok(buf)
}

fn is_row_major(shape: &[usize], stride: &[usize]) -> bool {
    let mut expected = 1;
    for (&n, &s) in shape.iter().zip(stride).rev() {
        if n > 1 && s != expected {
            return false;
        }
        expected *= n;
    }
    true
}

/// Copies a strided view out of `storage` in row-major order; `None` if it reaches past the end.
fn gather(storage: &[u8], t: &TensorRef, es: usize) -> Option<Vec<u8>> {
    let numel: usize = t.shape.iter().product();
    let mut out = Vec::with_capacity(numel * es);
    let mut index = vec![0usize; t.shape.len()];
    let mut at = t.offset;
    for _ in 0..numel {
        out.extend_from_slice(storage.get(at * es..(at + 1) * es)?);
        for d in (0..t.shape.len()).rev() {
            index[d] += 1;
            at += t.stride[d];
            if index[d] < t.shape[d] {
                break;
            }
            at -= t.stride[d] * t.shape[d];
            index[d] = 0;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gather_transposed_view() {
        // storage [0..6) as a 2x3 row-major matrix, viewed transposed (3x2, stride (1, 3)).
        let storage: Vec<u8> = (0u8..6).collect();
        let t = TensorRef { storage: "0".into(), dtype: DType::U8, shape: vec![3, 2], stride: vec![1, 3], offset: 0 };
        assert!(!is_row_major(&t.shape, &t.stride));
        assert_eq!(gather(&storage, &t, 1).unwrap(), vec![0, 3, 1, 4, 2, 5]);
        assert!(check_extent(&t, 6).is_ok());
        assert!(check_extent(&t, 5).is_err());
    }

    #[test]
    fn row_major_ignores_unit_dims() {
        assert!(is_row_major(&[2, 1, 3], &[3, 17, 1]));
        assert!(is_row_major(&[], &[]));
        assert!(!is_row_major(&[2, 3], &[1, 2]));
    }

    /// Truncations and byte flips of a real checkpoint pickle: errors or entries, never a panic.
    #[test]
    fn mutated_checkpoint_pickles_never_panic() {
        use std::io::Read;
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/checkpoints/nested.pth");
        let mut zip = zip::ZipArchive::new(std::fs::File::open(path).unwrap()).unwrap();
        let mut data = Vec::new();
        zip.by_name("nested/data.pkl").unwrap().read_to_end(&mut data).unwrap();
        assert_eq!(top_entries(&pickle::load(&data).unwrap()).unwrap().len(), 8);
        for cut in (0..data.len()).step_by(7) {
            assert!(pickle::load(&data[..cut]).is_err(), "truncated at {cut}");
        }
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..3000 {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let mut bad = data.clone();
            let at = (state >> 33) as usize % bad.len();
            bad[at] ^= (state >> 17) as u8 | 1;
            if let Ok(v) = pickle::load(&bad) {
                let _ = top_entries(&v);
            }
        }
    }
}
