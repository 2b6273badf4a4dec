//! Checkpoint files: opening `.safetensors` and PyTorch `.pth` files, strict loading with a key
//! audit, and writing clean `.safetensors`.
//!
//! - [`Checkpoint::open`] recognises the format from the file's content (a safetensors header or
//!   a torch zip archive), finds the weights (flat, or under `state_dict`/`model`/`module`),
//!   drops training state (`optimizer`, `scheduler`, `ema_state_dict`, `meta`, `epoch`, …) and
//!   strips DDP's `module.` prefix. Every name mapping lives in [`keys`].
//! - [`load_strict`] builds a model from a checkpoint and fails with one
//!   [`Error::KeyMismatch`] listing every missing, unexpected and wrongly shaped key;
//!   [`load_lenient`] builds it anyway and returns the [`AuditReport`]; [`audit`] checks the keys
//!   without reading any weight; [`dry_run`] lists what a constructor requests without a file.
//! - [`save_safetensors`] writes a temporary file and renames it: never a partial output.

pub mod audit;
pub mod keys;
mod pickle;
mod pth;
pub(crate) mod random;
mod st;

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};

pub use audit::{audit, dry_run, load_lenient, load_strict, AuditReport, Request};
/// The builder the loading functions hand to constructors (re-exported for crates that do not
/// depend on candle-nn themselves).
pub use candle_nn::VarBuilder;
pub use keys::KeyLayout;
pub use random::random_var_builder;

use crate::error::{Error, Result};

/// The file format, recognised from the content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Safetensors,
    /// `torch.save`'s zip archive (`.pth`, `.pt`, `.bin`).
    TorchZip,
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Format::Safetensors => "safetensors",
            Format::TorchZip => "PyTorch zip",
        })
    }
}

/// Shape and dtype of one stored tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorMeta {
    pub shape: Vec<usize>,
    pub dtype: DType,
}

impl TensorMeta {
    pub fn elem_count(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn size_in_bytes(&self) -> usize {
        self.elem_count() * self.dtype.size_in_bytes()
    }
}

/// Counts for a summary line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    /// Entries (parameters and buffers).
    pub tensors: usize,
    /// Entries that are buffers ([`keys::is_buffer`]).
    pub buffers: usize,
    /// Elements of the parameters (buffers excluded), as in MODEL-SPEC §11's "parameter count".
    pub parameter_count: usize,
    /// Bytes of all tensors as stored.
    pub bytes: usize,
}

enum Source {
    Safetensors(MmapedSafetensors),
    Torch(pth::Archive),
}

enum Locator {
    /// The key in the safetensors file.
    Safetensors(String),
    Torch(pth::TensorRef),
}

struct Entry {
    meta: TensorMeta,
    locator: Locator,
}

/// An opened checkpoint: the model's tensors by name (normalised, see [`keys`]), read lazily.
pub struct Checkpoint {
    path: PathBuf,
    format: Format,
    layout: KeyLayout,
    entries: BTreeMap<String, Entry>,
    source: Source,
}

fn ckpt_err(path: &Path, reason: impl Into<String>) -> Error {
    Error::Checkpoint { path: path.to_path_buf(), reason: reason.into() }
}

/// Recognises the format from the first bytes.
fn sniff(path: &Path) -> std::result::Result<(Format, u64), String> {
    let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => "file not found".to_string(),
        _ => e.to_string(),
    })?;
    if meta.is_dir() {
        return Err("is a directory, not a checkpoint file".into());
    }
    let mut head = Vec::with_capacity(9);
    File::open(path).and_then(|f| f.take(9).read_to_end(&mut head)).map_err(|e| e.to_string())?;
    if head.is_empty() {
        return Err("empty file".into());
    }
    if head.starts_with(b"PK\x03\x04") || head.starts_with(b"PK\x05\x06") {
        return Ok((Format::TorchZip, meta.len()));
    }
    if head.len() == 9 && head[8] == b'{' {
        return Ok((Format::Safetensors, meta.len()));
    }
    if head[0] == 0x80 {
        return Err("a bare pickle: the legacy torch.save format (before torch 1.6) is not supported; \
                    re-save it with a recent torch (`torch.save(torch.load(f), f2)`)"
            .into());
    }
    Err("not a checkpoint: neither a safetensors file nor a PyTorch zip archive".into())
}

impl Checkpoint {
    /// Opens a checkpoint; the format is recognised from the content, not the extension.
    ///
    /// Safetensors files are memory-mapped (the file must not change while the checkpoint is
    /// open); PyTorch archives are read entry by entry. Every inconsistency (truncated archive,
    /// header offsets past the end of the file, unknown storage types) is an
    /// [`Error::Checkpoint`] naming the file.
    pub fn open(path: &Path) -> Result<Checkpoint> {
        let (format, len) = sniff(path).map_err(|r| ckpt_err(path, r))?;
        let opened = match format {
            Format::Safetensors => Self::open_safetensors(path, len),
            Format::TorchZip => Self::open_torch(path),
        };
        let (source, layout, entries) = opened.map_err(|r| ckpt_err(path, r))?;
        let ckpt = Checkpoint { path: path.to_path_buf(), format, layout, entries, source };
        let s = ckpt.summary();
        tracing::info!(
            path = %path.display(),
            format = %format,
            tensors = s.tensors,
            parameters = s.parameter_count,
            nested_under = ckpt.layout.nested_under.as_deref().unwrap_or("-"),
            stripped_prefixes = ckpt.layout.stripped_prefixes,
            "opened checkpoint"
        );
        Ok(ckpt)
    }

    fn open_safetensors(
        path: &Path,
        len: u64,
    ) -> std::result::Result<(Source, KeyLayout, BTreeMap<String, Entry>), String> {
        let header = st::read_header(path, len)?;
        // SAFETY: the mapping is read-only; like every mmap-based loader we rely on the file not
        // being truncated or rewritten while it is open. The header was checked just above.
        let mmap = unsafe { MmapedSafetensors::new(path) }.map_err(|e| format!("safetensors: {e}"))?;
        let (names, stripped) = keys::normalise(header.iter().map(|h| h.name.as_str()))?;
        let mut by_file_key: HashMap<String, st::HeaderEntry> =
            header.into_iter().map(|h| (h.name.clone(), h)).collect();
        let mut entries = BTreeMap::new();
        for (name, file_key) in names {
            if let Some(h) = by_file_key.remove(&file_key) {
                let meta = TensorMeta { shape: h.shape, dtype: h.dtype };
                entries.insert(name, Entry { meta, locator: Locator::Safetensors(file_key) });
            }
        }
        let layout = KeyLayout { nested_under: None, stripped_prefixes: stripped, ignored: vec![] };
        Ok((Source::Safetensors(mmap), layout, entries))
    }

    fn open_torch(path: &Path) -> std::result::Result<(Source, KeyLayout, BTreeMap<String, Entry>), String> {
        let (archive, top) = pth::Archive::open(path)?;
        let kinds: Vec<(String, keys::EntryKind)> = top.iter().map(|(n, e)| (n.clone(), e.kind())).collect();
        let mut layout = keys::locate_state_dict(&kinds)?;
        for (name, entry) in top.iter().filter(|(n, _)| layout.ignored.contains(n)) {
            let what = match entry {
                pth::TopEntry::Other(description) => description.as_str(),
                _ => "tensors",
            };
            if keys::is_training_state(name) {
                tracing::debug!("{}: dropping '{name}' ({what})", path.display());
            } else {
                tracing::warn!("{}: ignoring top-level entry '{name}' ({what}): not model weights", path.display());
            }
        }
        let tensors: Vec<(String, pth::TensorRef)> = match &layout.nested_under {
            Some(key) => top
                .into_iter()
                .find_map(|(n, e)| match e {
                    pth::TopEntry::TensorDict(ts) if &n == key => Some(ts),
                    _ => None,
                })
                .unwrap_or_default(),
            None => top
                .into_iter()
                .filter_map(|(n, e)| match e {
                    pth::TopEntry::Tensor(t) => Some((n, t)),
                    _ => None,
                })
                .collect(),
        };
        archive.check_tensors(tensors.iter().map(|(_, t)| t))?;
        let (names, stripped) = keys::normalise(tensors.iter().map(|(n, _)| n.as_str()))?;
        layout.stripped_prefixes = stripped;
        let mut by_file_key: HashMap<String, pth::TensorRef> = tensors.into_iter().collect();
        let mut entries = BTreeMap::new();
        for (name, file_key) in names {
            if let Some(t) = by_file_key.remove(&file_key) {
                let meta = TensorMeta { shape: t.shape.clone(), dtype: t.dtype };
                entries.insert(name, Entry { meta, locator: Locator::Torch(t) });
            }
        }
        Ok((Source::Torch(archive), layout, entries))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn format(&self) -> Format {
        self.format
    }

    /// Where the weights were found and how the names were mapped.
    pub fn layout(&self) -> &KeyLayout {
        &self.layout
    }

    /// Number of model tensors.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The model's tensor names (normalised), sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// Shape and dtype of a tensor, without reading it.
    pub fn meta(&self, name: &str) -> Option<&TensorMeta> {
        self.entries.get(name).map(|e| &e.meta)
    }

    /// Reads one tensor in its stored dtype.
    pub fn get(&self, name: &str, device: &Device) -> Result<Tensor> {
        let entry = self.entries.get(name).ok_or_else(|| ckpt_err(&self.path, format!("no tensor named '{name}'")))?;
        let t = match (&self.source, &entry.locator) {
            (Source::Safetensors(st), Locator::Safetensors(key)) => st.load(key, device).map_err(|e| e.to_string()),
            (Source::Torch(archive), Locator::Torch(t)) => archive.read(t, device),
            _ => Err("internal error: tensor locator does not match the file format".to_string()),
        };
        t.map_err(|r| ckpt_err(&self.path, format!("tensor '{name}': {r}")))
    }

    /// Reads every tensor in its stored dtype.
    pub fn load_all(&self, device: &Device) -> Result<BTreeMap<String, Tensor>> {
        self.names().map(|n| Ok((n.to_string(), self.get(n, device)?))).collect()
    }

    /// Entry, buffer, parameter and byte counts.
    pub fn summary(&self) -> Summary {
        let mut s = Summary { tensors: self.entries.len(), buffers: 0, parameter_count: 0, bytes: 0 };
        for (name, e) in &self.entries {
            s.bytes += e.meta.size_in_bytes();
            if keys::is_buffer(name) {
                s.buffers += 1;
            } else {
                s.parameter_count += e.meta.elem_count();
            }
        }
        s
    }
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("path", &self.path)
            .field("format", &self.format)
            .field("layout", &self.layout)
            .field("tensors", &self.entries.len())
            .finish()
    }
}

/// True if both tensors have the same dtype, shape and bytes (bit-for-bit, NaN payloads and
/// signed zeros included).
pub fn bit_identical(a: &Tensor, b: &Tensor) -> Result<bool> {
    if a.dtype() != b.dtype() || a.dims() != b.dims() {
        return Ok(false);
    }
    let (mut x, mut y) = (Vec::new(), Vec::new());
    a.write_bytes(&mut x)?;
    b.write_bytes(&mut y)?;
    Ok(x == y)
}

/// Writes `tensors` as a safetensors file, keeping their dtypes. The data goes to a temporary
/// file beside `path`, which is renamed over `path` only once complete.
pub fn save_safetensors(tensors: &BTreeMap<String, Tensor>, path: &Path) -> Result<()> {
    let io_err = |err| Error::Io { path: path.to_path_buf(), err };
    let file_name = path.file_name().ok_or_else(|| io_err(std::io::Error::other("not a file path")))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(file_name);
    tmp_name.push(format!(".{}.tmp", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let map: HashMap<&str, Tensor> = tensors.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    let written = candle_core::safetensors::save(&map, &tmp)
        .map_err(|e| io_err(std::io::Error::other(e.to_string())))
        .and_then(|()| File::open(&tmp).and_then(|f| f.sync_all()).map_err(io_err))
        .and_then(|()| std::fs::rename(&tmp, path).map_err(io_err));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}
