//! `probe` end to end with the real registry and its in-memory cache: after a manifest
//! delete and GC the running registry still vouches for deleted blobs; probe finds
//! exactly those, read-only, and finds none after a restart. The same behind basic auth.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use common::*;

struct Mem {
    dir: Scratch,
    registry: Registry,
    app1: Image,
    app2: Image,
    app2_manifest: String,
}

fn in_memory_scenario(tag: &str, htpasswd: bool) -> Mem {
    in_memory_scenario_with(tag, if htpasswd { Auth::Htpasswd } else { Auth::None })
}

fn in_memory_scenario_with(tag: &str, auth: Auth<'_>) -> Mem {
    let dir = Scratch::new(tag);
    let registry = Registry::start_auth(&dir, Cache::InMemory, auth);
    let (app1, app2, app2_manifest) = push_two_apps(&registry, &dir, [200_000, 50_000, 60_000]);
    registry.delete_manifest("team/app2", &app2_manifest);
    let gc = registry.garbage_collect();
    fs::write(dir.path("gc.log"), &gc.stdout).expect("gc log");
    assert!(!registry.has_blob(&app2.layers[1]));
    Mem {
        dir,
        registry,
        app1,
        app2,
        app2_manifest,
    }
}

/// Every file under the storage root with its size and modification time.
fn storage_listing(root: &Path) -> Vec<(String, u64, std::time::SystemTime)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).expect("read_dir").flatten() {
            let m = e.metadata().expect("metadata");
            if m.is_dir() {
                stack.push(e.path());
            } else {
                out.push((
                    e.path().display().to_string(),
                    m.len(),
                    m.modified().expect("mtime"),
                ));
            }
        }
    }
    out.sort();
    out
}

fn probe(m: &Mem, extra: &[&str], stdin: Option<&str>) -> (i32, String, String) {
    let url = m.registry.url();
    let root = m.registry.root.display().to_string();
    let mut cmd = Command::new(BIN);
    cmd.args([
        "probe",
        "--registry-url",
        &url,
        "--root",
        &root,
        "--format",
        "json",
    ])
    .args(extra)
    // No developer credentials leak in from ~/.docker.
    .env("DOCKER_CONFIG", m.dir.path("no-docker-config"))
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn");
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("write stdin");
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().expect("wait");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn live_phantoms(report: &serde_json::Value) -> BTreeSet<(String, String)> {
    report["findings"]
        .as_array()
        .expect("findings")
        .iter()
        .filter(|f| f["kind"] == "live-phantom")
        .map(|f| {
            (
                f["repository"].as_str().expect("repo").to_string(),
                f["digest"].as_str().expect("digest").to_string(),
            )
        })
        .collect()
}

#[test]
fn probe_finds_live_phantoms_of_the_in_memory_cache_until_a_restart() {
    let mut m = in_memory_scenario("probe", false);
    // The bug, as a client sees it.
    assert_eq!(
        m.registry.head_blob("team/app2", &m.app2.layers[1]),
        Some(200)
    );
    let before = storage_listing(&m.registry.root);

    let (code, out, err) = probe(&m, &[], None);
    assert_eq!(code, 1, "{err}\n{out}");
    let report = json(&out);
    let got = live_phantoms(&report);
    // Independently: every (repo, digest) with a _layers link to a deleted blob that the
    // registry answers 200 for.
    let mut expected = BTreeSet::new();
    for d in [&m.app2.layers[1], &m.app2.config] {
        assert!(!m.registry.has_blob(d));
        if m.registry.head_blob("team/app2", d) == Some(200) {
            expected.insert(("team/app2".to_string(), d.clone()));
        }
    }
    assert!(!expected.is_empty());
    assert_eq!(got, expected, "{report:#}");
    for f in report["findings"].as_array().expect("f") {
        if f["kind"] == "live-phantom" {
            assert_eq!(f["severity"], "error");
            assert_eq!(f["live"], true);
        } else {
            assert_eq!(
                f["severity"], "warning",
                "storage findings are warnings in probe: {f}"
            );
        }
        assert!(!app1_blob(&m, f["digest"].as_str().unwrap_or("")), "{f}");
    }
    let verdict = report["verdict"].as_str().expect("verdict");
    assert!(verdict.contains("restart"), "{verdict}");
    assert_eq!(report["source"]["cache"], "registry");
    // Read-only: storage is exactly as it was.
    assert_eq!(storage_listing(&m.registry.root), before);

    // The GC log names the deleted blobs, the manifest among them.
    let log = m.dir.path("gc.log").display().to_string();
    let (code, out, _) = probe(&m, &["--gc-log", &log], None);
    assert_eq!(code, 1);
    let r = json(&out);
    assert_eq!(r["summary"]["probe"]["gc_log_digests"], 3, "{r:#}");
    assert_eq!(live_phantoms(&r), got);
    let _ = &m.app2_manifest;

    // After a restart the in-memory cache is empty: nothing live, exit 0.
    m.registry.restart();
    let (code, out, err) = probe(&m, &["--all-repositories"], None);
    assert_eq!(code, 0, "{err}\n{out}");
    let r = json(&out);
    assert!(live_phantoms(&r).is_empty());
    assert!(r["summary"]["probe"]["probed"].as_u64().expect("n") >= 2);
    assert_eq!(
        r["summary"]["probe"]["answered_unknown"],
        r["summary"]["probe"]["probed"]
    );
}

fn app1_blob(m: &Mem, d: &str) -> bool {
    m.app1.blobs().iter().any(|b| b == d)
}

#[test]
fn probe_behind_basic_auth() {
    let m = in_memory_scenario("probeauth", true);
    // Without credentials: one clear line, exit 2.
    let (code, out, err) = probe(&m, &[], None);
    assert_eq!(code, 2, "{out}");
    assert!(
        err.contains("refused access") && err.contains("--username"),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1);

    // With --username and --password-stdin.
    let (code, out, err) = probe(
        &m,
        &["--username", HTPASSWD_USER, "--password-stdin"],
        Some(&format!("{HTPASSWD_PASSWORD}\n")),
    );
    assert_eq!(code, 1, "{err}");
    let got = live_phantoms(&json(&out));
    assert!(
        got.contains(&("team/app2".to_string(), m.app2.layers[1].clone())),
        "{got:?}"
    );
    assert!(!out.contains(HTPASSWD_PASSWORD) && !err.contains(HTPASSWD_PASSWORD));

    // With a Docker config.json.
    let cfg = m.dir.path("docker-config.json");
    let auth = common::base64_encode(format!("{HTPASSWD_USER}:{HTPASSWD_PASSWORD}").as_bytes());
    fs::write(
        &cfg,
        format!(
            r#"{{"auths":{{"127.0.0.1:{}":{{"auth":"{auth}"}}}}}}"#,
            m.registry.port
        ),
    )
    .expect("write");
    let c = cfg.display().to_string();
    let (code, out, err) = probe(&m, &["--docker-config", &c], None);
    assert_eq!(code, 1, "{err}");
    assert_eq!(live_phantoms(&json(&out)), got);

    // Wrong password: refused, exit 2.
    let (code, _, err) = probe(
        &m,
        &["--username", HTPASSWD_USER, "--password-stdin"],
        Some("wrong\n"),
    );
    assert_eq!(code, 2);
    assert!(!err.contains("wrong"), "{err}");
}

#[test]
fn probe_behind_a_bearer_token_service() {
    let tokens = TokenServer::start();
    let m = in_memory_scenario_with("probetoken", Auth::Token(&tokens));
    // Without a token the registry says 401 with a Bearer challenge.
    assert_eq!(
        http_status(
            "HEAD",
            &format!(
                "{}/v2/team/app2/blobs/{}",
                m.registry.url(),
                m.app2.layers[1]
            )
        ),
        Some(401)
    );
    let before = tokens.requests.load(std::sync::atomic::Ordering::Relaxed);
    let (code, out, err) = probe(&m, &[], None);
    assert_eq!(code, 1, "{err}");
    let got = live_phantoms(&json(&out));
    assert!(
        got.contains(&("team/app2".to_string(), m.app2.layers[1].clone())),
        "{got:?}"
    );
    assert!(
        tokens.requests.load(std::sync::atomic::Ordering::Relaxed) > before,
        "probe asked the token service"
    );
}

#[test]
fn probe_over_tls_with_a_private_ca_or_insecure() {
    let certs = Pki::new(&["server"]);
    let dir = Scratch::new("probetls");
    let registry = Registry::start_tls(
        &dir,
        Cache::InMemory,
        &certs.path("server.crt"),
        &certs.path("server.key"),
    );
    let app = make_image(&dir.path("img"), "tls", &[bytes(11, 30_000)]);
    let manifest = push(&registry, &app, "secure/app:v1");
    let (ok, err) = pull(&registry, "secure/app:v1", &dir.path("pulled"));
    assert!(ok, "{err}");
    registry.delete_manifest("secure/app", &manifest);
    registry.garbage_collect();

    let (url, root) = (registry.url(), registry.root.display().to_string());
    assert!(url.starts_with("https://"));
    let probe = |extra: &[&str]| {
        let mut args = vec![
            "probe",
            "--registry-url",
            &url,
            "--root",
            &root,
            "--format",
            "json",
        ];
        args.extend_from_slice(extra);
        run_tool_env(
            &args,
            &[("DOCKER_CONFIG", dir.path("none").to_str().expect("utf8"))],
        )
    };
    // A private CA the system does not know: one clear line, exit 2.
    let (code, _, err) = probe(&[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--ca-cert"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    // With the CA, or when told to skip verification: the live phantom is found.
    let ca = certs.path("ca.crt").display().to_string();
    for extra in [vec!["--ca-cert", ca.as_str()], vec!["--insecure"]] {
        let (code, out, err) = probe(&extra);
        assert_eq!(code, 1, "{extra:?}: {err}");
        assert!(
            live_phantoms(&json(&out)).contains(&("secure/app".to_string(), app.layers[0].clone())),
            "{out}"
        );
    }
}
