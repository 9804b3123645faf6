//! `check --config` on every kind of registry config, end to end with the real registry
//! (Debian's distribution 2.8). On its default in-memory cache check verifies storage and
//! then asks the running registry (HEAD only), at the address the config gives, about
//! every blob storage lost: over HTTP, over HTTPS with a private CA, and on a unix socket
//! under a prefix; a registry that does not answer makes the run incomplete. The cache
//! kind is read as the registry reads it: Harbor's `layerinfo: redis` (Redis in database
//! 3), and a config with no cache at all, where the registry caches nothing.

use crate::common;

use std::collections::BTreeSet;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

/// `check --config CONFIG --format json EXTRA`, without any Docker credentials.
fn check_config(config: &Path, dir: &Scratch, extra: &[&str]) -> (i32, serde_json::Value, String) {
    let config = config.display().to_string();
    let mut args = vec!["check", "--config", config.as_str(), "--format", "json"];
    args.extend_from_slice(extra);
    let no_docker = dir.path("no-docker-config");
    let (code, out, err) = run_tool_env(
        &args,
        &[("DOCKER_CONFIG", no_docker.to_str().expect("utf8"))],
    );
    (code, json_or_null(&out), err)
}

/// (repository, digest) of every finding of `kind`.
fn pairs(report: &serde_json::Value, kind: &str) -> BTreeSet<(String, String)> {
    report["findings"]
        .as_array()
        .unwrap_or_else(|| panic!("no findings: {report:#}"))
        .iter()
        .filter(|f| f["kind"] == kind)
        .map(|f| {
            (
                f["repository"].as_str().expect("repo").to_string(),
                f["digest"].as_str().expect("digest").to_string(),
            )
        })
        .collect()
}

fn notes(report: &serde_json::Value) -> String {
    report["notes"]
        .as_array()
        .expect("notes")
        .iter()
        .map(|n| n.as_str().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every (repo, digest) of `digests` whose blob is gone and that the registry still
/// answers 200 for: the live phantoms, asked independently of the tool.
fn served_although_gone(
    head: impl Fn(&str, &str) -> Option<u16>,
    gone: impl Fn(&str) -> bool,
    repo: &str,
    digests: &[String],
) -> BTreeSet<(String, String)> {
    digests
        .iter()
        .filter(|d| gone(d) && head(repo, d) == Some(200))
        .map(|d| (repo.to_string(), d.clone()))
        .collect()
}

fn assert_live_phantoms_are_errors(report: &serde_json::Value) {
    for f in report["findings"].as_array().expect("findings") {
        if f["kind"] == "live-phantom" {
            assert_eq!(f["severity"], "error", "{f}");
            assert_eq!(f["live"], true, "{f}");
        }
    }
}

#[test]
fn check_config_probes_the_in_memory_cache_through_gc_restart_and_stop() {
    let dir = Scratch::new("ckmem");
    let mut registry = Registry::start(&dir, Cache::InMemory);
    let (app1, app2, app2_manifest) = push_two_apps(&registry, &dir, [200_000, 50_000, 60_000]);
    let config = registry.config.clone();

    // Before GC: nothing is missing from storage, nothing to report.
    let (code, r, err) = check_config(&config, &dir, &[]);
    assert_eq!(code, 0, "{err}\n{r:#}");
    assert_eq!(r["findings"], serde_json::json!([]), "{r:#}");
    assert_eq!(r["complete"], true);
    assert_eq!(r["source"]["cache"], "inmemory");
    assert_eq!(r["source"]["registry_url"], registry.url());
    assert_eq!(r["summary"]["probe"]["probed"], 0);
    assert!(r["verdict"].as_str().expect("v").starts_with("OK"), "{r:#}");

    // A manifest delete and a real GC: the registry still vouches for deleted blobs.
    registry.delete_manifest("team/app2", &app2_manifest);
    registry.garbage_collect();
    let expected = served_although_gone(
        |repo, d| registry.head_blob(repo, d),
        |d| !registry.has_blob(d),
        "team/app2",
        &app2.blobs(),
    );
    assert!(!expected.is_empty());
    let (code, r, err) = check_config(&config, &dir, &[]);
    assert_eq!(code, 1, "{err}\n{r:#}");
    assert_eq!(pairs(&r, "live-phantom"), expected, "{r:#}");
    assert_live_phantoms_are_errors(&r);
    assert_eq!(r["complete"], true, "{r:#}");
    assert_eq!(r["summary"]["probe"]["live_phantoms"], expected.len());
    assert_eq!(
        r["summary"]["findings_by_kind"]["live-phantom"],
        expected.len()
    );
    let verdict = r["verdict"].as_str().expect("verdict");
    assert!(verdict.contains("restart"), "{verdict}");
    // The dangling links GC left are the candidates; none is a blob app1 still uses.
    let dangling = pairs(&r, "dangling-layer-link");
    assert!(expected.is_subset(&dangling), "{r:#}");
    assert!(dangling.iter().all(|(_, d)| !app1.blobs().contains(d)));
    assert_eq!(r["summary"]["probe"]["probed"], dangling.len());

    // After a restart the in-memory cache is empty: no live phantom, exit 0, the
    // dangling links GC leaves reported as warnings.
    registry.restart();
    let (code, r, err) = check_config(&config, &dir, &[]);
    assert_eq!(code, 0, "{err}\n{r:#}");
    assert!(pairs(&r, "live-phantom").is_empty(), "{r:#}");
    assert_eq!(pairs(&r, "dangling-layer-link"), dangling);
    assert!(
        r["findings"]
            .as_array()
            .expect("f")
            .iter()
            .all(|f| f["severity"] == "warning"),
        "{r:#}"
    );
    assert_eq!(r["summary"]["probe"]["answered_unknown"], dangling.len());
    assert_eq!(r["complete"], true);

    // The registry stopped: storage is still verified and reported, the run is
    // incomplete, and the note names the address tried.
    let url = registry.url();
    drop(registry);
    let (code, r, err) = check_config(&config, &dir, &[]);
    assert_eq!(code, 1, "{err}\n{r:#}");
    assert_eq!(r["complete"], false, "{r:#}");
    let n = notes(&r);
    assert!(n.contains(&url) && n.contains("not probed"), "{n}");
    assert_eq!(pairs(&r, "dangling-layer-link"), dangling);
    assert!(pairs(&r, "live-phantom").is_empty());
    let verdict = r["verdict"].as_str().expect("verdict");
    assert!(verdict.contains("not fully probed"), "{verdict}");
}

#[test]
fn check_config_over_tls_with_a_private_ca() {
    let certs = Pki::new(&["server"]);
    let dir = Scratch::new("ckmemtls");
    let mut registry = Registry::start_tls(
        &dir,
        Cache::InMemory,
        &certs.path("server.crt"),
        &certs.path("server.key"),
    );
    let app = make_image(
        &dir.path("img"),
        "tls",
        &[bytes(11, 30_000), bytes(12, 20_000)],
    );
    let manifest = push(&registry, &app, "secure/app:v1");
    let config = registry.config.clone();
    let ca = certs.path("ca.crt").display().to_string();
    let with_ca = ["--ca-cert", ca.as_str()];
    assert!(registry.url().starts_with("https://"));

    let (code, r, err) = check_config(&config, &dir, &with_ca);
    assert_eq!(code, 0, "{err}\n{r:#}");
    assert_eq!(r["findings"], serde_json::json!([]));
    assert_eq!(r["source"]["registry_url"], registry.url());

    registry.delete_manifest("secure/app", &manifest);
    registry.garbage_collect();
    let expected = served_along(&registry, "secure/app", &app.blobs());
    assert!(!expected.is_empty());
    let (code, r, err) = check_config(&config, &dir, &with_ca);
    assert_eq!(code, 1, "{err}\n{r:#}");
    assert_eq!(pairs(&r, "live-phantom"), expected, "{r:#}");
    assert_live_phantoms_are_errors(&r);
    assert_eq!(r["complete"], true);

    // Without the CA the registry cannot be trusted: storage is reported, the run is
    // incomplete, and the note says what to pass.
    let (code, r, err) = check_config(&config, &dir, &[]);
    assert_eq!(code, 1, "{err}\n{r:#}");
    assert_eq!(r["complete"], false);
    let n = notes(&r);
    assert!(
        n.contains(&registry.url()) && n.contains("--ca-cert"),
        "{n}"
    );
    assert!(!pairs(&r, "dangling-layer-link").is_empty());

    registry.restart();
    let (code, r, err) = check_config(&config, &dir, &with_ca);
    assert_eq!(code, 0, "{err}\n{r:#}");
    assert!(pairs(&r, "live-phantom").is_empty());
    assert!(!pairs(&r, "dangling-layer-link").is_empty());
}

fn served_along(registry: &Registry, repo: &str, digests: &[String]) -> BTreeSet<(String, String)> {
    served_although_gone(
        |r, d| registry.head_blob(r, d),
        |d| !registry.has_blob(d),
        repo,
        digests,
    )
}

/// One request over a unix socket; the status of the answer.
fn unix_status(socket: &Path, method: &str, path: &str) -> Option<u16> {
    let mut s = UnixStream::connect(socket).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).ok()?;
    String::from_utf8_lossy(&answer)
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

#[test]
fn check_config_on_a_unix_socket_under_a_prefix() {
    // Registry A (TCP) takes the pushes, the delete and the GC; registry B serves the
    // same storage on a unix socket under /reg/, with its own in-memory cache.
    let dir = Scratch::new("ckmemunix");
    let a = Registry::start(&dir, Cache::InMemory);
    let (_, app2, app2_manifest) = push_two_apps(&a, &dir, [20_000, 5_000, 6_000]);
    let socket = dir.path("registry.sock");
    let config = dir.path("unix.yml");
    fs::write(
        &config,
        format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n  cache:\n    blobdescriptor: inmemory\nhttp:\n  net: unix\n  addr: {}\n  prefix: /reg/\n",
            a.root.display(),
            socket.display()
        ),
    )
    .expect("config");
    let log = fs::File::create(dir.path("unix.log")).expect("log");
    let _b = Proc(
        Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .expect("start docker-registry"),
    );
    wait_until(
        "the registry on its unix socket",
        Duration::from_secs(30),
        || unix_status(&socket, "GET", "/reg/v2/") == Some(200),
    );
    // B learns app2's layers and config (a client asking before it pushes does the same).
    let blob = |d: &str| format!("/reg/v2/team/app2/blobs/{d}");
    let mut layers = app2.layers.clone();
    layers.push(app2.config.clone());
    for d in layers {
        assert_eq!(unix_status(&socket, "HEAD", &blob(&d)), Some(200), "{d}");
    }
    a.delete_manifest("team/app2", &app2_manifest);
    a.garbage_collect();
    let expected = served_although_gone(
        |_, d| unix_status(&socket, "HEAD", &blob(d)),
        |d| !a.has_blob(d),
        "team/app2",
        &app2.blobs(),
    );
    assert!(!expected.is_empty());

    let (code, r, err) = check_config(&config, &dir, &[]);
    assert_eq!(code, 1, "{err}\n{r:#}");
    assert_eq!(pairs(&r, "live-phantom"), expected, "{r:#}");
    assert_eq!(
        r["source"]["registry_url"],
        format!("unix://{}/reg", socket.display())
    );
    assert_eq!(r["complete"], true);
}

#[test]
fn harbor_layerinfo_redis_in_database_3() {
    let redis = Redis::start();
    let dir = Scratch::new("cklayerinfo");
    let mut registry = Registry::start(&dir, Cache::Redis(&redis));
    // Harbor's dialect: the older key, and a database other than 0.
    let text = fs::read_to_string(&registry.config).expect("config");
    let harbor = text
        .replace("blobdescriptor: redis", "layerinfo: redis")
        .replace("  db: 0\n", "  db: 3\n");
    assert!(harbor.contains("layerinfo: redis") && harbor.contains("db: 3"));
    fs::write(&registry.config, &harbor).expect("config");
    registry.restart();
    let (app1, app2, app2_manifest) = push_two_apps(&registry, &dir, [20_000, 5_000, 6_000]);
    registry.delete_manifest("team/app2", &app2_manifest);
    registry.garbage_collect();

    // The registry caches in Redis, database 3 (and nothing in 0): a deleted layer is
    // still served from there.
    let gone = &app2.layers[1];
    assert!(!registry.has_blob(gone));
    assert_eq!(registry.head_blob("team/app2", gone), Some(200));
    let db = |n: u8| {
        redis::Client::open(format!("redis://127.0.0.1:{}/{n}", redis.port))
            .and_then(|c| c.get_connection())
            .expect("redis")
    };
    let exists: bool = redis::cmd("EXISTS")
        .arg(format!("blobs::{gone}"))
        .query(&mut db(3))
        .expect("exists");
    assert!(exists, "the registry did not cache in database 3");
    let in_0: u64 = redis::cmd("DBSIZE").query(&mut db(0)).expect("dbsize");
    assert_eq!(in_0, 0);

    let check = |config: &Path, env: &[(&str, &str)]| {
        let c = config.display().to_string();
        let (code, out, err) = run_tool_env(&["check", "--config", &c, "--format", "json"], env);
        (code, json_or_null(&out), err)
    };
    let (code, r, err) = check(&registry.config, &[]);
    assert_eq!(code, 1, "{err}\n{r:#}");
    assert_eq!(r["source"]["cache"], "redis");
    assert_eq!(
        r["source"]["redis"],
        format!("redis://127.0.0.1:{}/3", redis.port)
    );
    let phantoms = pairs(&r, "phantom-repository-blob");
    assert!(
        phantoms.contains(&("team/app2".to_string(), gone.clone())),
        "{r:#}"
    );
    let global = r["findings"].as_array().expect("f").iter().any(|f| {
        f["kind"] == "phantom-blob-descriptor" && f["digest"] == gone.as_str() && f["live"] == true
    });
    assert!(global, "{r:#}");
    assert!(phantoms.iter().all(|(_, d)| !app1.blobs().contains(d)));

    // The same key from the registry's environment, on a config without a cache section.
    let bare = dir.path("bare.yml");
    fs::write(
        &bare,
        harbor.replace("  cache:\n    layerinfo: redis\n", ""),
    )
    .expect("config");
    let (code, r2, err) = check(&bare, &[("REGISTRY_STORAGE_CACHE_LAYERINFO", "redis")]);
    assert_eq!(code, 1, "{err}");
    assert_eq!(r2["findings"], r["findings"]);
}

#[test]
fn a_config_without_a_cache_verifies_storage_alone() {
    let dir = Scratch::new("cknocache");
    let mut registry = Registry::start(&dir, Cache::InMemory);
    let text = fs::read_to_string(&registry.config).expect("config");
    let bare = text.replace("  cache:\n    blobdescriptor: inmemory\n", "");
    assert_ne!(bare, text);
    fs::write(&registry.config, bare).expect("config");
    registry.restart();
    let (_, app2, app2_manifest) = push_two_apps(&registry, &dir, [20_000, 5_000, 6_000]);
    registry.delete_manifest("team/app2", &app2_manifest);
    registry.garbage_collect();
    // The registry caches nothing: a deleted blob is unknown at once.
    assert!(!registry.has_blob(&app2.layers[1]));
    assert_eq!(registry.head_blob("team/app2", &app2.layers[1]), Some(404));

    let (code, r, err) = check_config(&registry.config, &dir, &[]);
    assert_eq!(code, 0, "{err}\n{r:#}");
    assert_eq!(r["source"]["cache"], "none");
    assert!(notes(&r).contains("no blob descriptor cache"), "{r:#}");
    assert!(!pairs(&r, "dangling-layer-link").is_empty());
    assert_eq!(r["summary"]["probe"], serde_json::Value::Null);
    assert_eq!(r["complete"], true);
}

#[test]
fn in_memory_configs_check_cannot_use_exit_2_with_one_line() {
    let store = Store::new("ckmemexit2");
    let root = store.root();
    let dir = Scratch::new("ckmemcfgs");
    let write = |name: &str, cache: &str, http: &str| {
        let p = dir.path(name);
        fs::write(
            &p,
            format!(
                "storage:\n  filesystem:\n    rootdirectory: {root}\n  cache:\n    {cache}\n{http}"
            ),
        )
        .expect("write");
        p.display().to_string()
    };
    let no_addr = write("noaddr.yml", "blobdescriptor: inmemory", "");
    let udp = write(
        "udp.yml",
        "blobdescriptor: inmemory",
        "http:\n  net: udp\n  addr: :5000\n",
    );
    let unix_tls = write(
        "unixtls.yml",
        "layerinfo: inmemory",
        "http:\n  net: unix\n  addr: /run/r.sock\n  tls:\n    certificate: /c.pem\n    key: /k.pem\n",
    );
    let good = write(
        "good.yml",
        "blobdescriptor: inmemory",
        "http:\n  addr: :1\n",
    );
    let redis = write(
        "redis.yml",
        "layerinfo: redis",
        "redis:\n  addr: 127.0.0.1:1\n",
    );
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["check", "--config", &no_addr], "http.addr"),
        (vec!["check", "--config", &udp], "http.net 'udp'"),
        (
            vec!["check", "--config", &unix_tls],
            "TLS on the unix socket",
        ),
        (
            vec!["check", "--config", &good, "--skip-storage"],
            "--skip-storage",
        ),
        (
            vec!["check", "--config", &good, "--registry-url", "ftp://x"],
            "--registry-url",
        ),
        (
            vec![
                "check",
                "--config",
                &redis,
                "--registry-url",
                "http://127.0.0.1:1",
            ],
            "layerinfo) is redis",
        ),
    ];
    for (args, expect) in cases {
        let (code, out, err) = run_tool(&args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(out.is_empty(), "{args:?}: {out}");
        assert!(err.contains(expect), "{args:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
    }
}

#[test]
fn check_config_behind_basic_auth() {
    let dir = Scratch::new("ckmemauth");
    let registry = Registry::start_with(&dir, Cache::InMemory, true);
    let (_, app2, app2_manifest) = push_two_apps(&registry, &dir, [20_000, 5_000, 6_000]);
    registry.delete_manifest("team/app2", &app2_manifest);
    registry.garbage_collect();
    let expected = served_along(&registry, "team/app2", &app2.blobs());
    assert!(!expected.is_empty());
    let config = registry.config.display().to_string();
    let run = |extra: &[&str], stdin: &str| {
        let mut child = Command::new(BIN)
            .args(["check", "--config", &config, "--format", "json"])
            .args(extra)
            .env("DOCKER_CONFIG", dir.path("no-docker-config"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(stdin.as_bytes())
            .expect("stdin");
        let out = child.wait_with_output().expect("wait");
        (
            out.status.code().unwrap_or(-1),
            json_or_null(&String::from_utf8_lossy(&out.stdout)),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // Without credentials: refused, so incomplete, and the note says what to give.
    let (code, r, err) = run(&[], "");
    assert_eq!(code, 1, "{err}\n{r:#}");
    assert_eq!(r["complete"], false);
    let n = notes(&r);
    assert!(
        n.contains("refused access") && n.contains("--username"),
        "{n}"
    );
    assert!(!pairs(&r, "dangling-layer-link").is_empty());

    // With --username and --password-stdin, or a Docker config.json for its address.
    let (code, r, err) = run(
        &["--username", HTPASSWD_USER, "--password-stdin"],
        &format!("{HTPASSWD_PASSWORD}\n"),
    );
    assert_eq!(code, 1, "{err}");
    assert_eq!(pairs(&r, "live-phantom"), expected, "{r:#}");
    assert_eq!(r["complete"], true);
    let text = format!("{r}{err}");
    assert!(!text.contains(HTPASSWD_PASSWORD));
    let docker = dir.path("docker-config.json");
    let auth = common::base64_encode(format!("{HTPASSWD_USER}:{HTPASSWD_PASSWORD}").as_bytes());
    fs::write(
        &docker,
        format!(
            r#"{{"auths":{{"127.0.0.1:{}":{{"auth":"{auth}"}}}}}}"#,
            registry.port
        ),
    )
    .expect("write");
    let d = docker.display().to_string();
    let (code, r, err) = run(&["--docker-config", &d], "");
    assert_eq!(code, 1, "{err}");
    assert_eq!(pairs(&r, "live-phantom"), expected);
}

/// After a manifest delete, GC and `DELETE /v2/<repo>/blobs/<digest>` for every blob the
/// repository linked, storage has no dangling link and every HEAD answers 404; yet the
/// registry's global in-memory descriptors still vouch for the deleted manifest, so a
/// re-push "succeeds" and the pull fails. check cannot see those descriptors: it says so
/// (verdict and notes) and never calls the cache clean; the exit status stays 0.
#[test]
fn a_clean_probe_never_vouches_for_the_global_in_memory_descriptors() {
    let dir = Scratch::new("ckglobal");
    let registry = Registry::start(&dir, Cache::InMemory);
    let image = make_image(&dir.path("img"), "solo", &[bytes(41, 30_000)]);
    let manifest = push(&registry, &image, "solo/app:v1");
    let (ok, err) = pull(&registry, "solo/app:v1", &dir.path("pulled"));
    assert!(ok, "{err}");
    registry.delete_manifest("solo/app", &manifest);
    registry.garbage_collect();
    for d in image.blobs() {
        if !registry.has_blob(&d) && d != manifest {
            let status = registry.http("DELETE", &format!("/v2/solo/app/blobs/{d}"));
            assert_eq!(status, Some(202), "DELETE blob {d}");
            assert_eq!(registry.head_blob("solo/app", &d), Some(404));
        }
    }

    let config = registry.config.clone();
    let (code, r, err) = check_config(&config, &dir, &[]);
    assert_eq!(code, 0, "{err}\n{r:#}");
    assert_eq!(r["findings"], serde_json::json!([]), "{r:#}");
    assert_eq!(r["complete"], true);
    let verdict = r["verdict"].as_str().expect("verdict");
    assert!(
        !verdict.contains("no deleted blob to vouch for")
            && verdict.contains("cannot be seen")
            && verdict.contains("restart"),
        "{verdict}"
    );
    let n = notes(&r);
    assert!(
        n.contains("global in-memory blob descriptors cannot be audited") && n.contains("restart"),
        "{n}"
    );

    // What the note warns of, as a client meets it.
    push(&registry, &image, "solo/app:v1");
    let (ok, _) = pull(&registry, "solo/app:v1", &dir.path("pulled-again"));
    assert!(
        !ok,
        "the pull after a re-push worked: the global descriptors were gone"
    );
}

/// Answers every request on `listener` with 200 and no `Docker-Distribution-Api-Version`
/// header, as any web server with a `v2/` directory does.
fn serve_plain_200<L, S>(accept: L)
where
    L: Fn() -> Option<S> + Send + 'static,
    S: Read + Write,
{
    std::thread::spawn(move || {
        while let Some(mut conn) = accept() {
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && head.len() < 65536 {
                match conn.read(&mut byte) {
                    Ok(1) => head.push(byte[0]),
                    _ => break,
                }
            }
            let _ = conn.write_all(
                b"HTTP/1.1 200 OK\r\nServer: SimpleHTTP/0.6\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            );
        }
    });
}

/// A web server that answers 200 on /v2/ is not the registry: without the registry's API
/// version header `probe` exits 2 with one line, and `check --config` on an in-memory
/// cache verifies storage but is incomplete with a note saying so - over TCP and over a
/// unix socket.
#[test]
fn a_web_server_answering_200_on_v2_is_not_taken_for_the_registry() {
    let store = Store::new("notreg");
    let root = store.root();
    let dir = Scratch::new("notregcfg");
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = tcp.local_addr().expect("addr").port();
    serve_plain_200(move || tcp.accept().ok().map(|(s, _)| s));
    let sock = dir.path("web.sock");
    let unix = std::os::unix::net::UnixListener::bind(&sock).expect("bind unix");
    serve_plain_200(move || unix.accept().ok().map(|(s, _)| s));
    let url = format!("http://127.0.0.1:{port}");
    assert_eq!(http_status("HEAD", &format!("{url}/v2/")), Some(200));

    let (code, out, err) = run_tool(&["probe", "--registry-url", &url, "--root", &root]);
    assert_eq!(code, 2, "{out}\n{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(
        err.contains("not a container registry") && err.contains("Docker-Distribution-Api-Version"),
        "{err}"
    );

    for (name, http) in [
        ("tcp.yml", format!("http:\n  addr: 127.0.0.1:{port}\n")),
        (
            "unix.yml",
            format!("http:\n  net: unix\n  addr: {}\n", sock.display()),
        ),
    ] {
        let config = dir.path(name);
        fs::write(
            &config,
            format!("storage:\n  filesystem:\n    rootdirectory: {root}\n  cache:\n    blobdescriptor: inmemory\n{http}"),
        )
        .expect("write");
        let (code, r, err) = check_config(&config, &dir, &[]);
        assert_eq!(code, 1, "{name}: {err}\n{r:#}");
        assert_eq!(r["complete"], false, "{name}: {r:#}");
        let n = notes(&r);
        assert!(
            n.contains("not probed") && n.contains("not a container registry"),
            "{name}: {n}"
        );
        assert!(
            !r["verdict"].as_str().expect("v").starts_with("OK"),
            "{r:#}"
        );
    }
}
