//! What a bench run found: every sample of every series, grouped by scenario, plus the notes
//! that explain them. The report writer, the chart and the JSON file all read this.

use serde::Serialize;

use super::stats::{self, Summary};

/// One backend's samples of one metric.
#[derive(Debug, Clone, Serialize)]
pub struct Series {
    /// Names the runtime and what ran the guest, e.g. `husk (qemu/TCG)`, `runc`.
    pub backend: String,
    pub samples: Vec<f64>,
}

impl Series {
    pub fn summary(&self) -> Option<Summary> {
        stats::summarize(&self.samples)
    }
}

/// One line of comparison: husk's series and, where there is one, the baseline's.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub metric: String,
    /// `ms`, `MiB`, `threads`, …
    pub unit: String,
    pub husk: Series,
    pub baseline: Option<Series>,
}

impl Row {
    /// husk's median over the baseline's, when both exist and the baseline is not zero.
    pub fn ratio(&self) -> Option<f64> {
        let h = self.husk.summary()?.median;
        let b = self.baseline.as_ref()?.summary()?.median;
        (b != 0.0).then(|| h / b)
    }
}

/// A numbered scenario of issue 6.
#[derive(Debug, Clone, Serialize)]
pub struct Scenario {
    pub number: u32,
    pub title: String,
    /// What was run, in one or two sentences.
    pub method: String,
    pub rows: Vec<Row>,
    /// Findings: targets met or missed (and by how much), where the time goes.
    pub notes: Vec<String>,
}

impl Scenario {
    pub fn new(number: u32, title: &str, method: impl Into<String>) -> Self {
        Self {
            number,
            title: title.into(),
            method: method.into(),
            rows: Vec::new(),
            notes: Vec::new(),
        }
    }
}

/// The whole run.
#[derive(Debug, Clone, Serialize)]
pub struct Results {
    /// UTC, `YYYY-MM-DD HH:MM`.
    pub date: String,
    pub machine: String,
    pub quick: bool,
    /// The scenarios `--only` asked for (empty: all).
    pub only: Vec<u32>,
    /// Other compilers or benchmarks seen running while this one ran.
    pub load_note: String,
    pub scenarios: Vec<Scenario>,
    /// Scenarios of the issue that this run does not measure, with the reason.
    pub not_done: Vec<String>,
}

/// An error message on one line, for a Markdown list item.
pub fn one_line(s: &str) -> String {
    s.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ⏎ ")
}
