//! The picture of a run (`curve.png`): the training loss (raw points and a moving average, log
//! scale) on the left, the validation headline metrics (percent: gIoU, cIoU, N-acc, T-acc for
//! GRES; mIoU, oIoU for RIS) on the right, both against the step.

use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Result};
use crate::preprocess::image::RgbImage;
use crate::viz::{draw_text, fill_rect};

const W: usize = 1000;
const H: usize = 400;
const PANEL_W: usize = 440;
const MARGIN: usize = 50;
const PLOT_H: usize = 300;

/// The metrics drawn, with their colours.
const METRICS: [(&str, [u8; 3]); 6] = [
    ("gIoU", [31, 119, 180]),
    ("cIoU", [44, 160, 44]),
    ("N-acc", [214, 39, 40]),
    ("T-acc", [255, 127, 14]),
    ("mIoU", [31, 119, 180]),
    ("oIoU", [44, 160, 44]),
];

/// Draws the history (the `step` and `eval` records of the JSONL log) and writes it as a PNG.
pub fn write_curve(history: &[Value], path: &Path) -> Result<()> {
    let img = render(history)?;
    let buf = image::RgbImage::from_raw(img.w as u32, img.h as u32, img.data)
        .ok_or_else(|| Error::Input { name: "curve".into(), reason: "image buffer of the wrong size".into() })?;
    let tmp = path.with_extension("png.part");
    buf.save_with_format(&tmp, image::ImageFormat::Png)
        .map_err(|e| Error::Io { path: path.to_path_buf(), err: std::io::Error::other(e.to_string()) })?;
    std::fs::rename(&tmp, path).map_err(|err| Error::Io { path: path.to_path_buf(), err })
}

/// The picture as an RGB image.
pub fn render(history: &[Value]) -> Result<RgbImage> {
    let mut img = RgbImage::new(H, W, vec![255; W * H * 3])?;
    let losses: Vec<(f64, f64)> = history
        .iter()
        .filter(|v| v["type"] == "step")
        .filter_map(|v| Some((v["record"]["step"].as_f64()?, v["record"]["loss"].as_f64()?)))
        .filter(|&(_, l)| l > 0.0 && l.is_finite())
        .collect();
    let evals: Vec<&Value> = history.iter().filter(|v| v["type"] == "eval").collect();
    let metrics: Vec<(&str, [u8; 3], Vec<(f64, f64)>)> = METRICS
        .iter()
        .map(|&(name, c)| (name, c, evals.iter().filter_map(|v| Some((v["step"].as_f64()?, v["metrics"][name].as_f64()?))).collect::<Vec<_>>()))
        .filter(|m| !m.2.is_empty())
        .collect();
    let max_step = losses.iter().map(|p| p.0).chain(metrics.iter().flat_map(|m| m.2.iter().map(|p| p.0))).fold(1.0, f64::max);

    // Left: loss, log10 scale.
    let logs: Vec<(f64, f64)> = losses.iter().map(|&(s, l)| (s, l.log10())).collect();
    let (lo, hi) = logs.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| (a.min(p.1), b.max(p.1)));
    let (lo, hi) = if lo.is_finite() { (lo.floor(), hi.ceil().max(lo.floor() + 1.0)) } else { (-1.0, 1.0) };
    let left = Panel { x0: MARGIN, max_step, lo, hi };
    left.frame(&mut img, "training loss (log10)");
    for &(s, l) in &logs {
        left.dot(&mut img, s, l, [170, 170, 170]);
    }
    let smooth = moving_average(&logs, 20);
    left.line(&mut img, &smooth, [0, 0, 0]);
    for k in 0..=(hi - lo) as usize {
        let v = lo + k as f64;
        draw_text(&mut img, MARGIN - 20, left.y(v).saturating_sub(3), &format!("{v:.0}"), 1, [0, 0, 0]);
    }

    // Right: metrics, 0–100.
    let right = Panel { x0: W - MARGIN - PANEL_W, max_step, lo: 0.0, hi: 100.0 };
    right.frame(&mut img, "validation (%)");
    for (i, (name, c, pts)) in metrics.iter().enumerate() {
        right.line(&mut img, pts, *c);
        for &(s, v) in pts {
            right.dot(&mut img, s, v, *c);
        }
        let last = pts.last().map_or(0.0, |p| p.1);
        draw_text(&mut img, right.x0 + 8, MARGIN + 8 + 12 * i, &format!("{name} {last:.1}"), 1, *c);
    }
    for v in [0.0, 50.0, 100.0] {
        draw_text(&mut img, right.x0 - 22, right.y(v).saturating_sub(3), &format!("{v:>3.0}"), 1, [0, 0, 0]);
    }
    for panel in [&left, &right] {
        for k in 0..=4 {
            let step = max_step * k as f64 / 4.0;
            let label = format!("{step:.0}");
            let x = panel.x(step).saturating_sub(label.len() * 3);
            draw_text(&mut img, x, MARGIN + PLOT_H + 6, &label, 1, [0, 0, 0]);
        }
        draw_text(&mut img, panel.x0 + PANEL_W / 2 - 12, MARGIN + PLOT_H + 20, "step", 1, [0, 0, 0]);
    }
    Ok(img)
}

/// One plot area: x from 0 to `max_step`, y from `lo` to `hi`.
struct Panel {
    x0: usize,
    max_step: f64,
    lo: f64,
    hi: f64,
}

impl Panel {
    fn x(&self, step: f64) -> usize {
        self.x0 + ((step / self.max_step).clamp(0.0, 1.0) * (PANEL_W - 1) as f64) as usize
    }

    fn y(&self, v: f64) -> usize {
        let t = ((v - self.lo) / (self.hi - self.lo)).clamp(0.0, 1.0);
        MARGIN + ((1.0 - t) * (PLOT_H - 1) as f64) as usize
    }

    fn frame(&self, img: &mut RgbImage, title: &str) {
        fill_rect(img, self.x0, MARGIN, PANEL_W, 1, [0, 0, 0], 255);
        fill_rect(img, self.x0, MARGIN + PLOT_H, PANEL_W, 1, [0, 0, 0], 255);
        fill_rect(img, self.x0, MARGIN, 1, PLOT_H, [0, 0, 0], 255);
        fill_rect(img, self.x0 + PANEL_W, MARGIN, 1, PLOT_H + 1, [0, 0, 0], 255);
        draw_text(img, self.x0, 12, title, 2, [0, 0, 0]);
    }

    fn dot(&self, img: &mut RgbImage, step: f64, v: f64, c: [u8; 3]) {
        fill_rect(img, self.x(step).saturating_sub(1), self.y(v).saturating_sub(1), 2, 2, c, 255);
    }

    /// Straight segments between consecutive points, drawn as dots every pixel of x or y.
    fn line(&self, img: &mut RgbImage, pts: &[(f64, f64)], c: [u8; 3]) {
        for w in pts.windows(2) {
            let (xa, ya, xb, yb) = (self.x(w[0].0) as f64, self.y(w[0].1) as f64, self.x(w[1].0) as f64, self.y(w[1].1) as f64);
            let n = (xb - xa).abs().max((yb - ya).abs()).max(1.0) as usize;
            for k in 0..=n {
                let t = k as f64 / n as f64;
                fill_rect(img, (xa + t * (xb - xa)) as usize, (ya + t * (yb - ya)) as usize, 2, 2, c, 255);
            }
        }
    }
}

/// Trailing mean over `window` points.
fn moving_average(pts: &[(f64, f64)], window: usize) -> Vec<(f64, f64)> {
    let mut out = Vec::with_capacity(pts.len());
    let mut sum = 0.0;
    for (i, &(s, v)) in pts.iter().enumerate() {
        sum += v;
        if i >= window {
            sum -= pts[i - window].1;
        }
        out.push((s, sum / (i + 1).min(window) as f64));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn draws_losses_and_metrics() {
        let mut h: Vec<Value> = (1..=50).map(|s| json!({"type": "step", "record": {"step": s, "loss": 10.0 / s as f64}})).collect();
        h.push(json!({"type": "eval", "step": 25, "metrics": {"gIoU": 40.0, "N-acc": 60.0}}));
        h.push(json!({"type": "eval", "step": 50, "metrics": {"gIoU": 70.0, "N-acc": 90.0}}));
        let img = render(&h).unwrap();
        let coloured = img.data.chunks(3).filter(|p| p[0] != p[1] || p[1] != p[2]).count();
        assert!(coloured > 100, "the metric lines are drawn ({coloured} coloured pixels)");
        assert_eq!(moving_average(&[(0.0, 1.0), (1.0, 3.0), (2.0, 5.0)], 2), [(0.0, 1.0), (1.0, 2.0), (2.0, 4.0)]);
        // an empty history still gives a picture
        assert_eq!(render(&[]).unwrap().data.len(), W * H * 3);
    }
}
