//! `--push-gateway` against the real Prometheus Pushgateway (Debian's
//! `prometheus-pushgateway`) on 127.0.0.1: a run pushes exactly the metrics
//! `--format prometheus` writes, grouped by job and storage root (a path, so the
//! grouping value goes base64-encoded); a run that could not run pushes
//! `last_run_success 0` and keeps the last success time; a failed push is one line on
//! stderr and exit 2, without the gateway's password; `merge` pushes, `--shard` does not.

use crate::common;

use std::collections::BTreeMap;
use std::fs;
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

struct Pushgateway {
    port: u16,
    _proc: Proc,
}

impl Pushgateway {
    fn start() -> Pushgateway {
        let found = std::env::var_os("PATH").is_some_and(|p| {
            std::env::split_paths(&p).any(|d| d.join("prometheus-pushgateway").is_file())
        });
        assert!(
            found,
            "prometheus-pushgateway is not installed: run scripts/test as root (or apt-get install prometheus-pushgateway)"
        );
        for _ in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map(|a| a.port())
                .expect("a free port");
            let mut child = Command::new("prometheus-pushgateway")
                .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start prometheus-pushgateway");
            let url = format!("http://127.0.0.1:{port}/-/ready");
            let mut exited = false;
            wait_until("pushgateway", Duration::from_secs(30), || {
                exited = matches!(child.try_wait(), Ok(Some(_)));
                exited || http_status("GET", &url) == Some(200)
            });
            if !exited {
                return Pushgateway {
                    port,
                    _proc: Proc(child),
                };
            }
        }
        panic!("could not start prometheus-pushgateway");
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The gateway's own exposition: every pushed series with its grouping labels.
    fn scrape(&self) -> Samples {
        let text = ureq::get(&format!("{}/metrics", self.url()))
            .call()
            .expect("GET /metrics")
            .body_mut()
            .read_to_string()
            .expect("body");
        samples(&text)
    }
}

/// (name, labels) -> value, of every sample of a text exposition.
type Samples = BTreeMap<(String, BTreeMap<String, String>), String>;

fn samples(text: &str) -> Samples {
    let mut out = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (series, value) = line.rsplit_once(' ').expect("value");
        let (name, mut rest) = match series.split_once('{') {
            Some((n, r)) => (n, r.strip_suffix('}').expect("labels")),
            None => (series, ""),
        };
        let mut labels = BTreeMap::new();
        while let Some((label, after)) = rest.split_once("=\"") {
            let mut value = String::new();
            let mut chars = after.char_indices();
            let mut end = after.len();
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => match chars.next() {
                        Some((_, 'n')) => value.push('\n'),
                        Some((_, c)) => value.push(c),
                        None => {}
                    },
                    '"' => {
                        end = i;
                        break;
                    }
                    c => value.push(c),
                }
            }
            labels.insert(label.to_string(), value);
            rest = after[end + 1..].trim_start_matches(',');
        }
        out.insert((name.to_string(), labels), value.to_string());
    }
    out
}

/// The registry_audit_* samples the gateway holds for one group, without the grouping
/// labels (and the empty `instance` the gateway adds).
fn group(all: &Samples, job: &str, storage: &str) -> Samples {
    all.iter()
        .filter(|((name, labels), _)| {
            name.starts_with("registry_audit_")
                && labels.get("job").map(String::as_str) == Some(job)
                && labels.get("storage").map(String::as_str) == Some(storage)
        })
        .map(|((name, labels), v)| {
            let mut labels = labels.clone();
            labels.remove("job");
            labels.remove("storage");
            if labels.get("instance").is_some_and(String::is_empty) {
                labels.remove("instance");
            }
            ((name.clone(), labels), v.clone())
        })
        .collect()
}

fn value(s: &Samples, name: &str) -> Option<f64> {
    s.get(&(format!("registry_audit_{name}"), BTreeMap::new()))
        .and_then(|v| v.parse().ok())
}

/// A storage root with two blobs, both cached in Redis, one of them deleted: two live
/// phantoms (its global descriptor and its repository entry).
fn populated(tag: &str) -> (Store, Redis) {
    let store = Store::new(tag);
    let redis = Redis::start();
    let mut c = redis.conn();
    for i in 0..2u64 {
        let content = bytes(i + 11, 5_000);
        let d = store.blob("team/app", &content);
        cache(&mut c, "team/app", &d, content.len());
        if i == 0 {
            fs::remove_file(store.data_path(&d)).expect("rm");
        }
    }
    (store, redis)
}

#[test]
fn check_pushes_what_format_prometheus_writes_and_a_failure_keeps_the_last_success() {
    let gw = Pushgateway::start();
    let (store, redis) = populated("push");
    let (root, url, gateway) = (store.root(), redis.url(), gw.url());
    let textfile = store.dir.path("registry_audit.prom");
    let t = textfile.display().to_string();
    let (code, out, err) = run_tool(&[
        "check",
        "--root",
        &root,
        "--redis",
        &url,
        "--format",
        "prometheus",
        "--output",
        &t,
        "--push-gateway",
        &gateway,
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(out.is_empty(), "{out}");
    let written = samples(&fs::read_to_string(&textfile).expect("textfile"));
    // The storage root is a path: its grouping value went base64-encoded and came back whole.
    let pushed = group(&gw.scrape(), "registry-audit", &root);
    let keys = |s: &Samples| s.keys().cloned().collect::<Vec<_>>();
    assert_eq!(keys(&pushed), keys(&written));
    for (series, v) in &written {
        // Two renderings of one report: only the clock may differ.
        if !series.0.contains("timestamp") {
            assert_eq!(&pushed[series], v, "{series:?}");
        }
    }
    assert_eq!(value(&pushed, "last_run_success"), Some(1.0));
    assert_eq!(value(&pushed, "live_findings"), Some(2.0));
    let success = value(&pushed, "last_success_timestamp_seconds").expect("success time");

    // Redis gone: the run cannot run (exit 2); its failure goes into the same group,
    // and the last success time pushed before stays.
    drop(redis);
    let (code, out, err) = run_tool(&[
        "check",
        "--root",
        &root,
        "--redis",
        &url,
        "--format",
        "json",
        "--push-gateway",
        &gateway,
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(out.is_empty());
    let pushed = group(&gw.scrape(), "registry-audit", &root);
    assert_eq!(value(&pushed, "last_run_success"), Some(0.0));
    assert_eq!(
        value(&pushed, "last_success_timestamp_seconds"),
        Some(success)
    );
    let error = pushed
        .iter()
        .find(|((n, _), _)| n == "registry_audit_last_error")
        .map(|((_, l), _)| l["message"].clone())
        .expect("last_error");
    assert!(
        error.contains("Redis") || error.contains("redis"),
        "{error}"
    );
}

#[test]
fn a_failed_push_is_one_line_and_exit_2_without_the_password() {
    let (store, redis) = populated("pushfail");
    // Nothing listens on this port.
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("port");
    let gateway = format!("http://ops:s3cret-push@127.0.0.1:{port}");
    let (code, out, err) = run_tool(&[
        "check",
        "--root",
        &store.root(),
        "--redis",
        &redis.url(),
        "--format",
        "json",
        "--push-gateway",
        &gateway,
    ]);
    assert_eq!(code, 2, "{err}");
    // The report itself was delivered before the push was tried.
    assert_eq!(json(&out)["summary"]["live"], 2);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.starts_with(&format!(
            "registry-audit: cannot push the metrics to the Pushgateway at http://127.0.0.1:{port}"
        )),
        "{err}"
    );
    assert!(!err.contains("s3cret"), "{err}");

    // A URL that is not one is refused before the run, without the password either.
    let (code, out, err) = run_tool(&[
        "check",
        "--root",
        &store.root(),
        "--redis",
        &redis.url(),
        "--push-gateway",
        "ops:s3cret-push@127.0.0.1:9091",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(out.is_empty());
    assert!(err.contains("--push-gateway"), "{err}");
    assert!(!err.contains("s3cret"), "{err}");
}

#[test]
fn shards_do_not_push_and_merge_does_under_its_own_job() {
    let gw = Pushgateway::start();
    let (store, redis) = populated("pushmerge");
    let (root, url, gateway) = (store.root(), redis.url(), gw.url());
    let (code, _, err) = run_tool(&[
        "check",
        "--root",
        &root,
        "--redis",
        &url,
        "--shard",
        "1/2",
        "--push-gateway",
        &gateway,
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("push the merged report"), "{err}");
    let mut reports = Vec::new();
    for k in 1..=2 {
        let path = store.dir.path(&format!("shard-{k}.json"));
        let p = path.display().to_string();
        let shard = format!("{k}/2");
        let (code, _, err) = run_tool(&[
            "check", "--root", &root, "--redis", &url, "--shard", &shard, "--format", "json",
            "--output", &p,
        ]);
        assert!(code <= 1, "{err}");
        reports.push(p);
    }
    let mut args = vec!["merge"];
    args.extend(reports.iter().map(String::as_str));
    args.extend([
        "--format",
        "json",
        "--push-gateway",
        &gateway,
        "--push-job",
        "audit-merged",
    ]);
    let (code, out, err) = run_tool(&args);
    assert_eq!(code, 1, "{err}");
    let pushed = group(&gw.scrape(), "audit-merged", &root);
    assert_eq!(
        value(&pushed, "live_findings"),
        json(&out)["summary"]["live"].as_f64()
    );
    assert_eq!(value(&pushed, "last_run_success"), Some(1.0));
}
