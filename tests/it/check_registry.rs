//! `check` end to end against the real registry (Debian's docker-registry 2.8 with the
//! Redis cache), images pushed and pulled with skopeo, and the registry's own garbage
//! collection: the bug this project exists for, reproduced and reported exactly.

use crate::common;

use std::collections::BTreeSet;
use std::path::Path;

use common::*;

#[test]
fn healthy_registry_reports_nothing_and_exits_0() {
    let s = shared_layers_scenario("healthy");
    let (code, report, err) = check_fs(&s, &[]);
    assert_eq!(code, 0, "stderr: {err}\n{report:#}");
    assert_eq!(report["findings"], serde_json::json!([]));
    assert_eq!(report["schema_version"], 1);
    let summary = &report["summary"];
    // 5 distinct blobs pushed (2 layers shared) plus 2 configs and 2 manifests... counted from storage:
    let blobs: BTreeSet<String> = s.app1.blobs().into_iter().chain(s.app2.blobs()).collect();
    assert_eq!(summary["blobs_checked"], blobs.len() as u64, "{summary:#}");
    assert_eq!(summary["blobs_absent"], 0);
    assert!(summary["bytes_hashed"].as_u64().expect("bytes") > 460_000);
    assert!(summary["keys_scanned"].as_u64().expect("keys") > 10);
}

#[test]
fn phantoms_after_manifest_delete_and_gc_are_reported_exactly() {
    let s = shared_layers_scenario("phantoms");
    delete_app2_and_gc(&s);
    // The bug, as a client sees it: the registry says a deleted blob exists.
    assert_eq!(
        s.registry.head_blob("team/app2", &s.app2.layers[1]),
        Some(200)
    );

    let expected = expected_phantoms(&s);
    assert!(
        expected.contains(&(
            "phantom-blob-descriptor".into(),
            None,
            Some(s.app2.layers[1].clone())
        )),
        "{expected:?}"
    );
    assert!(expected.contains(&(
        "phantom-repository-blob".into(),
        Some("team/app2".into()),
        Some(s.app2.layers[1].clone())
    )));

    let (code, report, err) = check_fs(&s, &[]);
    assert_eq!(code, 1, "stderr: {err}\n{report:#}");
    let got: BTreeSet<_> = finding_triples(&report).into_iter().collect();
    assert_eq!(got, expected_after_gc(&s), "{report:#}");
    assert!(got.contains(&(
        "dangling-layer-link".into(),
        Some("team/app2".into()),
        Some(s.app2.layers[1].clone())
    )));
    for f in report["findings"].as_array().expect("findings") {
        let d = f["digest"].as_str().expect("digest");
        if f["kind"] == "dangling-layer-link" {
            assert_eq!(f["severity"], "warning");
            assert!(f["key"].is_null() && f["path"].is_string(), "{f}");
            continue;
        }
        assert!(app2_only(&s, d), "only app2's own blobs are phantoms: {f}");
        if f["live"] == true {
            assert_eq!(f["severity"], "error", "{f}");
        }
        match f["repository"].as_str() {
            None => assert_eq!(f["key"], format!("blobs::{d}")),
            Some(r) => assert_eq!(f["key"], format!("repository::{r}::blobs")),
        }
    }
    // The app2 layer's global and repository entries are live: the registry served it above.
    let live_layer: Vec<_> = report["findings"]
        .as_array()
        .expect("findings")
        .iter()
        .filter(|f| f["digest"] == s.app2.layers[1].as_str() && f["key"].is_string())
        .map(|f| f["live"].clone())
        .collect();
    assert_eq!(
        live_layer,
        vec![serde_json::json!(true), serde_json::json!(true)]
    );
    assert_eq!(
        report["summary"]["findings_by_kind"]["phantom-blob-descriptor"],
        3
    );

    // Two runs on the same state print the same findings.
    let (_, again, _) = check_fs(&s, &["--jobs", "1"]);
    assert_eq!(again["findings"], report["findings"]);

    // --quick finds the same phantoms without hashing.
    let (code, quick, _) = check_fs(&s, &["--quick"]);
    assert_eq!(code, 1);
    assert_eq!(quick["findings"], report["findings"]);
    assert_eq!(quick["summary"]["bytes_hashed"], 0);

    // --fail-on never keeps exit 0 while still reporting.
    let (code, _, _) = check_fs(&s, &["--fail-on", "never"]);
    assert_eq!(code, 0);
}

fn app2_only(s: &Scenario, d: &str) -> bool {
    let app2 = [&s.app2.layers[1], &s.app2.config, &s.app2_manifest];
    app2.iter().any(|b| *b == d) && !s.app1.blobs().iter().any(|b| b == d)
}

#[test]
fn the_same_through_the_registry_config() {
    let s = shared_layers_scenario("viaconfig");
    let config = s.registry.config.display().to_string();
    let (code, out, err) = run_tool(&["check", "--config", &config, "--format", "json"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(json(&out)["findings"], serde_json::json!([]));

    delete_app2_and_gc(&s);
    let (code, out, err) = run_tool(&["check", "--config", &config, "--format", "json"]);
    assert_eq!(code, 1, "{err}");
    let got: BTreeSet<_> = finding_triples(&json(&out)).into_iter().collect();
    assert_eq!(got, expected_after_gc(&s));

    // The registry's environment overrides apply: a wrong root through the environment
    // is honoured (and refused as not a registry).
    let (code, _, err) = run_tool_env(
        &["check", "--config", &config],
        &[(
            "REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY",
            s.dir.path("img1").to_str().expect("utf8"),
        )],
    );
    assert_eq!(code, 2);
    assert!(err.contains("no registry storage under"), "{err}");

    // The table names the kinds and ends with a verdict an operator can act on.
    let (code, table, _) = run_tool(&["check", "--config", &config, "--format", "table"]);
    assert_eq!(code, 1);
    assert!(table.contains("phantom-blob-descriptor (3)"), "{table}");
    let verdict = table.trim_end().lines().last().expect("verdict");
    assert!(
        verdict.contains("live phantom") && verdict.contains("registry-audit purge"),
        "{verdict}"
    );
    let _ = Path::new(&config);
}

/// The registry reads `redis.password: 0x1F` (unquoted) as the text `0x1F`, as yaml.v2 does
/// for a string field; so must the tool, or it is refused by a Redis the registry uses.
#[test]
fn an_unquoted_number_like_password_is_read_as_written() {
    let dir = Scratch::new("numpw");
    let redis = Redis::start_with(Some("0x1F"));
    let registry = Registry::start(&dir, Cache::Redis(&redis));
    let config = registry.config.display().to_string();
    let text = std::fs::read_to_string(&config).expect("config");
    assert!(text.contains("password: 0x1F\n"), "{text}");
    let image = make_image(&dir.path("img"), "numpw", &[bytes(7, 5_000)]);
    // The registry authenticates with that text: a push fills its Redis cache.
    push(&registry, &image, "num/pw:v1");
    assert!(
        !redis.dump().is_empty(),
        "the registry wrote no cache entry"
    );
    let (code, out, err) = run_tool(&["check", "--config", &config, "--format", "json"]);
    assert_eq!(code, 0, "{err}");
    let report = json(&out);
    assert_eq!(report["findings"], serde_json::json!([]), "{report:#}");
    assert!(report["summary"]["keys_scanned"].as_u64().expect("keys") > 0);
}
