//! The report as Prometheus metrics, in the node_exporter textfile format, and the
//! failure metrics a run that could not run still writes (`write_failure`), through
//! `files::write_output`, which replaces the file atomically.

use std::fmt::Write as _;
use std::path::Path;

use crate::finding::{Kind, Severity};
use crate::output::report::Report;

const PREFIX: &str = "registry_audit";

struct Out(String);

impl Out {
    fn family(&mut self, name: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {PREFIX}_{name} {help}");
        let _ = writeln!(self.0, "# TYPE {PREFIX}_{name} gauge");
    }
    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        let _ = write!(self.0, "{PREFIX}_{name}");
        if !labels.is_empty() {
            let inner: Vec<String> = labels
                .iter()
                .map(|(k, v)| format!("{k}=\"{}\"", escape_label(v)))
                .collect();
            let _ = write!(self.0, "{{{}}}", inner.join(","));
        }
        let _ = writeln!(self.0, " {}", number(value));
    }
    fn gauge(&mut self, name: &str, help: &str, value: f64) {
        self.family(name, help);
        self.sample(name, &[], value);
    }
}

fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn number(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

fn now_seconds() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs() as f64)
}

/// When the last run ended, whether it could run, and when one last could.
fn run_outcome(o: &mut Out, success: bool, last_success: Option<f64>) {
    o.gauge(
        "last_run_timestamp_seconds",
        "When the last run ended.",
        now_seconds(),
    );
    o.gauge(
        "last_run_success",
        "1 when the last run could run (exit 0 or 1), 0 when it could not (exit 2).",
        if success { 1.0 } else { 0.0 },
    );
    if let Some(t) = last_success {
        o.gauge(
            "last_success_timestamp_seconds",
            "When a run last could run.",
            t,
        );
    }
}

/// Every metric of a run that ran (exit 0 or 1).
pub(crate) fn render(report: &Report) -> String {
    let mut o = Out(String::new());
    let s = &report.summary;
    o.family("findings", "Findings of the last run by kind and severity.");
    for kind in Kind::ALL {
        for severity in [Severity::Error, Severity::Warning] {
            let n = report
                .findings
                .iter()
                .filter(|f| f.kind == kind && f.severity == severity)
                .count();
            o.sample(
                "findings",
                &[("kind", kind.name()), ("severity", severity.name())],
                n as f64,
            );
        }
    }
    o.gauge(
        "live_findings",
        "Findings about cache entries the registry serves as hits (clients are misled).",
        s.live as f64,
    );
    o.gauge(
        "keys_scanned",
        "Registry-shaped cache keys read.",
        s.keys_scanned as f64,
    );
    o.gauge(
        "set_members_scanned",
        "Members of repository sets read.",
        s.set_members_scanned as f64,
    );
    o.gauge(
        "blobs_checked",
        "Distinct blobs checked against storage.",
        s.blobs_checked as f64,
    );
    o.gauge(
        "blobs_absent",
        "Blobs the cache names that storage does not have.",
        s.blobs_absent as f64,
    );
    o.gauge(
        "blobs_hashed",
        "Blobs re-hashed in the last run.",
        s.hashing.blobs_hashed as f64,
    );
    o.gauge(
        "blobs_trusted",
        "Blobs not re-hashed because the state file vouches for them.",
        s.hashing.blobs_trusted as f64,
    );
    o.gauge(
        "blobs_not_reached",
        "Blobs not re-hashed because --max-duration ran out.",
        s.hashing.blobs_not_reached as f64,
    );
    o.gauge(
        "bytes_hashed",
        "Bytes re-hashed in the last run.",
        s.bytes_hashed as f64,
    );
    o.gauge(
        "duration_seconds",
        "Duration of the last run.",
        report.duration_ms as f64 / 1000.0,
    );
    o.gauge(
        "run_complete",
        "1 when the last run re-hashed everything it selected, 0 when --max-duration stopped it.",
        if report.complete { 1.0 } else { 0.0 },
    );
    run_outcome(&mut o, true, Some(now_seconds()));
    o.family("info", "The tool and command that wrote these metrics.");
    o.sample(
        "info",
        &[
            ("version", report.tool.version.as_str()),
            ("command", report.command.as_str()),
        ],
        1.0,
    );
    o.0
}

/// The metrics of a run that could not run: the failure, and the last success carried
/// over from the previous file so alerts on staleness keep working.
pub(crate) fn render_failure(previous: Option<&str>, message: &str) -> String {
    let mut o = Out(String::new());
    let last_success = previous.and_then(|text| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{PREFIX}_last_success_timestamp_seconds ")))
            .and_then(|v| v.trim().parse::<f64>().ok())
    });
    run_outcome(&mut o, false, last_success);
    o.family(
        "last_error",
        "The last run's error (the label), 1 while it stands.",
    );
    let short: String = message.chars().take(200).collect();
    o.sample("last_error", &[("message", &short)], 1.0);
    o.0
}

/// Writes the failure metrics to `path`, atomically, keeping the last success time.
/// The previous file is read only if it is a regular file within
/// `files::MAX_METRICS_BYTES`; a special file is never read nor replaced.
pub(crate) fn write_failure(path: &Path, message: &str) -> Result<(), String> {
    let previous = if crate::files::is_stdout(path) {
        None
    } else {
        crate::files::read_to_string("metrics file", path, crate::files::MAX_METRICS_BYTES).ok()
    };
    let text = render_failure(previous.as_deref(), message);
    crate::files::write_output(&text, Some(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_keeps_the_last_success() {
        let prev = "registry_audit_last_success_timestamp_seconds 1700000000\n";
        let text = render_failure(Some(prev), "cannot reach \"Redis\"");
        assert!(text.contains("registry_audit_last_success_timestamp_seconds 1700000000\n"));
        assert!(text.contains("registry_audit_last_run_success 0\n"));
        assert!(text.contains("message=\"cannot reach \\\"Redis\\\"\""));
    }
}
