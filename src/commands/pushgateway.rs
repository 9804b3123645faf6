//! Pushing a run's metrics to a Prometheus Pushgateway (`--push-gateway URL`): the text
//! `metrics` renders for `--format prometheus`, sent to the group of `--push-job` and
//! the storage root (or bucket). A run that ran replaces its group with PUT; a run that
//! could not run POSTs `registry_audit_last_run_success 0` and its error into the same
//! group, so the last success time pushed before stays (the Pushgateway replaces only
//! the metrics a POST names). It renders no metric itself, sends nothing but these two
//! requests to the gateway named on the command line, retries nothing, and never
//! prints the gateway's credentials. A push that fails is an error (exit status 2): the
//! run's result did not reach the monitoring that expects it.

use std::time::Duration;

use ureq::tls::{RootCerts, TlsConfig};

use crate::cli::{PushArgs, SourceArgs};
use crate::output::report::Report;

/// Every error of a push starts with this, so a run that ran but could not push is not
/// taken for a run that could not run (which would push its failure, and fail again).
const PUSH_FAILED: &str = "cannot push the metrics to the Pushgateway";

/// How long one push may take, connection included.
const TIMEOUT: Duration = Duration::from_secs(30);

/// The label the storage root or bucket is pushed under, next to `job`.
pub(crate) const STORAGE_LABEL: &str = "storage";

/// A checked `--push-gateway` and `--push-job`.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Gateway {
    /// `scheme://host[:port][/path]`, without user information or a trailing slash:
    /// what messages show.
    base: String,
    /// `Basic ...` from the URL's user information, if any.
    authorization: Option<String>,
    job: String,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Gateway({}, job {})", self.base, self.job)
    }
}

impl Gateway {
    /// The gateway the flags name, if any; an unusable URL or job is an error that says
    /// what to write instead.
    pub(crate) fn from_args(args: &PushArgs) -> Result<Option<Gateway>, String> {
        let Some(url) = args.push_gateway.as_deref() else {
            return Ok(None);
        };
        let unusable = |why: &str| {
            format!(
                "--push-gateway {}: {why}",
                crate::finding::terminal_safe(&without_userinfo(url))
            )
        };
        let (scheme, rest) = url
            .split_once("://")
            .filter(|(s, _)| matches!(*s, "http" | "https"))
            .ok_or_else(|| unusable("give the gateway's http:// or https:// URL"))?;
        let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        let (userinfo, host) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        if host.is_empty() || host.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(unusable("the URL names no host"));
        }
        if path.contains(['?', '#']) || path.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(unusable(
                "give the gateway's base URL, without a query, and without /metrics/job/...",
            ));
        }
        if path.contains("/metrics/job") {
            return Err(unusable(
                "give the gateway's base URL: the job comes from --push-job, the storage label from the run",
            ));
        }
        let job = args.push_job.trim();
        if job.is_empty() {
            return Err("--push-job must not be empty".into());
        }
        let authorization = userinfo.map(|u| {
            format!(
                "Basic {}",
                crate::registry::client::base64_encode(&percent_decode(u))
            )
        });
        Ok(Some(Gateway {
            base: format!("{scheme}://{host}{}", path.trim_end_matches('/')),
            authorization,
            job: job.to_string(),
        }))
    }

    /// The URL of the group of this job and `storage`.
    pub(crate) fn group_url(&self, storage: &str) -> String {
        format!(
            "{}/metrics/{}/{}",
            self.base,
            segment("job", &self.job),
            segment(STORAGE_LABEL, storage)
        )
    }

    /// Sends `body` (the text exposition format) with PUT (replace the group) or POST
    /// (replace only the metrics it names).
    fn send(&self, replace_group: bool, storage: &str, body: &str) -> Result<(), String> {
        let failed = |why: String| format!("{PUSH_FAILED} at {}: {why}", self.base);
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(TIMEOUT))
            .user_agent(concat!("registry-audit/", env!("CARGO_PKG_VERSION")))
            .tls_config(
                TlsConfig::builder()
                    .root_certs(RootCerts::PlatformVerifier)
                    .build(),
            )
            .build()
            .into();
        let url = self.group_url(storage);
        let mut request = if replace_group {
            agent.put(&url)
        } else {
            agent.post(&url)
        }
        .header("Content-Type", "text/plain; version=0.0.4; charset=utf-8");
        if let Some(auth) = &self.authorization {
            request = request.header("Authorization", auth);
        }
        let mut response = request.send(body).map_err(|e| failed(e.to_string()))?;
        let status = response.status().as_u16();
        if (200..300).contains(&status) {
            return Ok(());
        }
        // The gateway says why in the body's first line (a metric it finds inconsistent...).
        let why = response
            .body_mut()
            .with_config()
            .limit(4096)
            .read_to_string()
            .unwrap_or_default();
        let why = why.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
        Err(failed(match status {
            401 | 403 => format!(
                "it answered {status}: give credentials in the URL (https://user:password@host)"
            ),
            _ if why.is_empty() => format!("it answered {status}"),
            _ => format!("it answered {status}: {}", why.trim()),
        }))
    }
}

/// A URL as messages may show it: without `user:password@`.
fn without_userinfo(url: &str) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme, rest)) => (format!("{scheme}://"), rest),
        None => (String::new(), url),
    };
    let end = rest.find('/').unwrap_or(rest.len());
    match rest[..end].rsplit_once('@') {
        Some((_, host)) => format!("{scheme}{host}{}", &rest[end..]),
        None => url.to_string(),
    }
}

/// `%XX` sequences of URL user information decoded (a password may hold `@` or `:`).
fn percent_decode(text: &str) -> Vec<u8> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    out
}

/// One `name/value` pair of a grouping key. A value that is empty or holds anything but
/// letters, digits and `-._~` (a `/` above all: a storage root is a path) goes as
/// `name@base64/<base64url>`, the Pushgateway's convention; an empty one as `=`.
pub(crate) fn segment(name: &str, value: &str) -> String {
    let plain = !value.is_empty()
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'))
        && value != "."
        && value != "..";
    if plain {
        return format!("{name}/{value}");
    }
    if value.is_empty() {
        return format!("{name}@base64/=");
    }
    let url_safe: String = crate::registry::client::base64_encode(value.as_bytes())
        .chars()
        .filter(|&c| c != '=')
        .map(|c| match c {
            '+' => '-',
            '/' => '_',
            c => c,
        })
        .collect();
    format!("{name}@base64/{url_safe}")
}

/// Checks the push flags before the run, so a wrong URL is known before an hour of
/// hashing. Shard runs do not push: each would replace the others' group; the merged
/// report is pushed instead.
pub(crate) fn preflight(args: &PushArgs, shard: Option<&str>) -> Result<(), String> {
    if Gateway::from_args(args)?.is_some() && shard.is_some() {
        return Err("--push-gateway with --shard: push the merged report instead (registry-audit merge ... --push-gateway URL)".into());
    }
    Ok(())
}

/// Pushes the metrics of a run that ran (what `--format prometheus` writes), replacing
/// the group of the job and the report's storage.
pub(crate) fn push_report(args: &PushArgs, report: &Report) -> Result<(), String> {
    let Some(gateway) = Gateway::from_args(args)? else {
        return Ok(());
    };
    let text = crate::output::metrics::render(report);
    gateway.send(true, &report.source.storage_root, &text)?;
    tracing::info!(
        "metrics pushed to {}",
        gateway.group_url(&report.source.storage_root)
    );
    Ok(())
}

/// Runs a command that can push (check, gc, probe, merge): checks the push flags first,
/// and when the run could not run (exit status 2, for another reason than the push
/// itself), pushes `registry_audit_last_run_success 0` with the error into the group
/// of `storage()`. That push failing too is a warning: the run's own error is what the
/// exit status reports.
pub(crate) fn around(
    args: &PushArgs,
    shard: Option<&str>,
    storage: impl FnOnce() -> String,
    run: impl FnOnce() -> Result<u8, String>,
) -> Result<u8, String> {
    let result = preflight(args, shard).and_then(|()| run());
    if let Err(message) = &result
        && !message.starts_with(PUSH_FAILED)
        && let Ok(Some(gateway)) = Gateway::from_args(args)
    {
        let text = crate::output::metrics::render_failure(None, message);
        if let Err(e) = gateway.send(false, &storage(), &text) {
            tracing::warn!("{e}");
        }
    }
    result
}

/// The storage label of a run that could not run: the storage its flags or config
/// name, as its report would give it; the flag as given when the config cannot be read;
/// empty when nothing says.
pub(crate) fn storage_of(source: &SourceArgs) -> String {
    match crate::settings::Source::resolve(source, None, crate::settings::Want::Nothing) {
        Ok(s) => s.storage.describe(),
        Err(_) => source
            .root
            .as_ref()
            .map(|r| r.display().to_string())
            .or_else(|| source.storage.clone())
            .unwrap_or_default(),
    }
}

/// The storage label of a `probe` that could not run.
pub(crate) fn storage_of_probe(args: &crate::cli::ProbeArgs) -> String {
    storage_of(&args.source_args())
}

/// The storage label of a `merge` that could not run: the storage root of the first
/// report that can be read, else empty.
pub(crate) fn storage_of_reports(reports: &[std::path::PathBuf]) -> String {
    reports
        .iter()
        .find_map(|p| {
            let bytes = crate::files::read("report", p, crate::files::MAX_REPORT_BYTES).ok()?;
            let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
            v["source"]["storage_root"].as_str().map(str::to_string)
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(url: &str) -> PushArgs {
        PushArgs {
            push_gateway: Some(url.into()),
            push_job: "registry-audit".into(),
        }
    }

    #[test]
    fn grouping_values_with_a_slash_go_as_base64url() {
        assert_eq!(segment("job", "registry-audit"), "job/registry-audit");
        assert_eq!(
            segment("storage", "/var/lib/registry"),
            "storage@base64/L3Zhci9saWIvcmVnaXN0cnk"
        );
        assert_eq!(segment("storage", ""), "storage@base64/=");
        assert_eq!(segment("storage", ".."), "storage@base64/Li4");
        // base64url: `-` and `_`, never `+` or `/`.
        assert_eq!(segment("s", "s3://b/\u{ff}?>"), "s@base64/czM6Ly9iL8O_Pz4");
    }

    #[test]
    fn urls_are_checked_and_credentials_kept_out_of_messages() {
        let g = Gateway::from_args(&args("https://ops:p%40ss@push.example:9091/gw/"))
            .expect("ok")
            .expect("some");
        assert_eq!(
            g.group_url("/srv"),
            "https://push.example:9091/gw/metrics/job/registry-audit/storage@base64/L3Nydg"
        );
        assert_eq!(
            g.authorization.as_deref(),
            Some(
                format!(
                    "Basic {}",
                    crate::registry::client::base64_encode(b"ops:p@ss")
                )
                .as_str()
            )
        );
        assert!(!format!("{g:?}").contains("p%40ss"));
        for bad in [
            "push.example:9091",
            "ftp://push.example",
            "http://",
            "http://h/metrics/job/x",
            "http://h/?q=1",
        ] {
            let e = Gateway::from_args(&args(bad)).expect_err(bad);
            assert!(e.starts_with("--push-gateway"), "{e}");
        }
        for bad in [
            "ftp://ops:secret@h",
            "ops:secret@h:9091",
            "http://ops:secret@/x",
        ] {
            let e = Gateway::from_args(&args(bad)).expect_err(bad);
            assert!(!e.contains("secret"), "{e}");
        }
        let mut empty_job = args("http://h:1");
        empty_job.push_job = " ".into();
        assert!(Gateway::from_args(&empty_job).is_err());
        assert_eq!(Gateway::from_args(&PushArgs::default()), Ok(None));
    }

    #[test]
    fn shard_runs_do_not_push() {
        assert!(preflight(&args("http://h:1"), Some("1/2")).is_err());
        assert!(preflight(&args("http://h:1"), None).is_ok());
        assert!(preflight(&PushArgs::default(), Some("1/2")).is_ok());
    }
}
