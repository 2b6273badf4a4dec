//! The overlay picture of a [`Prediction`]: the mask in a translucent colour, its contour, and a
//! caption with the sentence and the decision. A pure function of (image, prediction, style): the
//! input is untouched, colours are fixed by the [`Style`], and nothing here runs a model.
//!
//! Text is drawn with a built-in 5×7 ASCII bitmap font (plus descenders) (no system fonts at run time); characters
//! outside printable ASCII are shown as `?`.

use crate::output::Prediction;
use crate::post::BinaryMask;
use crate::preprocess::image::RgbImage;
use crate::preprocess::resize::resize_nearest_u8;

/// Colours and sizes of the overlay. Sizes left at `None` follow the image size.
#[derive(Debug, Clone, PartialEq)]
pub struct Style {
    /// Fill colour of the mask.
    pub mask_color: [u8; 3],
    /// Opacity of the mask fill, 0 (invisible) to 255 (opaque).
    pub mask_alpha: u8,
    /// Colour of the mask's contour.
    pub contour_color: [u8; 3],
    /// Contour width in pixels; `None`: about 1/250 of the shorter side, at least 1.
    pub contour_width: Option<usize>,
    /// Write the sentence and the decision on the picture.
    pub caption: bool,
    /// Size of one font pixel in image pixels; `None`: 1/250 of the width rounded up (a line
    /// holds about 40 characters), at most 1/60 of the height, at least 1.
    pub text_scale: Option<usize>,
    /// Colour of the sentence.
    pub text_color: [u8; 3],
    /// Colour of the caption's backdrop, drawn with [`Style::caption_alpha`].
    pub caption_background: [u8; 3],
    pub caption_alpha: u8,
    /// Colour of the decision when there is a target.
    pub target_color: [u8; 3],
    /// Colour of the decision, the frame and the central label when there is no target.
    pub no_target_color: [u8; 3],
}

impl Default for Style {
    fn default() -> Self {
        Self {
            mask_color: [30, 144, 255],
            mask_alpha: 115,
            contour_color: [255, 215, 0],
            contour_width: None,
            caption: true,
            text_scale: None,
            text_color: [255, 255, 255],
            caption_background: [0, 0, 0],
            caption_alpha: 170,
            target_color: [80, 220, 100],
            no_target_color: [255, 64, 64],
        }
    }
}

/// Draws `prediction` on a copy of `image`.
///
/// - The mask (resized with nearest-neighbour if its size differs from the image's) is blended in
///   [`Style::mask_color`] and outlined in [`Style::contour_color`].
/// - A caption band at the top holds the sentence (quoted, wrapped, at most three lines) and the
///   decision: `TARGET  score 0.93 > 0.70` or `NO TARGET  best score 0.41 <= 0.70`.
/// - Without a target the picture also gets a frame and a central `NO TARGET` label in
///   [`Style::no_target_color`].
pub fn overlay(image: &RgbImage, prediction: &Prediction, style: &Style) -> RgbImage {
    let mut out = image.clone();
    let (h, w) = (image.h, image.w);
    if h == 0 || w == 0 || image.data.len() != h * w * 3 {
        return out;
    }
    let short = h.min(w);
    let line = style.contour_width.unwrap_or((short + 125) / 250).max(1);
    if let Some(mask) = mask_at(&prediction.mask, h, w) {
        for (px, &m) in out.data.chunks_exact_mut(3).zip(&mask) {
            if m != 0 {
                blend(px, style.mask_color, style.mask_alpha);
            }
        }
        for (px, &c) in out.data.chunks_exact_mut(3).zip(&contour(&mask, h, w, line)) {
            if c {
                px.copy_from_slice(&style.contour_color);
            }
        }
    }
    let scale = style.text_scale.unwrap_or_else(|| w.div_ceil(250).min(h / 60)).max(1);
    if style.caption {
        draw_caption(&mut out, prediction, style, scale);
    }
    if prediction.no_target {
        let frame = 2 * line;
        fill_rect(&mut out, 0, 0, w, frame.min(h), style.no_target_color, 255);
        fill_rect(&mut out, 0, h.saturating_sub(frame), w, frame.min(h), style.no_target_color, 255);
        fill_rect(&mut out, 0, 0, frame.min(w), h, style.no_target_color, 255);
        fill_rect(&mut out, w.saturating_sub(frame), 0, frame.min(w), h, style.no_target_color, 255);
        let big = (2 * scale).min(w / (9 * ADVANCE)).max(1);
        let (tw, th) = (9 * ADVANCE * big, GLYPH_H * big);
        let pad = 2 * big;
        let (x, y) = (w.saturating_sub(tw) / 2, h.saturating_sub(th) / 2);
        fill_rect(&mut out, x.saturating_sub(pad), y.saturating_sub(pad), tw + 2 * pad, th + 2 * pad, style.caption_background, style.caption_alpha);
        draw_text(&mut out, x, y, "NO TARGET", big, style.no_target_color);
    }
    out
}

/// The sentence (wrapped) and the decision in a translucent band at the top.
fn draw_caption(out: &mut RgbImage, p: &Prediction, style: &Style, scale: usize) {
    let pad = 2 * scale;
    let per_line = (out.w.saturating_sub(2 * pad) / (ADVANCE * scale)).max(1);
    let mut lines = wrap(&format!("\"{}\"", ascii(&p.text)), per_line, 3);
    let best = p.best_score().unwrap_or(0.0);
    let decision = if p.no_target {
        format!("NO TARGET  best score {best:.2} <= {:.2}", p.score_threshold)
    } else {
        format!("TARGET  score {best:.2} > {:.2}", p.score_threshold)
    };
    let decision_lines = wrap(&decision, per_line, 2);
    let n_sentence = lines.len();
    lines.extend(decision_lines);
    let line_h = LINE_H * scale;
    fill_rect(out, 0, 0, out.w, lines.len() * line_h + 2 * pad - (LINE_H - GLYPH_ROWS) * scale, style.caption_background, style.caption_alpha);
    for (i, text) in lines.iter().enumerate() {
        let color = match (i < n_sentence, p.no_target) {
            (true, _) => style.text_color,
            (false, false) => style.target_color,
            (false, true) => style.no_target_color,
        };
        draw_text(out, pad, pad + i * line_h, text, scale, color);
    }
}

/// The mask at `h × w` (nearest-neighbour if its size differs); `None` when empty or invalid.
fn mask_at(mask: &BinaryMask, h: usize, w: usize) -> Option<Vec<u8>> {
    let (mh, mw) = (mask.height, mask.width);
    if mh == 0 || mw == 0 || mask.data.len() != mh * mw || mask.is_empty() {
        return None;
    }
    if (mh, mw) == (h, w) {
        return Some(mask.data.clone());
    }
    Some(resize_nearest_u8(&mask.data, mh, mw, 1, h, w))
}

/// Pixels within `width − 1` (Chebyshev distance) of a mask pixel that has a 4-neighbour outside
/// the mask (the image border counts as outside).
fn contour(mask: &[u8], h: usize, w: usize, width: usize) -> Vec<bool> {
    let on = |y: usize, x: usize| mask[y * w + x] != 0;
    let mut edge = vec![false; h * w];
    for y in 0..h {
        for x in 0..w {
            edge[y * w + x] = on(y, x)
                && (y == 0 || x == 0 || y + 1 == h || x + 1 == w || !on(y - 1, x) || !on(y + 1, x) || !on(y, x - 1) || !on(y, x + 1));
        }
    }
    let r = width - 1;
    if r == 0 {
        return edge;
    }
    // Separable dilation: along rows, then along columns.
    let mut rows = vec![false; h * w];
    for y in 0..h {
        for x in 0..w {
            rows[y * w + x] = (x.saturating_sub(r)..=(x + r).min(w - 1)).any(|xx| edge[y * w + xx]);
        }
    }
    let mut out = vec![false; h * w];
    for y in 0..h {
        for x in 0..w {
            out[y * w + x] = (y.saturating_sub(r)..=(y + r).min(h - 1)).any(|yy| rows[yy * w + x]);
        }
    }
    out
}

/// `px = (px · (255 − a) + c · a) / 255`, rounded.
fn blend(px: &mut [u8], c: [u8; 3], a: u8) {
    let a = u32::from(a);
    for (p, c) in px.iter_mut().zip(c) {
        *p = ((u32::from(*p) * (255 - a) + u32::from(c) * a + 127) / 255) as u8;
    }
}

/// Blends a rectangle, clipped to the image.
pub(crate) fn fill_rect(img: &mut RgbImage, x: usize, y: usize, rw: usize, rh: usize, c: [u8; 3], a: u8) {
    let (x1, y1) = ((x + rw).min(img.w), (y + rh).min(img.h));
    for yy in y.min(y1)..y1 {
        for xx in x.min(x1)..x1 {
            let i = (yy * img.w + xx) * 3;
            blend(&mut img.data[i..i + 3], c, a);
        }
    }
}

/// Draws ASCII text with the top-left corner of the first glyph at `(x, y)`, clipped.
pub(crate) fn draw_text(img: &mut RgbImage, x: usize, y: usize, text: &str, scale: usize, c: [u8; 3]) {
    for (k, ch) in text.chars().enumerate() {
        let gx = x + k * ADVANCE * scale;
        if gx >= img.w {
            break;
        }
        for (row, bits) in glyph(ch).iter().enumerate() {
            for col in 0..GLYPH_W {
                if bits >> (GLYPH_W - 1 - col) & 1 == 1 {
                    fill_rect(img, gx + col * scale, y + row * scale, scale, scale, c, 255);
                }
            }
        }
    }
}

/// Printable ASCII kept, everything else `?`.
fn ascii(s: &str) -> String {
    s.chars().map(|c| if (' '..='~').contains(&c) { c } else if c.is_whitespace() { ' ' } else { '?' }).collect()
}

/// Greedy word wrap to `width` characters (long words are cut), at most `max_lines` lines; a cut
/// text ends with `...`.
fn wrap(text: &str, width: usize, max_lines: usize) -> Vec<String> {
    let mut lines: Vec<String> = Vec::new();
    let mut cur = String::new();
    for word in text.split_whitespace() {
        let mut word = word.to_string();
        loop {
            let sep = usize::from(!cur.is_empty());
            if cur.len() + sep + word.len() <= width {
                if sep == 1 {
                    cur.push(' ');
                }
                cur.push_str(&word);
                break;
            }
            if !cur.is_empty() {
                lines.push(std::mem::take(&mut cur));
                continue;
            }
            // A word longer than a line: cut it (the text is ASCII, so bytes are characters).
            let rest = word.split_off(width);
            lines.push(word);
            word = rest;
        }
    }
    if !cur.is_empty() {
        lines.push(cur);
    }
    if lines.len() > max_lines {
        lines.truncate(max_lines);
        if let Some(last) = lines.last_mut() {
            last.truncate(width.saturating_sub(3));
            last.push_str("...");
        }
    }
    lines
}

const GLYPH_W: usize = 5;
/// Rows from the top of a capital to the baseline.
const GLYPH_H: usize = 7;
/// Rows including the two below the baseline (descenders of `g j p q y , ;`).
const GLYPH_ROWS: usize = GLYPH_H + 2;
/// Horizontal distance between glyphs, in font pixels.
const ADVANCE: usize = GLYPH_W + 1;
/// Vertical distance between lines, in font pixels.
const LINE_H: usize = GLYPH_ROWS + 2;

/// The glyph of `c`: 9 rows of 5 bits, the leftmost pixel in bit 4; `?` outside printable ASCII.
fn glyph(c: char) -> &'static [u8; GLYPH_ROWS] {
    let i = (c as usize).wrapping_sub(0x20);
    FONT_5X9.get(i).unwrap_or(&FONT_5X9[usize::from(b'?' - 0x20)])
}

/// Our 5×7 bitmap font (with 2 descender rows) for ASCII 0x20 (space) to 0x7E (`~`).
#[rustfmt::skip]
const FONT_5X9: [[u8; GLYPH_ROWS]; 95] = [
    [0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00], // space
    [0x04, 0x04, 0x04, 0x04, 0x04, 0x00, 0x04, 0x00, 0x00], // !
    [0x0A, 0x0A, 0x0A, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00], // "
    [0x0A, 0x0A, 0x1F, 0x0A, 0x1F, 0x0A, 0x0A, 0x00, 0x00], // #
    [0x04, 0x0F, 0x14, 0x0E, 0x05, 0x1E, 0x04, 0x00, 0x00], // $
    [0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03, 0x00, 0x00], // %
    [0x0C, 0x12, 0x14, 0x08, 0x15, 0x12, 0x0D, 0x00, 0x00], // &
    [0x04, 0x04, 0x08, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00], // '
    [0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02, 0x00, 0x00], // (
    [0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08, 0x00, 0x00], // )
    [0x00, 0x04, 0x15, 0x0E, 0x15, 0x04, 0x00, 0x00, 0x00], // *
    [0x00, 0x04, 0x04, 0x1F, 0x04, 0x04, 0x00, 0x00, 0x00], // +
    [0x00, 0x00, 0x00, 0x00, 0x00, 0x0C, 0x0C, 0x04, 0x08], // ,
    [0x00, 0x00, 0x00, 0x1F, 0x00, 0x00, 0x00, 0x00, 0x00], // -
    [0x00, 0x00, 0x00, 0x00, 0x00, 0x0C, 0x0C, 0x00, 0x00], // .
    [0x00, 0x01, 0x02, 0x04, 0x08, 0x10, 0x00, 0x00, 0x00], // /
    [0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E, 0x00, 0x00], // 0
    [0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E, 0x00, 0x00], // 1
    [0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F, 0x00, 0x00], // 2
    [0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E, 0x00, 0x00], // 3
    [0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02, 0x00, 0x00], // 4
    [0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E, 0x00, 0x00], // 5
    [0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E, 0x00, 0x00], // 6
    [0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08, 0x00, 0x00], // 7
    [0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E, 0x00, 0x00], // 8
    [0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C, 0x00, 0x00], // 9
    [0x00, 0x0C, 0x0C, 0x00, 0x0C, 0x0C, 0x00, 0x00, 0x00], // :
    [0x00, 0x00, 0x0C, 0x0C, 0x00, 0x0C, 0x0C, 0x04, 0x08], // ;
    [0x02, 0x04, 0x08, 0x10, 0x08, 0x04, 0x02, 0x00, 0x00], // <
    [0x00, 0x00, 0x1F, 0x00, 0x1F, 0x00, 0x00, 0x00, 0x00], // =
    [0x08, 0x04, 0x02, 0x01, 0x02, 0x04, 0x08, 0x00, 0x00], // >
    [0x0E, 0x11, 0x01, 0x02, 0x04, 0x00, 0x04, 0x00, 0x00], // ?
    [0x0E, 0x11, 0x01, 0x0D, 0x15, 0x15, 0x0E, 0x00, 0x00], // @
    [0x0E, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11, 0x00, 0x00], // A
    [0x1E, 0x11, 0x11, 0x1E, 0x11, 0x11, 0x1E, 0x00, 0x00], // B
    [0x0E, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0E, 0x00, 0x00], // C
    [0x1C, 0x12, 0x11, 0x11, 0x11, 0x12, 0x1C, 0x00, 0x00], // D
    [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x1F, 0x00, 0x00], // E
    [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x10, 0x00, 0x00], // F
    [0x0E, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0F, 0x00, 0x00], // G
    [0x11, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11, 0x00, 0x00], // H
    [0x0E, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E, 0x00, 0x00], // I
    [0x07, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0C, 0x00, 0x00], // J
    [0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11, 0x00, 0x00], // K
    [0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1F, 0x00, 0x00], // L
    [0x11, 0x1B, 0x15, 0x15, 0x11, 0x11, 0x11, 0x00, 0x00], // M
    [0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11, 0x00, 0x00], // N
    [0x0E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E, 0x00, 0x00], // O
    [0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10, 0x10, 0x00, 0x00], // P
    [0x0E, 0x11, 0x11, 0x11, 0x15, 0x12, 0x0D, 0x00, 0x00], // Q
    [0x1E, 0x11, 0x11, 0x1E, 0x14, 0x12, 0x11, 0x00, 0x00], // R
    [0x0F, 0x10, 0x10, 0x0E, 0x01, 0x01, 0x1E, 0x00, 0x00], // S
    [0x1F, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04, 0x00, 0x00], // T
    [0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E, 0x00, 0x00], // U
    [0x11, 0x11, 0x11, 0x11, 0x11, 0x0A, 0x04, 0x00, 0x00], // V
    [0x11, 0x11, 0x11, 0x15, 0x15, 0x15, 0x0A, 0x00, 0x00], // W
    [0x11, 0x11, 0x0A, 0x04, 0x0A, 0x11, 0x11, 0x00, 0x00], // X
    [0x11, 0x11, 0x11, 0x0A, 0x04, 0x04, 0x04, 0x00, 0x00], // Y
    [0x1F, 0x01, 0x02, 0x04, 0x08, 0x10, 0x1F, 0x00, 0x00], // Z
    [0x0E, 0x08, 0x08, 0x08, 0x08, 0x08, 0x0E, 0x00, 0x00], // [
    [0x00, 0x10, 0x08, 0x04, 0x02, 0x01, 0x00, 0x00, 0x00], // backslash
    [0x0E, 0x02, 0x02, 0x02, 0x02, 0x02, 0x0E, 0x00, 0x00], // ]
    [0x04, 0x0A, 0x11, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00], // ^
    [0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x1F, 0x00, 0x00], // _
    [0x08, 0x04, 0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00], // `
    [0x00, 0x00, 0x0E, 0x01, 0x0F, 0x11, 0x0F, 0x00, 0x00], // a
    [0x10, 0x10, 0x16, 0x19, 0x11, 0x11, 0x1E, 0x00, 0x00], // b
    [0x00, 0x00, 0x0E, 0x10, 0x10, 0x11, 0x0E, 0x00, 0x00], // c
    [0x01, 0x01, 0x0D, 0x13, 0x11, 0x11, 0x0F, 0x00, 0x00], // d
    [0x00, 0x00, 0x0E, 0x11, 0x1F, 0x10, 0x0E, 0x00, 0x00], // e
    [0x06, 0x09, 0x08, 0x1C, 0x08, 0x08, 0x08, 0x00, 0x00], // f
    [0x00, 0x00, 0x0F, 0x11, 0x11, 0x11, 0x0F, 0x01, 0x0E], // g
    [0x10, 0x10, 0x16, 0x19, 0x11, 0x11, 0x11, 0x00, 0x00], // h
    [0x04, 0x00, 0x0C, 0x04, 0x04, 0x04, 0x0E, 0x00, 0x00], // i
    [0x02, 0x00, 0x06, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0C], // j
    [0x10, 0x10, 0x12, 0x14, 0x18, 0x14, 0x12, 0x00, 0x00], // k
    [0x0C, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E, 0x00, 0x00], // l
    [0x00, 0x00, 0x1A, 0x15, 0x15, 0x11, 0x11, 0x00, 0x00], // m
    [0x00, 0x00, 0x16, 0x19, 0x11, 0x11, 0x11, 0x00, 0x00], // n
    [0x00, 0x00, 0x0E, 0x11, 0x11, 0x11, 0x0E, 0x00, 0x00], // o
    [0x00, 0x00, 0x1E, 0x11, 0x11, 0x11, 0x1E, 0x10, 0x10], // p
    [0x00, 0x00, 0x0F, 0x11, 0x11, 0x11, 0x0F, 0x01, 0x01], // q
    [0x00, 0x00, 0x16, 0x19, 0x10, 0x10, 0x10, 0x00, 0x00], // r
    [0x00, 0x00, 0x0E, 0x10, 0x0E, 0x01, 0x1E, 0x00, 0x00], // s
    [0x08, 0x08, 0x1C, 0x08, 0x08, 0x09, 0x06, 0x00, 0x00], // t
    [0x00, 0x00, 0x11, 0x11, 0x11, 0x13, 0x0D, 0x00, 0x00], // u
    [0x00, 0x00, 0x11, 0x11, 0x11, 0x0A, 0x04, 0x00, 0x00], // v
    [0x00, 0x00, 0x11, 0x11, 0x15, 0x15, 0x0A, 0x00, 0x00], // w
    [0x00, 0x00, 0x11, 0x0A, 0x04, 0x0A, 0x11, 0x00, 0x00], // x
    [0x00, 0x00, 0x11, 0x11, 0x11, 0x11, 0x0F, 0x01, 0x0E], // y
    [0x00, 0x00, 0x1F, 0x02, 0x04, 0x08, 0x1F, 0x00, 0x00], // z
    [0x02, 0x04, 0x04, 0x08, 0x04, 0x04, 0x02, 0x00, 0x00], // {
    [0x04, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04, 0x00, 0x00], // |
    [0x08, 0x04, 0x04, 0x02, 0x04, 0x04, 0x08, 0x00, 0x00], // }
    [0x00, 0x00, 0x08, 0x15, 0x02, 0x00, 0x00, 0x00, 0x00], // ~
];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::output::{QueryPrediction, Timings};

    fn prediction(h: usize, w: usize, mask: Vec<u8>, no_target: bool) -> Prediction {
        let m = BinaryMask { height: h, width: w, data: mask };
        Prediction {
            text: "the dog — left".into(),
            mask_model: m.clone(),
            mask: m,
            no_target,
            score_threshold: 0.7,
            queries: vec![QueryPrediction { score: 0.9, selected: !no_target, bbox: [0.0; 4], bbox_model: [0.0; 4], mask: None }],
            existence: 0.5,
            pred_nt: 0.5,
            timings: Timings::default(),
        }
    }

    #[test]
    fn wrap_cuts_and_marks_long_text() {
        assert_eq!(wrap("a bb ccc", 4, 3), vec!["a bb", "ccc"]);
        assert_eq!(wrap("abcdefghij", 4, 3), vec!["abcd", "efgh", "ij"]);
        assert_eq!(wrap("one two three four five", 5, 2), vec!["one", "tw..."]);
        assert_eq!(ascii("é a\tb"), "? a b");
    }

    #[test]
    fn contour_is_the_inner_border() {
        let mut m = vec![0u8; 25];
        for y in 1..4 {
            for x in 1..4 {
                m[y * 5 + x] = 1;
            }
        }
        let c = contour(&m, 5, 5, 1);
        assert!(!c[2 * 5 + 2] && c[5 + 1] && c[3 * 5 + 3] && !c[0]);
        assert_eq!(c.iter().filter(|&&v| v).count(), 8);
        assert!(contour(&m, 5, 5, 2)[0]);
    }

    #[test]
    fn overlay_leaves_the_input_alone_and_is_deterministic() {
        let (h, w) = (60, 80);
        let img = RgbImage { h, w, data: (0..h * w * 3).map(|i| (i % 251) as u8).collect() };
        let before = img.clone();
        let mask: Vec<u8> = (0..h * w).map(|i| u8::from((i / w) > 30 && (i % w) > 40)).collect();
        let p = prediction(h, w, mask, false);
        let a = overlay(&img, &p, &Style::default());
        assert_eq!(img, before);
        assert_eq!(a, overlay(&img, &p, &Style::default()));
        assert_eq!((a.h, a.w, a.data.len()), (h, w, h * w * 3));
        // Inside the mask, away from the contour: the blend of the pixel and the mask colour.
        let i = (50 * w + 60) * 3;
        let mut want = [img.data[i], img.data[i + 1], img.data[i + 2]];
        blend(&mut want, Style::default().mask_color, Style::default().mask_alpha);
        assert_eq!(&a.data[i..i + 3], &want);
        // Outside the mask and below the caption: untouched.
        let j = (50 * w + 10) * 3;
        assert_eq!(&a.data[j..j + 3], &img.data[j..j + 3]);
    }

    #[test]
    fn no_target_draws_a_frame() {
        let (h, w) = (40, 40);
        let img = RgbImage { h, w, data: vec![100; h * w * 3] };
        let style = Style::default();
        let a = overlay(&img, &prediction(h, w, vec![0; h * w], true), &style);
        let corner = ((h - 1) * w) * 3;
        assert_eq!(&a.data[corner..corner + 3], &style.no_target_color);
        // A mask of another size is resized, and a 1x1 image does not break anything.
        let tiny = RgbImage { h: 1, w: 1, data: vec![0; 3] };
        let _ = overlay(&tiny, &prediction(3, 3, vec![1; 9], false), &style);
    }
}
