//! `check` on hand-made cases against a real Redis: corrupt and wrongly sized blobs,
//! hostile and malformed keys, other applications' keys, huge sets, and every way the
//! tool can fail to run (exit 2 with one line that says what to fix).

use crate::common;

use std::fs;

use common::*;

fn check(store: &Store, redis: &Redis, extra: &[&str]) -> (i32, serde_json::Value, String) {
    let root = store.root();
    let url = redis.url();
    let mut args = vec![
        "check", "--root", &root, "--redis", &url, "--format", "json",
    ];
    args.extend_from_slice(extra);
    let (code, out, err) = run_tool(&args);
    let report = json_or_null(&out);
    (code, report, err)
}

fn kinds(report: &serde_json::Value) -> Vec<String> {
    report["findings"]
        .as_array()
        .expect("findings")
        .iter()
        .map(|f| f["kind"].as_str().expect("kind").to_string())
        .collect()
}

#[test]
fn corrupt_blob_is_a_digest_mismatch_and_wrong_size_a_size_mismatch() {
    let store = Store::new("corrupt");
    let redis = Redis::start();
    let mut c = redis.conn();
    let good = store.blob("app", &bytes(1, 100_000));
    let corrupt = store.blob("app", &bytes(2, 50_000));
    let resized = store.blob("app", &bytes(3, 1000));
    cache(&mut c, "app", &good, 100_000);
    cache(&mut c, "app", &corrupt, 50_000);
    cache(&mut c, "app", &resized, 999);
    // Same length, different bytes: only a re-hash can tell.
    let mut tampered = bytes(2, 50_000);
    tampered[25_000] ^= 0xff;
    store.write_data(&corrupt, &tampered);

    let (code, report, err) = check(&store, &redis, &[]);
    assert_eq!(code, 1, "{err}");
    assert_eq!(
        kinds(&report),
        vec!["size-mismatch", "digest-mismatch"],
        "{report:#}"
    );
    let f = &report["findings"];
    assert_eq!(f[0]["digest"], resized.as_str());
    assert_eq!(f[0]["key"], format!("blobs::{resized}"));
    assert_eq!(f[0]["live"], true);
    assert_eq!(f[0]["severity"], "error");
    assert_eq!(f[1]["digest"], corrupt.as_str());
    assert_eq!(f[1]["severity"], "error");
    assert!(f[1]["detail"].as_str().expect("detail").contains("corrupt"));
    assert_eq!(report["summary"]["bytes_hashed"], 151_000);
    assert!(
        report["verdict"]
            .as_str()
            .expect("verdict")
            .contains("corrupt or unreadable in storage")
    );

    // --quick does not hash, so it sees the size but not the corruption.
    let (code, quick, _) = check(&store, &redis, &["--quick"]);
    assert_eq!(code, 1);
    assert_eq!(kinds(&quick), vec!["size-mismatch"]);
}

#[test]
fn unreadable_blobs_and_symlinks_out_of_the_root() {
    let store = Store::new("unreadable");
    let outside = Scratch::new("outside");
    let redis = Redis::start();
    let mut c = redis.conn();
    let secret = b"not registry data";
    fs::write(outside.path("secret"), secret).expect("write");
    let d = sha256(secret);
    let p = store.data_path(&d);
    fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
    std::os::unix::fs::symlink(outside.path("secret"), &p).expect("symlink");
    cache(&mut c, "app", &d, secret.len());
    // A directory where the data file should be.
    let dir_digest = sha256(b"dir");
    fs::create_dir_all(store.data_path(&dir_digest)).expect("mkdir");
    cache(&mut c, "app", &dir_digest, 3);

    let (code, report, err) = check(&store, &redis, &[]);
    assert_eq!(code, 1, "{err}");
    assert_eq!(
        kinds(&report),
        vec!["unreadable-blob", "unreadable-blob"],
        "{report:#}"
    );
    assert_eq!(
        report["summary"]["bytes_hashed"], 0,
        "nothing outside the root is read"
    );
    let details: Vec<&str> = report["findings"]
        .as_array()
        .expect("f")
        .iter()
        .map(|f| f["detail"].as_str().expect("d"))
        .collect();
    assert!(
        details
            .iter()
            .any(|d| d.contains("outside the storage root")),
        "{details:?}"
    );
    assert!(
        details.iter().any(|d| d.contains("not a regular file")),
        "{details:?}"
    );
}

#[test]
fn hostile_keys_are_findings_and_other_applications_keys_are_left_alone() {
    let store = Store::new("hostile");
    let redis = Redis::start();
    let mut c = redis.conn();
    let good = store.blob("app", b"layer");
    cache(&mut c, "app", &good, 5);
    redis::pipe()
        // Another application's keys in the same database.
        .cmd("SET")
        .arg("session:42")
        .arg("x")
        .cmd("HSET")
        .arg("myapp::blobs::x")
        .arg("a")
        .arg("b")
        .cmd("SADD")
        .arg("repository::notours")
        .arg("m")
        // Traversal in digests and repository names.
        .cmd("HSET")
        .arg("blobs::sha256:../../../../etc/passwd")
        .arg("size")
        .arg("1")
        .cmd("SADD")
        .arg("repository::../../etc::blobs")
        .arg(&good)
        .cmd("SADD")
        .arg("repository::app::blobs")
        .arg("sha256:../../../etc/shadow")
        .cmd("HSET")
        .arg("repository::app::blobs::sha512:abc")
        .arg("mediatype")
        .arg("x")
        // Non-UTF-8 bytes in a key and in a member.
        .cmd("SADD")
        .arg(&b"repository::caf\xe9::blobs"[..])
        .arg(&good)
        .cmd("SADD")
        .arg("repository::app::blobs")
        .arg(&b"sha256:\xff\xfe"[..])
        // Wrong types and unusable fields.
        .cmd("SET")
        .arg(format!("blobs::{}", sha256(b"string")))
        .arg("x")
        .cmd("HSET")
        .arg("repository::other::blobs")
        .arg("a")
        .arg("b")
        .cmd("HSET")
        .arg(format!("blobs::{}", sha256(b"nan")))
        .arg("digest")
        .arg(sha256(b"nan"))
        .arg("size")
        .arg("twelve")
        .cmd("HSET")
        .arg(format!("blobs::{}", sha256(b"neg")))
        .arg("digest")
        .arg(sha256(b"neg"))
        .arg("size")
        .arg("-5")
        .cmd("HSET")
        .arg(format!("blobs::{good}"))
        .arg("digest")
        .arg(sha256(b"someone else"))
        .query::<()>(&mut c)
        .expect("hostile keys");
    let before = redis.dump();

    let (code, report, err) = check(&store, &redis, &[]);
    let findings = report["findings"].as_array().expect("findings");
    // Every malformed entry is a finding with the raw key; no other kind appears.
    let malformed: Vec<(String, Option<String>)> = findings
        .iter()
        .filter(|f| f["kind"] == "malformed-cache-entry")
        .map(|f| {
            (
                f["key"].as_str().expect("key").to_string(),
                f["member"].as_str().map(str::to_string),
            )
        })
        .collect();
    let keys: Vec<&str> = malformed.iter().map(|(k, _)| k.as_str()).collect();
    for expected in [
        "blobs::sha256:../../../../etc/passwd",
        "repository::../../etc::blobs",
        "repository::app::blobs::sha512:abc",
        "repository::caf\\xe9::blobs",
        "repository::other::blobs",
    ] {
        assert!(keys.contains(&expected), "{expected} missing from {keys:?}");
    }
    let members: Vec<&str> = malformed.iter().filter_map(|(_, m)| m.as_deref()).collect();
    assert_eq!(
        members,
        vec!["sha256:../../../etc/shadow", "sha256:\\xff\\xfe"]
    );
    assert!(keys.contains(&format!("blobs::{}", sha256(b"string")).as_str()));
    assert!(keys.contains(&format!("blobs::{}", sha256(b"nan")).as_str()));
    assert!(keys.contains(&format!("blobs::{}", sha256(b"neg")).as_str()));
    assert!(
        keys.contains(&format!("blobs::{good}").as_str()),
        "digest field disagreeing"
    );
    for f in findings {
        let key = f["key"].as_str().expect("key");
        assert!(
            !key.starts_with("session")
                && !key.starts_with("myapp")
                && key != "repository::notours",
            "{f}"
        );
        if f["digest"].is_string() {
            assert!(f["digest"].as_str().expect("d").starts_with("sha"), "{f}");
        }
    }
    // Blobs of nan/string are absent and their entries unusable: inert, warnings. The
    // negative size parses as an integer, so the registry serves that entry: a live
    // phantom, the one error here.
    let neg = sha256(b"neg");
    for f in findings {
        let is_neg_phantom = f["kind"] == "phantom-blob-descriptor" && f["digest"] == neg.as_str();
        assert_eq!(f["severity"] == "error", is_neg_phantom, "{f}");
        // Served as they are: the negative size, and the digest field naming another blob.
        let served = f["digest"] == neg.as_str()
            || (f["digest"] == good.as_str() && f["repository"].is_null());
        assert_eq!(f["live"] == true, served, "{f}");
    }
    assert_eq!(report["summary"]["foreign_keys_skipped"], 3);
    assert_eq!(code, 1, "{err}");
    let (code, _, _) = check(&store, &redis, &["--fail-on", "never"]);
    assert_eq!(code, 0);
    // Nothing was written to Redis.
    let after = redis.dump();
    assert_eq!(before, after, "check must not write to Redis");
}

#[test]
fn huge_sets_are_streamed() {
    let store = Store::new("huge");
    let redis = Redis::start();
    let mut c = redis.conn();
    let good = store.blob("big", b"present");
    cache(&mut c, "big", &good, 7);
    // 60,000 members of one set (phantoms: no blob data), added in chunks.
    let members: Vec<String> = (0..60_000u32).map(|i| sha256(&i.to_le_bytes())).collect();
    for chunk in members.chunks(5000) {
        redis::cmd("SADD")
            .arg("repository::big::blobs")
            .arg(chunk)
            .query::<()>(&mut c)
            .expect("sadd");
    }
    let (code, report, err) = check(&store, &redis, &["--scan-count", "500"]);
    assert_eq!(code, 0, "inert phantoms are warnings: {err}");
    assert_eq!(report["summary"]["set_members_scanned"], 60_001);
    assert_eq!(
        report["summary"]["findings_by_kind"]["phantom-repository-blob"],
        60_000
    );
    assert!(
        report["findings"]
            .as_array()
            .expect("f")
            .iter()
            .all(|f| f["live"] == false)
    );
}

#[test]
fn exit_2_with_one_line_for_everything_that_cannot_run() {
    let store = Store::new("exit2");
    let redis = Redis::start_with(Some("s3cret-pw"));
    let root = store.root();
    let good = redis.url();
    let wrong_pw = good.replace("s3cret-pw", "wrong-pw");
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = l.local_addr().expect("addr").port();
        drop(l);
        format!("redis://127.0.0.1:{port}/0")
    };
    let cfg_dir = Scratch::new("cfgs");
    let broken = cfg_dir.path("broken.yml");
    fs::write(&broken, "storage: [unclosed\n").expect("write");
    let inmemory = cfg_dir.path("inmemory.yml");
    fs::write(&inmemory, format!("storage:\n  filesystem:\n    rootdirectory: {root}\n  cache:\n    blobdescriptor: inmemory\n")).expect("write");
    let swift = cfg_dir.path("swift.yml");
    fs::write(&swift, "storage:\n  swift:\n    container: b\n  cache:\n    blobdescriptor: redis\nredis:\n  addr: 127.0.0.1:1\n").expect("write");
    let missing = cfg_dir.path("missing.yml").display().to_string();
    let not_registry = cfg_dir.0.display().to_string();
    let (b, i, s) = (
        broken.display().to_string(),
        inmemory.display().to_string(),
        swift.display().to_string(),
    );

    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec![
                "check", "--root", &root, "--redis", &good, "--format", "xml",
            ],
            "invalid value",
        ),
        (
            vec!["check", "--root", &root, "--redis", &good, "--jobs", "0"],
            "--jobs",
        ),
        (
            vec!["check", "--root", &root, "--redis", "http://x"],
            "invalid Redis URL",
        ),
        (
            vec!["check", "--config", &missing],
            "cannot read registry config",
        ),
        (vec!["check", "--config", &b], "not valid YAML"),
        (vec!["check", "--config", &i], "inmemory"),
        (vec!["check", "--config", &s], "'swift' driver"),
        (
            vec!["check", "--root", "/nonexistent/registry", "--redis", &good],
            "does not exist",
        ),
        (
            vec!["check", "--root", &not_registry, "--redis", &good],
            "no registry storage under",
        ),
        (
            vec!["check", "--root", &root, "--redis", &dead],
            "cannot reach Redis",
        ),
        (
            vec!["check", "--root", &root, "--redis", &wrong_pw],
            "refused the credentials",
        ),
        (vec!["check", "--root", &root], "--redis"),
    ];
    for (args, expect) in cases {
        let (code, out, err) = run_tool(&args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(out.is_empty(), "{args:?} printed a report: {out}");
        assert!(err.contains(expect), "{args:?}: {err}");
        assert!(
            !err.contains("s3cret") && !err.contains("wrong-pw"),
            "password printed: {err}"
        );
        if !expect.starts_with("invalid value") {
            assert_eq!(
                err.trim_end().lines().count(),
                1,
                "{args:?}: one line: {err}"
            );
        }
    }
    // The right password works.
    let (code, _, err) = run_tool(&[
        "check", "--root", &root, "--redis", &good, "--format", "json",
    ]);
    assert_eq!(code, 0, "{err}");
}

#[test]
fn output_file_is_written_and_sha512_blobs_are_verified() {
    let store = Store::new("output");
    let redis = Redis::start();
    let mut c = redis.conn();
    // A sha512 blob: the registry's layout with the sha512 directory.
    let content = b"sha512 content";
    let d512 = {
        use sha2::Digest as _;
        let out = sha2::Sha512::digest(content);
        format!(
            "sha512:{}",
            out.iter().map(|b| format!("{b:02x}")).collect::<String>()
        )
    };
    let p = store
        .v2()
        .join("blobs/sha512")
        .join(&d512[7..9])
        .join(&d512[7..])
        .join("data");
    fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
    fs::write(&p, content).expect("write");
    let link = store
        .v2()
        .join("repositories/app/_layers/sha512")
        .join(&d512[7..]);
    fs::create_dir_all(&link).expect("mkdir");
    fs::write(link.join("link"), &d512).expect("link");
    cache(&mut c, "app", &d512, content.len());
    let out = store.dir.path("report.json");
    let (root, url, o) = (store.root(), redis.url(), out.display().to_string());
    let (code, stdout, err) =
        run_tool(&["check", "--root", &root, "--redis", &url, "--output", &o]);
    assert_eq!(code, 0, "{err}");
    assert!(stdout.is_empty());
    let report = json(&fs::read_to_string(&out).expect("report file"));
    assert_eq!(report["findings"], serde_json::json!([]));
    assert_eq!(report["summary"]["bytes_hashed"], content.len());
}

#[test]
fn redis_over_tls_with_the_registry_v3_tls_settings() {
    let store = Store::new("tls");
    let pki = Pki::new(&["server", "client"]);
    let d = &pki.dir.0;
    // A TLS-only Redis that requires client certificates.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("port");
    let _redis = Proc(
        std::process::Command::new("redis-server")
            .args([
                "--port",
                "0",
                "--tls-port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .args([
                "--tls-cert-file",
                "server.crt",
                "--tls-key-file",
                "server.key",
                "--tls-ca-cert-file",
                "ca.crt",
            ])
            .args(["--tls-auth-clients", "yes"])
            .current_dir(d)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server"),
    );
    let config = store.dir.path("config.yml");
    let write_config = |with_client: bool| {
        let client = if with_client {
            format!(
                "    certificate: {0}/client.crt\n    key: {0}/client.key\n",
                d.display()
            )
        } else {
            String::new()
        };
        fs::write(
            &config,
            format!(
                "storage:\n  filesystem:\n    rootdirectory: {}\n  cache:\n    blobdescriptor: redis\nredis:\n  addrs: [127.0.0.1:{port}]\n  tls:\n{client}    rootcas: [{}/ca.crt]\n",
                store.root(),
                d.display()
            ),
        )
        .expect("config");
    };
    write_config(true);
    let c = config.display().to_string();
    let mut result = (0, String::new(), String::new());
    wait_until("TLS redis", std::time::Duration::from_secs(20), || {
        result = run_tool(&["check", "--config", &c, "--format", "json"]);
        result.0 == 0
    });
    let report = json(&result.1);
    assert_eq!(
        report["source"]["redis"],
        format!("rediss://127.0.0.1:{port}/0")
    );
    // Without the client certificate the server refuses: exit 2, one line.
    write_config(false);
    let (code, _, err) = run_tool(&["check", "--config", &c, "--format", "json"]);
    assert_eq!(code, 2, "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
}
