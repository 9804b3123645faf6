//! Running from cron: Prometheus textfile output (checked against a strict grammar),
//! incremental verification with --state, --sample slices, --max-duration, the run
//! lock, and progress bars on a terminal only. A real Redis and a storage root written
//! by the test.

use crate::common;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs;
use std::process::Command;

use common::*;

/// A store of `n` blobs of a few sizes, all cached in Redis as the registry would.
fn populated(tag: &str, n: u32) -> (Store, Redis, Vec<String>) {
    let store = Store::new(tag);
    let redis = Redis::start();
    let mut c = redis.conn();
    let mut digests = Vec::new();
    for i in 0..n {
        let content = bytes(u64::from(i) + 1, 10_000 + i as usize * 997);
        let d = store.blob("app", &content);
        cache(&mut c, "app", &d, content.len());
        digests.push(d);
    }
    (store, redis, digests)
}

fn check(store: &Store, redis: &Redis, extra: &[&str]) -> (i32, serde_json::Value, String) {
    let (root, url) = (store.root(), redis.url());
    let mut args = vec![
        "check",
        "--root",
        &root,
        "--redis",
        &url,
        "--format",
        "json",
        "--skip-storage",
    ];
    args.extend_from_slice(extra);
    let (code, out, err) = run_tool(&args);
    let v = json_or_null(&out);
    (code, v, err)
}

fn mismatched(report: &serde_json::Value) -> BTreeSet<String> {
    report["findings"]
        .as_array()
        .expect("findings")
        .iter()
        .filter(|f| f["kind"] == "digest-mismatch")
        .map(|f| f["digest"].as_str().expect("digest").to_string())
        .collect()
}

/// A strict reader of the Prometheus text exposition format: HELP and TYPE once per
/// family and before its samples, valid metric and label names, quoted and escaped
/// label values, float values, no duplicate series, a newline at the end. Returns the
/// samples.
fn parse_exposition(text: &str) -> HashMap<String, f64> {
    assert!(text.ends_with('\n'), "must end with a newline");
    let name_ok = |n: &str| {
        let mut cs = n.chars();
        cs.next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
            && cs.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    };
    let label_ok = |n: &str| {
        let mut cs = n.chars();
        cs.next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && cs.all(|c| c.is_ascii_alphanumeric() || c == '_')
    };
    let mut typed: HashSet<String> = HashSet::new();
    let mut helped: HashSet<String> = HashSet::new();
    let mut samples = HashMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').expect("HELP name text");
            assert!(name_ok(name) && !help.is_empty(), "{line}");
            assert!(helped.insert(name.to_string()), "second HELP: {line}");
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, ty) = rest.split_once(' ').expect("TYPE name type");
            assert!(name_ok(name), "{line}");
            assert!(
                ["gauge", "counter", "untyped", "summary", "histogram"].contains(&ty),
                "{line}"
            );
            assert!(typed.insert(name.to_string()), "second TYPE: {line}");
            continue;
        }
        assert!(
            !line.starts_with('#') && !line.trim().is_empty(),
            "stray line: {line:?}"
        );
        let (series, value) = line.rsplit_once(' ').expect("sample value");
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value: {line}"));
        let (name, labels) = match series.split_once('{') {
            Some((n, rest)) => (
                n,
                Some(
                    rest.strip_suffix('}')
                        .unwrap_or_else(|| panic!("unclosed labels: {line}")),
                ),
            ),
            None => (series, None),
        };
        assert!(name_ok(name), "{line}");
        assert!(typed.contains(name), "sample before its TYPE: {line}");
        if let Some(mut rest) = labels {
            while !rest.is_empty() {
                let (lname, after) = rest
                    .split_once("=\"")
                    .unwrap_or_else(|| panic!("label: {line}"));
                assert!(label_ok(lname), "label name: {line}");
                let mut end = None;
                let mut escaped = false;
                for (i, c) in after.char_indices() {
                    match (escaped, c) {
                        (true, '\\' | '"' | 'n') => escaped = false,
                        (true, _) => panic!("bad escape: {line}"),
                        (false, '\\') => escaped = true,
                        (false, '"') => {
                            end = Some(i);
                            break;
                        }
                        (false, '\n') => panic!("raw newline: {line}"),
                        _ => {}
                    }
                }
                let end = end.unwrap_or_else(|| panic!("unterminated label value: {line}"));
                rest = after[end + 1..]
                    .strip_prefix(',')
                    .unwrap_or(&after[end + 1..]);
            }
        }
        assert!(
            samples.insert(series.to_string(), value).is_none(),
            "duplicate series: {line}"
        );
    }
    samples
}

#[test]
fn prometheus_textfile_is_valid_exposition_and_failures_keep_the_last_success() {
    let (store, redis, digests) = populated("prom", 6);
    fs::remove_file(store.data_path(&digests[0])).expect("rm");
    let out = store.dir.path("textfile/registry_audit.prom");
    fs::create_dir_all(out.parent().expect("dir")).expect("mkdir");
    let (root, url, o) = (store.root(), redis.url(), out.display().to_string());
    let prometheus = || {
        run_tool(&[
            "check",
            "--root",
            &root,
            "--redis",
            &url,
            "--format",
            "prometheus",
            "--output",
            &o,
        ])
    };
    let (code, stdout, err) = prometheus();
    assert_eq!(code, 1, "{err}");
    assert!(stdout.is_empty());
    let text = fs::read_to_string(&out).expect("textfile");
    let m = parse_exposition(&text);
    assert_eq!(
        m[r#"registry_audit_findings{kind="phantom-blob-descriptor",severity="error"}"#],
        1.0
    );
    assert_eq!(
        m[r#"registry_audit_findings{kind="digest-mismatch",severity="error"}"#],
        0.0
    );
    assert_eq!(m["registry_audit_blobs_checked"], 6.0);
    assert_eq!(m["registry_audit_run_complete"], 1.0);
    assert_eq!(m["registry_audit_last_run_success"], 1.0);
    assert!(m["registry_audit_bytes_hashed"] > 0.0);
    let success = m["registry_audit_last_success_timestamp_seconds"];
    assert!(success > 1.7e9);
    // No temporary file is left next to it.
    assert_eq!(
        fs::read_dir(out.parent().expect("dir"))
            .expect("ls")
            .count(),
        1
    );

    // A run that cannot run (Redis gone) still writes its failure, keeping the last success.
    drop(redis);
    let (code, _, err) = prometheus();
    assert_eq!(code, 2, "{err}");
    let m = parse_exposition(&fs::read_to_string(&out).expect("textfile"));
    assert_eq!(m["registry_audit_last_run_success"], 0.0);
    assert_eq!(m["registry_audit_last_success_timestamp_seconds"], success);
}

#[test]
fn state_skips_verified_blobs_yet_sees_deletions_and_changes_once_due() {
    let (store, redis, digests) = populated("state", 5);
    let state = store.dir.path("state.json");
    let s = state.display().to_string();
    let (code, r, err) = check(&store, &redis, &["--state", &s]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(r["summary"]["hashing"]["blobs_hashed"], 5);

    // Second run: nothing verified and unchanged is hashed again.
    let (code, r, _) = check(&store, &redis, &["--state", &s]);
    assert_eq!(code, 0);
    assert_eq!(r["summary"]["bytes_hashed"], 0);
    assert_eq!(r["summary"]["hashing"]["blobs_trusted"], 5);

    // A blob deleted since is still found: existence is checked every run.
    fs::remove_file(store.data_path(&digests[1])).expect("rm");
    let (code, r, _) = check(&store, &redis, &["--state", &s]);
    assert_eq!(code, 1);
    assert_eq!(r["summary"]["bytes_hashed"], 0);
    assert_eq!(
        r["summary"]["findings_by_kind"]["phantom-blob-descriptor"],
        1
    );

    // Bytes changed in place, same size and modification time: trusted until due.
    let victim = &digests[2];
    let path = store.data_path(victim);
    let mtime = fs::metadata(&path)
        .expect("meta")
        .modified()
        .expect("mtime");
    let mut content = fs::read(&path).expect("read");
    content[10] ^= 0x55;
    fs::write(&path, &content).expect("write");
    fs::File::options()
        .write(true)
        .open(&path)
        .expect("open")
        .set_modified(mtime)
        .expect("set mtime");
    let (_, r, _) = check(&store, &redis, &["--state", &s, "--reverify-after", "1h"]);
    assert!(mismatched(&r).is_empty(), "not due yet");
    // Two hours pass (the state's verification times move back).
    let mut st: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&state).expect("state")).expect("json");
    for (_, e) in st["blobs"].as_object_mut().expect("blobs") {
        let t = e["verified_at"].as_u64().expect("t");
        e["verified_at"] = serde_json::json!(t - 7200);
    }
    fs::write(&state, st.to_string()).expect("write state");
    let (code, r, _) = check(&store, &redis, &["--state", &s, "--reverify-after", "1h"]);
    assert_eq!(code, 1);
    assert_eq!(mismatched(&r), [victim.clone()].into_iter().collect());

    // A corrupt state file is reported and rebuilt, never trusted.
    fs::write(&state, "{\"format\":\"registry-audit-state\",").expect("corrupt");
    let (_, r, _) = check(&store, &redis, &["--state", &s]);
    assert_eq!(r["summary"]["hashing"]["blobs_trusted"], 0);
    assert!(
        r["notes"][0].as_str().expect("note").contains("corrupt"),
        "{r:#}"
    );
    let again: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&state).expect("state")).expect("rebuilt");
    assert_eq!(again["format"], "registry-audit-state");
}

#[test]
fn four_sample_slices_cover_every_blob_exactly_once() {
    let (store, redis, digests) = populated("sample", 24);
    // Corrupt every blob: each run reports exactly the blobs it hashed.
    for d in &digests {
        let p = store.data_path(d);
        let mut c = fs::read(&p).expect("read");
        c[0] ^= 1;
        fs::write(&p, c).expect("write");
    }
    let mut seen: Vec<BTreeSet<String>> = Vec::new();
    for n in 1..=4 {
        let slice = format!("{n}/4");
        let (_, r, err) = check(&store, &redis, &["--sample", &slice]);
        assert_eq!(r["summary"]["blobs_checked"], 24, "{err}");
        seen.push(mismatched(&r));
    }
    let all: BTreeSet<String> = digests.iter().cloned().collect();
    let union: BTreeSet<String> = seen.iter().flatten().cloned().collect();
    assert_eq!(union, all);
    assert_eq!(
        seen.iter().map(|s| s.len()).sum::<usize>(),
        24,
        "no blob twice"
    );
}

#[test]
fn max_duration_stops_reports_incomplete_and_the_next_run_carries_on() {
    let (store, redis, _) = populated("deadline", 8);
    let s = store.dir.path("state.json").display().to_string();
    let (code, r, err) = check(&store, &redis, &["--state", &s, "--max-duration", "0s"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(r["complete"], false);
    assert_eq!(r["summary"]["hashing"]["blobs_not_reached"], 8);
    assert!(
        r["notes"][0]
            .as_str()
            .expect("note")
            .contains("--max-duration")
    );
    let (_, r, _) = check(&store, &redis, &["--state", &s]);
    assert_eq!(r["complete"], true);
    assert_eq!(r["summary"]["hashing"]["blobs_hashed"], 8);
    let (_, r, _) = check(&store, &redis, &["--state", &s, "--max-duration", "0s"]);
    assert_eq!(r["complete"], true, "nothing left to hash");
    assert_eq!(r["summary"]["hashing"]["blobs_trusted"], 8);
}

#[test]
fn a_second_run_is_refused_while_the_lock_is_held_and_a_stale_lock_is_taken_over() {
    let (store, redis, _) = populated("lock", 2);
    let state = store.dir.path("state.json");
    let lock_path = store.dir.path("state.json.lock");
    let s = state.display().to_string();
    // Another run holds the lock (the same kernel lock a running registry-audit takes).
    let holder = fs::File::options()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&lock_path)
        .expect("open");
    holder.try_lock().expect("lock");
    fs::write(&lock_path, "pid 4242 since 2026-01-01T00:00:00Z\n").expect("write");
    let (code, r, err) = check(&store, &redis, &["--state", &s]);
    assert_eq!(code, 2);
    assert!(r.is_null());
    assert!(
        err.contains("another registry-audit run") && err.contains("pid 4242"),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1);
    drop(holder);

    // A lock file left by a killed run (no holder): taken over, with a warning.
    let (code, _, err) = check(&store, &redis, &["--state", &s]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("stale lock"), "{err}");
}

#[test]
fn progress_is_drawn_on_a_terminal_and_absent_in_a_pipe() {
    let (store, redis, _) = populated("progress", 4);
    let report = store.dir.path("report.json");
    let cmd = format!(
        "{BIN} check --root {} --redis {} --skip-storage --output {}",
        store.root(),
        redis.url(),
        report.display()
    );
    // Under `script`, stderr is a terminal.
    let out = Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .output()
        .expect("script");
    let screen = String::from_utf8_lossy(&out.stdout);
    assert!(
        screen.contains("hashed") && screen.contains("cache keys read"),
        "{screen}"
    );
    // The report file is clean JSON all the same.
    json(&fs::read_to_string(&report).expect("report"));

    // In a pipe: no bars, no escape sequences.
    let (root, url, o) = (store.root(), redis.url(), report.display().to_string());
    let (code, stdout, err) = run_tool(&[
        "check",
        "--root",
        &root,
        "--redis",
        &url,
        "--skip-storage",
        "--output",
        &o,
    ]);
    assert_eq!(code, 0);
    assert!(stdout.is_empty() && err.is_empty(), "{err:?}");
}
