//! Scenes of coloured shapes: random layout, polygons, and the picture.
//!
//! Every shape is a polygon, and the picture paints exactly the pixels pycocotools rasterises from
//! that polygon (`deris_coco::fr_polygons`), so the annotation masks and the drawn shapes agree
//! pixel for pixel. Shapes never overlap (their bounding circles keep a gap).

use deris_coco::{CocoError, Rle};
use image::{Rgb, RgbImage};

use crate::data::rng::SplitMix64;

/// The shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ShapeKind {
    Circle,
    Square,
    Triangle,
    Star,
}

impl ShapeKind {
    pub const ALL: [ShapeKind; 4] = [Self::Circle, Self::Square, Self::Triangle, Self::Star];

    pub fn name(self) -> &'static str {
        match self {
            Self::Circle => "circle",
            Self::Square => "square",
            Self::Triangle => "triangle",
            Self::Star => "star",
        }
    }

    /// `(radius, angle offset)` of each vertex, in units of the object's radius. The polygons have
    /// roughly equal areas (2.0–3.1 r²), so shape is not told by size.
    fn outline(self) -> Vec<(f64, f64)> {
        use std::f64::consts::{FRAC_PI_2, FRAC_PI_4, PI};
        let ring = |n: usize, r: f64, start: f64| (0..n).map(move |k| (r, start + 2.0 * PI * k as f64 / n as f64));
        match self {
            Self::Circle => ring(28, 1.0, 0.0).collect(),
            Self::Square => ring(4, 0.85 * std::f64::consts::SQRT_2, FRAC_PI_4).collect(),
            Self::Triangle => ring(3, 1.25, -FRAC_PI_2).collect(),
            Self::Star => (0..10).map(|k| (if k % 2 == 0 { 1.3 } else { 0.55 }, -FRAC_PI_2 + PI * k as f64 / 5.0)).collect(),
        }
    }
}

/// The colours and their nominal RGB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Colour {
    Red,
    Green,
    Blue,
    Yellow,
    Purple,
    Orange,
}

impl Colour {
    pub const ALL: [Colour; 6] = [Self::Red, Self::Green, Self::Blue, Self::Yellow, Self::Purple, Self::Orange];

    pub fn name(self) -> &'static str {
        match self {
            Self::Red => "red",
            Self::Green => "green",
            Self::Blue => "blue",
            Self::Yellow => "yellow",
            Self::Purple => "purple",
            Self::Orange => "orange",
        }
    }

    pub fn rgb(self) -> [u8; 3] {
        match self {
            Self::Red => [215, 35, 35],
            Self::Green => [35, 165, 55],
            Self::Blue => [35, 75, 220],
            Self::Yellow => [240, 215, 30],
            Self::Purple => [135, 50, 175],
            Self::Orange => [250, 135, 20],
        }
    }
}

/// Two sizes with a clear gap between them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SizeClass {
    Small,
    Big,
}

impl SizeClass {
    pub const ALL: [SizeClass; 2] = [Self::Small, Self::Big];

    pub fn name(self) -> &'static str {
        match self {
            Self::Small => "small",
            Self::Big => "big",
        }
    }

    /// Radius range as a fraction of the image side.
    fn radius_range(self) -> (f64, f64) {
        match self {
            Self::Small => (0.055, 0.07),
            Self::Big => (0.095, 0.115),
        }
    }
}

/// Largest vertex radius of any outline (the star's tips), for spacing.
const EXTENT: f64 = 1.3;

/// One shape in a scene.
#[derive(Debug, Clone, PartialEq)]
pub struct Object {
    pub shape: ShapeKind,
    pub colour: Colour,
    pub size: SizeClass,
    /// Centre `(x, y)` in pixels (x to the right, y down).
    pub centre: (f64, f64),
    pub radius: f64,
    /// The painted RGB (the colour's nominal RGB, jittered).
    pub rgb: [u8; 3],
    /// COCO polygon `[x1, y1, x2, y2, …]`, coordinates rounded to 1/100 pixel.
    pub polygon: Vec<f64>,
}

impl Object {
    /// COCO `category_id` of its kind: one category per (size, colour, shape), numbered from 1
    /// in that order ([`categories`]).
    pub fn category_id(&self) -> u32 {
        kind_id(self.size, self.colour, self.shape)
    }

    /// The area of the polygon (shoelace), in pixels².
    pub fn polygon_area(&self) -> f64 {
        let p = &self.polygon;
        let n = p.len() / 2;
        let twice: f64 = (0..n).map(|i| p[2 * i] * p[2 * ((i + 1) % n) + 1] - p[2 * ((i + 1) % n)] * p[2 * i + 1]).sum();
        twice.abs() / 2.0
    }

    /// COCO `[x, y, w, h]` of the polygon.
    pub fn bbox(&self) -> [f64; 4] {
        let xs = self.polygon.iter().step_by(2);
        let ys = self.polygon.iter().skip(1).step_by(2);
        let (x0, x1) = xs.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &x| (a.min(x), b.max(x)));
        let (y0, y1) = ys.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &y| (a.min(y), b.max(y)));
        [x0, y0, round2(x1 - x0), round2(y1 - y0)]
    }
}

/// A plain colour, optionally with per-pixel noise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Background {
    pub rgb: [u8; 3],
    /// Each channel of each pixel gets a uniform offset in `[-noise, noise]` (0 = plain).
    pub noise: u8,
    pub noise_seed: u64,
}

/// A square picture of a few shapes.
#[derive(Debug, Clone, PartialEq)]
pub struct Scene {
    /// Side in pixels.
    pub size: u32,
    pub background: Background,
    pub objects: Vec<Object>,
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

impl Scene {
    /// A random scene of 3–6 shapes on a side of `size` pixels (fewer when they do not fit). About
    /// a third of the shapes repeat the colour and shape of an earlier one, so that a colour and a
    /// shape often do not single out an object and relations, sizes or positions are needed.
    pub fn random(rng: &mut SplitMix64, size: u32) -> Scene {
        let s = f64::from(size);
        let grey = 95 + rng.below(96) as i32;
        let tint = |rng: &mut SplitMix64| (grey + rng.below(21) as i32 - 10).clamp(0, 255) as u8;
        let rgb = [tint(rng), tint(rng), tint(rng)];
        let noise = if rng.chance(0.5) { 18 } else { 0 };
        let background = Background { rgb, noise, noise_seed: rng.next_u64() };

        let wanted = 3 + rng.below(4);
        let mut objects: Vec<Object> = Vec::new();
        for _ in 0..wanted {
            let (shape, colour) = match rng.pick(&objects) {
                Some(o) if rng.chance(0.35) => (o.shape, o.colour),
                _ => (ShapeKind::ALL[rng.below(4)], Colour::ALL[rng.below(6)]),
            };
            let size_class = SizeClass::ALL[rng.below(2)];
            let (lo, hi) = size_class.radius_range();
            let radius = rng.uniform(lo, hi) * s;
            let reach = EXTENT * radius + 1.0;
            let placed = (0..60).map(|_| (rng.uniform(reach, s - reach), rng.uniform(reach, s - reach))).find(|&(x, y)| {
                objects.iter().all(|o| (o.centre.0 - x).hypot(o.centre.1 - y) >= reach + EXTENT * o.radius + 3.0)
            });
            let Some(centre) = placed else { continue };
            let rotation = if shape == ShapeKind::Circle { 0.0 } else { rng.uniform(-0.3, 0.3) };
            let polygon = shape
                .outline()
                .into_iter()
                .flat_map(|(r, a)| [round2(centre.0 + r * radius * (a + rotation).cos()), round2(centre.1 + r * radius * (a + rotation).sin())])
                .collect();
            let jitter = |c: u8, rng: &mut SplitMix64| (i32::from(c) + rng.below(25) as i32 - 12).clamp(0, 255) as u8;
            let [r, g, b] = colour.rgb();
            let rgb = [jitter(r, rng), jitter(g, rng), jitter(b, rng)];
            objects.push(Object { shape, colour, size: size_class, centre, radius, rgb, polygon });
        }
        Scene { size, background, objects }
    }

    /// One mask per object, as pycocotools rasterises its polygon at the scene's size.
    pub fn masks(&self) -> Result<Vec<Rle>, CocoError> {
        self.objects
            .iter()
            .map(|o| deris_coco::fr_polygons(std::slice::from_ref(&o.polygon), self.size, self.size).and_then(|r| Rle::merge(&r)))
            .collect()
    }

    /// The picture: the background, then every object's mask in its colour.
    pub fn render(&self) -> Result<RgbImage, CocoError> {
        let Background { rgb, noise, noise_seed } = self.background;
        let mut rng = SplitMix64::new(noise_seed);
        let mut img = RgbImage::from_fn(self.size, self.size, |_, _| {
            Rgb(rgb.map(|c| {
                let offset = if noise == 0 { 0 } else { rng.below(2 * usize::from(noise) + 1) as i32 - i32::from(noise) };
                (i32::from(c) + offset).clamp(0, 255) as u8
            }))
        });
        for (object, mask) in self.objects.iter().zip(self.masks()?) {
            for (i, &v) in mask.to_rowmajor().iter().enumerate() {
                if v != 0 {
                    img.put_pixel(i as u32 % self.size, i as u32 / self.size, Rgb(object.rgb));
                }
            }
        }
        Ok(img)
    }
}

/// The COCO categories of the synthetic objects, `(id, name)` ("big red circle"), in id order.
pub fn categories() -> Vec<(u32, String)> {
    let mut out = Vec::new();
    for size in SizeClass::ALL {
        for colour in Colour::ALL {
            for shape in ShapeKind::ALL {
                out.push((kind_id(size, colour, shape), format!("{} {} {}", size.name(), colour.name(), shape.name())));
            }
        }
    }
    out
}

/// The category id of a kind: 1 + its index in (size, colour, shape) order.
fn kind_id(size: SizeClass, colour: Colour, shape: ShapeKind) -> u32 {
    1 + (size as u32 * Colour::ALL.len() as u32 + colour as u32) * ShapeKind::ALL.len() as u32 + shape as u32
}
