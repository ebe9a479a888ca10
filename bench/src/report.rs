//! Results: each metric keeps its raw samples for both sides and is quoted by their medians.
//! Invariant: a metric that did not run is a `Skip` with its reason, never a made-up number.

use serde::Serialize;

/// Which direction is good for a metric.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Better {
    Higher,
    Lower,
}

impl Better {
    fn as_str(self) -> &'static str {
        match self {
            Better::Higher => "higher",
            Better::Lower => "lower",
        }
    }
}

/// One side-by-side measurement: our samples, the peer's samples, and what the peer is.
#[derive(Debug, Clone, Serialize)]
pub struct Metric {
    pub name: String,
    pub unit: String,
    pub better: Better,
    /// What the peer column is (a command, a raw file, a fixed budget or goal).
    pub peer_is: String,
    /// The bar from DESIGN.md, in words (empty when there is none).
    pub goal: String,
    pub ours: Vec<f64>,
    pub peer: Vec<f64>,
}

impl Metric {
    pub fn new(name: &str, unit: &str, better: Better, peer_is: &str, goal: &str) -> Metric {
        Metric {
            name: name.to_string(),
            unit: unit.to_string(),
            better,
            peer_is: peer_is.to_string(),
            goal: goal.to_string(),
            ours: Vec::new(),
            peer: Vec::new(),
        }
    }

    pub fn ours_median(&self) -> f64 {
        median(&self.ours)
    }

    pub fn peer_median(&self) -> f64 {
        median(&self.peer)
    }

    /// ours / peer, on the medians.
    pub fn ratio(&self) -> f64 {
        self.ours_median() / self.peer_median()
    }

    /// The one line scripts grep for.
    pub fn line(&self) -> String {
        format!(
            "BENCH {} ours={} peer={} unit={} ratio={:.3} better={}",
            self.name,
            fmt_num(self.ours_median()),
            fmt_num(self.peer_median()),
            self.unit,
            self.ratio(),
            self.better.as_str()
        )
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "name": self.name,
            "unit": self.unit,
            "better": self.better,
            "peer_is": self.peer_is,
            "goal": self.goal,
            "ours": self.ours_median(),
            "peer": self.peer_median(),
            "ratio": self.ratio(),
            "ours_samples": self.ours,
            "peer_samples": self.peer,
        })
    }
}

/// A metric that could not run, and why.
#[derive(Debug, Clone, Serialize)]
pub struct Skip {
    pub name: String,
    pub reason: String,
}

impl Skip {
    pub fn line(&self) -> String {
        format!("BENCH-SKIP {}: {}", self.name, self.reason)
    }
}

/// Everything one run produced, printed as it arrives and written as JSON at the end.
#[derive(Debug)]
pub struct Report {
    pub metrics: Vec<Metric>,
    pub skipped: Vec<Skip>,
    /// Wall-clock seconds each metric took (set-up included), to keep the whole run in budget.
    took: Vec<(String, f64)>,
    last: std::time::Instant,
}

impl Default for Report {
    fn default() -> Report {
        Report {
            metrics: Vec::new(),
            skipped: Vec::new(),
            took: Vec::new(),
            last: std::time::Instant::now(),
        }
    }
}

impl Report {
    /// Records how long the metric `name` took since the previous one was reported.
    fn lap(&mut self, name: &str) {
        let now = std::time::Instant::now();
        self.took.push((
            name.to_string(),
            now.duration_since(self.last).as_secs_f64(),
        ));
        self.last = now;
    }

    pub fn add(&mut self, m: Metric) {
        self.lap(&m.name);
        println!("{}", m.line());
        if !m.goal.is_empty() || !m.peer_is.is_empty() {
            println!("      peer: {}; goal: {}", m.peer_is, m.goal);
        }
        self.metrics.push(m);
    }

    pub fn skip(&mut self, name: &str, reason: impl Into<String>) {
        let s = Skip {
            name: name.to_string(),
            reason: reason.into(),
        };
        self.lap(name);
        println!("{}", s.line());
        self.skipped.push(s);
    }

    pub fn json(&self, machine: serde_json::Value) -> serde_json::Value {
        serde_json::json!({
            "machine": machine,
            "metrics": self.metrics.iter().map(Metric::json).collect::<Vec<_>>(),
            "skipped": self.skipped,
            "seconds_taken": self.took.iter().map(|(n, t)| serde_json::json!({"name": n, "seconds": t})).collect::<Vec<_>>(),
        })
    }
}

/// The median (mean of the middle two for an even count); NaN for no samples.
pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match (v.get(n / 2), n.checked_sub(1).and_then(|i| v.get(i / 2))) {
        (Some(hi), Some(lo)) if n.is_multiple_of(2) => (hi + lo) / 2.0,
        (Some(mid), _) => *mid,
        _ => f64::NAN,
    }
}

/// Three significant digits or so, without trailing noise.
fn fmt_num(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.4}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_even_and_empty() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn line_has_medians_and_ratio() {
        let mut m = Metric::new("x", "MiB/s", Better::Higher, "cp", "");
        m.ours = vec![100.0, 300.0, 200.0];
        m.peer = vec![400.0, 400.0];
        assert_eq!(
            m.line(),
            "BENCH x ours=200 peer=400 unit=MiB/s ratio=0.500 better=higher"
        );
    }
}
