//! PNG pictures: a 2-D model's density as a heat map with a colour bar, and points as
//! a scatter, both with a title and labelled axes; and grids of images.

use std::{path::Path, sync::OnceLock};

use candle::{Device, Tensor};
use flow_models::ModelDensity;
use plotters::{
    coord::{types::RangedCoordf64, Shift},
    prelude::*,
};

use crate::Failure;

/// The font every label is drawn in: DejaVu Sans (see `assets/DejaVuSans-LICENSE.txt`),
/// built in so that no system font library is needed.
const FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");
const FONT_FAMILY: &str = "sans-serif";

/// Pixel size of a scatter plot; a density adds its colour bar to the right.
const SIZE: (u32, u32) = (760, 720);
const COLOUR_BAR_WIDTH: u32 = 130;
/// Heat-map cells along each axis.
const CELLS: usize = 240;
/// The colour scale of a density spans this many nats below its highest log p(x);
/// lower values take the darkest colour.
const LOG_SPAN: f64 = 10.0;
/// The share of points a default range leaves out on each side of each axis, so that
/// a few outliers do not shrink the picture.
const TAIL: f64 = 0.005;
/// The margin a default range adds on each side, as a share of its span.
const MARGIN: f64 = 0.1;

const TITLE_SIZE: u32 = 22;
const LABEL_SIZE: u32 = 16;
/// Pixels around a plot, and the heights of the areas below and left of it that hold
/// the tick labels and axis names.
const PAD: u32 = 12;
const X_LABEL_AREA: u32 = 48;
const Y_LABEL_AREA: u32 = 64;

/// A rectangle of the plane: `[x.0, x.1] × [y.0, y.1]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bounds {
    pub x: (f64, f64),
    pub y: (f64, f64),
}

impl Bounds {
    /// `xmin,xmax,ymin,ymax`: four numbers finite as f32 (the points' type), each min
    /// below its max.
    pub fn parse(text: &str) -> Result<Self, String> {
        let values: Vec<(&str, f64)> = text
            .split(',')
            .map(|v| {
                let v = v.trim();
                v.parse::<f32>()
                    .ok()
                    .filter(|v| v.is_finite())
                    .map(|x| (v, f64::from(x)))
                    .ok_or_else(|| format!("`{v}` is not a finite number"))
            })
            .collect::<Result<_, _>>()?;
        let [x0, x1, y0, y1] = values[..] else {
            return Err(format!(
                "expected xmin,xmax,ymin,ymax (four numbers), got {} values",
                values.len()
            ));
        };
        for (axis, lo, hi) in [("x", x0, x1), ("y", y0, y1)] {
            if lo.1 >= hi.1 {
                return Err(format!(
                    "{axis}min {} must be below {axis}max {}",
                    lo.0, hi.0
                ));
            }
        }
        Ok(Self {
            x: (x0.1, x1.1),
            y: (y0.1, y1.1),
        })
    }

    /// The middle of `points` (rows of 2): on each axis the finite values from the
    /// [`TAIL`] quantile to the `1 − TAIL` quantile, widened by [`MARGIN`] on each
    /// side. Rows with a non-finite value are left out.
    pub fn robust(points: &[f32]) -> Self {
        let finite = || {
            points
                .chunks_exact(2)
                .filter(|p| p.iter().all(|v| v.is_finite()))
        };
        let axis = |k: usize| {
            let mut v: Vec<f64> = finite().map(|p| f64::from(p[k])).collect();
            v.sort_by(f64::total_cmp);
            let (lo, hi) = (quantile(&v, TAIL), quantile(&v, 1.0 - TAIL));
            let margin = if hi > lo {
                (hi - lo) * MARGIN
            } else {
                // One value (or none): a unit-sized window around it.
                (lo.abs() * MARGIN).max(0.5)
            };
            (lo - margin, hi + margin)
        };
        Self {
            x: axis(0),
            y: axis(1),
        }
    }

    fn contains(&self, x: f64, y: f64) -> bool {
        (self.x.0..=self.x.1).contains(&x) && (self.y.0..=self.y.1).contains(&y)
    }
}

/// The `q` quantile of sorted `values`, interpolated between neighbours (0 when empty).
fn quantile(sorted: &[f64], q: f64) -> f64 {
    let Some(last) = sorted.len().checked_sub(1) else {
        return 0.0;
    };
    let at = q.clamp(0.0, 1.0) * last as f64;
    let (i, f) = (at.floor() as usize, at.fract());
    let next = sorted[(i + 1).min(last)];
    sorted[i] + f * (next - sorted[i])
}

/// What a plot of the plane shows around its points: a title, the axes' names, and a
/// fixed range (without one, the range is [`Bounds::robust`] of the points).
#[derive(Debug, Clone, PartialEq)]
pub struct PlotOptions {
    pub title: String,
    pub axes: [String; 2],
    pub range: Option<Bounds>,
}

impl PlotOptions {
    /// A plot titled `title`, its axes named `x0` and `x1`, its range from its points.
    pub fn new(title: impl Into<String>) -> Self {
        Self {
            title: title.into(),
            axes: ["x0".to_string(), "x1".to_string()],
            range: None,
        }
    }

    /// Names the axes after the first two of `names` (the data's columns); an axis
    /// without a name keeps its default.
    pub fn with_axes(mut self, names: &[String]) -> Self {
        for (axis, name) in self.axes.iter_mut().zip(names) {
            axis.clone_from(name);
        }
        self
    }

    pub fn with_range(mut self, range: Option<Bounds>) -> Self {
        self.range = range;
        self
    }

    /// The fixed range, or the robust range of `points`.
    pub fn bounds(&self, points: &[f32]) -> Bounds {
        self.range.unwrap_or_else(|| Bounds::robust(points))
    }
}

/// A plot's title: the model's file name, then what it is conditioned on, if anything.
pub fn title(model: &Path, condition: Option<&str>) -> String {
    let name = model.file_name().map_or_else(
        || model.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    match condition {
        Some(c) => format!("{name} — {c}"),
        None => name,
    }
}

/// The built-in font, registered once for every plot of the process.
fn font() -> Result<(), Failure> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        plotters::style::register_font(FONT_FAMILY, FontStyle::Normal, FONT).is_ok()
    });
    if ok {
        Ok(())
    } else {
        Err("the built-in plot font does not load".into())
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

type Area<'a> = DrawingArea<BitMapBackend<'a>, Shift>;

/// Draws a `size` picture with `paint` into a temporary file beside `path`, then
/// renames it: never a partial PNG.
fn draw_sized(
    path: &Path,
    size: (u32, u32),
    paint: impl FnOnce(&Area) -> Result<(), String>,
) -> Result<(), Failure> {
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

/// A tick label on an axis spanning `span`: enough decimals for ticks a tenth of the
/// span apart, trailing zeros dropped, and no `-0` for a tick that is zero up to
/// rounding.
fn tick_label(value: f64, span: f64) -> String {
    let decimals = (3.0 - span.abs().log10().floor()).clamp(0.0, 9.0) as usize;
    let text = format!("{value:.decimals$}");
    let text = if text.contains('.') {
        text.trim_end_matches('0').trim_end_matches('.')
    } else {
        &text
    };
    match text {
        "-0" => "0".to_string(),
        t => t.to_string(),
    }
}

type Chart<'a, 'b> =
    ChartContext<'a, BitMapBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// The titled frame of a plot over `bounds`, its axes ticked and named.
fn frame<'a, 'b>(
    area: &'a Area<'b>,
    options: &PlotOptions,
    bounds: Bounds,
) -> Result<Chart<'a, 'b>, String> {
    let mut chart = ChartBuilder::on(area)
        .caption(&options.title, (FONT_FAMILY, TITLE_SIZE))
        .margin(PAD)
        .x_label_area_size(X_LABEL_AREA)
        .y_label_area_size(Y_LABEL_AREA)
        .build_cartesian_2d(bounds.x.0..bounds.x.1, bounds.y.0..bounds.y.1)
        .map_err(|e| e.to_string())?;
    let (x_span, y_span) = (bounds.x.1 - bounds.x.0, bounds.y.1 - bounds.y.0);
    chart
        .configure_mesh()
        .disable_mesh()
        .x_label_formatter(&|v| tick_label(*v, x_span))
        .y_label_formatter(&|v| tick_label(*v, y_span))
        .x_desc(&options.axes[0])
        .y_desc(&options.axes[1])
        .label_style((FONT_FAMILY, LABEL_SIZE))
        .axis_desc_style((FONT_FAMILY, LABEL_SIZE))
        .draw()
        .map_err(|e| e.to_string())?;
    Ok(chart)
}

/// The rows of `points` inside `bounds` as small dots.
fn dots(
    chart: &mut Chart,
    points: &[f32],
    bounds: Bounds,
    radius: i32,
    color: RGBAColor,
) -> Result<(), String> {
    let inside = points
        .chunks_exact(2)
        .map(|p| (f64::from(p[0]), f64::from(p[1])))
        .filter(|&(x, y)| bounds.contains(x, y));
    chart
        .draw_series(inside.map(|p| Circle::new(p, radius, color.filled())))
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// `points` (rows of 2) as a scatter plot over the options' range (points outside it
/// are not drawn), titled and with named axes.
pub fn scatter(path: &Path, points: &[f32], options: &PlotOptions) -> Result<(), Failure> {
    font()?;
    let bounds = options.bounds(points);
    draw_sized(path, SIZE, |root| {
        paint_scatter(root, points, options, bounds)
    })
}

fn paint_scatter(
    root: &Area,
    points: &[f32],
    options: &PlotOptions,
    bounds: Bounds,
) -> Result<(), String> {
    let mut chart = frame(root, options, bounds)?;
    dots(
        &mut chart,
        points,
        bounds,
        2,
        RGBColor(30, 60, 160).mix(0.45),
    )
}

/// The density of a 2-D model (given `context`, one row, for a conditional flow) as a
/// heat map of log p(x) with a colour bar, and `points` over it, if given. The range
/// is the options' or the robust range of `frame_points` (the data, or the model's
/// samples).
pub fn density(
    path: &Path,
    model: &mut ModelDensity,
    context: Option<&Tensor>,
    device: &Device,
    frame_points: &[f32],
    points: Option<&[f32]>,
    options: &PlotOptions,
) -> Result<(), Failure> {
    font()?;
    let bounds = options.bounds(frame_points);
    let (dx, dy) = (
        (bounds.x.1 - bounds.x.0) / CELLS as f64,
        (bounds.y.1 - bounds.y.0) / CELLS as f64,
    );
    let centre = |k: usize| {
        let (i, j) = (k / CELLS, k % CELLS);
        (
            bounds.x.0 + (j as f64 + 0.5) * dx,
            bounds.y.0 + (i as f64 + 0.5) * dy,
        )
    };
    let grid: Vec<f32> = (0..CELLS * CELLS)
        .flat_map(|k| {
            let (x, y) = centre(k);
            [x as f32, y as f32]
        })
        .collect();
    let x = Tensor::from_vec(grid, (CELLS * CELLS, 2), &Device::Cpu)?.to_device(device)?;
    let lp = model
        .log_prob(&x, context)?
        .to_dtype(candle::DType::F64)?
        .to_device(&Device::Cpu)?
        .to_vec1::<f64>()?;
    let top = lp
        .iter()
        .copied()
        .filter(|v| v.is_finite())
        .fold(f64::NEG_INFINITY, f64::max);
    let top = if top.is_finite() { top } else { 0.0 };
    let scale = (top - LOG_SPAN, top);
    let colour = |v: f64| {
        let t = if v.is_finite() {
            (v - scale.0) / LOG_SPAN
        } else {
            0.0
        };
        ramp(t)
    };
    draw_sized(path, (SIZE.0 + COLOUR_BAR_WIDTH, SIZE.1), |root| {
        let (plot, bar) = root.split_horizontally(SIZE.0);
        let mut chart = frame(&plot, options, bounds)?;
        let cells = lp.iter().enumerate().map(|(k, &v)| {
            let (x, y) = centre(k);
            let corners = [(x - dx / 2.0, y - dy / 2.0), (x + dx / 2.0, y + dy / 2.0)];
            Rectangle::new(corners, colour(v).filled())
        });
        chart.draw_series(cells).map_err(|e| e.to_string())?;
        if let Some(p) = points {
            dots(&mut chart, p, bounds, 1, WHITE.mix(0.35))?;
        }
        colour_bar(&bar, scale)
    })
}

/// The key to a density's colours: log p(x) from `scale.0` (and below) to `scale.1`.
fn colour_bar(area: &Area, scale: (f64, f64)) -> Result<(), String> {
    const STEPS: usize = 200;
    // Top and bottom as the plot beside it, so that the two line up.
    let area = area.margin(PAD + TITLE_SIZE + 5, PAD + X_LABEL_AREA, 8, 8);
    let mut bar = ChartBuilder::on(&area)
        .y_label_area_size(0)
        .right_y_label_area_size(70)
        .build_cartesian_2d(0.0..1.0, scale.0..scale.1)
        .map_err(|e| e.to_string())?;
    bar.configure_mesh()
        .disable_mesh()
        .disable_x_axis()
        .y_label_formatter(&|v| tick_label(*v, scale.1 - scale.0))
        .y_desc("log p(x), nats")
        .label_style((FONT_FAMILY, LABEL_SIZE))
        .axis_desc_style((FONT_FAMILY, LABEL_SIZE))
        .draw()
        .map_err(|e| e.to_string())?;
    let step = (scale.1 - scale.0) / STEPS as f64;
    let bands = (0..STEPS).map(|k| {
        let lo = scale.0 + k as f64 * step;
        let t = (k as f64 + 0.5) / STEPS as f64;
        Rectangle::new([(0.0, lo), (1.0, lo + step)], ramp(t).filled())
    });
    bar.draw_series(bands).map_err(|e| e.to_string())?;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Seeded points: a bulk in [−1, 1]², and a few far outliers.
    fn bulk_with_outliers() -> Vec<f32> {
        use rand::{rngs::StdRng, Rng, SeedableRng};
        let mut rng = StdRng::seed_from_u64(7);
        let mut points: Vec<f32> = (0..2000 * 2)
            .map(|_| rng.random_range(-1.0f32..1.0))
            .collect();
        points.extend([
            1e6,
            -3e5,
            -4e4,
            9e4,
            2e3,
            2e3,
            f32::NAN,
            0.0,
            0.0,
            f32::INFINITY,
        ]);
        points
    }

    #[test]
    fn the_robust_range_keeps_the_bulk_and_drops_the_outliers() {
        let b = Bounds::robust(&bulk_with_outliers());
        for (lo, hi) in [b.x, b.y] {
            // The 0.5% and 99.5% quantiles of U(−1, 1) are ∓0.99; the margin adds about
            // 0.2 on each side.
            assert!((-1.3..=-1.1).contains(&lo), "{b:?}");
            assert!((1.1..=1.3).contains(&hi), "{b:?}");
        }
        // The plain extent would span a million.
        assert!(b.x.1 - b.x.0 < 3.0, "{b:?}");
    }

    #[test]
    fn the_robust_range_of_one_point_or_none_is_a_window() {
        let b = Bounds::robust(&[3.0, -2.0, 3.0, -2.0]);
        assert_eq!(b.x, (2.5, 3.5));
        assert_eq!(b.y, (-2.5, -1.5));
        let empty = Bounds::robust(&[f32::NAN, 1.0]);
        assert_eq!(empty.x, (-0.5, 0.5));
    }

    #[test]
    fn quantiles_interpolate_between_neighbours() {
        let v = [0.0, 1.0, 2.0, 3.0, 4.0];
        assert_eq!(quantile(&v, 0.0), 0.0);
        assert_eq!(quantile(&v, 0.5), 2.0);
        assert_eq!(quantile(&v, 0.125), 0.5);
        assert_eq!(quantile(&v, 1.0), 4.0);
    }

    #[test]
    fn a_range_is_four_finite_numbers_each_min_below_its_max() {
        let b = Bounds::parse("-3, 3,-1.5,2e0").expect("a range");
        assert_eq!(b.x, (-3.0, 3.0));
        assert_eq!(b.y, (-1.5, 2.0));
        let err = |t: &str| Bounds::parse(t).expect_err(t);
        assert_eq!(
            err("1,2,3"),
            "expected xmin,xmax,ymin,ymax (four numbers), got 3 values"
        );
        assert_eq!(err("0,1,0,inf"), "`inf` is not a finite number");
        assert_eq!(err("0,1,a,2"), "`a` is not a finite number");
        assert_eq!(err("2,1,0,1"), "xmin 2 must be below xmax 1");
        assert_eq!(err("0,1,1,1"), "ymin 1 must be below ymax 1");
        // As f32, as the points are: beyond its range, or a span it cannot resolve.
        assert_eq!(err("-1e308,1e308,0,1"), "`-1e308` is not a finite number");
        assert_eq!(
            err("1e15,1.00000001e15,0,1"),
            "xmin 1e15 must be below xmax 1.00000001e15"
        );
    }

    #[test]
    fn options_take_the_column_names_and_a_fixed_range_over_the_points() {
        let names = ["theta0".to_string(), "theta1".to_string()];
        let fixed = Bounds::parse("0,1,0,1").expect("a range");
        let o = PlotOptions::new("t")
            .with_axes(&names)
            .with_range(Some(fixed));
        assert_eq!(o.axes, names);
        assert_eq!(o.bounds(&bulk_with_outliers()), fixed);
        let unnamed = PlotOptions::new("t").with_axes(&[]);
        assert_eq!(unnamed.axes, ["x0", "x1"]);
    }

    #[test]
    fn tick_labels_have_the_decimals_their_span_needs() {
        assert_eq!(tick_label(-1e-17, 2.0), "0");
        assert_eq!(tick_label(0.4, 2.0), "0.4");
        assert_eq!(tick_label(-1.5, 4.0), "-1.5");
        assert_eq!(tick_label(2000.0, 1e4), "2000");
        assert_eq!(tick_label(0.0025, 0.01), "0.0025");
        assert_eq!(tick_label(-3.0, 10.0), "-3");
    }

    #[test]
    fn a_title_names_the_model_file_and_the_condition() {
        let m = Path::new("runs/model.safetensors");
        assert_eq!(title(m, Some("context 1")), "model.safetensors — context 1");
        assert_eq!(title(m, None), "model.safetensors");
    }

    /// A scatter file is a PNG of the plot's size.
    #[test]
    fn a_scatter_is_a_png_of_the_plot_size() {
        let dir = std::env::temp_dir().join(format!("flows-plot-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("s.png");
        scatter(&path, &bulk_with_outliers(), &PlotOptions::new("t")).expect("scatter");
        let bytes = std::fs::read(&path).expect("png");
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        assert_eq!(&bytes[12..16], b"IHDR");
        let be = |at: usize| u32::from_be_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
        assert_eq!((be(16), be(20)), SIZE);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// An RGB picture of a scatter of no points: only the frame and its text.
    fn frame_pixels(options: &PlotOptions) -> Vec<u8> {
        font().expect("the font");
        let mut buffer = vec![0u8; (SIZE.0 * SIZE.1 * 3) as usize];
        {
            let root = BitMapBackend::with_buffer(&mut buffer, SIZE).into_drawing_area();
            root.fill(&WHITE).expect("fill");
            let bounds = Bounds::parse("-2,2,-1,1").expect("a range");
            paint_scatter(&root, &[], options, bounds).expect("paint");
            root.present().expect("present");
        }
        buffer
    }

    /// Dark pixels in rows `rows` and columns `cols` of an RGB picture `SIZE.0` wide.
    fn ink(pixels: &[u8], rows: std::ops::Range<u32>, cols: std::ops::Range<u32>) -> usize {
        let width = SIZE.0 as usize;
        rows.flat_map(|r| {
            cols.clone()
                .map(move |c| (r as usize * width + c as usize) * 3)
        })
        .filter(|&at| pixels[at..at + 3].iter().all(|&c| c < 128))
        .count()
    }

    /// The built-in font draws: a title puts ink above the plot, and the tick labels
    /// and axis name put ink below its x axis.
    #[test]
    fn the_title_and_the_tick_labels_are_drawn() {
        let titled = frame_pixels(&PlotOptions::new("model.safetensors — context 1"));
        let untitled = frame_pixels(&PlotOptions::new(""));
        // The middle of the top rows: where a title goes, away from the y axis.
        let (top, middle) = (0..PAD + TITLE_SIZE, SIZE.0 / 4..SIZE.0 * 3 / 4);
        assert!(
            ink(&titled, top.clone(), middle.clone()) > 100,
            "no title drawn"
        );
        assert_eq!(ink(&untitled, top, middle), 0);
        // Below the x axis line: its tick marks, tick labels and name.
        let below_axis = SIZE.1 - PAD - X_LABEL_AREA + 8..SIZE.1 - PAD;
        assert!(
            ink(&titled, below_axis, 0..SIZE.0) > 200,
            "no tick labels drawn"
        );
    }
}
