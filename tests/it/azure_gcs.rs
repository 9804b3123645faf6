//! Object storage beyond S3: the registry's azure driver's layout in Azurite (Microsoft's
//! Azure Storage emulator) and the gcs driver's. Debian's registry is built without those
//! drivers, so the state is made by the real registry on the filesystem (push, pull,
//! manifest delete, GC) and copied object for object, as the drivers lay it out; the
//! tool then reads it through the registry's own `storage.azure` / `storage.gcs`
//! settings (or `--storage` URLs) and must report exactly what it reports on the
//! filesystem; in Azure also a corrupted object, purge's re-check, throttling and a
//! dropped connection, a missing container, a wrong key and an endpoint nobody answers.

use crate::common;

use common::*;

fn azure_config(dir: &Scratch, azurite: &Azurite, container: &str, redis: &Redis) -> String {
    let path = dir.path("azure.yml");
    std::fs::write(
        &path,
        format!(
            "version: 0.1\nstorage:\n  cache:\n    blobdescriptor: redis\n  azure:\n    accountname: {AZURITE_ACCOUNT}\n    accountkey: \"{AZURITE_KEY}\"\n    container: {container}\n    serviceurl: {}\n    rootdirectory: /{S3_PREFIX}\nredis:\n  addr: 127.0.0.1:{}\n",
            azurite.endpoint(),
            redis.port
        ),
    )
    .expect("config");
    path.display().to_string()
}

/// The shared-layers scenario after a manifest delete and GC, copied into a container
/// `registry` of a fresh Azurite under S3_PREFIX.
fn scenario_in_azure(tag: &str) -> (Scenario, Azurite) {
    let s = shared_layers_scenario(tag);
    delete_app2_and_gc(&s);
    let azurite = Azurite::start();
    azurite.create_container("registry");
    azurite.upload_tree("registry", &s.registry.root, S3_PREFIX);
    (s, azurite)
}

#[test]
fn the_same_state_on_the_filesystem_and_in_azure_gives_the_same_findings() {
    let (s, azurite) = scenario_in_azure("fs-vs-azure");
    let (code_fs, fs_report, err) = check_fs(&s, &[]);
    assert_eq!(code_fs, 1, "{err}");
    let dir = Scratch::new("azcfg");
    let config = azure_config(&dir, &azurite, "registry", &s.redis);
    let (code, out, err) = run_tool(&["check", "--config", &config, "--format", "json"]);
    assert_eq!(code, code_fs, "{err}");
    let az_report = json(&out);
    assert_eq!(az_report["findings"], fs_report["findings"]);
    assert_eq!(
        az_report["summary"]["storage"],
        fs_report["summary"]["storage"]
    );
    assert_eq!(
        az_report["summary"]["bytes_hashed"],
        fs_report["summary"]["bytes_hashed"]
    );
    assert!(az_report["summary"]["object_storage"]["requests"].as_u64() > Some(0));
    // The table says what reading the store cost.
    let (_, table, _) = run_tool(&["check", "--config", &config, "--format", "table"]);
    let requests = az_report["summary"]["object_storage"]["requests"].clone();
    assert!(
        table.contains(&format!("object storage: {requests} requests")),
        "{table}"
    );
}

/// A GCS service-account key file whose `gcs_base_url` names `server` and that asks for
/// no OAuth token (object_store's switches for test servers).
fn gcs_keyfile(dir: &Scratch, server: &str) -> String {
    let path = dir.path("gcs-key.json");
    let key = serde_json::json!({
        "type": "service_account",
        "private_key": "",
        "private_key_id": "",
        "client_email": "audit@example.iam.gserviceaccount.com",
        "gcs_base_url": server,
        "disable_oauth": true,
    });
    std::fs::write(&path, key.to_string()).expect("key file");
    path.display().to_string()
}

#[test]
fn the_same_state_on_the_filesystem_and_in_gcs_gives_the_same_findings() {
    let s = shared_layers_scenario("fs-vs-gcs");
    delete_app2_and_gc(&s);
    // No GCS emulator that serves the XML API object_store's GCS client lists and reads
    // with is packaged here; moto serves the S3 XML API it was made to match, behind a
    // proxy that decodes the escaped object names (`reg%2Fdocker%2F...`) GCS accepts.
    // The objects are public-read, so they are readable without a token.
    let moto = Moto::start();
    moto.create_bucket("gcs-registry");
    moto.upload_tree_with_acl("gcs-registry", &s.registry.root, S3_PREFIX, "public-read");
    let gcs = FaultyProxy::decoding(moto.port);

    let url = s.redis.url();
    let (code_fs, fs_report, err) = check_fs(&s, &[]);
    assert_eq!(code_fs, 1, "{err}");
    let dir = Scratch::new("gcscfg");
    let keyfile = gcs_keyfile(&dir, &gcs.endpoint());
    let config = dir.path("gcs.yml");
    std::fs::write(
        &config,
        format!(
            "version: 0.1\nstorage:\n  cache:\n    blobdescriptor: redis\n  gcs:\n    bucket: gcs-registry\n    keyfile: {keyfile}\n    rootdirectory: {S3_PREFIX}\nredis:\n  addr: 127.0.0.1:{}\n",
            s.redis.port
        ),
    )
    .expect("config");
    let config = config.display().to_string();
    let (code, out, err) = run_tool(&["check", "--config", &config, "--format", "json"]);
    assert_eq!(code, code_fs, "{err}");
    let report = json(&out);
    assert_eq!(report["source"]["storage_root"], "gs://gcs-registry/reg");
    assert_eq!(report["findings"], fs_report["findings"]);
    assert_eq!(
        report["summary"]["storage"],
        fs_report["summary"]["storage"]
    );
    assert_eq!(
        report["summary"]["bytes_hashed"],
        fs_report["summary"]["bytes_hashed"]
    );

    // The same by URL, with the key file from the environment; then a missing bucket.
    let (code, out, err) = run_tool_env(
        &[
            "check",
            "--storage",
            "gs://gcs-registry/reg",
            "--redis",
            &url,
            "--format",
            "json",
        ],
        &[("GOOGLE_SERVICE_ACCOUNT", keyfile.as_str())],
    );
    assert_eq!(code, code_fs, "{err}");
    assert_eq!(json(&out)["findings"], fs_report["findings"]);
    let (code, _, err) = run_tool_env(
        &[
            "check",
            "--storage",
            "gs://no-such-bucket/reg",
            "--redis",
            &url,
        ],
        &[("GOOGLE_SERVICE_ACCOUNT", keyfile.as_str())],
    );
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("bucket no-such-bucket does not exist"),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
}

#[test]
fn in_azure_a_corrupted_object_is_a_digest_mismatch_and_purge_re_checks_azure() {
    let (s, azurite) = scenario_in_azure("azure-purge");
    let config = azure_config(&s.dir, &azurite, "registry", &s.redis);

    // A corrupted object is a digest-mismatch.
    let victim = &s.app1.layers[1];
    let mut bad = image_blob(&s.app1, victim);
    bad[0] ^= 1;
    azurite.put("registry", &s3_blob_key(victim), &bad);
    let (code, out, err) = run_tool(&["check", "--config", &config, "--format", "json"]);
    assert_eq!(code, 1, "{err}");
    let report = json(&out);
    assert!(
        has_finding(&report, "digest-mismatch", victim),
        "{report:#}"
    );

    // purge asks Azure again before each digest: the layer put back after the plan was
    // made keeps its entries, the other phantoms go.
    let plan = s.dir.path("plan.json").display().to_string();
    let (code, _, err) = run_tool(&["purge", "--config", &config, "--plan-out", &plan]);
    assert_eq!(code, 1, "{err}");
    let back = &s.app2.layers[1];
    azurite.put("registry", &s3_blob_key(back), &image_blob(&s.app2, back));
    let journal = s.dir.path("j.jsonl").display().to_string();
    let (code, report, err) = purge_apply(&config, &plan, &journal);
    assert_eq!(code, 1, "the corrupt layer is still there: {err}");
    let result = &report["result"];
    assert_eq!(result["digests_skipped_came_back"], 1, "{result:#}");
    assert!(
        result["digests_removed"].as_u64().expect("n") >= 1,
        "{result:#}"
    );
    let (_, out, _) = run_tool(&["check", "--config", &config, "--format", "json"]);
    let phantoms: Vec<serde_json::Value> = json_findings(&out)
        .into_iter()
        .filter(|f| f["kind"].as_str().is_some_and(|k| k.starts_with("phantom")))
        .collect();
    assert!(phantoms.is_empty(), "{phantoms:#?}");
}

fn json_findings(out: &str) -> Vec<serde_json::Value> {
    json(out)["findings"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

#[test]
fn azure_by_url_with_the_key_from_the_environment_through_throttling() {
    let (s, azurite) = scenario_in_azure("azure-url");
    let (_, fs_report, _) = check_fs(&s, &[]);
    let url = s.redis.url();
    let storage = format!("azure://{AZURITE_ACCOUNT}/registry/{S3_PREFIX}");
    let by_url = |endpoint: &str| {
        let (code, out, err) = run_tool_env(
            &[
                "check",
                "--storage",
                &storage,
                "--storage-endpoint",
                endpoint,
                "--redis",
                &url,
                "--format",
                "json",
            ],
            &[("AZURE_STORAGE_ACCOUNT_KEY", AZURITE_KEY)],
        );
        assert_eq!(code, 1, "{err}");
        json(&out)
    };
    assert_eq!(
        by_url(&azurite.endpoint())["findings"],
        fs_report["findings"]
    );

    // Three 503 answers, then a connection closed without an answer: retried.
    let proxy = FaultyProxy::start(azurite.port, 3);
    let through = by_url(&format!("{}/{AZURITE_ACCOUNT}", proxy.endpoint()));
    assert_eq!(proxy.faults.load(std::sync::atomic::Ordering::Relaxed), 4);
    assert_eq!(through["findings"], fs_report["findings"]);
}

#[test]
fn a_missing_container_and_a_wrong_key_are_exit_2_with_one_line() {
    let azurite = Azurite::start();
    azurite.create_container("registry");
    let redis = Redis::start();
    let dir = Scratch::new("azure-bad");

    let config = azure_config(&dir, &azurite, "no-such-container", &redis);
    let (code, out, err) = run_tool(&["check", "--config", &config]);
    assert_eq!(code, 2, "{err}");
    assert!(out.is_empty());
    assert!(
        err.contains("container no-such-container does not exist"),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");

    // A well-formed key that is not the account's.
    let wrong = "d3Jvbmcta2V5LXdyb25nLWtleS13cm9uZy1rZXktd3Jvbmcta2V5LXdyb25nLWtleQ==";
    let config = azure_config(&dir, &azurite, "registry", &redis);
    let text = std::fs::read_to_string(&config).expect("config");
    std::fs::write(&config, text.replace(AZURITE_KEY, wrong)).expect("config");
    let (code, _, err) = run_tool(&["check", "--config", &config]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("refused the credentials"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(
        !err.contains(wrong) && !err.contains("d3Jvbm"),
        "no key is printed: {err}"
    );

    // Nothing listening at the endpoint: retried, then one line.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    std::fs::write(
        &config,
        text.replace(&format!(":{}/", azurite.port), &format!(":{dead}/")),
    )
    .expect("config");
    let (code, _, err) = run_tool(&["check", "--config", &config]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("cannot reach"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
}
