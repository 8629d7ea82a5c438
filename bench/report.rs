//! Percentiles, medians over rounds, and the tables the harness prints (Markdown, so
//! they paste into BENCHMARKS.md as they are).

use serde_json::{Value, json};

/// Latency percentiles of one run, in milliseconds.
#[derive(Debug, Clone, Copy, Default)]
pub struct Summary {
    /// Samples.
    pub n: usize,
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Largest sample.
    pub max: f64,
}

impl Summary {
    /// Percentiles of samples given in nanoseconds (nearest-rank).
    pub fn of_ns(mut samples: Vec<u64>) -> Self {
        if samples.is_empty() {
            return Self::default();
        }
        samples.sort_unstable();
        let at = |q: f64| {
            let rank = ((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len());
            samples[rank - 1] as f64 / 1e6
        };
        Self {
            n: samples.len(),
            p50: at(0.50),
            p99: at(0.99),
            p999: at(0.999),
            max: samples[samples.len() - 1] as f64 / 1e6,
        }
    }

    /// The median of each field over several runs.
    pub fn median_of(runs: &[Summary]) -> Self {
        Self {
            n: runs.iter().map(|s| s.n).sum(),
            p50: median(runs.iter().map(|s| s.p50)),
            p99: median(runs.iter().map(|s| s.p99)),
            p999: median(runs.iter().map(|s| s.p999)),
            max: median(runs.iter().map(|s| s.max)),
        }
    }

    /// As JSON (milliseconds).
    pub fn json(&self) -> Value {
        json!({"n": self.n, "p50_ms": round(self.p50, 4), "p99_ms": round(self.p99, 4),
               "p999_ms": round(self.p999, 4), "max_ms": round(self.max, 4)})
    }
}

/// The median of some numbers (NaN when there are none; NaNs are ignored).
pub fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.filter(|x| !x.is_nan()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    }
}

/// Rounds to `digits` decimals (for JSON).
pub fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

/// A number for a table cell: 3 significant-ish digits, `–` for NaN.
pub fn num(x: f64) -> String {
    if x.is_nan() || x.is_infinite() {
        "–".into()
    } else if x.abs() >= 1000.0 {
        format!("{x:.0}")
    } else if x.abs() >= 100.0 {
        format!("{x:.1}")
    } else if x.abs() >= 1.0 {
        format!("{x:.2}")
    } else {
        format!("{x:.3}")
    }
}

/// A ratio cell like `0.42×`.
pub fn ratio(a: f64, b: f64) -> String {
    if b == 0.0 || a.is_nan() || b.is_nan() {
        "–".into()
    } else {
        format!("{:.2}×", a / b)
    }
}

/// A printable table.
pub struct Table {
    /// Heading printed above it.
    pub title: String,
    /// Column names.
    pub header: Vec<String>,
    /// Cells.
    pub rows: Vec<Vec<String>>,
}

impl Table {
    /// An empty table.
    pub fn new(title: impl Into<String>, header: &[&str]) -> Self {
        Self {
            title: title.into(),
            header: header.iter().map(|h| (*h).to_string()).collect(),
            rows: Vec::new(),
        }
    }

    /// Appends a row.
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// Markdown with aligned columns.
    pub fn render(&self) -> String {
        let cols = self.header.len();
        let mut width: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate().take(cols) {
                width[i] = width[i].max(cell.chars().count());
            }
        }
        let line = |cells: &[String]| {
            let mut s = String::from("|");
            for (i, w) in width.iter().enumerate() {
                let cell = cells.get(i).map_or("", String::as_str);
                let pad = w.saturating_sub(cell.chars().count());
                s.push(' ');
                s.push_str(cell);
                s.push_str(&" ".repeat(pad));
                s.push_str(" |");
            }
            s
        };
        let mut out = format!("### {}\n\n", self.title);
        out.push_str(&line(&self.header));
        out.push('\n');
        out.push('|');
        for w in &width {
            out.push_str(&"-".repeat(w + 2));
            out.push('|');
        }
        out.push('\n');
        for row in &self.rows {
            out.push_str(&line(row));
            out.push('\n');
        }
        out
    }
}

/// One scenario's printed tables, notes and JSON.
pub struct Section {
    /// Scenario name (the JSON key).
    pub name: &'static str,
    /// Tables to print.
    pub tables: Vec<Table>,
    /// Remarks printed under the tables (skips, caveats).
    pub notes: Vec<String>,
    /// Machine-readable results.
    pub json: Value,
}

impl Section {
    /// An empty section.
    pub fn new(name: &'static str) -> Self {
        Self {
            name,
            tables: Vec::new(),
            notes: Vec::new(),
            json: json!({}),
        }
    }

    /// Prints the section to stdout.
    pub fn print(&self) {
        println!("\n## {}\n", self.name);
        for t in &self.tables {
            println!("{}", t.render());
        }
        for n in &self.notes {
            println!("- {n}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let s = Summary::of_ns((1..=1000).map(|i| i * 1_000_000).collect());
        assert_eq!(s.p50, 500.0);
        assert_eq!(s.p99, 990.0);
        assert_eq!(s.p999, 999.0);
        assert_eq!(s.max, 1000.0);
        assert_eq!(median([3.0, 1.0, 2.0].into_iter()), 2.0);
    }
}
