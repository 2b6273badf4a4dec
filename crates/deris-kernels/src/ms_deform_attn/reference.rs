//! The slow twin of the fast op, from primitive candle ops only (`index_select`, comparisons
//! turned into masks, broadcasting): the oracle of the tests, differentiable through autograd.

use candle_core::{DType, Result, Tensor};

use super::Geometry;

/// Same contract as [`super::ms_deform_attn`], computed level by level: gather the four
/// neighbours of every sampling point, blend them with masked bilinear weights, weight by the
/// attention and sum. Gradients come from candle's autograd (the sampling-range and
/// corner-validity masks are constants, exactly like the kernel's branches).
///
/// # Shapes
/// - `value`: `[B, S, M, Dh]`; `sampling_locations`: `[B, Lq, M, L, P, 2]` (x, y);
///   `attention_weights`: `[B, Lq, M, L, P]`; returns `[B, Lq, M·Dh]`
pub fn ms_deform_attn_reference(
    value: &Tensor,
    spatial_shapes: &[(usize, usize)],
    sampling_locations: &Tensor,
    attention_weights: &Tensor,
) -> Result<Tensor> {
    let g = Geometry::new(value, spatial_shapes, sampling_locations, attention_weights)?;
    let (b, m, dh, lq, p) = (g.b, g.m, g.dh, g.lq, g.p);
    let bm = b * m;
    let dt = value.dtype();
    let dev = value.device();
    let mut out = Tensor::zeros((bm, lq, dh), dt, dev)?;
    for (li, lv) in g.levels.iter().enumerate() {
        let hw = lv.h * lv.w;
        let (h, w) = (lv.h as f64, lv.w as f64);
        // value_l: [B, HW, M, Dh] -> [B, M, HW, Dh] -> [B·M·HW, Dh]
        let v_l = value.narrow(1, lv.start, hw)?.permute((0, 2, 1, 3))?.reshape((bm * hw, dh))?;
        // loc_l: [B, Lq, M, P, 2] -> [B, M, Lq, P, 2]
        let loc_l = sampling_locations.narrow(3, li, 1)?.squeeze(3)?.permute((0, 2, 1, 3, 4))?;
        let x = loc_l.narrow(4, 0, 1)?.reshape((bm, lq * p))?;
        let y = loc_l.narrow(4, 1, 1)?.reshape((bm, lq * p))?;
        let xi = x.affine(w, -0.5)?; // [B·M, Lq·P], pixel coordinates
        let yi = y.affine(h, -0.5)?;
        let (xc, yc) = (xi.detach(), yi.detach());
        let inside = xc
            .gt(-1.0)?
            .to_dtype(dt)?
            .mul(&yc.gt(-1.0)?.to_dtype(dt)?)?
            .mul(&xc.lt(w)?.to_dtype(dt)?)?
            .mul(&yc.lt(h)?.to_dtype(dt)?)?;
        let (x0, y0) = (xc.floor()?, yc.floor()?);
        let lx = (&xi - &x0)?;
        let ly = (&yi - &y0)?;
        let hx = lx.affine(-1.0, 1.0)?;
        let hy = ly.affine(-1.0, 1.0)?;
        // row offset of each (b, m) block in the flattened value_l: [B·M, 1]
        let block = Tensor::arange(0u32, bm as u32, dev)?.to_dtype(dt)?.affine(hw as f64, 0.0)?.unsqueeze(1)?;
        let mut sample = Tensor::zeros((bm, lq * p, dh), dt, dev)?;
        for (dy, dx) in [(0.0, 0.0), (0.0, 1.0), (1.0, 0.0), (1.0, 1.0)] {
            let yy = y0.affine(1.0, dy)?;
            let xx = x0.affine(1.0, dx)?;
            let valid = yy
                .ge(0.0)?
                .to_dtype(dt)?
                .mul(&yy.le(h - 1.0)?.to_dtype(dt)?)?
                .mul(&xx.ge(0.0)?.to_dtype(dt)?)?
                .mul(&xx.le(w - 1.0)?.to_dtype(dt)?)?
                .mul(&inside)?;
            let idx = yy
                .clamp(0.0, h - 1.0)?
                .affine(w, 0.0)?
                .add(&xx.clamp(0.0, w - 1.0)?)?
                .broadcast_add(&block)?
                .to_dtype(DType::U32)?
                .flatten_all()?;
            let vals = v_l.index_select(&idx, 0)?.reshape((bm, lq * p, dh))?;
            let wy = if dy == 1.0 { &ly } else { &hy };
            let wx = if dx == 1.0 { &lx } else { &hx };
            let cw = wy.mul(wx)?.mul(&valid)?.unsqueeze(2)?; // [B·M, Lq·P, 1]
            sample = (sample + vals.broadcast_mul(&cw)?)?;
        }
        // attention_l: [B, Lq, M, P] -> [B, M, Lq, P] -> [B·M, Lq, P, 1]
        let a_l = attention_weights.narrow(3, li, 1)?.squeeze(3)?.permute((0, 2, 1, 3))?.reshape((bm, lq, p, 1))?;
        let o = sample.reshape((bm, lq, p, dh))?.broadcast_mul(&a_l)?.sum(2)?; // [B·M, Lq, Dh]
        out = (out + o)?;
    }
    // [B, M, Lq, Dh] -> [B, Lq, M, Dh] -> [B, Lq, M·Dh]
    out.reshape((b, m, lq, dh))?.permute((0, 2, 1, 3))?.reshape((b, lq, m * dh))
}
