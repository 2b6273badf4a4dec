//! Reading custom-op inputs: the contiguous data of a CPU storage, checked against the length
//! the op expects.

use candle_core::{bail, CpuStorage, Layout, Result, WithDType};

/// The data of a contiguous custom-op input of `len` elements; `op` and `what` name it in the
/// error.
pub(crate) fn contiguous<'a, T: WithDType>(op: &str, what: &str, s: &'a CpuStorage, l: &Layout, len: usize) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) if b - a == len => Ok(&T::cpu_storage_as_slice(s)?[a..b]),
        _ => bail!("{op}: {what} {:?} is not a contiguous block of {len} elements", l.dims()),
    }
}
