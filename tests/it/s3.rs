//! Object storage: the registry's s3 driver against a local S3-compatible server
//! (moto_server). The same registry state audited on the filesystem and on S3 gives the
//! same findings; the real registry on S3 after a manifest delete and GC shows its
//! phantoms; a corrupted object is a digest-mismatch; purge re-checks S3 before
//! removing; a bucket that does not exist is exit 2 with one line.

use crate::common;

use std::collections::BTreeSet;

use common::*;

const AWS_ENV: [(&str, &str); 3] = [
    ("AWS_ACCESS_KEY_ID", "test"),
    ("AWS_SECRET_ACCESS_KEY", "test"),
    ("AWS_REGION", "us-east-1"),
];

fn on_s3(
    moto: &Moto,
    bucket: &str,
    redis: &Redis,
    extra: &[&str],
) -> (i32, serde_json::Value, String) {
    on_s3_at(&moto.endpoint(), bucket, redis, extra)
}

/// `check --storage s3://bucket/PREFIX` against the S3 server at `endpoint`.
fn on_s3_at(
    endpoint: &str,
    bucket: &str,
    redis: &Redis,
    extra: &[&str],
) -> (i32, serde_json::Value, String) {
    let storage = format!("s3://{bucket}/{S3_PREFIX}");
    let url = redis.url();
    let mut args = vec![
        "check",
        "--storage",
        &storage,
        "--s3-endpoint",
        endpoint,
        "--redis",
        &url,
        "--format",
        "json",
    ];
    args.extend_from_slice(extra);
    let (code, out, err) = run_tool_env(&args, &AWS_ENV);
    let v = json_or_null(&out);
    (code, v, err)
}

#[test]
fn the_same_state_on_the_filesystem_and_on_s3_gives_the_same_findings() {
    let s = shared_layers_scenario("fs-vs-s3");
    delete_app2_and_gc(&s);
    let moto = Moto::start();
    moto.create_bucket("copy");
    moto.upload_tree("copy", &s.registry.root, S3_PREFIX);

    let (code_fs, fs_report, err) = check_fs(&s, &[]);
    assert_eq!(code_fs, 1, "{err}");
    let (code_s3, s3_report, err) = on_s3(&moto, "copy", &s.redis, &[]);
    assert_eq!(code_s3, code_fs, "{err}");
    assert_eq!(s3_report["findings"], fs_report["findings"]);
    for field in [
        "keys_scanned",
        "blobs_checked",
        "blobs_absent",
        "bytes_hashed",
        "findings_by_kind",
        "storage",
    ] {
        assert_eq!(
            s3_report["summary"][field], fs_report["summary"][field],
            "{field}"
        );
    }
    // What reading S3 cost is in the report.
    let cost = &s3_report["summary"]["object_storage"];
    assert!(cost["requests"].as_u64().expect("requests") > 0, "{cost}");
    assert!(
        cost["bytes"].as_u64().expect("bytes")
            >= s3_report["summary"]["bytes_hashed"]
                .as_u64()
                .expect("bytes")
    );
    assert!(fs_report["summary"]["object_storage"].is_null());
}

#[test]
fn the_registry_on_s3_phantoms_corruption_and_purge() {
    let dir = Scratch::new("regs3");
    let moto = Moto::start();
    moto.create_bucket("registry");
    let redis = Redis::start();
    let registry = Registry::start_s3(&dir, Cache::Redis(&redis), &moto, "registry");
    let (app1, app2, app2_manifest) = push_two_apps(&registry, &dir, [100_000, 30_000, 40_000]);
    registry.delete_manifest("team/app2", &app2_manifest);
    registry.garbage_collect();
    let gone = &app2.layers[1];
    assert!(
        !moto.exists("registry", &s3_blob_key(gone)),
        "GC deleted the layer on S3"
    );
    assert!(moto.exists("registry", &s3_blob_key(&app2.layers[0])));

    // check through the registry's own config (storage.s3), with the AWS env for nothing.
    let config = registry.config.display().to_string();
    let (code, out, err) = run_tool(&["check", "--config", &config, "--format", "json"]);
    assert_eq!(code, 1, "{err}");
    let report = json(&out);
    let phantoms: BTreeSet<(String, Option<String>)> = report["findings"]
        .as_array()
        .expect("findings")
        .iter()
        .filter(|f| f["kind"].as_str().is_some_and(|k| k.starts_with("phantom")))
        .map(|f| {
            (
                f["digest"].as_str().expect("d").to_string(),
                f["repository"].as_str().map(str::to_string),
            )
        })
        .collect();
    assert!(phantoms.contains(&(gone.clone(), None)), "{report:#}");
    assert!(phantoms.contains(&(gone.clone(), Some("team/app2".into()))));
    assert!(
        phantoms
            .iter()
            .all(|(d, _)| *d == *gone || *d == app2.config || *d == app2_manifest),
        "{phantoms:?}"
    );

    // A corrupted object is a digest-mismatch.
    let victim = &app1.layers[1];
    let mut bad = image_blob(&app1, victim);
    bad[0] ^= 1;
    moto.put_signed("registry", &s3_blob_key(victim), &bad);
    let (_, out, _) = run_tool(&["check", "--config", &config, "--format", "json"]);
    let report = json(&out);
    assert!(
        has_finding(&report, "digest-mismatch", victim),
        "{report:#}"
    );

    // purge re-checks S3: a blob uploaded again after the plan keeps its entries.
    let plan = dir.path("plan.json").display().to_string();
    let (code, _, err) = run_tool(&["purge", "--config", &config, "--plan-out", &plan]);
    assert_eq!(code, 1, "{err}");
    upload_blob(&registry, "team/app2", &image_blob(&app2, gone));
    let journal = dir.path("j.jsonl").display().to_string();
    let (code, report, err) = purge_apply(&config, &plan, &journal);
    assert_eq!(code, 1, "the corrupt blob is still there: {err}");
    let result = &report["result"];
    assert_eq!(result["digests_skipped_came_back"], 1, "{result:#}");
    assert!(result["digests_removed"].as_u64().expect("n") >= 1);
}

#[test]
fn a_bucket_that_does_not_exist_is_exit_2() {
    let moto = Moto::start();
    let redis = Redis::start();
    let (code, _, err) = on_s3(&moto, "no-such-bucket", &redis, &[]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("bucket no-such-bucket does not exist"),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
}

#[test]
fn credentials_the_store_refuses_are_exit_2() {
    let moto = Moto::start_authenticating();
    moto.create_bucket("locked");
    let redis = Redis::start();
    let (code, _, err) = on_s3(&moto, "locked", &redis, &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("refused the credentials"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(!err.contains("test"), "no key is printed: {err}");
}

#[test]
fn throttling_and_a_dropped_connection_are_retried() {
    let s = shared_layers_scenario("s3faults");
    delete_app2_and_gc(&s);
    let moto = Moto::start();
    moto.create_bucket("copy");
    moto.upload_tree("copy", &s.registry.root, S3_PREFIX);
    let (code, direct, err) = on_s3(&moto, "copy", &s.redis, &[]);
    assert_eq!(code, 1, "{err}");

    // Three 503 SlowDown answers, then a connection closed without an answer.
    let proxy = FaultyProxy::start(moto.port, 3);
    let (code, through, err) = on_s3_at(&proxy.endpoint(), "copy", &s.redis, &[]);
    assert_eq!(code, 1, "{err}");
    assert_eq!(
        proxy.faults.load(std::sync::atomic::Ordering::Relaxed),
        4,
        "every fault was served"
    );
    assert_eq!(through["findings"], direct["findings"]);
    assert_eq!(
        through["summary"]["bytes_hashed"],
        direct["summary"]["bytes_hashed"]
    );
}

#[test]
fn gc_on_s3_leaves_no_phantom() {
    let dir = Scratch::new("gcs3");
    let moto = Moto::start();
    moto.create_bucket("registry");
    let redis = Redis::start();
    let registry = Registry::start_s3(&dir, Cache::Redis(&redis), &moto, "registry");
    let app = make_image(
        &dir.path("img"),
        "gc-s3",
        &[bytes(21, 50_000), bytes(22, 20_000)],
    );
    let manifest = push(&registry, &app, "solo/app:v1");
    let (ok, err) = pull(&registry, "solo/app:v1", &dir.path("pulled"));
    assert!(ok, "{err}");
    registry.delete_manifest("solo/app", &manifest);
    let config = registry.config.display().to_string();
    let journal = dir.path("j.jsonl").display().to_string();
    let (code, r, err) = gc_with(
        &config,
        &journal,
        &[],
        &[
            "env",
            "-u",
            "AWS_CA_BUNDLE",
            "docker-registry",
            "garbage-collect",
            &config,
        ],
    );
    assert_eq!(code, 0, "{err}\n{r:#}");
    assert_eq!(r["summary"]["gc"]["blobs_deleted"], 4, "{r:#}");
    assert!(
        r["summary"]["gc"]["cache_entries_purged"]
            .as_u64()
            .expect("n")
            > 0
    );
    assert_eq!(registry.head_blob("solo/app", &app.layers[0]), Some(404));
    let (code, out, _) = run_tool(&["check", "--config", &config, "--format", "json"]);
    assert_eq!(code, 0, "no phantom left: {out}");
}
