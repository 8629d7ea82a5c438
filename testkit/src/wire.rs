//! The daemon's names and formats as a client sees them.
//!
//! Written down here independently of the daemon's own constants (this crate does not
//! depend on `citapulse`), so a rename on the server side breaks the tests and the
//! bench instead of silently following along.

/// The channel carrying `tenant`'s events and statistics: `estadisticas:<tenant>`.
pub fn stats_channel(tenant: &str) -> String {
    format!("estadisticas:{tenant}")
}

/// Sums every sample of `name` (any labels) in Prometheus text.
pub fn metric_value(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        // Not `sum()`: an empty float sum is -0.0, which would print as "-0".
        .fold(0.0, |a, b| a + b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_values_sum_over_labels_and_skip_prefixes() {
        let text =
            "# HELP x_total x\nx_total{a=\"1\"} 2\nx_total{a=\"2\"} 3\nx_total_more 7\nx_total 1\n";
        assert_eq!(metric_value(text, "x_total"), 6.0);
        assert_eq!(metric_value(text, "absent"), 0.0);
    }

    #[test]
    fn channel_names() {
        assert_eq!(stats_channel("negocio_1"), "estadisticas:negocio_1");
    }
}
