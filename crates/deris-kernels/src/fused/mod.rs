//! Fused CPU kernels of the transformer layers (BEiT-3, Swin, `nn.MultiheadAttention`):
//! LayerNorm, GELU, Linear with its bias, activation and residual in one pass, attention
//! (`softmax(q·kᵀ·scale + biases)·v`) without copies of the heads, and Swin's window attention
//! with the window partition done through an index.
//!
//! Each op `x` has a slow twin `x_reference` built from primitive candle ops. The op itself
//! runs its fused kernel only for f32 CPU tensors of which **none tracks a gradient**
//! ([`Tensor::track_op`]). Training on the CPU (f32/f64, some input tracking a gradient) runs
//! the ops of `crate::autograd`, which have a hand-written backward; other devices get the
//! reference and candle's autograd. The fused kernels themselves therefore need no backward.
//!
//! Work is split over rayon's global pool (the one candle's matmul uses). Matrix products go
//! through the `gemm` crate single-threaded per task; elementwise math is compiled for AVX-512,
//! AVX2 + FMA and baseline x86-64 and picked at run time ([`simd`]).

pub mod attention;
pub mod linear;
pub mod norm;
pub mod simd;
mod skinny;
pub mod window;

use candle_core::{bail, CpuStorage, Layout, Result, Storage, StorageRef, Tensor};

pub use attention::{attention, attention_reference};
pub use linear::{gelu_erf, gelu_erf_reference, linear, linear_bf16, linear_reference, pack_weight, Activation};
pub use norm::{layer_norm, layer_norm_reference};
pub use window::{window_attention, window_attention_reference};

/// Whether the fused kernels may run: every tensor is f32 on the CPU and none tracks a gradient.
fn fast_path(ts: &[&Tensor]) -> bool {
    ts.iter().all(|t| t.device().is_cpu() && t.dtype() == candle_core::DType::F32 && !t.track_op())
}

/// A read lock on an f32 CPU tensor's storage, with its layout.
struct CpuF32<'a> {
    storage: StorageRef<'a>,
    layout: &'a Layout,
}

fn cpu_f32(t: &Tensor) -> Result<CpuF32<'_>> {
    let (storage, layout) = t.storage_and_layout();
    if !matches!(&*storage, Storage::Cpu(CpuStorage::F32(_))) {
        bail!("fused kernel: expected an f32 CPU tensor, got {:?} on {:?}", t.dtype(), t.device().location());
    }
    Ok(CpuF32 { storage, layout })
}

impl CpuF32<'_> {
    /// The whole underlying buffer (index it with the layout's offset and strides).
    fn data(&self) -> &[f32] {
        match &*self.storage {
            Storage::Cpu(CpuStorage::F32(v)) => v,
            _ => &[],
        }
    }

    /// The elements of a contiguous tensor, in order.
    fn contiguous(&self) -> Result<&[f32]> {
        match self.layout.contiguous_offsets() {
            Some((start, end)) => Ok(&self.data()[start..end]),
            None => bail!("fused kernel: expected a contiguous tensor, got strides {:?}", self.layout.stride()),
        }
    }
}

/// Rows per parallel task for a row-wise kernel over `rows × width` values: at least ~16k values
/// per task, and about eight tasks per thread when there is enough work.
fn rows_per_task(rows: usize, width: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    let min_rows = (16_384 / width.max(1)).max(1);
    rows.div_ceil(8 * threads).max(min_rows).min(rows.max(1))
}

/// An output buffer that a kernel fills completely before anything reads it: allocated without
/// the zeroing pass (and the page faults it would take) that `vec![0.0; n]` costs.
struct Output(Vec<std::mem::MaybeUninit<f32>>);

impl Output {
    fn new(n: usize) -> Self {
        let mut v = Vec::with_capacity(n);
        // SAFETY: `MaybeUninit` needs no initialisation.
        unsafe { v.set_len(n) };
        Self(v)
    }

    fn ptr(&mut self) -> SendPtr {
        SendPtr(self.0.as_mut_ptr().cast())
    }

    /// # Safety
    /// Every element must have been written.
    unsafe fn assume_init(self) -> Vec<f32> {
        let mut v = std::mem::ManuallyDrop::new(self.0);
        // SAFETY: same allocation, length and capacity; `MaybeUninit<f32>` has f32's layout and
        // the caller guarantees every element is initialised.
        unsafe { Vec::from_raw_parts(v.as_mut_ptr().cast(), v.len(), v.capacity()) }
    }
}

/// A raw output pointer that parallel tasks write through, each to its own disjoint part.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);

impl SendPtr {
    /// The pointer (a method, so closures capture the `Send` wrapper rather than the field).
    fn get(self) -> *mut f32 {
        self.0
    }
}
// SAFETY: tasks write disjoint elements and the buffer outlives the parallel loop.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}
