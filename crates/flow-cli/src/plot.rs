//! PNG pictures of 2-D models: density heat maps and scatter plots.

use std::path::Path;

use candle::{Device, Tensor};
use flow_core::Flow;
use plotters::prelude::*;

use crate::Failure;

const SIZE: u32 = 720;
const CELLS: usize = 240;

/// A rectangle of the plane: `[x0, x1] × [y0, y1]`.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    pub x: (f64, f64),
    pub y: (f64, f64),
}

impl Bounds {
    /// The extent of `points` (rows of 2), widened by 10% on each side.
    pub fn around(points: &[f32]) -> Self {
        let (mut x, mut y) = ((f64::MAX, f64::MIN), (f64::MAX, f64::MIN));
        for p in points.chunks(2) {
            x = (x.0.min(p[0] as f64), x.1.max(p[0] as f64));
            y = (y.0.min(p[1] as f64), y.1.max(p[1] as f64));
        }
        let widen = |(a, b): (f64, f64)| {
            let m = ((b - a) * 0.1).max(1e-3);
            (a - m, b + m)
        };
        Self {
            x: widen(x),
            y: widen(y),
        }
    }

    fn to_pixel(self, px: f64, py: f64) -> (i32, i32) {
        let s = SIZE as f64;
        let u = (px - self.x.0) / (self.x.1 - self.x.0) * s;
        let v = (1.0 - (py - self.y.0) / (self.y.1 - self.y.0)) * s;
        (u as i32, v as i32)
    }
}

/// A dark-blue → teal → yellow ramp for `t ∈ [0, 1]`.
fn ramp(t: f64) -> RGBColor {
    const STOPS: [(f64, [f64; 3]); 4] = [
        (0.0, [20.0, 18.0, 60.0]),
        (0.35, [40.0, 90.0, 140.0]),
        (0.7, [60.0, 180.0, 130.0]),
        (1.0, [250.0, 230.0, 40.0]),
    ];
    let t = t.clamp(0.0, 1.0);
    let i = STOPS
        .iter()
        .rposition(|s| s.0 <= t)
        .unwrap_or(0)
        .min(STOPS.len() - 2);
    let (a, b) = (STOPS[i], STOPS[i + 1]);
    let f = (t - a.0) / (b.0 - a.0);
    let c = |k: usize| (a.1[k] + f * (b.1[k] - a.1[k])) as u8;
    RGBColor(c(0), c(1), c(2))
}

fn draw(
    path: &Path,
    paint: impl FnOnce(&DrawingArea<BitMapBackend, plotters::coord::Shift>) -> Result<(), String>,
) -> Result<(), Failure> {
    draw_sized(path, (SIZE, SIZE), paint)
}

fn draw_sized(
    path: &Path,
    size: (u32, u32),
    paint: impl FnOnce(&DrawingArea<BitMapBackend, plotters::coord::Shift>) -> Result<(), String>,
) -> Result<(), Failure> {
    // Draw into a temporary file beside the target, then rename: never a partial PNG.
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp-{}.png", std::process::id()));
    let result = (|| {
        let root = BitMapBackend::new(&tmp, size).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        paint(&root)?;
        root.present().map_err(|e| e.to_string())
    })();
    let result = result.and_then(|()| std::fs::rename(&tmp, path).map_err(|e| e.to_string()));
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(format!("{}: cannot write the picture: {e}", path.display()).into());
    }
    Ok(())
}

fn dots(
    root: &DrawingArea<BitMapBackend, plotters::coord::Shift>,
    points: &[f32],
    bounds: Bounds,
    color: RGBAColor,
) -> Result<(), String> {
    for p in points.chunks(2) {
        let c = Circle::new(bounds.to_pixel(p[0] as f64, p[1] as f64), 1, color.filled());
        root.draw(&c).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Images as a grid, as near square as their number allows, one pixel a `scale`×`scale`
/// block with a one-block gap between images: `pixels` holds one image per row of
/// `channels·height·width` values in `(C, H, W)` order, each a pixel value in
/// `[0, levels)`. One channel is drawn grey, three as RGB; otherwise the first channel.
pub fn image_grid(
    path: &Path,
    pixels: &[f32],
    (channels, height, width): (usize, usize, usize),
    levels: u32,
) -> Result<(), Failure> {
    let per_image = channels * height * width;
    let n = pixels.len() / per_image.max(1);
    let cols = (n as f64).sqrt().ceil().max(1.0) as usize;
    let rows = n.div_ceil(cols).max(1);
    // About 512 pixels across, at least one per image pixel.
    let scale = (512 / (cols * (width + 1))).max(1);
    let size = (
        ((cols * (width + 1) + 1) * scale) as u32,
        ((rows * (height + 1) + 1) * scale) as u32,
    );
    let top = (levels.max(2) - 1) as f32;
    let level = |v: f32| (v.clamp(0.0, top) / top * 255.0).round() as u8;
    draw_sized(path, size, |root| {
        root.fill(&RGBColor(40, 40, 40))
            .map_err(|e| e.to_string())?;
        for (k, img) in pixels.chunks_exact(per_image).enumerate() {
            let (gx, gy) = ((k % cols) * (width + 1) + 1, (k / cols) * (height + 1) + 1);
            for i in 0..height {
                for j in 0..width {
                    let at = |c: usize| level(img[(c * height + i) * width + j]);
                    let color = if channels == 3 {
                        RGBColor(at(0), at(1), at(2))
                    } else {
                        RGBColor(at(0), at(0), at(0))
                    };
                    let (x, y) = (((gx + j) * scale) as i32, ((gy + i) * scale) as i32);
                    let s = scale as i32;
                    root.draw(&Rectangle::new([(x, y), (x + s, y + s)], color.filled()))
                        .map_err(|e| e.to_string())?;
                }
            }
        }
        Ok(())
    })
}

/// The points as a scatter plot.
pub fn scatter(path: &Path, points: &[f32]) -> Result<(), Failure> {
    let bounds = Bounds::around(points);
    draw(path, |root| {
        dots(root, points, bounds, RGBColor(30, 60, 160).mix(0.6))
    })
}

/// The density of a 2-D `flow` (given `context`, one row, for a conditional flow) over
/// `bounds` as a heat map, with `points` over it.
pub fn density(
    path: &Path,
    flow: &Flow,
    context: Option<&Tensor>,
    device: &Device,
    bounds: Bounds,
    points: Option<&[f32]>,
) -> Result<(), Failure> {
    let mut grid = Vec::with_capacity(CELLS * CELLS * 2);
    for i in 0..CELLS {
        for j in 0..CELLS {
            let x = bounds.x.0 + (j as f64 + 0.5) / CELLS as f64 * (bounds.x.1 - bounds.x.0);
            let y = bounds.y.1 - (i as f64 + 0.5) / CELLS as f64 * (bounds.y.1 - bounds.y.0);
            grid.extend([x as f32, y as f32]);
        }
    }
    let x = Tensor::from_vec(grid, (CELLS * CELLS, 2), &Device::Cpu)?;
    let x = x.to_device(device)?;
    let lp = flow
        .log_prob_with_context(&x, context)?
        .to_dtype(candle::DType::F32)?
        .to_vec1::<f32>()?;
    let max = lp
        .iter()
        .cloned()
        .filter(|v| v.is_finite())
        .fold(f32::MIN, f32::max);
    let cell = SIZE as i32 / CELLS as i32;
    draw(path, |root| {
        for (k, v) in lp.iter().enumerate() {
            let (i, j) = ((k / CELLS) as i32, (k % CELLS) as i32);
            let t = if v.is_finite() {
                ((v - max) as f64).exp()
            } else {
                0.0
            };
            let rect = Rectangle::new(
                [(j * cell, i * cell), ((j + 1) * cell, (i + 1) * cell)],
                ramp(t.sqrt()).filled(),
            );
            root.draw(&rect).map_err(|e| e.to_string())?;
        }
        match points {
            Some(p) => dots(root, p, bounds, RGBColor(255, 255, 255).mix(0.35)),
            None => Ok(()),
        }
    })
}
