//! Polygon rasterisation: pycocotools' `rleFrPoly` bit for bit, and `frPyObjects` on a list of
//! polygons.
//!
//! `rleFrPoly` works on a ×5 grid: it rounds the vertices to it, walks every edge one grid step at
//! a time (stepping along the longer axis and rounding the other coordinate), keeps the points where
//! the walk crosses a pixel-column centre, and turns each into the first row of that column at or
//! below the boundary. Sorting those positions gives the run boundaries; positions hit twice cancel.
//! Following it exactly includes its C behaviour: `(int)` truncation toward zero (so negative
//! coordinates do not round like positive ones) and, for a zero-length edge, a `0/0` slope whose
//! `(int)NaN` is `INT_MIN` on x86.

use crate::error::{CocoError, Result};
use crate::rle::{check_size, Rle};

/// The upsampling factor of `rleFrPoly`.
const SCALE: f64 = 5.0;

/// Largest boundary walk we accept. pycocotools would allocate two `int` arrays of this many
/// points; real annotations need a few thousand.
const MAX_WALK_POINTS: u64 = 1 << 28;

/// `rleFrPoly(xy, k = xy.len() / 2, h, w)`: one polygon `[x1, y1, x2, y2, …]` (x = column, y = row,
/// pixel units) rasterised to an `h`×`w` RLE. An odd trailing coordinate is ignored, and fewer than
/// two points rasterise to nothing, as in pycocotools.
///
/// Fails on a size with no pixels, on coordinates that are not finite or overflow pycocotools'
/// `int` arithmetic (|5·c| ≥ 2^31), and on walks longer than 2^28 points.
pub fn fr_poly(xy: &[f64], h: u32, w: u32) -> Result<Rle> {
    rasterise(xy, h, w, 0)
}

/// `pycocotools.mask.frPyObjects(polygons, h, w)` for a list of polygons: one RLE per polygon.
///
/// pycocotools decides what the list holds from its first element, so:
/// - a first polygon of exactly 4 coordinates makes it read every element as an `[x, y, w, h]`
///   box and raise `TypeError`: [`CocoError::FirstPolygonIsBox`];
/// - an empty list, or a first polygon of fewer than 4 coordinates, is rejected:
///   [`CocoError::UnsupportedPolygons`];
/// - otherwise every polygon is rasterised with [`fr_poly`], whatever its length (a later polygon
///   of 4 coordinates or fewer gives an empty mask).
pub fn fr_polygons<P: AsRef<[f64]>>(polygons: &[P], h: u32, w: u32) -> Result<Vec<Rle>> {
    let first = polygons
        .first()
        .ok_or_else(|| CocoError::UnsupportedPolygons { reason: "the list is empty".into() })?
        .as_ref();
    match first.len() {
        4 => return Err(CocoError::FirstPolygonIsBox),
        n if n < 4 => {
            return Err(CocoError::UnsupportedPolygons { reason: format!("the first polygon has {n} coordinates") });
        }
        _ => {}
    }
    polygons.iter().enumerate().map(|(i, p)| rasterise(p.as_ref(), h, w, i)).collect()
}

/// C's `(int)` of a double on x86-64: truncation toward zero; NaN and out-of-range give `INT_MIN`.
fn c_int(x: f64) -> i64 {
    if x.is_nan() || x >= 2_147_483_648.0 || x <= -2_147_483_649.0 {
        i64::from(i32::MIN)
    } else {
        x.trunc() as i64
    }
}

fn rasterise(xy: &[f64], h: u32, w: u32, polygon: usize) -> Result<Rle> {
    let n = check_size(h, w)?;
    let k = xy.len() / 2;
    let mut gx = Vec::with_capacity(k + 1);
    let mut gy = Vec::with_capacity(k + 1);
    for (index, &value) in xy[..2 * k].iter().enumerate() {
        let scaled = SCALE * value + 0.5;
        if !scaled.is_finite() || scaled.abs() >= 2_147_483_648.0 {
            return Err(CocoError::BadCoordinate { polygon, index, value });
        }
        if index % 2 == 0 { &mut gx } else { &mut gy }.push(c_int(scaled));
    }
    if k == 0 {
        return Rle::zeros(h, w);
    }
    gx.push(gx[0]);
    gy.push(gy[0]);
    let points: u64 = (0..k).map(|j| (gx[j] - gx[j + 1]).unsigned_abs().max((gy[j] - gy[j + 1]).unsigned_abs()) + 1).sum();
    if points > MAX_WALK_POINTS {
        return Err(CocoError::PolygonTooLarge { polygon, points, limit: MAX_WALK_POINTS });
    }

    // Walk the edges on the ×5 grid; wherever consecutive points change column, record the pixel
    // (column-major index) where the boundary enters that column.
    let (hf, wf) = (f64::from(h), f64::from(w));
    let mut bounds: Vec<u32> = Vec::new();
    let mut prev: Option<(i64, i64)> = None;
    let mut visit = |u: i64, v: i64| {
        if let Some((pu, pv)) = prev {
            if u != pu {
                let xd = ((if u < pu { u } else { u - 1 }) as f64 + 0.5) / SCALE - 0.5;
                if xd.floor() == xd && xd >= 0.0 && xd <= wf - 1.0 {
                    let mut yd = (v.min(pv) as f64 + 0.5) / SCALE - 0.5;
                    if yd < 0.0 {
                        yd = 0.0;
                    } else if yd > hf {
                        yd = hf;
                    }
                    bounds.push((xd as u32) * h + yd.ceil() as u32);
                }
            }
        }
        prev = Some((u, v));
    };
    for j in 0..k {
        let (mut xs, mut xe, mut ys, mut ye) = (gx[j], gx[j + 1], gy[j], gy[j + 1]);
        let dx = (xe - xs).abs();
        let dy = (ys - ye).abs();
        let flip = (dx >= dy && xs > xe) || (dx < dy && ys > ye);
        if flip {
            std::mem::swap(&mut xs, &mut xe);
            std::mem::swap(&mut ys, &mut ye);
        }
        if dx >= dy {
            // dx = dy = 0 gives 0/0 = NaN, as in C.
            let s = (ye - ys) as f64 / dx as f64;
            for d in 0..=dx {
                let t = if flip { dx - d } else { d };
                visit(t + xs, c_int(ys as f64 + s * t as f64 + 0.5));
            }
        } else {
            let s = (xe - xs) as f64 / dy as f64;
            for d in 0..=dy {
                let t = if flip { dy - d } else { d };
                visit(c_int(xs as f64 + s * t as f64 + 0.5), t + ys);
            }
        }
    }

    // Boundaries → runs: sort, take differences, and let boundaries hit twice cancel out.
    bounds.push(n);
    bounds.sort_unstable();
    let mut previous = 0u32;
    for b in bounds.iter_mut() {
        let here = *b;
        *b -= previous;
        previous = here;
    }
    let mut counts = Vec::with_capacity(bounds.len());
    let mut it = bounds.into_iter();
    counts.extend(it.next());
    while let Some(d) = it.next() {
        if d > 0 {
            counts.push(d);
        } else if let (Some(next), Some(last)) = (it.next(), counts.last_mut()) {
            *last += next;
        }
    }
    Rle::from_counts(h, w, counts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_square_covers_one_pixel() {
        // The pixel-centred square of the gold cases: (0.5, 0.5)-(1.5, 1.5) in a 10x10 image.
        let r = fr_poly(&[0.5, 0.5, 1.5, 0.5, 1.5, 1.5, 0.5, 1.5], 10, 10).unwrap();
        assert_eq!(r.area(), 1);
    }

    #[test]
    fn degenerate_polygons_are_empty() {
        assert_eq!(fr_poly(&[], 4, 4).unwrap(), Rle::zeros(4, 4).unwrap());
        assert_eq!(fr_poly(&[1.0, 2.0, 3.0], 4, 4).unwrap().area(), 0);
        assert_eq!(fr_poly(&[1.0, 1.0, 3.0, 3.0], 4, 4).unwrap().area(), 0);
        assert_eq!(fr_poly(&[2.0, 2.0, 2.0, 2.0, 2.0, 2.0], 4, 4).unwrap().area(), 0);
    }

    #[test]
    fn frpyobjects_list_rules() {
        let square = vec![0.0, 0.0, 2.0, 0.0, 2.0, 2.0, 0.0, 2.0];
        assert_eq!(fr_polygons(&[vec![1.0, 1.0, 3.0, 3.0]], 4, 4), Err(CocoError::FirstPolygonIsBox));
        assert!(matches!(fr_polygons(&[vec![1.0, 1.0]], 4, 4), Err(CocoError::UnsupportedPolygons { .. })));
        assert!(matches!(fr_polygons::<Vec<f64>>(&[], 4, 4), Err(CocoError::UnsupportedPolygons { .. })));
        let rles = fr_polygons(&[square.clone(), vec![1.0, 1.0, 3.0, 3.0]], 4, 4).unwrap();
        assert_eq!(rles.len(), 2);
        assert_eq!(rles[0].area(), 4);
        assert_eq!(rles[1].area(), 0);
    }

    #[test]
    fn bad_coordinates_are_errors() {
        let nan = [0.0, 0.0, f64::NAN, 0.0, 2.0, 2.0];
        assert!(matches!(fr_poly(&nan, 4, 4), Err(CocoError::BadCoordinate { index: 2, .. })));
        let huge = [0.0, 0.0, 1e12, 0.0, 2.0, 2.0];
        assert!(matches!(fr_poly(&huge, 4, 4), Err(CocoError::BadCoordinate { index: 2, .. })));
        let far = [0.0, 0.0, 4e8, 0.0, 2.0, 2.0];
        assert!(matches!(fr_poly(&far, 4, 4), Err(CocoError::PolygonTooLarge { .. })));
        assert!(matches!(fr_poly(&[0.0; 6], 0, 4), Err(CocoError::InvalidSize { .. })));
    }
}
