//! The quality-versus-compute frontier: test perplexity against inference cost, for the static
//! models and for early exit swept over its thresholds.
//!
//! ```text
//!  PPL │ ● phase 1 (2 layers)
//!      │   ╲  ← the static frontier: what mixing the two static models buys
//!      │    ╲     ○──○──○  a sweep (one model, one measure, one fill, several thresholds)
//!      │     ╲
//!      │      ● baseline (4 layers)
//!      └──────────────────── cost (FLOPs per token, relative to the baseline)
//! ```
//!
//! A **point** is one way of running inference: a static model (every token at full depth), or
//! a model with an exit rule. Every point is measured the same way, by
//! [`FrontierPoint::measure`]: the same test sequences fed token by token through the decoder
//! ([`LegoTransformer::evaluate_with_early_exit`]), so every point sees the same tokens and the
//! same contexts, and a token that exits really is missing from the upper cache (with
//! [`UpperCacheFill::Skip`]), as in generation. (The whole-sequence
//! [`Trainer::evaluate`](crate::train::Trainer::evaluate) cannot tell the two fills apart.)
//!
//! **Cost** is FLOPs per token including the exit check ([`cost::early_exit_flops`]), relative
//! to the baseline at full depth; a static model pays no check. The measured wall time per
//! token of that same evaluation is kept beside it.
//!
//! **The static frontier** is the straight line through the phase-1 point and the baseline
//! point: a user who can afford cost `c` between the two could route a share of requests to
//! each and get the perplexity on that line. A point **below** it gives better quality for its
//! compute than the static models can ([`StaticLine::gap`]).

use std::time::Instant;

use crate::data::Batch;
use crate::error::{Error, Result};
use crate::model::cost::{self, mean_over_window};
use crate::model::{ExitMeasure, ExitRule, LegoTransformer, UpperCacheFill};
use crate::train::compute_confidence_threshold;

use super::{Csv, Table};

/// A threshold above every confidence: no token exits.
pub const NEVER_EXIT: f32 = 2.0;

/// Whether a point is a static model or one threshold of a sweep.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PointKind {
    /// A model run at full depth.
    Static,
    /// A model with an exit rule.
    Sweep,
}

/// One way of running inference, measured.
#[derive(Clone, Debug, PartialEq)]
pub struct FrontierPoint {
    /// The curve it belongs to ("LEGO, softmax, skip"), or the static model's name.
    pub series: String,
    /// What distinguishes it within its series ("25 % hard (0.4123)").
    pub label: String,
    /// Static or a sweep point.
    pub kind: PointKind,
    /// FLOPs per token against the baseline at full depth.
    pub cost: f64,
    /// Test perplexity.
    pub ppl: f64,
    /// Share of tokens that exited (0 for a static model).
    pub shallow_ratio: f64,
    /// The routing threshold (`None` for a static model).
    pub threshold: Option<f32>,
    /// Measured wall time per token of the evaluation, microseconds (all sequences decoded
    /// together as one batch).
    pub us_per_token: f64,
}

impl FrontierPoint {
    /// Measures `model` on `sequences` (all one length, at most `max_seq_len`): at full depth
    /// with no `rule` (a static point), else with it. Cost is relative to full-depth inference
    /// of a model configured as `baseline`.
    pub fn measure(
        model: &LegoTransformer,
        sequences: &[Vec<usize>],
        rule: Option<&ExitRule>,
        baseline: &crate::model::LegoConfig,
        series: &str,
        label: &str,
    ) -> Result<FrontierPoint> {
        // Full depth is the same decoder with a rule no token meets: every logit then comes
        // from the deep head (a one-part model's deep head is its only head).
        let never = ExitRule::new(NEVER_EXIT, UpperCacheFill::Skip);
        let t0 = Instant::now();
        let stats = model.evaluate_with_early_exit(sequences, rule.unwrap_or(&never))?;
        let seconds = t0.elapsed().as_secs_f64();
        // A sequence of L tokens gives L − 1 predictions, at contexts 1..=L − 1.
        let len = sequences[0].len() - 1;
        let full = |c: &crate::model::LegoConfig| mean_over_window(len, |ctx| cost::full_depth_flops(c, ctx));
        let flops = match rule {
            None => full(&model.config),
            Some(rule) => cost::early_exit_flops(&model.config, len, stats.shallow_ratio, rule),
        };
        Ok(FrontierPoint {
            series: series.into(),
            label: label.into(),
            kind: if rule.is_some() { PointKind::Sweep } else { PointKind::Static },
            cost: flops / full(baseline),
            ppl: stats.ppl,
            shallow_ratio: if rule.is_some() { stats.shallow_ratio } else { 0.0 },
            threshold: rule.map(|r| r.threshold),
            us_per_token: 1e6 * seconds / stats.tokens as f64,
        })
    }
}

/// The threshold of `measure` under which `hard_ratio` of the tokens of `val` fall (so that
/// about `1 − hard_ratio` of them exit). Each measure says here how it is calibrated, so a
/// sweep over measures is one more loop.
pub fn calibrate(
    model: &LegoTransformer,
    val: &[Batch],
    measure: ExitMeasure,
    hard_ratio: f32,
) -> Result<f32> {
    match measure {
        ExitMeasure::MaxSoftmax => compute_confidence_threshold(model, val, hard_ratio),
        ExitMeasure::Gate => crate::train::exit_gate::compute_gate_threshold(model, val, hard_ratio),
    }
}

/// What an early-exit sweep runs over: validation hard ratios (each calibrated to a threshold
/// per measure), measures and fills. A new measure is one more entry in `measures`.
#[derive(Clone, Debug, PartialEq)]
pub struct SweepGrid {
    /// Shares of validation tokens that should go deep, one threshold each.
    pub hard_ratios: Vec<f32>,
    /// The exit measures.
    pub measures: Vec<ExitMeasure>,
    /// The upper-cache fills.
    pub fills: Vec<UpperCacheFill>,
}

impl SweepGrid {
    /// Every point of the grid for `model`, measured on `sequences` (see
    /// [`FrontierPoint::measure`]), the thresholds calibrated on `val`; one series per measure
    /// and fill, named `"{name}, {measure}, {fill}"`.
    pub fn run(
        &self,
        model: &LegoTransformer,
        name: &str,
        val: &[Batch],
        sequences: &[Vec<usize>],
        baseline: &crate::model::LegoConfig,
    ) -> Result<Vec<FrontierPoint>> {
        let mut points = Vec::new();
        for &measure in &self.measures {
            let thresholds: Vec<(f32, f32)> = self
                .hard_ratios
                .iter()
                .map(|&r| calibrate(model, val, measure, r).map(|t| (r, t)))
                .collect::<Result<_>>()?;
            for &fill in &self.fills {
                let series = format!("{name}, {}, {}", measure.name(), fill.name());
                for &(ratio, threshold) in &thresholds {
                    let rule = ExitRule { threshold, fill, measure };
                    let label = format!("{:.0} % hard on val ({threshold:.4})", 100.0 * ratio);
                    points.push(FrontierPoint::measure(
                        model,
                        sequences,
                        Some(&rule),
                        baseline,
                        &series,
                        &label,
                    )?);
                }
            }
        }
        Ok(points)
    }
}

/// The straight line in (cost, PPL) through two static points.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StaticLine {
    /// (cost, PPL) of the cheap end (the phase-1 model).
    pub from: (f64, f64),
    /// (cost, PPL) of the expensive end (the baseline).
    pub to: (f64, f64),
}

impl StaticLine {
    /// The line's perplexity at `cost` (extended beyond its ends as a straight line).
    pub fn ppl_at(&self, cost: f64) -> f64 {
        let ((x0, y0), (x1, y1)) = (self.from, self.to);
        if x1 == x0 {
            return y0.min(y1);
        }
        y0 + (y1 - y0) * (cost - x0) / (x1 - x0)
    }

    /// How far `point` lies above the line, as a share of the line's PPL at its cost:
    /// negative below (better than the static models for its compute), positive above.
    pub fn gap(&self, point: &FrontierPoint) -> f64 {
        point.ppl / self.ppl_at(point.cost) - 1.0
    }

    /// Whether `point` lies on or below the line, allowing `tolerance` (relative) for
    /// measurement noise.
    pub fn is_on_or_below(&self, point: &FrontierPoint, tolerance: f64) -> bool {
        self.gap(point) <= tolerance
    }
}

/// The static points, the line through two of them, and the sweeps.
#[derive(Clone, Debug, PartialEq)]
pub struct Frontier {
    /// Every point: the static ones and the sweeps, in the order measured.
    pub points: Vec<FrontierPoint>,
    /// The static frontier.
    pub line: StaticLine,
}

/// Where the best point of some series stands against the static frontier.
#[derive(Clone, Debug, PartialEq)]
pub struct Standing {
    /// The point with the lowest gap among those that save compute (cost below 1).
    pub best: FrontierPoint,
    /// Its gap ([`StaticLine::gap`]).
    pub gap: f64,
    /// How many of the series' points lie on or below the line.
    pub on_or_below: usize,
    /// How many points the series have.
    pub points: usize,
}

impl Frontier {
    /// A frontier whose static line runs from the point of series `cheap` to that of series
    /// `expensive` (both static points in `points`). Error if either is missing.
    pub fn new(points: Vec<FrontierPoint>, cheap: &str, expensive: &str) -> Result<Frontier> {
        let find = |name: &str| {
            points
                .iter()
                .find(|p| p.kind == PointKind::Static && p.series == name)
                .map(|p| (p.cost, p.ppl))
                .ok_or_else(|| Error::Input(format!("frontier: no static point named '{name}'")))
        };
        let line = StaticLine { from: find(cheap)?, to: find(expensive)? };
        Ok(Frontier { points, line })
    }

    /// The names of the sweep series, in the order first measured.
    pub fn series(&self) -> Vec<&str> {
        let mut names: Vec<&str> = Vec::new();
        for p in self.points.iter().filter(|p| p.kind == PointKind::Sweep) {
            if !names.contains(&p.series.as_str()) {
                names.push(&p.series);
            }
        }
        names
    }

    /// The standing of the sweep points whose series `belongs`; `None` if none saves compute.
    pub fn standing(&self, belongs: impl Fn(&str) -> bool) -> Option<Standing> {
        let points: Vec<&FrontierPoint> =
            self.points.iter().filter(|p| p.kind == PointKind::Sweep && belongs(&p.series)).collect();
        let best = points
            .iter()
            .filter(|p| p.cost < 1.0)
            .min_by(|a, b| self.line.gap(a).total_cmp(&self.line.gap(b)))?;
        Some(Standing {
            best: (*best).clone(),
            gap: self.line.gap(best),
            on_or_below: points.iter().filter(|p| self.line.is_on_or_below(p, 0.0)).count(),
            points: points.len(),
        })
    }

    /// One line on where the series that `belongs` stand, e.g. "LEGO: best 2.1 % below the
    /// static frontier at cost 0.72 (...); 5 of 14 sweep points on or below it".
    pub fn summary(&self, name: &str, belongs: impl Fn(&str) -> bool) -> String {
        match self.standing(belongs) {
            None => format!("{name}: no point saves compute, so none can beat the static frontier"),
            Some(s) => format!(
                "{name}: best {:.1} % {} the static frontier at cost {:.3} of the baseline ({}, {}: PPL {:.3}, {:.1} % exit); {} of {} sweep points on or below it",
                100.0 * s.gap.abs(),
                if s.gap <= 0.0 { "below" } else { "above" },
                s.best.cost,
                s.best.series,
                s.best.label,
                s.best.ppl,
                100.0 * s.best.shallow_ratio,
                s.on_or_below,
                s.points
            ),
        }
    }

    /// The points as a table, each with its gap to the static frontier.
    pub fn table(&self) -> Table {
        let mut t = Table::new([
            "series",
            "point",
            "cost (FLOPs vs baseline)",
            "test PPL",
            "vs static frontier",
            "exit share",
            "µs/token",
        ]);
        for p in &self.points {
            t.row([
                p.series.clone(),
                p.label.clone(),
                format!("{:.3}", p.cost),
                format!("{:.3}", p.ppl),
                format!("{:+.1} %", 100.0 * self.line.gap(p)),
                format!("{:.1} %", 100.0 * p.shallow_ratio),
                format!("{:.1}", p.us_per_token),
            ]);
        }
        t
    }

    /// The points as CSV, full precision, for plotting elsewhere.
    pub fn to_csv(&self) -> Csv {
        let mut csv = Csv::new([
            "series",
            "kind",
            "label",
            "threshold",
            "shallow_ratio",
            "cost",
            "ppl",
            "gap_to_static_frontier",
            "us_per_token",
        ]);
        for p in &self.points {
            csv.push([
                p.series.clone(),
                match p.kind {
                    PointKind::Static => "static".into(),
                    PointKind::Sweep => "sweep".into(),
                },
                p.label.clone(),
                p.threshold.map_or(String::new(), |t| t.to_string()),
                p.shallow_ratio.to_string(),
                p.cost.to_string(),
                p.ppl.to_string(),
                self.line.gap(p).to_string(),
                p.us_per_token.to_string(),
            ]);
        }
        csv
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn point(series: &str, kind: PointKind, cost: f64, ppl: f64) -> FrontierPoint {
        FrontierPoint {
            series: series.into(),
            label: format!("{cost}"),
            kind,
            cost,
            ppl,
            shallow_ratio: 1.0 - cost,
            threshold: (kind == PointKind::Sweep).then_some(0.5),
            us_per_token: 10.0,
        }
    }

    /// Phase 1 at (0.55, 6), the baseline at (1, 5), a sweep through both sides of the line.
    pub(crate) fn sample() -> Frontier {
        let s = PointKind::Static;
        let points = vec![
            point("phase 1", s, 0.55, 6.0),
            point("baseline", s, 1.0, 5.0),
            point("LEGO, softmax, skip", PointKind::Sweep, 0.7, 5.5),
            point("LEGO, softmax, skip", PointKind::Sweep, 0.8, 5.4),
            point("tuned", PointKind::Sweep, 0.7, 5.9),
        ];
        Frontier::new(points, "phase 1", "baseline").unwrap()
    }

    #[test]
    fn the_static_line_runs_through_both_static_points() {
        let f = sample();
        assert_eq!(f.line.ppl_at(0.55), 6.0);
        assert_eq!(f.line.ppl_at(1.0), 5.0);
        // At 0.7 the line is at 6 − 0.15/0.45 = 5.667: 5.5 is 2.9 % below it, 5.9 above.
        let (below, above) = (&f.points[2], &f.points[4]);
        assert!((f.line.ppl_at(0.7) - (6.0 - 1.0 / 3.0)).abs() < 1e-12);
        assert!((f.line.gap(below) - (5.5 / (6.0 - 1.0 / 3.0) - 1.0)).abs() < 1e-12);
        assert!(f.line.is_on_or_below(below, 0.0));
        assert!(!f.line.is_on_or_below(above, 0.0));
        assert!(f.line.is_on_or_below(&f.points[0], 0.0) && f.line.is_on_or_below(&f.points[1], 0.0));
    }

    #[test]
    fn a_sweep_measures_every_grid_point_on_the_same_sequences() {
        use crate::model::LegoConfig;
        use crate::train::set_seed;
        // An untrained 4-layer model (exit after 2) and its 2-layer lower part as "phase 1".
        let deep = LegoConfig { exit_layer: 2, ..LegoConfig::new(32, 16, 4, 2, 32, 12) };
        let model = LegoTransformer::new(deep.clone(), &mut set_seed(1)).unwrap();
        let shallow = LegoConfig { exit_layer: 2, ..LegoConfig::new(32, 16, 2, 2, 32, 12) };
        let phase1 = LegoTransformer::new(shallow, &mut set_seed(2)).unwrap();
        let seqs: Vec<Vec<usize>> = (0..4).map(|r| (0..12).map(|i| (7 * r + 3 * i) % 32).collect()).collect();
        let val = crate::data::batches(&seqs, 2, None).unwrap();

        let full = FrontierPoint::measure(&model, &seqs, None, &deep, "deep", "full depth").unwrap();
        assert_eq!(
            (full.cost, full.kind, full.shallow_ratio, full.threshold),
            (1.0, PointKind::Static, 0.0, None)
        );
        let never = ExitRule::new(NEVER_EXIT, UpperCacheFill::Skip);
        assert_eq!(full.ppl, model.evaluate_with_early_exit(&seqs, &never).unwrap().ppl);
        let cheap = FrontierPoint::measure(&phase1, &seqs, None, &deep, "phase 1", "full depth").unwrap();
        let len = 11; // 12 tokens: 11 predictions
        let expected = mean_over_window(len, |c| cost::full_depth_flops(&phase1.config, c))
            / mean_over_window(len, |c| cost::full_depth_flops(&deep, c));
        assert!((cheap.cost - expected).abs() < 1e-12 && cheap.cost < 0.7);

        let grid = SweepGrid {
            hard_ratios: vec![0.2, 0.5, 0.8],
            measures: vec![ExitMeasure::MaxSoftmax],
            fills: vec![UpperCacheFill::Skip, UpperCacheFill::Propagate],
        };
        let points = grid.run(&model, "M", &val, &seqs, &deep).unwrap();
        assert_eq!(points.len(), 6);
        assert_eq!(points[0].series, "M, softmax, skip");
        assert_eq!(points[5].series, "M, softmax, propagate");
        // More tokens go deep as the hard ratio rises, so the cost rises with it.
        for w in points[..3].windows(2) {
            assert!(w[0].shallow_ratio >= w[1].shallow_ratio && w[0].cost <= w[1].cost, "{w:?}");
        }
        assert!(
            points.iter().all(|p| p.ppl.is_finite() && p.kind == PointKind::Sweep && p.us_per_token > 0.0)
        );
    }

    #[test]
    fn the_standing_names_the_best_point_that_saves_compute() {
        let f = sample();
        let s = f.standing(|name| name.starts_with("LEGO")).unwrap();
        assert_eq!((s.best.cost, s.on_or_below, s.points), (0.7, 2, 2));
        let line = f.summary("LEGO", |name| name.starts_with("LEGO"));
        assert!(line.starts_with("LEGO: best 2.9 % below the static frontier at cost 0.700"), "{line}");
        assert!(f.summary("none", |_| false).contains("no point saves compute"));
        assert_eq!(f.series(), ["LEGO, softmax, skip", "tuned"]);
        assert!(Frontier::new(f.points.clone(), "phase 1", "nope").is_err());
        assert_eq!(f.table().rows().len(), 5);
        assert_eq!(f.to_csv().rows()[2][7], f.line.gap(&f.points[2]).to_string());
    }
}
