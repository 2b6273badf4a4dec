//! The safetensors header, checked before the file is memory-mapped: an 8-byte little-endian
//! header length, a JSON object `name → {dtype, shape, data_offsets}`, then the data. A header
//! that lies (offsets past the end of the file, sizes that disagree with the shape) is reported
//! with the tensor's name instead of being trusted.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use candle_core::DType;

/// The safetensors crate's limit on the header size.
const MAX_HEADER: u64 = 100_000_000;

/// One tensor described by the header.
pub struct HeaderEntry {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
}

fn dtype_of(s: &str) -> Option<DType> {
    Some(match s {
        "F32" => DType::F32,
        "F64" => DType::F64,
        "F16" => DType::F16,
        "BF16" => DType::BF16,
        "I64" => DType::I64,
        "I32" => DType::I32,
        "I16" => DType::I16,
        "U32" => DType::U32,
        "U8" => DType::U8,
        _ => return None,
    })
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEntry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: (u64, u64),
}

/// Reads and checks the header of the safetensors file at `path` (of `file_len` bytes).
pub fn read_header(path: &Path, file_len: u64) -> Result<Vec<HeaderEntry>, String> {
    let mut f = File::open(path).map_err(|e| e.to_string())?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(|_| "file too short for a safetensors header".to_string())?;
    let n = u64::from_le_bytes(len);
    if n > MAX_HEADER || n > file_len.saturating_sub(8) {
        return Err(format!("safetensors header claims {n} bytes but the file has {file_len} bytes in all"));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).map_err(|e| format!("reading the safetensors header: {e}"))?;
    let data_len = file_len - 8 - n;
    let raw: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|e| format!("safetensors header is not a JSON object: {e}"))?;

    let mut entries = Vec::with_capacity(raw.len());
    for (name, value) in raw {
        if name == "__metadata__" {
            continue;
        }
        let e: RawEntry = serde_json::from_value(value).map_err(|e| format!("header entry '{name}': {e}"))?;
        let dtype = dtype_of(&e.dtype).ok_or_else(|| format!("tensor '{name}': unsupported dtype {}", e.dtype))?;
        let (start, end) = e.data_offsets;
        if start > end || end > data_len {
            return Err(format!(
                "tensor '{name}': data [{start}, {end}) lies outside the file's {data_len} data bytes (truncated file or lying header)"
            ));
        }
        let bytes = e
            .shape
            .iter()
            .try_fold(dtype.size_in_bytes() as u64, |acc, &d| acc.checked_mul(d as u64))
            .ok_or_else(|| format!("tensor '{name}': shape {:?} overflows", e.shape))?;
        if bytes != end - start {
            return Err(format!(
                "tensor '{name}': shape {:?} of {} needs {bytes} bytes, the header gives {}",
                e.shape,
                e.dtype,
                end - start
            ));
        }
        entries.push(HeaderEntry { name, dtype, shape: e.shape });
    }
    Ok(entries)
}
