//! Charts of experiment results, written as both PNG and SVG with [`plotters`].
//!
//! Each chart is 800 × 500 pixels on a white background and goes to two files, `<stem>.png` and
//! `<stem>.svg`; the parent directory must exist. Text is set in DejaVu Sans, which is embedded in
//! the binary (`simulations/assets/DejaVuSans.ttf`, licence in `DejaVuSans-LICENSE.txt`), so the
//! PNGs look the same on every machine whatever fonts it has installed.
//!
//! - [`cdf`]: the empirical CDF of a set of samples, with optional vertical [`Marker`]s.
//! - [`lines`]: one or more [`Series`] of (x, y) points, optionally with a logarithmic x axis.

use std::ffi::OsString;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::coord::ranged1d::{AsRangedCoord, ValueFormatter};
use plotters::element::DashedPathElement;
use plotters::prelude::*;

/// Width and height of every chart, in pixels.
const SIZE: (u32, u32) = (800, 500);

/// The font family every text style here uses; the embedded font is registered under it.
const FAMILY: &str = "sans-serif";

/// DejaVu Sans (see `simulations/assets/DejaVuSans-LICENSE.txt`).
const FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

/// Line colours, in order of use (the Tableau 10 palette: distinct, and readable on white).
const COLOURS: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// One line on a chart.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// The name shown in the legend.
    pub name: String,
    /// The (x, y) points; they are joined in order of x. Points with a non-finite coordinate are
    /// skipped, and so are points with x ≤ 0 on a logarithmic x axis.
    pub points: Vec<(f64, f64)>,
}

/// A vertical marker line with a label, e.g. a lower bound.
#[derive(Debug, Clone, PartialEq)]
pub struct Marker {
    /// Where the line is drawn on the x axis; a non-finite `x` is skipped.
    pub x: f64,
    /// The text shown in the legend.
    pub label: String,
}

/// Why a chart could not be written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PlotError {
    /// There was no finite data point to plot.
    #[error("nothing to plot: no finite data points")]
    NoData,
    /// The embedded font could not be loaded (the font file is corrupt).
    #[error("the embedded font (DejaVu Sans) could not be loaded")]
    Font,
    /// Plotters failed to draw or write a chart; the message names the file.
    #[error("could not draw the chart: {0}")]
    Draw(String),
}

/// A chart with nothing to plot (every fetch failed, say) is left out with a note instead of
/// failing the run: the summary and the CSVs, written before the charts, say what happened, and
/// the run's last lines still print.
pub fn skip_if_empty(drawn: Result<(), PlotError>) -> Result<(), PlotError> {
    match drawn {
        Err(PlotError::NoData) => {
            eprintln!("netsim: a chart was left out: nothing to plot");
            Ok(())
        }
        other => other,
    }
}

/// Writes `<stem>.png` and `<stem>.svg`: the empirical CDF of `samples` (x = value, y = fraction ≤ x, a step line),
/// with optional vertical markers.
///
/// Non-finite samples and markers are skipped. A legend is drawn when there is any marker.
///
/// # Errors
///
/// [`PlotError::NoData`] when no sample is finite, [`PlotError::Draw`] when drawing or writing a
/// file fails, [`PlotError::Font`] if the embedded font does not load.
pub fn cdf(stem: &Path, title: &str, x_label: &str, samples: &[f64], markers: &[Marker]) -> Result<(), PlotError> {
    let mut values: Vec<f64> = samples.iter().copied().filter(|v| v.is_finite()).collect();
    if values.is_empty() {
        return Err(PlotError::NoData);
    }
    values.sort_by(f64::total_cmp);
    let markers: Vec<&Marker> = markers.iter().filter(|m| m.x.is_finite()).collect();

    let (lo, hi) = bounds(values.iter().copied().chain(markers.iter().map(|m| m.x))).ok_or(PlotError::NoData)?;
    let x = linear_range(lo, hi);
    let points = step_points(&values, &x);
    let chart = Chart {
        title,
        x_label,
        y_label: "fraction of samples ≤ x",
        lines: vec![Line { name: "CDF", points, colour: COLOURS[0], point_size: 0 }],
        markers,
        x,
        y: 0.0..1.02,
        log_x: false,
    };
    chart.write(stem)
}

/// Writes `<stem>.png` and `<stem>.svg`: one or more line series (with point markers), optional log-scale x axis.
///
/// Each series gets its own colour (in the order given) and a legend is drawn when there is more
/// than one series. Points are joined in order of x; points with a non-finite coordinate, or with
/// x ≤ 0 when `log_x` is set, are skipped, and series left with no point are left out.
///
/// # Errors
///
/// [`PlotError::NoData`] when no series has a point left to plot, [`PlotError::Draw`] when
/// drawing or writing a file fails, [`PlotError::Font`] if the embedded font does not load.
pub fn lines(
    stem: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    log_x: bool,
) -> Result<(), PlotError> {
    let lines: Vec<Line<'_>> = series
        .iter()
        .enumerate()
        .filter_map(|(i, s)| {
            let mut points: Vec<(f64, f64)> = s
                .points
                .iter()
                .copied()
                .filter(|&(x, y)| x.is_finite() && y.is_finite() && (!log_x || x > 0.0))
                .collect();
            points.sort_by(|a, b| a.0.total_cmp(&b.0));
            let colour = COLOURS[i % COLOURS.len()];
            (!points.is_empty()).then_some(Line { name: &s.name, points, colour, point_size: 3 })
        })
        .collect();
    let all = || lines.iter().flat_map(|l| l.points.iter());
    let (x_lo, x_hi) = bounds(all().map(|p| p.0)).ok_or(PlotError::NoData)?;
    let (y_lo, y_hi) = bounds(all().map(|p| p.1)).ok_or(PlotError::NoData)?;
    let x = if log_x { log_range(x_lo, x_hi) } else { linear_range(x_lo, x_hi) };
    let chart = Chart { title, x_label, y_label, lines, markers: Vec::new(), x, y: linear_range(y_lo, y_hi), log_x };
    chart.write(stem)
}

/// One line, ready to draw.
struct Line<'a> {
    name: &'a str,
    /// Only finite points, inside the chart's ranges.
    points: Vec<(f64, f64)>,
    colour: RGBColor,
    /// Radius of the dot drawn at each point; 0 for none.
    point_size: u32,
}

/// Everything needed to draw one chart on any backend.
struct Chart<'a> {
    title: &'a str,
    x_label: &'a str,
    y_label: &'a str,
    lines: Vec<Line<'a>>,
    /// Only markers with a finite x inside the x range.
    markers: Vec<&'a Marker>,
    x: Range<f64>,
    y: Range<f64>,
    log_x: bool,
}

impl Chart<'_> {
    /// Draws the chart into `<stem>.png` and `<stem>.svg`.
    fn write(&self, stem: &Path) -> Result<(), PlotError> {
        register_font()?;

        let png = with_extension(stem, "png");
        {
            let root = BitMapBackend::new(&png, SIZE).into_drawing_area();
            self.draw(&root).and_then(|()| root.present()).map_err(|e| draw_error(&png, e))?;
        }

        let svg = with_extension(stem, "svg");
        let root = SVGBackend::new(&svg, SIZE).into_drawing_area();
        self.draw(&root).and_then(|()| root.present()).map_err(|e| draw_error(&svg, e))
    }

    /// Draws the whole chart on `root`.
    fn draw<DB: DrawingBackend>(
        &self,
        root: &DrawingArea<DB, Shift>,
    ) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
        root.fill(&WHITE)?;
        if self.log_x { self.draw_with(root, self.x.clone().log_scale()) } else { self.draw_with(root, self.x.clone()) }
    }

    /// Draws the chart on `root` with the x axis `x_spec` (linear or logarithmic).
    fn draw_with<DB, X>(
        &self,
        root: &DrawingArea<DB, Shift>,
        x_spec: X,
    ) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>>
    where
        DB: DrawingBackend,
        X: AsRangedCoord<Value = f64>,
        X::CoordDescType: ValueFormatter<f64>,
    {
        let mut chart = ChartBuilder::on(root)
            .caption(self.title, (FAMILY, 24))
            .margin(16)
            .x_label_area_size(50)
            .y_label_area_size(70)
            .build_cartesian_2d(x_spec, self.y.clone())?;

        let mut mesh = chart.configure_mesh();
        mesh.x_desc(self.x_label)
            .y_desc(self.y_label)
            .axis_desc_style((FAMILY, 16))
            .label_style((FAMILY, 13))
            .light_line_style(BLACK.mix(0.04));
        // Plain numbers ("40", "0.5", "1e6") rather than plotters' "40.0" (or the log axis' "1000.0").
        mesh.x_label_formatter(&tick_label).y_label_formatter(&tick_label);
        mesh.draw()?;

        let legend = self.lines.len() > 1 || !self.markers.is_empty();
        for line in &self.lines {
            let colour = line.colour;
            let series = LineSeries::new(line.points.iter().copied(), colour.filled().stroke_width(2))
                .point_size(line.point_size);
            let anno = chart.draw_series(series)?;
            if legend {
                anno.label(line.name)
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2)));
            }
        }

        let first_marker_colour = self.lines.len();
        for (i, marker) in self.markers.iter().enumerate() {
            let colour = COLOURS[(first_marker_colour + i) % COLOURS.len()];
            let style = colour.stroke_width(2);
            let top_to_bottom = [(marker.x, self.y.start), (marker.x, self.y.end)];
            chart
                .draw_series(DashedLineSeries::new(top_to_bottom, 8, 5, style))?
                .label(marker.label.as_str())
                .legend(move |(x, y)| DashedPathElement::new([(x, y), (x + 20, y)], 6, 3, style));
        }

        if legend {
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperLeft)
                .label_font((FAMILY, 14))
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK.mix(0.4))
                .draw()?;
        }
        Ok(())
    }
}

/// Registers the embedded font as [`FAMILY`], once per process.
fn register_font() -> Result<(), PlotError> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| plotters::style::register_font(FAMILY, FontStyle::Normal, FONT).is_ok());
    if ok { Ok(()) } else { Err(PlotError::Font) }
}

/// `<stem>.<extension>`, keeping any dots already in the stem's file name.
fn with_extension(stem: &Path, extension: &str) -> PathBuf {
    let mut path = OsString::from(stem.as_os_str());
    path.push(".");
    path.push(extension);
    PathBuf::from(path)
}

/// Wraps a plotters error, naming the file it happened on.
fn draw_error<E: std::error::Error + Send + Sync>(path: &Path, error: DrawingAreaErrorKind<E>) -> PlotError {
    PlotError::Draw(format!("{}: {error}", path.display()))
}

/// The smallest and largest of `values`, or `None` if there are none.
fn bounds(values: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    values.fold(None, |acc, v| match acc {
        None => Some((v, v)),
        Some((lo, hi)) => Some((lo.min(v), hi.max(v))),
    })
}

/// A linear axis range around `lo..=hi` with some room on both sides, never empty. It does not
/// reach below zero when the data does not.
fn linear_range(lo: f64, hi: f64) -> Range<f64> {
    let span = hi - lo;
    let pad = if span > lo.abs().max(hi.abs()) * 1e-9 {
        span * 0.05
    } else if lo == 0.0 {
        // All values are equal (or a single point): give it some room.
        1.0
    } else {
        lo.abs() * 0.1
    };
    let start = if lo >= 0.0 { (lo - pad).max(0.0) } else { lo - pad };
    start..hi + pad
}

/// A logarithmic axis range around `lo..=hi` (both > 0) with some room on both sides. It always
/// contains a power of ten, since plotters puts the log axis' ticks there.
fn log_range(lo: f64, hi: f64) -> Range<f64> {
    let mut start = lo / 1.25;
    let end = hi * 1.25;
    if 10f64.powf(start.log10().ceil()) > end {
        // Reach down to the power of ten below, a hair under it so that rounding cannot skip it.
        start = 10f64.powf(start.log10().floor()) * 0.999;
    }
    start..end
}

/// The step line of the empirical CDF of `sorted` (finite, ascending), across the whole `x` range.
fn step_points(sorted: &[f64], x: &Range<f64>) -> Vec<(f64, f64)> {
    let n = sorted.len() as f64;
    let mut points = Vec::with_capacity(2 * sorted.len() + 2);
    points.push((x.start, 0.0));
    let mut below = 0.0;
    let mut i = 0;
    while i < sorted.len() {
        let v = sorted[i];
        while i < sorted.len() && sorted[i] == v {
            i += 1;
        }
        let fraction = i as f64 / n;
        points.push((v, below));
        points.push((v, fraction));
        below = fraction;
    }
    points.push((x.end, 1.0));
    points
}

/// A tick label: "40", "0.25", "2.5e6".
fn tick_label(value: &f64) -> String {
    let magnitude = value.abs();
    if magnitude == 0.0 {
        return "0".to_string();
    }
    if !(1e-3..1e5).contains(&magnitude) {
        let scientific = format!("{value:.3e}");
        let (mantissa, exponent) = scientific.split_once('e').unwrap_or((&scientific, "0"));
        return format!("{}e{exponent}", trim_fraction(mantissa));
    }
    trim_fraction(&format!("{value:.6}")).to_string()
}

/// `number` without trailing zeros after the decimal point, nor a bare trailing point.
fn trim_fraction(number: &str) -> &str {
    if number.contains('.') { number.trim_end_matches('0').trim_end_matches('.') } else { number }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PNG_SIGNATURE: &[u8] = b"\x89PNG\r\n\x1a\n";

    /// Checks `<stem>.png` and `<stem>.svg` exist and look like a chart titled `title`.
    fn check_files(stem: &Path, title: &str) {
        let png = std::fs::read(with_extension(stem, "png")).expect("the PNG is written");
        assert!(png.starts_with(PNG_SIGNATURE), "not a PNG");
        assert!(png.len() > 5_000, "PNG only {} bytes", png.len());
        let svg = std::fs::read_to_string(with_extension(stem, "svg")).expect("the SVG is written");
        assert!(svg.contains("<svg"), "not an SVG");
        assert!(svg.contains(title), "the SVG lacks the title");
    }

    #[test]
    fn cdf_with_marker() {
        let dir = tempfile::tempdir().expect("tempdir");
        let stem = dir.path().join("fetch.latency");
        let samples: Vec<f64> = (0..200)
            .map(|i| 40.0 + f64::from(i % 37) * 3.5 + f64::from(i) * 0.4)
            .chain([f64::NAN, f64::INFINITY])
            .collect();
        let markers = [Marker { x: 35.0, label: "lower bound (RTT + transfer)".to_string() }];
        cdf(&stem, "Fetch latency CDF", "latency (ms)", &samples, &markers).expect("cdf");
        check_files(&stem, "Fetch latency CDF");
        let svg = std::fs::read_to_string(with_extension(&stem, "svg")).expect("the SVG is written");
        assert!(svg.contains("lower bound (RTT + transfer)"), "the SVG lacks the marker's legend entry");
    }

    #[test]
    fn two_series_log_x() {
        let dir = tempfile::tempdir().expect("tempdir");
        let stem = dir.path().join("lookup");
        let sizes = [10.0, 30.0, 100.0, 300.0, 1000.0];
        let series = [
            Series {
                name: "median hops".to_string(),
                points: sizes.iter().map(|&n: &f64| (n, n.log2() / 2.0)).collect(),
            },
            Series {
                name: "p99 hops".to_string(),
                points: sizes.iter().map(|&n: &f64| (n, n.log2())).chain([(0.0, 1.0), (f64::NAN, 2.0)]).collect(),
            },
        ];
        lines(&stem, "Lookup hops vs network size", "nodes", "hops", &series, true).expect("lines");
        check_files(&stem, "Lookup hops vs network size");
    }

    #[test]
    fn single_point_and_equal_values() {
        let dir = tempfile::tempdir().expect("tempdir");
        cdf(&dir.path().join("one"), "One sample", "ms", &[7.0], &[]).expect("one sample");
        cdf(&dir.path().join("zeros"), "All zero", "ms", &[0.0, 0.0, 0.0], &[]).expect("all zero");
        let one = [Series { name: "only".to_string(), points: vec![(100.0, 3.0)] }];
        lines(&dir.path().join("point-lin"), "One point", "x", "y", &one, false).expect("linear");
        lines(&dir.path().join("point-log"), "One point", "x", "y", &one, true).expect("log");
    }

    #[test]
    fn no_finite_data() {
        let dir = tempfile::tempdir().expect("tempdir");
        let stem = dir.path().join("empty");
        let err = cdf(&stem, "Empty", "ms", &[f64::NAN, f64::INFINITY], &[]).expect_err("no data");
        assert!(matches!(err, PlotError::NoData), "{err:?}");
        assert!(matches!(cdf(&stem, "Empty", "ms", &[], &[]), Err(PlotError::NoData)));
        let log_only_nonpositive = [Series { name: "s".to_string(), points: vec![(0.0, 1.0), (-1.0, 2.0)] }];
        assert!(matches!(lines(&stem, "Empty", "x", "y", &log_only_nonpositive, true), Err(PlotError::NoData)));
        assert!(!with_extension(&stem, "png").exists());
    }

    #[test]
    fn ranges() {
        assert_eq!(linear_range(5.0, 5.0), 4.5..5.5);
        assert_eq!(linear_range(0.0, 0.0), 0.0..1.0);
        assert_eq!(linear_range(0.0, 10.0), 0.0..10.5);
        assert_eq!(linear_range(-10.0, 10.0), -11.0..11.0);
        let r = log_range(20.0, 50.0);
        assert!(r.start < 10.0 && r.end > 50.0, "{r:?}");
        let r = log_range(10.0, 1000.0);
        assert!(r.start < 10.0 && r.end > 1000.0, "{r:?}");
        assert_eq!(tick_label(&1000.0), "1000");
        assert_eq!(tick_label(&0.5), "0.5");
        assert_eq!(tick_label(&1e6), "1e6");
        assert_eq!(tick_label(&2.5e6), "2.5e6");
        assert_eq!(tick_label(&-0.0), "0");
        assert_eq!(tick_label(&0.30000000000000004), "0.3");
        assert_eq!(tick_label(&120.0), "120");
    }

    #[test]
    fn step_line() {
        let points = step_points(&[1.0, 2.0, 2.0, 4.0], &(0.0..5.0));
        assert_eq!(
            points,
            vec![(0.0, 0.0), (1.0, 0.0), (1.0, 0.25), (2.0, 0.25), (2.0, 0.75), (4.0, 0.75), (4.0, 1.0), (5.0, 1.0)]
        );
    }
}
