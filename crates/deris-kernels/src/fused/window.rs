//! Swin's window self-attention straight from image-order tokens: the window partition (pad,
//! cyclic shift, cut into windows), the attention of every window and head, and the window
//! reverse happen inside one kernel, through an index, with no partitioned copy of the map.
//!
//! Padding tokens are zero after the norm, so their `q, k, v` are the projection's bias; the
//! kernel uses the bias rows for them instead of projecting padded copies of the map.

use std::cell::RefCell;

use candle_core::{bail, Result, Tensor};
use rayon::prelude::*;

use super::attention::{softmax_rows, BiasView};
use super::{cpu_f32, fast_path, Output};
use crate::autograd;

/// Index of a padding token in a window map.
pub const PAD: u32 = u32::MAX;

/// Window self-attention of `qkv`, laid out per image token, for the windows of `windows`.
///
/// `windows[w·N + i]` is the image token at position `i` of window `w` (`N = windows.len() / nW`),
/// or [`PAD`] for a padding token, whose `q, k, v` are `qkv_bias` (zeros without a bias). Every
/// image token appears in exactly one window. The biases are those of [`super::attention`] with
/// batch `b·nW + w` for window `w` of image `b`: `[1, H, N, N]` for one bias shared by all
/// windows, `[nW, 1, N, N]` for one per window.
///
/// Runs the fused kernel on f32 CPU tensors that need no gradient, [`window_attention_reference`]
/// otherwise.
///
/// # Shapes
/// - `qkv`: `[B, L, 3·H·hd]`, channels `[q | k | v]`, each head-major; `qkv_bias`: `[3·H·hd]`
/// - `windows`: `nW·N` entries in `0..L` or [`PAD`]
/// - returns `[B, L, H·hd]`: each image token's attention output, in image order
pub fn window_attention(
    qkv: &Tensor,
    qkv_bias: Option<&Tensor>,
    windows: &[u32],
    num_windows: usize,
    num_heads: usize,
    scale: f64,
    biases: &[&Tensor],
) -> Result<Tensor> {
    let g = WindowGeometry::new(qkv, qkv_bias, windows, num_windows, num_heads)?;
    let mut all = vec![qkv];
    all.extend(qkv_bias);
    all.extend(biases);
    if !fast_path(&all) {
        if autograd::supported(&all) && autograd::any_tracked(&all) {
            let args = WindowArgs { qkv, qkv_bias, windows, num_windows, num_heads, scale, biases };
            return window_attention_graph(&args, super::attention::attention_autograd);
        }
        return window_attention_reference(qkv, qkv_bias, windows, num_windows, num_heads, scale, biases);
    }
    let WindowGeometry { b, l, nw, n, h, hd } = g;
    let c = h * hd;
    let qkv = qkv.contiguous()?;
    let qkv_bias = qkv_bias.map(|t| t.contiguous()).transpose()?;
    // Check the biases against the attention of all B·nW windows.
    let bias4 = biases.iter().map(|t| super::attention::to_rank4(t)).collect::<Result<Vec<_>>>()?;
    for t in &bias4 {
        let d = t.dims();
        if (b * nw) % d[0] != 0 || (d[1] != 1 && d[1] != h) || (d[2] != 1 && d[2] != n) || (d[3] != 1 && d[3] != n) {
            bail!("window_attention: bias {d:?} must be [G, {h} or 1, {n} or 1, {n} or 1] with G dividing {}", b * nw);
        }
    }
    let bias4 = bias4
        .into_iter()
        .map(|t| if t.dim(3)? > 1 && t.stride()[3] != 1 { t.contiguous() } else { Ok(t) })
        .collect::<Result<Vec<_>>>()?;
    let qs = cpu_f32(&qkv)?;
    let qd = qs.contiguous()?;
    let bs_qkv = qkv_bias.as_ref().map(cpu_f32).transpose()?;
    let zeros = vec![0f32; 3 * c];
    let pad_row: &[f32] = match &bs_qkv {
        Some(t) => t.contiguous()?,
        None => &zeros,
    };
    let bs = bias4.iter().map(cpu_f32).collect::<Result<Vec<_>>>()?;
    let bias_views: Vec<BiasView> = bs.iter().map(BiasView::new).collect();
    let scale = scale as f32;

    let mut out = Output::new(b * l * c);
    let dst = out.ptr();
    let task = |t: usize| {
        let (bi, w) = (t / nw, t % nw);
        let map = &windows[w * n..(w + 1) * n];
        WINDOW.with(|s| {
            let mut s = s.borrow_mut();
            let need = n * 3 * c + n * n + n * c;
            if s.len() < need {
                s.resize(need, 0.0);
            }
            let (rows, rest) = s.split_at_mut(n * 3 * c);
            let (scores, o) = rest.split_at_mut(n * n);
            // Gather the window's q, k, v rows [N, 3C].
            for (i, &src) in map.iter().enumerate() {
                let row = if src == PAD { pad_row } else { &qd[(bi * l + src as usize) * 3 * c..][..3 * c] };
                rows[i * 3 * c..(i + 1) * 3 * c].copy_from_slice(row);
            }
            for hi in 0..h {
                // SAFETY: the three operands are slices of this thread's scratch buffer with the
                // sizes checked above; `o` receives rows of N × hd at column offset hi·hd.
                unsafe {
                    let qp = rows.as_ptr().add(hi * hd);
                    let kp = rows.as_ptr().add(c + hi * hd);
                    let vp = rows.as_ptr().add(2 * c + hi * hd);
                    gemm::gemm(
                        n,
                        n,
                        hd,
                        scores.as_mut_ptr(),
                        1,
                        n as isize,
                        false,
                        qp,
                        1,
                        (3 * c) as isize,
                        kp,
                        (3 * c) as isize,
                        1,
                        0.0,
                        scale,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                    softmax_rows(&mut scores[..n * n], n, &bias_views, bi * nw + w, hi, 0);
                    gemm::gemm(
                        n,
                        hd,
                        n,
                        o.as_mut_ptr().add(hi * hd),
                        1,
                        c as isize,
                        false,
                        scores.as_ptr(),
                        1,
                        n as isize,
                        vp,
                        1,
                        (3 * c) as isize,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
            }
            // Window reverse: each real token's row goes back to its image position.
            for (i, &src) in map.iter().enumerate() {
                if src != PAD {
                    // SAFETY: every image token appears in one window only, so no other task
                    // writes this row.
                    unsafe {
                        let d = dst.get().add((bi * l + src as usize) * c);
                        std::ptr::copy_nonoverlapping(o.as_ptr().add(i * c), d, c);
                    }
                }
            }
        });
    };
    (0..b * nw).into_par_iter().for_each(task);
    drop((qs, bs_qkv, bs));
    // SAFETY: every image token is in one window (checked by the geometry), so every row is written.
    let out = unsafe { out.assume_init() };
    Tensor::from_vec(out, (b, l, c), qkv.device())
}

/// [`window_attention`] from primitive candle ops (differentiable; any device and dtype): the
/// bias row appended to the tokens, `index_select` into windows, [`super::attention_reference`],
/// and `index_select` back.
pub fn window_attention_reference(
    qkv: &Tensor,
    qkv_bias: Option<&Tensor>,
    windows: &[u32],
    num_windows: usize,
    num_heads: usize,
    scale: f64,
    biases: &[&Tensor],
) -> Result<Tensor> {
    let args = WindowArgs { qkv, qkv_bias, windows, num_windows, num_heads, scale, biases };
    window_attention_graph(&args, super::attention_reference)
}

/// The arguments of [`window_attention`].
struct WindowArgs<'a> {
    qkv: &'a Tensor,
    qkv_bias: Option<&'a Tensor>,
    windows: &'a [u32],
    num_windows: usize,
    num_heads: usize,
    scale: f64,
    biases: &'a [&'a Tensor],
}

/// Attention function of the window graph: `(q, k, v, scale, biases)`.
type Attend = fn(&Tensor, &Tensor, &Tensor, f64, &[&Tensor]) -> Result<Tensor>;

/// [`window_attention_reference`]'s graph with the attention of the windows computed by `attend`.
fn window_attention_graph(args: &WindowArgs<'_>, attend: Attend) -> Result<Tensor> {
    let WindowArgs { qkv, qkv_bias, windows, num_windows, num_heads, scale, biases } = *args;
    let WindowGeometry { b, l, nw, n, h, hd } = WindowGeometry::new(qkv, qkv_bias, windows, num_windows, num_heads)?;
    let pad = match qkv_bias {
        Some(t) => t.reshape((1, 1, 3 * h * hd))?.broadcast_as((b, 1, 3 * h * hd))?.contiguous()?,
        None => Tensor::zeros((b, 1, 3 * h * hd), qkv.dtype(), qkv.device())?,
    };
    let ext = Tensor::cat(&[qkv, &pad], 1)?; // [B, L + 1, 3C]: row L is a padding token
    let gather: Vec<u32> = windows.iter().map(|&i| if i == PAD { l as u32 } else { i }).collect();
    let gather = Tensor::from_vec(gather, nw * n, qkv.device())?;
    let x = ext.index_select(&gather, 1)?.reshape((b * nw, n, 3, h, hd))?;
    let part = |i: usize| x.narrow(2, i, 1)?.squeeze(2)?.transpose(1, 2); // [B·nW, H, N, hd]
    let o = attend(&part(0)?, &part(1)?, &part(2)?, scale, biases)?; // [B·nW, H, N, hd]
    let o = o.transpose(1, 2)?.contiguous()?.reshape((b, nw * n, h * hd))?;
    let mut scatter = vec![0u32; l];
    for (p, &i) in windows.iter().enumerate() {
        if i != PAD {
            scatter[i as usize] = p as u32;
        }
    }
    o.index_select(&Tensor::from_vec(scatter, l, qkv.device())?, 1)
}

thread_local! {
    /// Per-thread window rows, scores and output of one window.
    static WINDOW: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

#[derive(Debug, Clone, Copy)]
struct WindowGeometry {
    b: usize,
    l: usize,
    nw: usize,
    n: usize,
    h: usize,
    hd: usize,
}

impl WindowGeometry {
    fn new(qkv: &Tensor, qkv_bias: Option<&Tensor>, windows: &[u32], nw: usize, h: usize) -> Result<Self> {
        let (b, l, c3) = qkv.dims3()?;
        if h == 0 || nw == 0 || c3 % (3 * h) != 0 || windows.len() % nw != 0 || windows.is_empty() {
            bail!(
                "window_attention: qkv {:?} with {h} heads and {} window tokens in {nw} windows",
                qkv.dims(),
                windows.len()
            );
        }
        if let Some(t) = qkv_bias {
            if t.dims() != [c3] {
                bail!("window_attention: qkv bias {:?} must be [{c3}]", t.dims());
            }
        }
        let mut seen = vec![false; l];
        for &i in windows {
            if i != PAD {
                match seen.get_mut(i as usize) {
                    Some(s) if !*s => *s = true,
                    _ => bail!("window_attention: token {i} of {l} is out of range or in two windows"),
                }
            }
        }
        if seen.iter().any(|s| !s) {
            bail!("window_attention: the windows leave image tokens out");
        }
        Ok(Self { b, l, nw, n: windows.len() / nw, h, hd: c3 / (3 * h) })
    }
}
