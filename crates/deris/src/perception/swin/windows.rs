//! Window geometry of the Swin stages (`window_partition`, `window_reverse`, the `torch.roll`
//! cyclic shift, the stage padding and the `BasicLayer` region mask of `swin_trans.py`).
//!
//! Padding a map to a multiple of the window, rolling it by `−shift` and cutting it into windows
//! only moves tokens, so it is described here by one index (window token → image token, or
//! `u32::MAX` for padding) that the window-attention kernel reads through
//! ([`deris_kernels::fused::window_attention`]); undoing it (window reverse, roll back, crop) is the
//! same index read backwards. No padded or partitioned copy of the map is ever made. The index and
//! the −100 region mask depend on the feature-map size only, so they are built once per size and
//! shared by every block of a stage.

use candle_core::{DType, Device, Result, Tensor};

/// Additive logit of the shifted-window region mask between tokens of different regions
/// (the authors use −100, not −inf).
const REGION_MASK_FILL: f32 = -100.0;

/// `relative_position_index` of `WindowAttention`, row-major `[ws², ws²]`: for window tokens
/// `i = (yi, xi)` and `j = (yj, xj)`, `(yi − yj + ws − 1)·(2ws − 1) + (xi − xj + ws − 1)`.
pub fn relative_position_index(ws: usize) -> Vec<u32> {
    let n = ws * ws;
    let span = 2 * ws - 1;
    let mut index = Vec::with_capacity(n * n);
    for i in 0..n {
        let (yi, xi) = (i / ws, i % ws);
        for j in 0..n {
            let (yj, xj) = (j / ws, j % ws);
            index.push(((yi + ws - 1 - yj) * span + (xi + ws - 1 - xj)) as u32);
        }
    }
    index
}

/// Window-map entry of a padding token.
const PAD_TOKEN: u32 = deris_kernels::fused::window::PAD;

/// Region band of coordinate `p` on a padded, shifted axis of length `len`:
/// 0 for `[0, len − ws)`, 1 for `[len − ws, len − shift)`, 2 for `[len − shift, len)`.
fn region_band(p: usize, len: usize, ws: usize, shift: usize) -> usize {
    if p < len - ws {
        0
    } else if p < len - shift {
        1
    } else {
        2
    }
}

/// How the tokens of an `H×W` map are arranged into windows for one kind of block (regular or
/// shifted).
#[derive(Debug)]
pub struct WindowPartition {
    /// Windows per image, `(Hp/ws)·(Wp/ws)`.
    pub num_windows: usize,
    /// For each window token (windows row-major, tokens row-major inside a window), the index of
    /// its source among the `H·W` row-major tokens, or `u32::MAX` for padding. `nW·ws²` entries.
    pub gather: Vec<u32>,
    /// Shifted blocks only: the region mask, 0 within a region and −100 across, `[nW, 1, ws², ws²]`.
    pub region_mask: Option<Tensor>,
}

impl WindowPartition {
    /// The partition of an `h×w` map into `ws×ws` windows after a cyclic shift by `−shift`
    /// (`shift = 0`: regular windows, no mask).
    pub fn new(h: usize, w: usize, ws: usize, shift: usize, dtype: DType, device: &Device) -> Result<Self> {
        if ws == 0 || shift >= ws || h == 0 || w == 0 {
            candle_core::bail!("swin windows: invalid map {h}x{w} with window {ws} and shift {shift}");
        }
        let (hp, wp) = (h.div_ceil(ws) * ws, w.div_ceil(ws) * ws);
        let (rows, cols) = (hp / ws, wp / ws);
        let n = ws * ws;
        let num_windows = rows * cols;

        let mut gather = Vec::with_capacity(num_windows * n);
        let mut labels = Vec::with_capacity(num_windows * n);
        for wy in 0..rows {
            for wx in 0..cols {
                for iy in 0..ws {
                    for ix in 0..ws {
                        // Position in the shifted, padded map and its source before the roll.
                        let (py, px) = (wy * ws + iy, wx * ws + ix);
                        let (sy, sx) = ((py + shift) % hp, (px + shift) % wp);
                        gather.push(if sy < h && sx < w { (sy * w + sx) as u32 } else { PAD_TOKEN });
                        labels.push(3 * region_band(py, hp, ws, shift) + region_band(px, wp, ws, shift));
                    }
                }
            }
        }

        let region_mask = if shift > 0 {
            let mut mask = Vec::with_capacity(num_windows * n * n);
            for window in labels.chunks_exact(n) {
                for li in window {
                    mask.extend(window.iter().map(|lj| if li == lj { 0.0 } else { REGION_MASK_FILL }));
                }
            }
            Some(Tensor::from_vec(mask, (num_windows, 1, n, n), device)?.to_dtype(dtype)?)
        } else {
            None
        };

        Ok(Self { num_windows, gather, region_mask })
    }
}

/// The two partitions used by the blocks of one stage: even blocks use `regular`, odd blocks
/// `shifted` (shift `ws/2`, kept even when the map is no bigger than the window).
#[derive(Debug)]
pub struct StageWindows {
    pub regular: WindowPartition,
    pub shifted: WindowPartition,
}

impl StageWindows {
    pub fn new(h: usize, w: usize, ws: usize, dtype: DType, device: &Device) -> Result<Self> {
        Ok(Self {
            regular: WindowPartition::new(h, w, ws, 0, dtype, device)?,
            shifted: WindowPartition::new(h, w, ws, ws / 2, dtype, device)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The straightforward tensor version: pad, roll, partition (values are token index + 1,
    /// 0 for padding).
    fn naive_windows(h: usize, w: usize, ws: usize, shift: usize) -> Vec<u32> {
        let dev = Device::Cpu;
        let ids: Vec<u32> = (1..=(h * w) as u32).collect();
        let x = Tensor::from_vec(ids, (1, h, w, 1), &dev).unwrap().to_dtype(DType::F32).unwrap();
        let (hp, wp) = (h.div_ceil(ws) * ws, w.div_ceil(ws) * ws);
        let x = x.pad_with_zeros(1, 0, hp - h).unwrap().pad_with_zeros(2, 0, wp - w).unwrap();
        let x = x.roll(-(shift as i32), 1).unwrap().roll(-(shift as i32), 2).unwrap();
        let x = x.reshape((hp / ws, ws, wp / ws, ws)).unwrap().permute((0, 2, 1, 3)).unwrap().flatten_all().unwrap();
        x.to_dtype(DType::U32).unwrap().to_vec1().unwrap()
    }

    #[test]
    fn gather_matches_pad_roll_partition() {
        for &(h, w, ws) in &[(5usize, 9usize, 7usize), (24, 40, 7), (3, 5, 7), (12, 12, 12), (13, 6, 4)] {
            for shift in [0, ws / 2] {
                let p = WindowPartition::new(h, w, ws, shift, DType::F32, &Device::Cpu).unwrap();
                let want = naive_windows(h, w, ws, shift);
                let got: Vec<u32> = p.gather.iter().map(|&g| if g == PAD_TOKEN { 0 } else { g + 1 }).collect();
                assert_eq!(got, want, "{h}x{w} ws {ws} shift {shift}");
                // every token sits in exactly one window
                let mut real: Vec<u32> = p.gather.iter().copied().filter(|&g| g != PAD_TOKEN).collect();
                real.sort_unstable();
                assert_eq!(real, (0..(h * w) as u32).collect::<Vec<_>>());
            }
        }
    }

    #[test]
    fn region_mask_on_the_padded_grid() {
        // 4×4 map, window 7, shift 3: one padded 7×7 window; rows/cols split at 7−3 = 4.
        let p = WindowPartition::new(4, 4, 7, 3, DType::F32, &Device::Cpu).unwrap();
        let m: Vec<f32> = p.region_mask.unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let at = |i: (usize, usize), j: (usize, usize)| m[(i.0 * 7 + i.1) * 49 + j.0 * 7 + j.1];
        assert_eq!(at((0, 0), (3, 3)), 0.0);
        assert_eq!(at((0, 0), (4, 0)), -100.0);
        assert_eq!(at((0, 0), (0, 4)), -100.0);
        assert_eq!(at((5, 6), (4, 4)), 0.0);
        assert_eq!(at((5, 0), (6, 3)), 0.0);
        assert!(WindowPartition::new(4, 4, 7, 0, DType::F32, &Device::Cpu).unwrap().region_mask.is_none());
    }

    #[test]
    fn relative_position_index_corners() {
        let idx = relative_position_index(7);
        assert_eq!(idx.len(), 49 * 49);
        assert_eq!(idx[0], 6 * 13 + 6); // i = j
        assert_eq!(idx[48], 0); // i = (0,0), j = (6,6)
        assert_eq!(idx[48 * 49], 12 * 13 + 12); // i = (6,6), j = (0,0)
        assert_eq!(*idx.iter().max().unwrap() as usize, 13 * 13 - 1);
    }
}
