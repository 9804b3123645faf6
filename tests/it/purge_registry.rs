//! `purge` and `restore` end to end with the real registry, Redis and skopeo: the stale
//! entries left by GC are removed exactly, re-push then pull works, nothing else in Redis
//! changes, a saved plan re-checks storage before acting, and restore undoes a purge.

use crate::common;

use std::collections::BTreeSet;

use common::*;

/// `purge --root ROOT --redis URL` of the scenario, with `extra` flags.
fn purge(s: &Scenario, extra: &[&str]) -> (i32, String, String) {
    let (root, url) = (s.registry.root.display().to_string(), s.redis.url());
    let mut args = vec!["purge", "--root", &root, "--redis", &url];
    args.extend_from_slice(extra);
    run_tool(&args)
}

/// `restore --journal JOURNAL --redis URL --format json`: exit code, result, stderr.
fn restore(s: &Scenario, journal: &str) -> (i32, serde_json::Value, String) {
    let url = s.redis.url();
    let (code, out, err) = run_tool(&[
        "restore",
        "--journal",
        journal,
        "--redis",
        &url,
        "--format",
        "json",
    ]);
    (code, json_or_null(&out)["result"].clone(), err)
}

fn add_foreign_keys(s: &Scenario) {
    let mut c = s.redis.conn();
    redis::pipe()
        .cmd("SET")
        .arg("session:42")
        .arg("someone else's")
        .cmd("HSET")
        .arg("myapp::blobs::1")
        .arg("a")
        .arg("b")
        .cmd("SADD")
        .arg("repository::not-the-registry")
        .arg("m")
        .query::<()>(&mut c)
        .expect("foreign keys");
}

#[test]
fn without_purge_a_re_push_succeeds_and_the_pull_fails() {
    let s = shared_layers_scenario("nopurge");
    delete_app2_and_gc(&s);
    push(&s.registry, &s.app2, "team/app2:v1");
    let (ok, err) = pull(&s.registry, "team/app2:v1", &s.dir.path("pull-after"));
    assert!(!ok, "the pull should fail while the cache lies");
    assert!(
        err.contains("unknown") || err.contains("404") || err.contains("not found"),
        "{err}"
    );
}

#[test]
fn purge_removes_exactly_the_phantoms_and_fixes_the_re_push() {
    let s = shared_layers_scenario("purge");
    delete_app2_and_gc(&s);
    add_foreign_keys(&s);
    let expected = expected_phantoms(&s);
    let before = s.redis.dump();
    let journal = s.dir.path("purge.jsonl").display().to_string();

    let (code, out, err) = purge(&s, &["--yes", "--journal", &journal, "--format", "json"]);
    assert_eq!(code, 0, "{err}\n{out}");
    let report = json(&out);
    assert_eq!(report["mode"], "applied");
    let result = &report["result"];
    let phantom_digests: BTreeSet<String> =
        expected.iter().filter_map(|(_, _, d)| d.clone()).collect();
    assert_eq!(
        result["digests_removed"],
        phantom_digests.len() as u64,
        "{result:#}"
    );
    assert_eq!(result["digests_skipped_came_back"], 0);
    assert_eq!(
        result["entries_removed_by_kind"]["phantom-blob-descriptor"],
        3
    );
    assert_eq!(result["journal"], journal.as_str());

    // Exactly the phantom entries are gone; everything else is byte-for-byte the same.
    let after = s.redis.dump();
    let gone: BTreeSet<&Vec<u8>> = before
        .iter()
        .map(|(k, _)| k)
        .filter(|k| !after.iter().any(|(a, _)| a == *k))
        .collect();
    for (k, v) in &after {
        let old = before
            .iter()
            .find(|(b, _)| b == k)
            .map(|(_, v)| v)
            .expect("no new keys");
        let key = String::from_utf8_lossy(k);
        if key.ends_with("::blobs")
            && key.starts_with("repository::")
            && !key.contains("not-the-registry")
        {
            // Repository sets lose exactly their phantom members.
            let repo = &key["repository::".len()..key.len() - "::blobs".len()];
            let mut want = old.clone();
            for (_, r, d) in &expected {
                if r.as_deref() == Some(repo) {
                    want = want.replace(&format!("{:?}, ", d.as_ref().expect("d").as_bytes()), "");
                    want = want.replace(&format!(", {:?}", d.as_ref().expect("d").as_bytes()), "");
                }
            }
            assert_eq!(v, &want, "{key}");
        } else {
            assert_eq!(v, old, "{key} changed");
        }
    }
    for k in &gone {
        let key = String::from_utf8_lossy(k);
        let digest = key.rsplit("::").next().expect("digest");
        assert!(
            phantom_digests.contains(digest),
            "{key} removed but not a phantom"
        );
    }
    for foreign in [
        &b"session:42"[..],
        b"myapp::blobs::1",
        b"repository::not-the-registry",
    ] {
        assert!(after.iter().any(|(k, _)| k == foreign));
    }

    // check now finds nothing.
    let (code, report, _) = check_fs(&s, &[]);
    assert_eq!(code, 0, "{report:#}");

    // restore gives back the pre-purge state exactly.
    let (code, result, err) = restore(&s, &journal);
    assert_eq!(code, 0, "{err}");
    assert_eq!(result["entries_left_alone"], 0);
    assert_eq!(
        s.redis.dump(),
        before,
        "restore must give back the pre-purge state"
    );

    // Purge again (a cron run), then the re-push uploads for real and the pull works.
    let journal2 = s.dir.path("purge2.jsonl").display().to_string();
    let (code, _, err) = purge(&s, &["--yes", "--journal", &journal2]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        s.registry.head_blob("team/app2", &s.app2.layers[1]),
        Some(404)
    );
    push(&s.registry, &s.app2, "team/app2:v1");
    let (ok, err) = pull(&s.registry, "team/app2:v1", &s.dir.path("pull-after"));
    assert!(ok, "pull after purge and re-push: {err}");
}

#[test]
fn dry_run_and_unconfirmed_runs_change_nothing() {
    let s = shared_layers_scenario("dryrun");
    delete_app2_and_gc(&s);
    add_foreign_keys(&s);
    let before = s.redis.dump();

    let (code, out, err) = purge(&s, &["--dry-run", "--format", "json"]);
    assert_eq!(code, 1, "planned live phantoms are left: {err}");
    let report = json(&out);
    assert_eq!(report["mode"], "dry-run");
    assert!(report["result"].is_null());
    assert!(report["plan"]["groups"].as_array().expect("groups").len() >= 3);
    assert_eq!(s.redis.dump(), before);

    // No terminal and no --yes: the plan is shown, nothing changes, exit non-zero.
    let (code, out, err) = purge(&s, &["--format", "table"]);
    assert_eq!(code, 2);
    assert!(
        err.contains("--yes") && err.contains("nothing was changed"),
        "{err}"
    );
    assert!(out.contains("Plan: remove"), "{out}");
    assert_eq!(s.redis.dump(), before);
}

#[test]
fn a_saved_plan_keeps_the_entries_of_blobs_that_came_back() {
    let s = shared_layers_scenario("plan");
    delete_app2_and_gc(&s);
    let plan = s.dir.path("plan.json").display().to_string();
    let (code, out, err) = purge(&s, &["--plan-out", &plan, "--format", "table"]);
    assert_eq!(code, 1, "{err}");
    assert!(out.contains("Plan saved to"), "{out}");
    let saved = json(&std::fs::read_to_string(&plan).expect("plan file"));
    assert!(!saved.to_string().contains("password"));
    let planned: BTreeSet<String> = saved["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .map(|g| g["digest"].as_str().expect("digest").to_string())
        .collect();
    let layer = s.app2.layers[1].clone();
    let config = s.app2.config.clone();
    assert!(planned.contains(&layer) && planned.contains(&config));

    // A client uploads the layer and the config again after the plan was saved.
    upload_blob(&s.registry, "team/app2", &image_blob(&s.app2, &layer));
    upload_blob(&s.registry, "team/app2", &image_blob(&s.app2, &config));
    assert!(s.registry.has_blob(&layer));
    let before = s.redis.dump();

    let journal = s.dir.path("j.jsonl").display().to_string();
    let (code, out, err) = run_tool(&[
        "purge",
        "--apply",
        &plan,
        "--yes",
        "--journal",
        &journal,
        "--format",
        "json",
    ]);
    assert_eq!(code, 0, "{err}\n{out}");
    let result = &json(&out)["result"];
    assert_eq!(result["digests_skipped_came_back"], 2, "{result:#}");
    assert_eq!(result["digests_removed"], planned.len() as u64 - 2);
    // The entries of the blobs that came back are untouched.
    let after = s.redis.dump();
    for (k, v) in &before {
        let key = String::from_utf8_lossy(k);
        if key.contains(&layer) || key.contains(&config) {
            assert!(
                after.iter().any(|(a, b)| a == k && b == v),
                "{key} was touched"
            );
        }
    }
    let (code, report, _) = check_fs(&s, &[]);
    assert_eq!(code, 0, "{report:#}");

    // The summary in the table names what was kept and why.
    let (code, out, err) = run_tool(&[
        "purge",
        "--apply",
        &plan,
        "--yes",
        "--journal",
        &journal,
        "--format",
        "table",
    ]);
    assert_eq!(
        code,
        0,
        "{err}\n{out}\n{}",
        std::fs::read_to_string(&journal).unwrap_or_default()
    );
    assert!(out.contains("came back"), "{out}");
}

#[test]
fn restore_skips_a_cut_short_journal_line_and_keys_written_since() {
    let s = shared_layers_scenario("restore");
    delete_app2_and_gc(&s);
    let journal_path = s.dir.path("j.jsonl");
    let journal = journal_path.display().to_string();
    let (code, _, err) = purge(&s, &["--yes", "--journal", &journal]);
    assert_eq!(code, 0, "{err}");
    // A crash while writing leaves half a line at the end.
    let mut text = std::fs::read_to_string(&journal_path).expect("journal");
    text.push_str("{\"type\":\"remove\",\"seq\":99,\"dig");
    std::fs::write(&journal_path, text).expect("write");
    // The registry writes one of the keys again in the meantime.
    let layer = &s.app2.layers[1];
    let mut c = s.redis.conn();
    redis::cmd("HSET")
        .arg(format!("blobs::{layer}"))
        .arg("digest")
        .arg(layer)
        .arg("size")
        .arg(1)
        .query::<()>(&mut c)
        .expect("hset");

    let (code, result, err) = restore(&s, &journal);
    assert_eq!(code, 0, "{err}");
    let r = &result;
    assert_eq!(r["lines_skipped"], 1);
    assert_eq!(r["entries_left_alone"], 1, "{r:#}");
    let size: String = redis::cmd("HGET")
        .arg(format!("blobs::{layer}"))
        .arg("size")
        .query(&mut c)
        .expect("hget");
    assert_eq!(size, "1", "the key written since is left alone");
}
