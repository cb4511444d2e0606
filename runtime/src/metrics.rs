//! Prometheus metrics of a batch run, pushed to a Pushgateway when the run ends.
//!
//! A batch run does not live long enough to be scraped, so it pushes: every metric of the
//! run to the group `job=weir, pipeline=P, partition=X` (replacing the previous run's), and
//! on success only, `weir_last_success_timestamp_seconds` to its own group
//! (`job=weir_success`), so a failed run never erases when the partition last succeeded:
//! the metric an "analysts expect data by 8am" alert watches. Values are the last run's
//! (gauges), as a pushed batch job's metrics are.
//!
//! A Pushgateway that is down never fails the run; it is logged.

use std::fmt::Write as _;
use std::time::Duration;

use base64::Engine as _;

use crate::engine::RunSummary;

/// The pipeline file's `[metrics]` table (or `WEIR_PUSHGATEWAY_URL`).
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// `http://host:9091`.
    pub pushgateway: String,
    pub timeout: Duration,
}

impl Config {
    pub fn check_url(url: &str) -> Result<(), String> {
        if url.starts_with("http://") {
            Ok(())
        } else if url.starts_with("https://") {
            Err(format!(
                "`{url}`: this weir pushes over http only (no TLS is built in); use the Pushgateway's http:// address on a trusted network"
            ))
        } else {
            Err(format!("`{url}` is not an http:// URL of a Pushgateway; write it as http://HOST:9091"))
        }
    }
}

/// One sample of a gauge.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: &'static str,
    pub help: &'static str,
    /// `gauge` or `counter`.
    pub kind: &'static str,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

/// The samples of one run, in the order they were taken.
struct Text {
    samples: Vec<Sample>,
}

impl Text {
    fn new() -> Text {
        Text { samples: Vec::new() }
    }

    fn sample(&mut self, name: &'static str, help: &'static str, labels: &[(&str, &str)], value: f64) {
        let labels = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        self.samples.push(Sample { name, help, kind: "gauge", labels, value });
    }
}

/// The text exposition format: each metric's HELP and TYPE once, its samples together.
pub fn render(samples: &[Sample]) -> String {
    let mut names: Vec<&'static str> = Vec::new();
    for s in samples {
        if !names.contains(&s.name) {
            names.push(s.name);
        }
    }
    let mut out = String::new();
    for name in names {
        let mut first = true;
        for s in samples.iter().filter(|s| s.name == name) {
            if first {
                let _ = writeln!(out, "# HELP {name} {}\n# TYPE {name} {}", s.help, s.kind);
                first = false;
            }
            let labels: Vec<String> = s.labels.iter().map(|(k, v)| format!("{k}=\"{}\"", escape(v))).collect();
            let _ = writeln!(out, "{name}{{{}}} {}", labels.join(","), s.value);
        }
    }
    out
}

/// A label value as the text format wants it.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn now_secs() -> f64 {
    crate::store::now_ms() as f64 / 1000.0
}

/// The metrics of a run as exposition text.
pub fn run_metrics(pipeline: &str, outcome: Result<&RunSummary, &crate::Error>, seconds: f64) -> String {
    render(&run_samples(pipeline, outcome, seconds))
}

/// The metrics of a run: its summary when it succeeded, else the error's kind (and the
/// plugin the host stopped, if it did).
pub fn run_samples(pipeline: &str, outcome: Result<&RunSummary, &crate::Error>, seconds: f64) -> Vec<Sample> {
    let mut t = Text::new();
    let p = [("pipeline", pipeline)];
    let ok = outcome.is_ok();
    t.sample("weir_run_success", "1 if the last run succeeded, else 0", &p, if ok { 1.0 } else { 0.0 });
    t.sample("weir_run_duration_seconds", "wall time of the last run", &p, seconds);
    t.sample("weir_last_run_timestamp_seconds", "when the last run ended (Unix time)", &p, now_secs());
    match outcome {
        Err(e) => {
            let kind = match e.kind() {
                crate::ErrorKind::User => "user",
                crate::ErrorKind::External => "external",
                crate::ErrorKind::Internal => "internal",
            };
            let blocked = matches!(e, crate::Error::CheckFailed { .. });
            t.sample(
                "weir_run_failed",
                "1 if the last run failed, by who has to act (user, external, internal)",
                &[("pipeline", pipeline), ("kind", kind)],
                1.0,
            );
            t.sample(
                "weir_run_blocked_by_check",
                "1 if a blocking quality check failed the last run",
                &p,
                if blocked { 1.0 } else { 0.0 },
            );
            if let crate::Error::Plugin(f) = e {
                if let Some(k) = &f.kill {
                    t.sample(
                        "weir_plugin_killed",
                        "1 if the host stopped the plugin in the last run: deadline (timeout_ms), memory (memory_mb) or output_budget",
                        &[("pipeline", pipeline), ("step", &f.step), ("plugin", &k.plugin), ("reason", k.reason)],
                        1.0,
                    );
                }
            }
        }
        Ok(s) => {
            t.sample("weir_run_blocked_by_check", "1 if a blocking quality check failed the last run", &p, 0.0);
            for step in &s.steps {
                // the dataset the step writes (its output path; empty for a step without one)
                let dataset = step.output.as_ref().map(|o| o.display().to_string()).unwrap_or_default();
                let l = [("pipeline", pipeline), ("step", step.name.as_str()), ("dataset", dataset.as_str())];
                t.sample("weir_step_rows_read", "rows the step read in the last run", &l, step.rows_read as f64);
                t.sample("weir_step_rows_written", "rows the step wrote in the last run", &l, step.rows_written as f64);
                t.sample("weir_step_rows_skipped", "bad rows skipped (on_error = skip)", &l, step.rows_skipped as f64);
                t.sample("weir_step_rows_quarantined", "rows moved to quarantine", &l, step.rows_quarantined as f64);
                t.sample("weir_step_duration_seconds", "wall time of the step", &l, step.seconds);
                t.sample("weir_step_bytes_written", "bytes of the step's output files", &l, step.bytes_written as f64);
                t.sample(
                    "weir_step_attempts",
                    "attempts the step took (retries after transient failures)",
                    &l,
                    f64::from(step.attempts),
                );
                // a plugin used twice in a step: one sample, summed (the Pushgateway refuses
                // a push with the same series twice)
                let mut per_plugin: Vec<(&str, crate::plugin::CallTimings)> = Vec::new();
                for pt in &step.timings.plugins {
                    match per_plugin.iter_mut().find(|(p, _)| *p == pt.plugin) {
                        Some((_, t)) => t.add(&pt.calls),
                        None => per_plugin.push((pt.plugin.as_str(), pt.calls)),
                    }
                }
                for (plugin, c) in &per_plugin {
                    let l = [("pipeline", pipeline), ("step", step.name.as_str()), ("plugin", plugin)];
                    t.sample("weir_plugin_calls", "calls into the plugin in the last run", &l, c.calls as f64);
                    let secs = c.host_encode
                        + c.copy_in
                        + c.guest_decode
                        + c.guest_compute
                        + c.guest_encode
                        + c.guest_unsplit
                        + c.copy_out
                        + c.host_decode;
                    t.sample("weir_plugin_call_seconds", "time in and around the plugin's calls", &l, secs);
                    t.sample("weir_plugin_bytes_in", "bytes handed to the plugin", &l, c.bytes_in as f64);
                    t.sample(
                        "weir_plugin_peak_memory_bytes",
                        "the most linear memory one instance of the plugin grew to",
                        &l,
                        c.peak_memory_bytes as f64,
                    );
                }
                for c in &step.checks {
                    let l = [
                        ("pipeline", pipeline),
                        ("step", step.name.as_str()),
                        ("check", c.check.as_str()),
                        ("severity", c.severity.as_str()),
                    ];
                    t.sample(
                        "weir_check_passed",
                        "1 if the check passed in the last run",
                        &l,
                        f64::from(u8::from(c.passed)),
                    );
                    t.sample("weir_check_failing_rows", "rows the check found failing", &l, c.failing_rows as f64);
                }
            }
        }
    }
    t.samples
}

/// The success timestamp, pushed to its own group.
pub fn success_metrics(pipeline: &str) -> String {
    let mut t = Text::new();
    t.sample(
        "weir_last_success_timestamp_seconds",
        "when the pipeline (and partition) last ran successfully (Unix time)",
        &[("pipeline", pipeline)],
        now_secs(),
    );
    render(&t.samples)
}

/// `/metrics/job/JOB/pipeline@base64/..../partition@base64/...`: label values in URL-safe
/// base64, so any partition name (slashes included) is one path segment.
pub fn group_path(job: &str, pipeline: &str, partition: Option<&str>) -> String {
    let b = |v: &str| {
        if v.is_empty() {
            // the Pushgateway's spelling of an empty value
            "=".to_string()
        } else {
            base64::engine::general_purpose::URL_SAFE.encode(v)
        }
    };
    format!("/metrics/job/{job}/pipeline@base64/{}/partition@base64/{}", b(pipeline), b(partition.unwrap_or("")))
}

/// Push a run's metrics (PUT: the group holds the last run's alone). Returns what went
/// wrong, for the caller to log; never fails the run.
pub fn push(config: &Config, pipeline: &str, partition: Option<&str>, run: &str, success: bool) -> Result<(), String> {
    let c = ureq::Agent::config_builder().timeout_global(Some(config.timeout)).http_status_as_error(false).build();
    let agent = ureq::Agent::new_with_config(c);
    let base = config.pushgateway.trim_end_matches('/');
    let mut groups = vec![(group_path("weir", pipeline, partition), run.to_string())];
    if success {
        groups.push((group_path("weir_success", pipeline, partition), success_metrics(pipeline)));
    }
    for (path, body) in groups {
        let url = format!("{base}{path}");
        match agent.put(&url).header("Content-Type", "text/plain; version=0.0.4").send(&body) {
            Ok(r) if r.status().is_success() => {}
            Ok(r) => {
                let status = r.status();
                let text = r.into_body().read_to_string().unwrap_or_default();
                return Err(format!("{url} answered {status}: {}", text.chars().take(300).collect::<String>()));
            }
            Err(e) => return Err(format!("{url}: {e}")),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped_and_groups_are_base64() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        assert_eq!(
            group_path("weir", "orders", Some("2024/05")),
            "/metrics/job/weir/pipeline@base64/b3JkZXJz/partition@base64/MjAyNC8wNQ=="
        );
        assert_eq!(group_path("weir", "o", None), "/metrics/job/weir/pipeline@base64/bw==/partition@base64/=");
        let text = success_metrics("x\"y");
        assert!(text.contains("weir_last_success_timestamp_seconds{pipeline=\"x\\\"y\"} "), "{text}");
        assert_eq!(text.matches("# TYPE").count(), 1);
        assert!(Config::check_url("https://p").unwrap_err().contains("no TLS"));
    }
}
