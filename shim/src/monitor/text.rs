//! The Prometheus text exposition format (version 0.0.4): `# HELP` and `# TYPE` once per
//! family, then its samples, label values escaped.

use std::fmt::Write;

/// A metric family's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// A family: its name, type and help text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Desc {
    pub name: &'static str,
    pub kind: Kind,
    pub help: &'static str,
}

/// A sample's labels, in order.
type Labels = Vec<(&'static str, String)>;

struct Family {
    desc: Desc,
    /// `(name suffix, labels, value)`.
    samples: Vec<(&'static str, Labels, f64)>,
}

/// An exposition being built: samples may be added in any order; each family is written once,
/// in the order its first sample came.
#[derive(Default)]
pub(crate) struct Exposition {
    families: Vec<Family>,
}

/// `\`, `"` and newline escaped, as a label value needs.
pub(crate) fn escape_label(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

/// A sample value: integers without a fraction, `+Inf`/`-Inf`/`NaN` as the format spells them.
pub(crate) fn format_value(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        format!("{v}")
    }
}

impl Exposition {
    fn family(&mut self, desc: Desc) -> &mut Family {
        let i = match self.families.iter().position(|f| f.desc.name == desc.name) {
            Some(i) => i,
            None => {
                self.families.push(Family {
                    desc,
                    samples: Vec::new(),
                });
                self.families.len() - 1
            }
        };
        &mut self.families[i]
    }

    /// Adds a counter or gauge sample.
    pub fn sample(&mut self, desc: Desc, labels: &[(&'static str, &str)], value: f64) {
        self.add(desc, "", labels, value);
    }

    fn add(
        &mut self,
        desc: Desc,
        suffix: &'static str,
        labels: &[(&'static str, &str)],
        value: f64,
    ) {
        let labels = labels.iter().map(|(k, v)| (*k, (*v).to_string())).collect();
        self.family(desc).samples.push((suffix, labels, value));
    }

    /// Adds a histogram: `bounds[i]` with the count of observations `<= bounds[i]` not counted
    /// in an earlier bucket (`per_bucket`, made cumulative here), the count above the last
    /// bound (`over`), and the sum.
    pub(crate) fn histogram(
        &mut self,
        desc: Desc,
        labels: &[(&'static str, &str)],
        bounds: &[f64],
        per_bucket: &[u64],
        over: u64,
        sum: f64,
    ) {
        let mut cumulative = 0u64;
        for (i, bound) in bounds.iter().enumerate() {
            cumulative += per_bucket.get(i).copied().unwrap_or(0);
            let le = format_value(*bound);
            let mut l: Vec<(&'static str, &str)> = labels.to_vec();
            l.push(("le", &le));
            self.add(desc, "_bucket", &l, count_value(cumulative));
        }
        cumulative += over;
        let mut l: Vec<(&'static str, &str)> = labels.to_vec();
        l.push(("le", "+Inf"));
        self.add(desc, "_bucket", &l, count_value(cumulative));
        self.add(desc, "_sum", labels, sum);
        self.add(desc, "_count", labels, count_value(cumulative));
    }

    /// The text, ready to serve.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for f in &self.families {
            let _ = writeln!(out, "# HELP {} {}", f.desc.name, escape_help(f.desc.help));
            let _ = writeln!(out, "# TYPE {} {}", f.desc.name, f.desc.kind.as_str());
            for (suffix, labels, value) in &f.samples {
                out.push_str(f.desc.name);
                out.push_str(suffix);
                if !labels.is_empty() {
                    out.push('{');
                    for (i, (k, v)) in labels.iter().enumerate() {
                        if i > 0 {
                            out.push(',');
                        }
                        let _ = write!(out, "{k}=\"{}\"", escape_label(v));
                    }
                    out.push('}');
                }
                let _ = writeln!(out, " {}", format_value(*value));
            }
        }
        out
    }
}

/// A count as a sample value (exact below 2^53, which no counter here reaches).
#[allow(clippy::cast_precision_loss)]
pub(crate) fn count_value(n: u64) -> f64 {
    n as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    const UP: Desc = Desc {
        name: "husk_test_up",
        kind: Kind::Gauge,
        help: "Whether it is up.\nSecond line \\ backslash.",
    };
    const CALLS: Desc = Desc {
        name: "husk_test_call_duration_seconds",
        kind: Kind::Histogram,
        help: "Call latency.",
    };

    #[test]
    fn families_are_written_once_with_help_type_and_escaped_labels() {
        let mut e = Exposition::default();
        e.sample(UP, &[("sandbox", "a")], 1.0);
        e.histogram(CALLS, &[("sandbox", "a")], &[0.1, 1.0], &[2, 1], 1, 2.75);
        e.sample(UP, &[("sandbox", "b\"q\\\n")], 0.0);
        e.sample(
            Desc {
                name: "husk_test_bytes_total",
                kind: Kind::Counter,
                help: "Bytes.",
            },
            &[],
            12345678901.0,
        );
        assert_eq!(
            e.render(),
            "# HELP husk_test_up Whether it is up.\\nSecond line \\\\ backslash.\n\
             # TYPE husk_test_up gauge\n\
             husk_test_up{sandbox=\"a\"} 1\n\
             husk_test_up{sandbox=\"b\\\"q\\\\\\n\"} 0\n\
             # HELP husk_test_call_duration_seconds Call latency.\n\
             # TYPE husk_test_call_duration_seconds histogram\n\
             husk_test_call_duration_seconds_bucket{sandbox=\"a\",le=\"0.1\"} 2\n\
             husk_test_call_duration_seconds_bucket{sandbox=\"a\",le=\"1\"} 3\n\
             husk_test_call_duration_seconds_bucket{sandbox=\"a\",le=\"+Inf\"} 4\n\
             husk_test_call_duration_seconds_sum{sandbox=\"a\"} 2.75\n\
             husk_test_call_duration_seconds_count{sandbox=\"a\"} 4\n\
             # HELP husk_test_bytes_total Bytes.\n\
             # TYPE husk_test_bytes_total counter\n\
             husk_test_bytes_total 12345678901\n"
        );
    }

    #[test]
    fn special_values() {
        assert_eq!(format_value(f64::INFINITY), "+Inf");
        assert_eq!(format_value(f64::NEG_INFINITY), "-Inf");
        assert_eq!(format_value(f64::NAN), "NaN");
        assert_eq!(format_value(0.0005), "0.0005");
        assert_eq!(format_value(3.0), "3");
    }
}
