//! Storage verification after GC-style damage, and cache dumps, end to end with the real
//! registry: `check --storage-only` reports exactly the broken tags, manifests and
//! links, and the same from a copy in Azure; `export-cache` then `check --cache-dump`
//! reports what `check --redis` does.

use crate::common;

use std::collections::BTreeSet;
use std::fs;

use common::*;

type Triple = (String, Option<String>, Option<String>);

fn storage_check(reg: &Registry) -> (i32, serde_json::Value) {
    let root = reg.root.display().to_string();
    let (code, out, err) = run_tool(&[
        "check",
        "--storage-only",
        "--root",
        &root,
        "--format",
        "json",
    ]);
    assert!(code == 0 || code == 1, "{err}");
    (code, json(&out))
}

fn t(kind: &str, repo: &str, digest: &str) -> Triple {
    (kind.into(), Some(repo.into()), Some(digest.into()))
}

#[test]
fn storage_verification_finds_exactly_what_gc_can_break() {
    let dir = Scratch::new("verify");
    let redis = Redis::start();
    let reg = Registry::start(&dir, Cache::Redis(&redis));
    let base = bytes(7, 50_000);
    let app = make_image(&dir.path("app"), "app", &[base.clone(), bytes(8, 40_000)]);
    let other = make_image(&dir.path("other"), "other", &[bytes(9, 30_000)]);
    let (multi, _) = make_index_image(&dir.path("multi"), &["amd", "arm"]);
    let app_manifest = push(&reg, &app, "team/app:v1");
    push(&reg, &app, "team/app:v1-copy");
    let other_manifest = push(&reg, &other, "team/other:v1");
    let index = push_all(&reg, &multi, "team/multi:v1");
    // skopeo may re-encode manifests on the way: the children are read from the
    // registry's copy of the index.
    let stored: serde_json::Value =
        serde_json::from_slice(&fs::read(reg.blob_path(&index)).expect("index blob"))
            .expect("json");
    let children: Vec<String> = stored["manifests"]
        .as_array()
        .expect("manifests")
        .iter()
        .map(|m| m["digest"].as_str().expect("digest").to_string())
        .collect();
    assert_eq!(children.len(), 2);
    assert!(children.iter().all(|c| reg.has_blob(c)));

    // Intact, with an index image: nothing to report, exit 0.
    let (code, report) = storage_check(&reg);
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(report["findings"], serde_json::json!([]));
    assert_eq!(report["source"]["cache"], "none");
    assert_eq!(report["summary"]["storage"]["repositories"], 3);
    // team/app's two tags share one manifest.
    assert_eq!(report["summary"]["storage"]["tagged_manifests_checked"], 3);
    assert_eq!(report["summary"]["storage"]["tags_checked"], 4);

    // Break it the ways GC can: a layer of a tagged image, a child manifest of an index,
    // and the manifest a tag points to.
    let layer = &app.layers[1];
    fs::remove_file(reg.blob_path(layer)).expect("rm layer");
    fs::remove_file(reg.blob_path(&children[1])).expect("rm child");
    fs::remove_file(reg.blob_path(&other_manifest)).expect("rm manifest");

    let (code, report) = storage_check(&reg);
    assert_eq!(code, 1);
    let got: BTreeSet<Triple> = finding_triples(&report).into_iter().collect();
    let expected: BTreeSet<Triple> = [
        // The layer: both tags of team/app can no longer be pulled; its link dangles.
        t("missing-referenced-blob", "team/app", layer),
        t("dangling-layer-link", "team/app", layer),
        // The child manifest: the index's tag cannot be pulled; its revision link dangles.
        t("missing-referenced-blob", "team/multi", &children[1]),
        t("dangling-manifest-revision", "team/multi", &children[1]),
        // The tagged manifest: the tag points nowhere; its revision link dangles.
        t("dangling-tag", "team/other", &other_manifest),
        t("dangling-manifest-revision", "team/other", &other_manifest),
    ]
    .into_iter()
    .collect();
    assert_eq!(got, expected, "{report:#}");
    let findings = report["findings"].as_array().expect("findings");
    let missing: Vec<&serde_json::Value> = findings
        .iter()
        .filter(|f| f["kind"] == "missing-referenced-blob")
        .collect();
    let app_tags: BTreeSet<&str> = missing
        .iter()
        .filter(|f| f["repository"] == "team/app")
        .map(|f| f["tag"].as_str().expect("tag"))
        .collect();
    assert_eq!(app_tags, ["v1", "v1-copy"].into_iter().collect());
    for f in &missing {
        if f["repository"] == "team/app" {
            assert_eq!(f["manifest"], app_manifest.as_str());
        } else {
            assert_eq!(
                f["manifest"],
                index.as_str(),
                "the index names the missing child"
            );
            assert_eq!(f["tag"], "v1");
        }
        assert_eq!(f["severity"], "error");
    }
    let dangling_tag = findings
        .iter()
        .find(|f| f["kind"] == "dangling-tag")
        .expect("dangling tag");
    assert_eq!(dangling_tag["tag"], "v1");

    // A link that holds garbage is a bad-link.
    let link = reg
        .root
        .join("docker/registry/v2/repositories/team/app/_layers/sha256")
        .join(&base_digest(&app)[7..])
        .join("link");
    fs::write(&link, "not a digest").expect("corrupt link");
    let (_, report) = storage_check(&reg);
    assert!(
        finding_triples(&report).contains(&t("bad-link", "team/app", &base_digest(&app))),
        "{report:#}"
    );
    // Storage was only read: the files the test removed are still removed, nothing new.
    assert!(!reg.has_blob(layer));

    // The same storage in object storage (Azure, through Azurite): the same findings,
    // with links and manifests fetched ahead in batches.
    let azurite = Azurite::start();
    azurite.create_container("verify");
    azurite.upload_tree("verify", &reg.root, S3_PREFIX);
    let storage = format!("azure://{AZURITE_ACCOUNT}/verify/{S3_PREFIX}");
    let (code, out, err) = run_tool_env(
        &[
            "check",
            "--storage-only",
            "--storage",
            &storage,
            "--storage-endpoint",
            &azurite.endpoint(),
            "--format",
            "json",
        ],
        &[("AZURE_STORAGE_ACCOUNT_KEY", AZURITE_KEY)],
    );
    assert_eq!(code, 1, "{err}");
    let in_azure = json(&out);
    assert_eq!(in_azure["findings"], report["findings"]);
    assert_eq!(in_azure["summary"]["storage"], report["summary"]["storage"]);
}

fn base_digest(image: &Image) -> String {
    image.layers[0].clone()
}

#[test]
fn a_cache_dump_audits_exactly_like_redis() {
    let s = shared_layers_scenario("dump");
    delete_app2_and_gc(&s);
    let (root, url) = (s.registry.root.display().to_string(), s.redis.url());
    // A malformed entry too, so that `live` and malformed findings are compared as well.
    let mut c = s.redis.conn();
    redis::cmd("SADD")
        .arg("repository::team/app1::blobs")
        .arg(&b"sha256:\xff"[..])
        .query::<()>(&mut c)
        .expect("sadd");

    let dump = s.dir.path("cache.jsonl").display().to_string();
    let (code, _, err) = run_tool(&["export-cache", "--redis", &url, "--output", &dump]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("Exported"), "{err}");
    let text = fs::read_to_string(&dump).expect("dump");
    assert!(text.starts_with("{\"format\":\"registry-audit-cache-dump\""));

    let (code_redis, out_redis, _) = run_tool(&[
        "check", "--root", &root, "--redis", &url, "--format", "json",
    ]);
    let (code_dump, out_dump, err) = run_tool(&[
        "check",
        "--root",
        &root,
        "--cache-dump",
        &dump,
        "--format",
        "json",
    ]);
    assert_eq!(code_dump, code_redis, "{err}");
    let (r, d) = (json(&out_redis), json(&out_dump));
    assert_eq!(d["findings"], r["findings"]);
    assert!(!r["findings"].as_array().expect("f").is_empty());
    for field in [
        "keys_scanned",
        "set_members_scanned",
        "blobs_checked",
        "blobs_absent",
        "findings_by_kind",
        "live",
    ] {
        assert_eq!(d["summary"][field], r["summary"][field], "{field}");
    }
    assert_eq!(d["source"]["cache"], "dump");

    // A damaged dump is a clear error with line and column, exit 2.
    let broken = s.dir.path("broken.jsonl");
    let mut lines: Vec<&str> = text.lines().collect();
    lines[2] = "{\"key\": \"blobs::sha256:x\", \"type\": 12}";
    fs::write(&broken, lines.join("\n")).expect("write");
    let b = broken.display().to_string();
    let (code, _, err) = run_tool(&["check", "--root", &root, "--cache-dump", &b]);
    assert_eq!(code, 2);
    assert!(err.contains("line 3, column"), "{err}");

    // One hash line replaced by a copy of another: the trailer's count still agrees, and
    // the copy would override the first line of its key. It is refused, naming the key.
    let hashes: Vec<usize> = text
        .lines()
        .enumerate()
        .filter(|(_, l)| l.contains("\"type\":\"hash\""))
        .map(|(i, _)| i)
        .collect();
    assert!(hashes.len() >= 2, "{text}");
    let mut lines: Vec<&str> = text.lines().collect();
    lines[hashes[1]] = lines[hashes[0]];
    let copied = s.dir.path("copied.jsonl");
    fs::write(&copied, lines.join("\n")).expect("write");
    let c = copied.display().to_string();
    let (code, _, err) = run_tool(&["check", "--root", &root, "--cache-dump", &c]);
    assert_eq!(code, 2, "{err}");
    let key: serde_json::Value = serde_json::from_str(lines[hashes[0]]).expect("line");
    let key = key["key"].as_str().expect("key");
    assert!(
        err.contains(key)
            && err.contains(&format!("line {}", hashes[1] + 1))
            && err.contains("appears again"),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
}
