//! A [`Frontier`] drawn as a hand-written SVG: the static points and the line through them,
//! each sweep as a polyline of markers, axes with ticks and labels, and a legend.
//!
//! The mapping from data to the picture is linear on both axes:
//!
//! ```text
//! px = left + (x − x_min) / (x_max − x_min) · width
//! py = top  + (y_max − y) / (y_max − y_min) · height      (SVG's y grows downwards)
//! ```
//!
//! The plot group carries its `x_min … y_max` and `left … height` as `data-` attributes, and
//! every marker its data coordinates as `data-x` (cost) and `data-y` (PPL), so a reader (or a
//! test) can map any drawn position back to the table's numbers.

use std::path::{Path, PathBuf};

use super::frontier::{Frontier, PointKind};
use crate::error::Result;

/// Picture size and margins, in pixels.
const WIDTH: f64 = 880.0;
const HEIGHT: f64 = 480.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 350.0; // room for the legend (series names of ~50 characters)
const TOP: f64 = 40.0;
const BOTTOM: f64 = 60.0;

/// Colours of the sweeps, in order (then they repeat).
const COLOURS: [&str; 6] = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf"];

/// Text with `&`, `<`, `>` and `"` escaped for XML.
fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// One axis: the data range shown and its ticks.
#[derive(Clone, Debug, PartialEq)]
pub struct Axis {
    /// The smallest value shown.
    pub min: f64,
    /// The largest value shown.
    pub max: f64,
    /// Tick values, inside `min..=max`.
    pub ticks: Vec<f64>,
}

impl Axis {
    /// An axis covering `values` with a little room, its ends and ticks on a "nice" step
    /// (1, 2 or 5 times a power of ten) giving about five ticks.
    pub fn covering(values: impl IntoIterator<Item = f64>) -> Axis {
        let (mut lo, mut hi) = values.into_iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), v| {
            if v.is_finite() { (l.min(v), h.max(v)) } else { (l, h) }
        });
        if !lo.is_finite() {
            (lo, hi) = (0.0, 1.0);
        }
        if hi - lo < 1e-9 * hi.abs().max(1.0) {
            (lo, hi) = (lo - 0.5 * lo.abs().max(1e-3), hi + 0.5 * hi.abs().max(1e-3));
        }
        let pad = 0.05 * (hi - lo);
        let (lo, hi) = (lo - pad, hi + pad);
        let raw = (hi - lo) / 5.0;
        let power = 10f64.powf(raw.log10().floor());
        let step =
            [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * power).find(|s| *s >= raw).unwrap_or(10.0 * power);
        let (min, max) = ((lo / step).floor() * step, (hi / step).ceil() * step);
        let n = ((max - min) / step).round() as usize;
        Axis { min, max, ticks: (0..=n).map(|i| min + i as f64 * step).collect() }
    }

    /// Where `v` falls along the axis, 0 at `min` to 1 at `max`.
    pub fn fraction(&self, v: f64) -> f64 {
        (v - self.min) / (self.max - self.min)
    }
}

/// A tick's label: as few decimals as the step needs.
fn tick_label(v: f64, ticks: &[f64]) -> String {
    let step = if ticks.len() > 1 { ticks[1] - ticks[0] } else { 1.0 };
    let decimals = (-step.log10().floor()).max(0.0) as usize;
    format!("{v:.decimals$}")
}

/// The SVG document of `frontier`, titled `title`.
pub fn frontier_svg(frontier: &Frontier, title: &str) -> String {
    let (pw, ph) = (WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM);
    let xs = Axis::covering(frontier.points.iter().map(|p| p.cost));
    let ys = Axis::covering(frontier.points.iter().map(|p| p.ppl));
    let px = |x: f64| LEFT + xs.fraction(x) * pw;
    let py = |y: f64| TOP + (1.0 - ys.fraction(y)) * ph;

    let mut s = String::new();
    let mut w = |text: String| s.push_str(&text);
    w(format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{HEIGHT}\" viewBox=\"0 0 {WIDTH} {HEIGHT}\" font-family=\"sans-serif\" font-size=\"12\">\n"
    ));
    w(format!("<rect width=\"{WIDTH}\" height=\"{HEIGHT}\" fill=\"white\"/>\n"));
    w(format!(
        "<text x=\"{}\" y=\"22\" text-anchor=\"middle\" font-size=\"14\">{}</text>\n",
        LEFT + pw / 2.0,
        escape(title)
    ));

    // Axes: the frame, ticks with grid lines, and the labels with their units.
    w(format!(
        "<g id=\"plot\" data-x-min=\"{}\" data-x-max=\"{}\" data-y-min=\"{}\" data-y-max=\"{}\" data-left=\"{LEFT}\" data-top=\"{TOP}\" data-width=\"{pw}\" data-height=\"{ph}\">\n",
        xs.min, xs.max, ys.min, ys.max
    ));
    w(format!(
        "<rect x=\"{LEFT}\" y=\"{TOP}\" width=\"{pw}\" height=\"{ph}\" fill=\"none\" stroke=\"black\"/>\n"
    ));
    for &t in &xs.ticks {
        let x = px(t);
        w(format!(
            "<line x1=\"{x:.2}\" y1=\"{TOP}\" x2=\"{x:.2}\" y2=\"{:.2}\" stroke=\"#ddd\"/>\n",
            TOP + ph
        ));
        w(format!(
            "<text x=\"{x:.2}\" y=\"{:.2}\" text-anchor=\"middle\">{}</text>\n",
            TOP + ph + 16.0,
            tick_label(t, &xs.ticks)
        ));
    }
    for &t in &ys.ticks {
        let y = py(t);
        w(format!(
            "<line x1=\"{LEFT}\" y1=\"{y:.2}\" x2=\"{:.2}\" y2=\"{y:.2}\" stroke=\"#ddd\"/>\n",
            LEFT + pw
        ));
        w(format!(
            "<text x=\"{:.2}\" y=\"{:.2}\" text-anchor=\"end\">{}</text>\n",
            LEFT - 6.0,
            y + 4.0,
            tick_label(t, &ys.ticks)
        ));
    }
    w(format!(
        "<text x=\"{:.2}\" y=\"{:.2}\" text-anchor=\"middle\">inference cost (FLOPs per token, relative to the baseline = 1)</text>\n",
        LEFT + pw / 2.0,
        HEIGHT - 18.0
    ));
    w(format!(
        "<text x=\"18\" y=\"{:.2}\" text-anchor=\"middle\" transform=\"rotate(-90 18 {:.2})\">test perplexity (lower is better)</text>\n",
        TOP + ph / 2.0,
        TOP + ph / 2.0
    ));

    // The static frontier, then the static points with their names.
    let (a, b) = (frontier.line.from, frontier.line.to);
    w(format!(
        "<line class=\"static-frontier\" x1=\"{:.2}\" y1=\"{:.2}\" x2=\"{:.2}\" y2=\"{:.2}\" stroke=\"black\" stroke-dasharray=\"6 4\"/>\n",
        px(a.0),
        py(a.1),
        px(b.0),
        py(b.1)
    ));
    for p in frontier.points.iter().filter(|p| p.kind == PointKind::Static) {
        let (x, y) = (px(p.cost), py(p.ppl));
        w(format!(
            "<rect class=\"static\" x=\"{:.2}\" y=\"{:.2}\" width=\"8\" height=\"8\" fill=\"black\" data-x=\"{}\" data-y=\"{}\" data-cx=\"{x:.2}\" data-cy=\"{y:.2}\"><title>{}: cost {:.3}, PPL {:.3}</title></rect>\n",
            x - 4.0,
            y - 4.0,
            p.cost,
            p.ppl,
            escape(&p.series),
            p.cost,
            p.ppl
        ));
        w(format!("<text x=\"{:.2}\" y=\"{:.2}\">{}</text>\n", x + 7.0, y - 7.0, escape(&p.series)));
    }

    // Each sweep: a polyline in cost order, and a marker per point.
    let series = frontier.series();
    for (i, name) in series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let mut pts: Vec<_> =
            frontier.points.iter().filter(|p| p.kind == PointKind::Sweep && p.series == *name).collect();
        pts.sort_by(|p, q| p.cost.total_cmp(&q.cost));
        let path: Vec<String> = pts.iter().map(|p| format!("{:.2},{:.2}", px(p.cost), py(p.ppl))).collect();
        w(format!(
            "<polyline class=\"sweep\" points=\"{}\" fill=\"none\" stroke=\"{colour}\" stroke-width=\"1.5\"/>\n",
            path.join(" ")
        ));
        for p in pts {
            w(format!(
                "<circle class=\"sweep\" cx=\"{:.2}\" cy=\"{:.2}\" r=\"3.5\" fill=\"{colour}\" data-x=\"{}\" data-y=\"{}\"><title>{}, {}: cost {:.3}, PPL {:.3}</title></circle>\n",
                px(p.cost),
                py(p.ppl),
                p.cost,
                p.ppl,
                escape(&p.series),
                escape(&p.label),
                p.cost,
                p.ppl
            ));
        }
    }
    w("</g>\n".into());

    // The legend, right of the plot.
    let lx = LEFT + pw + 16.0;
    let mut ly = TOP + 8.0;
    w(format!(
        "<g id=\"legend\">\n<line x1=\"{lx}\" y1=\"{ly}\" x2=\"{}\" y2=\"{ly}\" stroke=\"black\" stroke-dasharray=\"6 4\"/>\n",
        lx + 22.0
    ));
    w(format!("<text x=\"{}\" y=\"{:.2}\">static frontier</text>\n", lx + 28.0, ly + 4.0));
    ly += 18.0;
    w(format!("<rect x=\"{}\" y=\"{:.2}\" width=\"8\" height=\"8\" fill=\"black\"/>\n", lx + 7.0, ly - 4.0));
    w(format!("<text x=\"{}\" y=\"{:.2}\">static models (full depth)</text>\n", lx + 28.0, ly + 4.0));
    for (i, name) in series.iter().enumerate() {
        ly += 18.0;
        let colour = COLOURS[i % COLOURS.len()];
        w(format!(
            "<line x1=\"{lx}\" y1=\"{ly:.2}\" x2=\"{:.2}\" y2=\"{ly:.2}\" stroke=\"{colour}\" stroke-width=\"1.5\"/>\n",
            lx + 22.0
        ));
        w(format!("<circle cx=\"{:.2}\" cy=\"{ly:.2}\" r=\"3.5\" fill=\"{colour}\"/>\n", lx + 11.0));
        w(format!("<text x=\"{}\" y=\"{:.2}\">{}</text>\n", lx + 28.0, ly + 4.0, escape(name)));
    }
    w("</g>\n</svg>\n".into());
    s
}

/// Writes [`frontier_svg`] as `dir/name`, atomically (creating `dir`); returns the path.
pub fn write_frontier_svg(frontier: &Frontier, title: &str, dir: &Path, name: &str) -> Result<PathBuf> {
    super::write_into(dir, name, frontier_svg(frontier, title).as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::frontier::tests::sample;

    /// A tiny XML well-formedness check: tags nest and close in order, attributes are quoted
    /// and unique, text holds no bare `<` and only the five XML entities. Returns every
    /// element as (name, attributes), in document order.
    fn parse_xml(text: &str) -> Vec<(String, Vec<(String, String)>)> {
        let check_text = |t: &str| {
            let mut rest = t;
            while let Some(i) = rest.find('&') {
                rest = &rest[i..];
                let end = rest.find(';').expect("an entity ends with ';'");
                assert!(
                    ["&amp;", "&lt;", "&gt;", "&quot;", "&apos;"].contains(&&rest[..=end]),
                    "entity {}",
                    &rest[..=end]
                );
                rest = &rest[end + 1..];
            }
        };
        let mut stack: Vec<String> = Vec::new();
        let mut elements = Vec::new();
        let mut rest = text.strip_prefix("<?xml").map(|r| &r[r.find("?>").unwrap() + 2..]).unwrap_or(text);
        while let Some(open) = rest.find('<') {
            check_text(&rest[..open]);
            assert!(!stack.is_empty() || rest[..open].trim().is_empty(), "text outside the root");
            let close = rest[open..].find('>').expect("a tag ends with '>'") + open;
            let tag = &rest[open + 1..close];
            rest = &rest[close + 1..];
            if let Some(name) = tag.strip_prefix('/') {
                assert_eq!(stack.pop().as_deref(), Some(name), "closing tag out of order");
                continue;
            }
            let self_closing = tag.ends_with('/');
            let body = tag.trim_end_matches('/');
            let name_end = body.find(char::is_whitespace).unwrap_or(body.len());
            let name = body[..name_end].to_string();
            assert!(
                !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == ':')
            );
            let mut attrs: Vec<(String, String)> = Vec::new();
            let mut a = body[name_end..].trim_start();
            while !a.is_empty() {
                let eq = a.find('=').expect("attribute = value");
                let key = a[..eq].trim().to_string();
                assert!(a[eq + 1..].starts_with('"'), "attribute {key} unquoted");
                let end = a[eq + 2..].find('"').expect("closing quote") + eq + 2;
                let value = a[eq + 2..end].to_string();
                assert!(!value.contains('<'));
                check_text(&value);
                assert!(attrs.iter().all(|(k, _)| *k != key), "attribute {key} twice");
                attrs.push((key, value));
                a = a[end + 1..].trim_start();
            }
            if !self_closing {
                stack.push(name.clone());
            }
            elements.push((name, attrs));
        }
        assert!(rest.trim().is_empty() && stack.is_empty(), "unclosed: {stack:?}");
        elements
    }

    fn attr<'a>(attrs: &'a [(String, String)], key: &str) -> &'a str {
        attrs.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str()).unwrap_or_else(|| panic!("no {key}"))
    }

    fn num(attrs: &[(String, String)], key: &str) -> f64 {
        attr(attrs, key).parse().unwrap()
    }

    #[test]
    fn the_svg_is_well_formed_and_its_markers_map_back_to_the_table() {
        let mut f = sample();
        f.points[2].series = "LEGO <skip> & \"co\"".into(); // escaping
        let elements = parse_xml(&frontier_svg(&f, "frontier & co"));
        assert_eq!(elements[0].0, "svg");
        let plot = &elements.iter().find(|(n, a)| n == "g" && attr(a, "id") == "plot").unwrap().1;
        let (x0, x1, y0, y1) = (
            num(plot, "data-x-min"),
            num(plot, "data-x-max"),
            num(plot, "data-y-min"),
            num(plot, "data-y-max"),
        );
        let (left, top, w, h) = (
            num(plot, "data-left"),
            num(plot, "data-top"),
            num(plot, "data-width"),
            num(plot, "data-height"),
        );
        // Every point of the frontier is drawn once, at its own numbers.
        let markers: Vec<_> = elements
            .iter()
            .filter(|(n, a)| (n == "circle" || n == "rect") && a.iter().any(|(k, _)| k == "data-x"))
            .map(|(n, a)| {
                let (cx, cy) = if n == "circle" {
                    (num(a, "cx"), num(a, "cy"))
                } else {
                    (num(a, "data-cx"), num(a, "data-cy"))
                };
                // The inverse of the plot's transform.
                let (x, y) = (x0 + (cx - left) / w * (x1 - x0), y1 - (cy - top) / h * (y1 - y0));
                (num(a, "data-x"), num(a, "data-y"), x, y)
            })
            .collect();
        assert_eq!(markers.len(), f.points.len());
        for p in &f.points {
            let m = markers.iter().find(|m| m.0 == p.cost && m.1 == p.ppl).expect("every point is drawn");
            // 0.01 px of rounding in the drawn position.
            assert!((m.2 - p.cost).abs() <= 0.01 / w * (x1 - x0) + 1e-12, "{m:?}");
            assert!((m.3 - p.ppl).abs() <= 0.01 / h * (y1 - y0) + 1e-12, "{m:?}");
        }
        // One polyline per sweep series, and the line through the static points.
        assert_eq!(elements.iter().filter(|(n, _)| n == "polyline").count(), f.series().len());
        assert!(elements.iter().any(|(n, a)| n == "line" && a.iter().any(|(_, v)| v == "static-frontier")));
    }

    #[test]
    fn axes_cover_their_values_with_nice_ticks() {
        let a = Axis::covering([0.55, 1.0, 0.7]);
        assert!(a.min <= 0.55 && a.max >= 1.0);
        assert!(a.ticks.len() >= 4 && a.ticks.len() <= 12, "{a:?}");
        assert_eq!(tick_label(0.6, &a.ticks), "0.6");
        let flat = Axis::covering([5.0, 5.0]);
        assert!(flat.min < 5.0 && flat.max > 5.0);
    }

    #[test]
    fn the_picture_is_written_into_the_directory() {
        let dir = std::env::temp_dir().join(format!("lego-svg-test-{}", std::process::id()));
        let path = write_frontier_svg(&sample(), "t", &dir, "frontier.svg").unwrap();
        assert!(std::fs::read_to_string(&path).unwrap().ends_with("</svg>\n"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
