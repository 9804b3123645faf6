//! `gc` end to end: the real registry's garbage-collect run through registry-audit,
//! leaving no phantom behind, with what it freed reported; a GC that breaks a tagged
//! image is caught; a failing GC leaves the cache alone.

use crate::common;

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::PermissionsExt;

use common::*;

fn gc(s: &Scenario, extra: &[&str], command: &[&str]) -> (i32, serde_json::Value, String) {
    let config = s.registry.config.display().to_string();
    let journal = s.dir.path("gc-journal.jsonl").display().to_string();
    gc_with(&config, &journal, extra, command)
}

#[test]
fn gc_leaves_no_phantom_and_a_re_push_pulls_straight_away() {
    let s = shared_layers_scenario("gc");
    s.registry.delete_manifest("team/app2", &s.app2_manifest);
    let own: Vec<String> = vec![
        s.app2.layers[1].clone(),
        s.app2.config.clone(),
        s.app2_manifest.clone(),
    ];
    let sizes: u64 = own
        .iter()
        .map(|d| fs::metadata(s.registry.blob_path(d)).expect("blob").len())
        .sum();
    let config = s.registry.config.display().to_string();

    let (code, r, err) = gc(&s, &[], &["docker-registry", "garbage-collect", &config]);
    assert_eq!(code, 0, "{err}\n{r:#}");
    // The GC's own output is passed through (on stderr; stdout is the report).
    assert!(err.contains("blob eligible for deletion"), "{err}");
    let g = &r["summary"]["gc"];
    assert_eq!(g["blobs_deleted"], 3, "{g:#}");
    assert_eq!(g["bytes_freed"], sizes);
    assert!(g["cache_entries_purged"].as_u64().expect("n") >= 5, "{g:#}");
    assert_eq!(g["tags_broken"], 0);
    assert!(
        r["verdict"]
            .as_str()
            .expect("v")
            .starts_with("GC freed 3 blobs"),
        "{}",
        r["verdict"]
    );
    for d in &own {
        assert!(!s.registry.has_blob(d));
    }
    // No phantom left: check finds nothing at error level, and HEAD says unknown.
    let (code, out, _) = run_tool(&["check", "--config", &config, "--format", "json"]);
    assert_eq!(code, 0, "{out}");
    let kinds: BTreeSet<String> = finding_triples(&json(&out))
        .into_iter()
        .map(|t| t.0)
        .collect();
    assert!(
        kinds.iter().all(|k| k == "dangling-layer-link"),
        "{kinds:?}"
    );
    assert_eq!(
        s.registry.head_blob("team/app2", &s.app2.layers[1]),
        Some(404)
    );
    // Re-push and pull work straight away.
    push(&s.registry, &s.app2, "team/app2:v1");
    let (ok, err) = pull(&s.registry, "team/app2:v1", &s.dir.path("after"));
    assert!(ok, "{err}");
}

#[test]
fn dry_run_changes_nothing_and_says_what_it_would_do() {
    let s = shared_layers_scenario("gcdry");
    s.registry.delete_manifest("team/app2", &s.app2_manifest);
    let before = s.redis.dump();
    let config = s.registry.config.display().to_string();
    let (code, r, err) = gc(
        &s,
        &["--dry-run"],
        &["docker-registry", "garbage-collect", &config],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(r["summary"]["gc"]["dry_run"], true);
    assert_eq!(r["summary"]["gc"]["blobs_deleted"], 3);
    assert!(
        r["summary"]["gc"]["cache_entries_purged"]
            .as_u64()
            .expect("n")
            >= 5
    );
    assert!(r["verdict"].as_str().expect("v").contains("would free"));
    assert!(
        s.registry.has_blob(&s.app2.layers[1]),
        "a dry run deletes nothing"
    );
    assert_eq!(s.redis.dump(), before);
}

#[test]
fn a_gc_that_breaks_a_tagged_image_is_reported_and_exits_1() {
    let s = shared_layers_scenario("gcbreak");
    s.registry.delete_manifest("team/app2", &s.app2_manifest);
    // A GC with a bug: it also deletes a layer that team/app1:v1 (and mirror/app1:v1) need.
    let victim = s.app1.layers[1].clone();
    let wrapper = s.dir.path("buggy-gc.sh");
    fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nset -e\ndocker-registry garbage-collect \"$1\"\nrm -f '{}'\necho 'blob eligible for deletion: {victim}'\n",
            s.registry.blob_path(&victim).display()
        ),
    )
    .expect("wrapper");
    fs::set_permissions(&wrapper, fs::Permissions::from_mode(0o755)).expect("chmod");
    let (w, config) = (
        wrapper.display().to_string(),
        s.registry.config.display().to_string(),
    );
    let (code, r, err) = gc(&s, &[], &[&w, &config]);
    assert_eq!(code, 1, "{err}\n{r:#}");
    let broken: BTreeSet<(String, String)> = r["findings"]
        .as_array()
        .expect("findings")
        .iter()
        .filter(|f| f["kind"] == "tag-broken-by-gc")
        .map(|f| {
            (
                f["repository"].as_str().expect("r").to_string(),
                f["tag"].as_str().expect("t").to_string(),
            )
        })
        .collect();
    let expected: BTreeSet<(String, String)> = [("mirror/app1", "v1"), ("team/app1", "v1")]
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    assert_eq!(broken, expected);
    assert_eq!(r["summary"]["gc"]["tags_broken"], 2);
    // The victim's cache entries were purged too: no phantom left for it.
    assert_eq!(s.registry.head_blob("team/app1", &victim), Some(404));
}

#[test]
fn a_failing_gc_leaves_the_cache_untouched_and_exits_2() {
    let s = shared_layers_scenario("gcfail");
    s.registry.delete_manifest("team/app2", &s.app2_manifest);
    let before = s.redis.dump();
    let (code, r, err) = gc(
        &s,
        &[],
        &[
            "sh",
            "-c",
            "echo 'configuration error: bad storage' >&2; exit 3",
        ],
    );
    assert_eq!(code, 2);
    assert!(r.is_null());
    assert!(
        err.contains("exit status 3") && err.contains("configuration error: bad storage"),
        "{err}"
    );
    assert!(err.contains("cache was not touched"), "{err}");
    assert_eq!(s.redis.dump(), before);
}

#[test]
fn with_the_in_memory_cache_gc_confirms_live_phantoms_and_asks_for_a_restart() {
    let dir = Scratch::new("gcmem");
    let registry = Registry::start(&dir, Cache::InMemory);
    let app = make_image(&dir.path("img"), "mem", &[bytes(5, 40_000)]);
    let manifest = push(&registry, &app, "solo/app:v1");
    let (ok, err) = pull(&registry, "solo/app:v1", &dir.path("pulled"));
    assert!(ok, "{err}");
    registry.delete_manifest("solo/app", &manifest);
    let config = registry.config.display().to_string();
    let url = registry.url();
    let (code, out, err) = run_tool(&[
        "gc",
        "--config",
        &config,
        "--registry-url",
        &url,
        "--format",
        "json",
        "--",
        "docker-registry",
        "garbage-collect",
        &config,
    ]);
    assert_eq!(code, 1, "{err}");
    let r = json(&out);
    assert_eq!(r["summary"]["gc"]["restart_needed"], true);
    assert!(
        r["findings"]
            .as_array()
            .expect("f")
            .iter()
            .any(|f| f["kind"] == "live-phantom" && f["digest"] == app.layers[0].as_str())
    );
    assert!(r["notes"][0].as_str().expect("note").contains("restart"));
}
