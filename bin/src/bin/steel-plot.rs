//! `steel-plot`: loss and learning-rate curves from a `metrics.jsonl`, as SVG or PNG.

use anyhow::{bail, Context};
use clap::Parser;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "steel-plot",
    version,
    about = "Draw the loss (train and validation) and learning-rate curves of a metrics.jsonl",
    after_help = "The format follows the file name: .svg (needs no fonts) or .png (needs a TrueType \
        font; searched under /usr/share/fonts, /usr/local/share/fonts and ~/.fonts, or given with \
        --font).\n\nExample (from the clone; after `cargo install --path bin`, bare `steel-plot …` too):\n  cargo run --release --bin steel-plot -- runs/demo/metrics.jsonl --out runs/demo/loss.svg"
)]
struct Args {
    /// The metrics log written by steel-train.
    metrics: PathBuf,
    /// The image to write (.svg or .png).
    #[arg(long)]
    out: PathBuf,
    /// A .ttf/.otf font for PNG output.
    #[arg(long)]
    font: Option<PathBuf>,
    /// Image width × height in pixels.
    #[arg(long, default_value_t = 1000)]
    width: u32,
    #[arg(long, default_value_t = 700)]
    height: u32,
}

struct Series {
    loss: Vec<(f64, f64)>,
    val: Vec<(f64, f64)>,
    lr: Vec<(f64, f64)>,
}

fn read(path: &Path) -> anyhow::Result<Series> {
    let rows = steel_train::metrics::read_metrics(path)?;
    let mut s = Series { loss: Vec::new(), val: Vec::new(), lr: Vec::new() };
    for r in &rows {
        let Some(step) = r["step"].as_f64() else { continue };
        if let Some(l) = r["loss"].as_f64().filter(|l| l.is_finite()) {
            s.loss.push((step, l));
        }
        if let Some(v) = r["val_loss"].as_f64().filter(|v| v.is_finite()) {
            s.val.push((step, v));
        }
        if let Some(lr) = r["lr"].as_f64() {
            s.lr.push((step, lr));
        }
    }
    if s.loss.is_empty() {
        bail!("{}: no steps with a finite loss to plot", path.display());
    }
    Ok(s)
}

fn find_font(given: Option<&Path>) -> anyhow::Result<Vec<u8>> {
    if let Some(p) = given {
        return std::fs::read(p).with_context(|| format!("reading the font {}", p.display()));
    }
    let mut roots =
        vec![PathBuf::from("/usr/share/fonts"), PathBuf::from("/usr/local/share/fonts")];
    if let Some(home) = std::env::var_os("HOME") {
        roots.push(PathBuf::from(home).join(".fonts"));
    }
    let mut stack = roots;
    let mut found: Vec<PathBuf> = Vec::new();
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "ttf" || x == "otf") {
                found.push(p);
            }
        }
    }
    // Prefer a plain sans face.
    found.sort_by_key(|p| {
        let n = p.file_name().map(|n| n.to_string_lossy().to_lowercase()).unwrap_or_default();
        (
            !n.contains("sans"),
            n.contains("bold") || n.contains("oblique") || n.contains("italic"),
            n,
        )
    });
    match found.first() {
        Some(p) => std::fs::read(p).with_context(|| format!("reading the font {}", p.display())),
        None => bail!(
            "PNG output needs a TrueType font and none was found under /usr/share/fonts, \
             /usr/local/share/fonts or ~/.fonts: pass --font FILE.ttf, or write .svg (no fonts needed)"
        ),
    }
}

fn range(points: &[(f64, f64)]) -> (f64, f64) {
    let lo = points.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
    let hi = points.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
    let pad = ((hi - lo) * 0.05).max(1e-12);
    (lo - pad, hi + pad)
}

/// A named curve and its colour.
type Curve<'a> = (&'a str, &'a [(f64, f64)], RGBColor);

/// `n + 1` evenly spaced values from `lo` to `hi`.
fn ticks(lo: f64, hi: f64, n: usize) -> Vec<f64> {
    (0..=n).map(|i| lo + (hi - lo) * i as f64 / n as f64).collect()
}

/// Round tick values inside `[lo, hi]`, about `n` intervals apart: multiples of 1, 2 or 5 × 10^k
/// (steps 0, 100, 200, … rather than 10, 108, 206, …).
fn round_ticks(lo: f64, hi: f64, n: usize) -> Vec<f64> {
    let span = hi - lo;
    if span.is_nan() || span <= 0.0 || !span.is_finite() {
        return vec![lo];
    }
    let raw = span / n.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let f = raw / mag;
    let step = mag
        * if f < 1.5 {
            1.0
        } else if f < 3.0 {
            2.0
        } else if f < 7.0 {
            5.0
        } else {
            10.0
        };
    let first = (lo / step).ceil() as i64;
    let last = (hi / step).floor() as i64;
    (first..=last).map(|k| k as f64 * step).collect()
}

/// One panel: a frame, grid lines, tick labels, axis names and the series. All text is placed
/// by hand (plotters' automatic layout measures glyphs, which needs a font; SVG text does not).
#[allow(clippy::too_many_arguments)]
fn panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    title: Option<&str>,
    x: (f64, f64),
    y: (f64, f64),
    x_name: Option<&str>,
    y_name: &str,
    y_fmt: &dyn Fn(f64) -> String,
    series: &[Curve<'_>],
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow::anyhow!("drawing: {e:?}");
    let (w, h) = area.dim_in_pixel();
    let (left, right, top, bottom) =
        (80i32, 20i32, if title.is_some() { 40i32 } else { 15 }, 45i32);
    let inner = area.margin(top as u32, bottom as u32, left as u32, right as u32);
    let mut chart = ChartBuilder::on(&inner).build_cartesian_2d(x.0..x.1, y.0..y.1).map_err(err)?;
    chart.configure_mesh().x_labels(0).y_labels(0).max_light_lines(0).draw().map_err(err)?;
    let text = |size: f64| TextStyle::from(("sans-serif", size).into_font()).color(&BLACK);
    let at = |v: (f64, f64)| {
        let (px, py) = chart.backend_coord(&v);
        // chart coordinates are relative to `inner`; `area` is offset by the margins
        (px - inner.get_base_pixel().0 + left, py - inner.get_base_pixel().1 + top)
    };
    let grid = ShapeStyle::from(&BLACK.mix(0.15)).stroke_width(1);
    let xs = round_ticks(x.0, x.1, 5);
    for (i, &tx) in xs.iter().enumerate() {
        let (px, _) = at((tx, y.0));
        area.draw(&PathElement::new(vec![(px, top), (px, h as i32 - bottom)], grid))
            .map_err(err)?;
        let label = if x.1 - x.0 >= 10.0 { format!("{tx:.0}") } else { format!("{tx:.1}") };
        // A label at the very edge is aligned inward so it stays inside the picture.
        let (left_px, _) = at((x.0, y.0));
        let (right_px, _) = at((x.1, y.0));
        let anchor = if i == 0 && px - left_px < 20 {
            HPos::Left
        } else if i + 1 == xs.len() && right_px - px < 20 {
            HPos::Right
        } else {
            HPos::Center
        };
        area.draw(&Text::new(
            label,
            (px, h as i32 - bottom + 6),
            text(13.0).pos(Pos::new(anchor, VPos::Top)),
        ))
        .map_err(err)?;
    }
    for ty in ticks(y.0, y.1, 4) {
        let (_, py) = at((x.0, ty));
        area.draw(&PathElement::new(vec![(left, py), (w as i32 - right, py)], grid))
            .map_err(err)?;
        area.draw(&Text::new(
            y_fmt(ty),
            (left - 6, py),
            text(13.0).pos(Pos::new(HPos::Right, VPos::Center)),
        ))
        .map_err(err)?;
    }
    if let Some(t) = title {
        area.draw(&Text::new(
            t.to_string(),
            (w as i32 / 2, 10),
            text(17.0).pos(Pos::new(HPos::Center, VPos::Top)),
        ))
        .map_err(err)?;
    }
    if let Some(n) = x_name {
        area.draw(&Text::new(
            n.to_string(),
            (w as i32 / 2, h as i32 - 18),
            text(14.0).pos(Pos::new(HPos::Center, VPos::Top)),
        ))
        .map_err(err)?;
    }
    area.draw(&Text::new(
        y_name.to_string(),
        (6, top - 4),
        text(14.0).pos(Pos::new(HPos::Left, VPos::Bottom)),
    ))
    .map_err(err)?;
    for (i, (name, points, color)) in series.iter().enumerate() {
        chart
            .draw_series(LineSeries::new(points.iter().copied(), color.stroke_width(2)))
            .map_err(err)?;
        if points.len() < 30 {
            chart
                .draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled())))
                .map_err(err)?;
        }
        if series.len() < 2 {
            continue; // the axis name says it all
        }
        // legend, top right
        let ly = top + 12 + 20 * i as i32;
        let lx = w as i32 - right - 170;
        area.draw(&PathElement::new(vec![(lx, ly), (lx + 24, ly)], color.stroke_width(3)))
            .map_err(err)?;
        area.draw(&Text::new(
            name.to_string(),
            (lx + 30, ly),
            text(13.0).pos(Pos::new(HPos::Left, VPos::Center)),
        ))
        .map_err(err)?;
    }
    Ok(())
}

fn draw<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    s: &Series,
    title: &str,
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow::anyhow!("drawing: {e:?}");
    root.fill(&WHITE).map_err(err)?;
    let (top, bottom) = root.split_vertically((root.dim_in_pixel().1 as f64 * 0.62) as u32);
    let x_max = s.loss.iter().chain(&s.lr).map(|p| p.0).fold(1.0, f64::max);
    let x_min =
        s.loss.iter().chain(&s.lr).map(|p| p.0).fold(f64::INFINITY, f64::min).min(x_max - 1.0);
    let all: Vec<(f64, f64)> = s.loss.iter().chain(&s.val).copied().collect();
    let mut losses: Vec<Curve<'_>> = vec![("train loss", &s.loss, BLUE)];
    if !s.val.is_empty() {
        losses.push(("validation loss", &s.val, RED));
    }
    panel(
        &top,
        Some(title),
        (x_min, x_max),
        range(&all),
        None,
        "loss",
        &|v| format!("{v:.2}"),
        &losses,
    )?;
    let (lo, hi) = range(&s.lr);
    panel(
        &bottom,
        None,
        (x_min, x_max),
        (lo.max(0.0), hi),
        Some("optimizer step"),
        "learning rate",
        &|v| format!("{v:.1e}"),
        &[("learning rate", &s.lr, RGBColor(0, 150, 0))],
    )?;
    root.present().map_err(err)?;
    Ok(())
}

fn main() -> ExitCode {
    steel_cli::run("steel-plot", || {
        let args = Args::parse();
        let s = read(&args.metrics)?;
        let (first, last) = (s.loss[0], s.loss[s.loss.len() - 1]);
        let title = format!(
            "{} — steps {}..{} ({} logged), loss {:.3} → {:.3}",
            args.metrics.display(),
            first.0,
            last.0,
            s.loss.len(),
            first.1,
            last.1
        );
        let ext =
            args.out.extension().map(|e| e.to_string_lossy().to_lowercase()).unwrap_or_default();
        // PNG rasterises glyphs and needs a font; SVG writes text as <text> elements and needs
        // none.
        let font = match ext.as_str() {
            "png" => Some(find_font(args.font.as_deref())?),
            "svg" => None,
            other => {
                bail!("--out {}: unknown format {other:?} (use .svg or .png)", args.out.display())
            }
        };
        if let Some(bytes) = font {
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).map_err(
                |_| anyhow::anyhow!("the font could not be parsed (pass another with --font)"),
            )?;
        }
        let size = (args.width, args.height);
        if ext == "png" {
            draw(BitMapBackend::new(&args.out, size).into_drawing_area(), &s, &title)?;
        } else {
            draw(SVGBackend::new(&args.out, size).into_drawing_area(), &s, &title)?;
        }
        println!("wrote {} ({} points)", args.out.display(), s.loss.len());
        Ok(())
    })
}
