//! Object storage beyond S3: the registry's azure driver's layout in Azurite (Microsoft's
//! Azure Storage emulator) and the gcs driver's. Debian's registry is built without those
//! drivers, so the state is made by the real registry on the filesystem (push, pull,
//! manifest delete, GC) and copied object for object, as the drivers lay it out; the
//! tool then reads it through the registry's own `storage.azure` / `storage.gcs`
//! settings and must report exactly what it reports on the filesystem.

mod common;

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

#[test]
fn the_same_state_on_the_filesystem_and_in_azure_gives_the_same_findings() {
    let s = shared_layers_scenario("fs-vs-azure");
    delete_app2_and_gc(&s);
    let azurite = Azurite::start();
    azurite.create_container("registry");
    azurite.upload_tree("registry", &s.registry.root, S3_PREFIX);

    let root = s.registry.root.display().to_string();
    let url = s.redis.url();
    let (code_fs, fs_out, err) = run_tool(&[
        "check", "--root", &root, "--redis", &url, "--format", "json",
    ]);
    assert_eq!(code_fs, 1, "{err}");
    let fs_report = json(&fs_out);
    let dir = Scratch::new("azcfg");
    let config = azure_config(&dir, &azurite, "registry", &s.redis);
    let (code, out, err) = run_tool(&["check", "--config", &config, "--format", "json"]);
    assert_eq!(code, code_fs, "{err}");
    let az_report = json(&out);
    eprintln!("{:#}", az_report["source"]);
    eprintln!("{:#}", az_report["summary"]);
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

    let root = s.registry.root.display().to_string();
    let url = s.redis.url();
    let (code_fs, fs_out, err) = run_tool(&[
        "check", "--root", &root, "--redis", &url, "--format", "json",
    ]);
    assert_eq!(code_fs, 1, "{err}");
    let fs_report = json(&fs_out);
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
}
