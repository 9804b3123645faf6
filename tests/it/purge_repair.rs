//! Repairs are all or nothing, even when Redis refuses a command: with the real
//! registry, Redis and skopeo, a Redis user refused one command purge (or restore)
//! needs stops the run before anything changes; a removal that Redis fails part-way
//! leaves nothing the registry still serves, is read back and reported truthfully and
//! ends non-zero; a hand-edited plan cannot remove the entries of a blob in storage.

use crate::common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

/// Adds a Redis user allowed everything, then `rules` (e.g. `-srem`).
fn add_user(s: &Scenario, name: &str, rules: &[&str]) -> String {
    let mut c = s.redis.conn();
    let mut cmd = redis::cmd("ACL");
    cmd.arg("SETUSER")
        .arg(name)
        .arg("on")
        .arg(">pw")
        .arg("~*")
        .arg("&*")
        .arg("+@all");
    for r in rules {
        cmd.arg(*r);
    }
    cmd.query::<()>(&mut c).expect("acl setuser");
    format!("redis://{name}:pw@127.0.0.1:{}/0", s.redis.port)
}

fn purge_as(s: &Scenario, url: &str, extra: &[&str]) -> (i32, String, String) {
    let root = s.registry.root.display().to_string();
    let mut args = vec!["purge", "--root", &root, "--redis", url];
    args.extend_from_slice(extra);
    run_tool(&args)
}

fn one_line(err: &str) -> &str {
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line expected: {err}");
    lines[0]
}

#[test]
fn a_user_refused_one_command_removes_nothing() {
    let s = shared_layers_scenario("aclrefused");
    delete_app2_and_gc(&s);
    let before = s.redis.dump();
    let layer = s.app2.layers[1].clone();
    assert_eq!(s.registry.head_blob("team/app2", &layer), Some(200));

    // ACL DRYRUN answers for a user that may run ACL; redis.acl_check_cmd for one that
    // may not; EVALSHA itself, and a command only the script calls.
    for (user, rules, command) in [
        ("nosrem", &["-srem"][..], "SREM"),
        ("nohdel", &["-hdel"][..], "HDEL"),
        ("noacl", &["-srem", "-acl"][..], "SREM"),
        ("noevalsha", &["-evalsha"][..], "EVALSHA"),
        ("noacl-noevalsha", &["-evalsha", "-acl"][..], "EVALSHA"),
    ] {
        let url = add_user(&s, user, rules);
        let journal = s.dir.path(&format!("{user}.jsonl"));
        let (code, out, err) = purge_as(
            &s,
            &url,
            &[
                "--yes",
                "--journal",
                &journal.display().to_string(),
                "--format",
                "json",
            ],
        );
        assert_eq!(code, 2, "{user}: {err}\n{out}");
        let line = one_line(&err);
        assert!(
            line.contains(&format!("may not run {command}")) && line.contains(&format!("'{user}'")),
            "{user}: {line}"
        );
        assert!(line.contains("nothing was removed"), "{line}");
        assert!(!line.contains("pw@"), "no password: {line}");
        assert!(
            !journal.exists(),
            "{user}: no journal before the check passed"
        );
        assert_eq!(s.redis.dump(), before, "{user}: Redis changed");
    }
    assert_eq!(s.registry.head_blob("team/app2", &layer), Some(200));

    // A user allowed everything purge needs purges; the report says how it was checked.
    let url = add_user(&s, "purger", &["-flushall", "-config"]);
    let journal = s.dir.path("ok.jsonl").display().to_string();
    let (code, out, err) = purge_as(
        &s,
        &url,
        &["--yes", "--journal", &journal, "--format", "json"],
    );
    assert_eq!(code, 0, "{err}");
    let result = &json(&out)["result"];
    assert_eq!(result["permissions"]["method"], "acl-dryrun");
    assert_eq!(result["permissions"]["user"], "purger");
    assert!(result["digests_removed"].as_u64().expect("n") >= 3);
    assert_eq!(s.registry.head_blob("team/app2", &layer), Some(404));

    // restore checks too: a user that may not SADD puts nothing back.
    let purged = s.redis.dump();
    let url = add_user(&s, "nosadd", &["-sadd", "-acl"]);
    let (code, out, err) = run_tool(&["restore", "--journal", &journal, "--redis", &url]);
    assert_eq!(code, 2, "{err}\n{out}");
    let line = one_line(&err);
    assert!(
        line.contains("may not run SADD")
            && line.contains("'nosadd'")
            && line.contains("nothing was restored"),
        "{line}"
    );
    assert_eq!(s.redis.dump(), purged);
    let (code, _, err) = run_tool(&["restore", "--journal", &journal, "--redis", &s.redis.url()]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(s.redis.dump(), before);
}

#[test]
fn a_removal_that_fails_part_way_leaves_nothing_served_and_says_so() {
    let s = shared_layers_scenario("midscript");
    delete_app2_and_gc(&s);
    let before = s.redis.dump();
    let phantoms: Vec<String> = vec![s.app2.layers[1].clone(), s.app2.config.clone()];
    for d in &phantoms {
        assert_eq!(s.registry.head_blob("team/app2", d), Some(200), "{d}");
    }
    let url = add_user(&s, "purger", &[]);
    let journal = s.dir.path("j.jsonl");

    // Hold every script at the door, start purge (it checks its permissions - all
    // granted - and journals the first digest), then take SREM away and let it run:
    // the script's HDEL of the global descriptor succeeds and its SREM is refused.
    let mut admin = s.redis.conn();
    redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(120_000)
        .arg("WRITE")
        .query::<()>(&mut admin)
        .expect("pause");
    let root = s.registry.root.display().to_string();
    let mut cmd = Command::new(BIN);
    cmd.args([
        "purge", "--root", &root, "--redis", &url, "--yes", "--format", "json",
    ])
    .arg("--journal")
    .arg(&journal)
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    for (k, _) in std::env::vars() {
        if k.starts_with("REGISTRY_") {
            cmd.env_remove(k);
        }
    }
    let child = cmd.spawn().expect("purge");
    wait_until(
        "the first removal journalled",
        Duration::from_secs(60),
        || std::fs::read_to_string(&journal).is_ok_and(|t| t.contains("\"type\":\"remove\"")),
    );
    redis::cmd("ACL")
        .arg("SETUSER")
        .arg("purger")
        .arg("-srem")
        .query::<()>(&mut admin)
        .expect("acl");
    redis::cmd("CLIENT")
        .arg("UNPAUSE")
        .query::<()>(&mut admin)
        .expect("unpause");
    let out = child.wait_with_output().expect("purge output");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(2), "{stderr}\n{stdout}");
    let line = one_line(&stderr);
    assert!(line.contains("failed part-way"), "{line}");
    assert!(
        line.contains("nothing of it is served from the cache any more"),
        "{line}"
    );

    // The report: one digest failed, with exactly what is gone and what is left.
    let report = json(&stdout);
    let result = &report["result"];
    // Digests before the first that needs SREM (a descriptor alone) go as planned.
    assert_eq!(result["digests_failed"], 1, "{result:#}");
    assert!(
        result["failure"]
            .as_str()
            .is_some_and(|f| f.contains("part-way"))
    );
    let failed = result["results"]
        .as_array()
        .expect("results")
        .iter()
        .find(|r| r["outcome"] == "failed")
        .expect("a failed digest");
    let digest = failed["digest"].as_str().expect("digest").to_string();
    let f = &failed["failure"];
    let global = format!("blobs::{digest}");
    assert_eq!(f["removed"], serde_json::json!([global]), "{f:#}");
    let left: Vec<&str> = f["left"]
        .as_array()
        .expect("left")
        .iter()
        .map(|v| v.as_str().expect("str"))
        .collect();
    assert!(
        left.contains(&format!("repository::team/app2::blobs {digest}").as_str()),
        "{left:?}"
    );
    assert_eq!(f["still_served"], serde_json::json!([]));
    let count = |k: &str| result[k].as_u64().expect("count");
    let results = result["results"].as_array().expect("results");
    assert_eq!(results.last(), Some(failed), "it stopped at the failure");
    assert_eq!(
        count("digests_removed") + count("digests_failed") + count("digests_not_attempted"),
        report["plan"]["groups"].as_array().expect("groups").len() as u64
    );

    // Redis agrees: the global descriptor is gone, the repository entries are left.
    let mut c = s.redis.conn();
    let exists: bool = redis::cmd("EXISTS")
        .arg(&global)
        .query(&mut c)
        .expect("exists");
    assert!(!exists);
    let member: bool = redis::cmd("SISMEMBER")
        .arg("repository::team/app2::blobs")
        .arg(&digest)
        .query(&mut c)
        .expect("sismember");
    assert!(member);
    // And so does the registry: the failed digest is no longer served anywhere.
    assert_eq!(s.registry.head_blob("team/app2", &digest), Some(404));

    // The journal records the failure and what it removed; restore puts back exactly that.
    let text = std::fs::read_to_string(&journal).expect("journal");
    let last: serde_json::Value =
        serde_json::from_str(text.lines().last().expect("line")).expect("json line");
    assert_eq!(last["outcome"], "failed", "{text}");
    assert_eq!(last["removed"], serde_json::json!([0]));
    assert!(last["error"].as_str().is_some_and(|e| !e.is_empty()));
    let (code, _, err) = run_tool(&[
        "restore",
        "--journal",
        &journal.display().to_string(),
        "--redis",
        &s.redis.url(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(s.redis.dump(), before);

    // With SREM back, purge finishes the job.
    redis::cmd("ACL")
        .arg("SETUSER")
        .arg("purger")
        .arg("+srem")
        .query::<()>(&mut admin)
        .expect("acl");
    let (code, _, err) = purge_as(
        &s,
        &url,
        &["--yes", "--journal", &journal.display().to_string()],
    );
    assert_eq!(code, 0, "{err}");
    for d in &phantoms {
        assert_eq!(s.registry.head_blob("team/app2", d), Some(404), "{d}");
    }
}

/// The registry's current descriptor fields of `key`, as a plan entry holds them.
fn hash_fields(s: &Scenario, key: &str) -> serde_json::Value {
    let mut c = s.redis.conn();
    let all: Vec<(String, String)> = redis::cmd("HGETALL")
        .arg(key)
        .query(&mut c)
        .expect("hgetall");
    assert!(!all.is_empty(), "{key} is cached");
    serde_json::Value::Object(
        all.into_iter()
            .map(|(k, v)| (k, serde_json::Value::String(v)))
            .collect(),
    )
}

#[test]
fn a_hand_edited_plan_cannot_remove_the_entries_of_a_blob_in_storage() {
    let s = shared_layers_scenario("handplan");
    delete_app2_and_gc(&s);
    let plan_path = s.dir.path("plan.json").display().to_string();
    let url = s.redis.url();
    let root = s.registry.root.display().to_string();
    let (code, _, err) = run_tool(&[
        "purge",
        "--root",
        &root,
        "--redis",
        &url,
        "--plan-out",
        &plan_path,
    ]);
    assert_eq!(code, 1, "{err}");
    let saved = json(&std::fs::read_to_string(&plan_path).expect("plan"));
    // The shared base layer is in storage and live in team/app1.
    let base = s.app1.layers[0].clone();
    assert!(s.registry.has_blob(&base));
    let base_global = format!("blobs::{base}");
    let global_entry = serde_json::json!({
        "kind": "phantom-blob-descriptor",
        "severity": "error",
        "repository": null,
        "key": base_global,
        "op": "fields",
        "fields": hash_fields(&s, &base_global),
        "exact": false
    });
    let member_entry = serde_json::json!({
        "kind": "phantom-repository-blob",
        "severity": "error",
        "repository": "team/app1",
        "key": "repository::team/app1::blobs",
        "op": "member",
        "member": base
    });
    let apply = |plan: &serde_json::Value, name: &str| {
        let path = s.dir.path(name).display().to_string();
        std::fs::write(&path, plan.to_string()).expect("write plan");
        let journal = s.dir.path(&format!("{name}.jsonl")).display().to_string();
        run_tool(&[
            "purge",
            "--apply",
            &path,
            "--redis",
            &url,
            "--root",
            &root,
            "--yes",
            "--journal",
            &journal,
            "--format",
            "json",
        ])
    };
    let before = s.redis.dump();

    // 1. The base layer's entries slipped into a phantom digest's group: refused whole.
    let mut plan = saved.clone();
    plan["groups"][0]["entries"]
        .as_array_mut()
        .expect("entries")
        .push(global_entry.clone());
    let (code, out, err) = apply(&plan, "foreign.json");
    assert_eq!(code, 2, "{err}\n{out}");
    let line = one_line(&err);
    assert!(
        line.contains("does not belong") && line.contains(&base_global),
        "{line}"
    );
    assert_eq!(s.redis.dump(), before, "nothing changed");

    // 2. A group of its own that claims the blob is absent, or was not checked, or is
    // there: each entry is checked against its own digest's blob, which is in storage.
    let size = std::fs::metadata(s.registry.blob_path(&base))
        .expect("base blob")
        .len();
    for (i, blob) in [
        serde_json::json!("absent"),
        serde_json::json!("not-checked"),
        serde_json::json!({"present": {"size": size}}),
    ]
    .into_iter()
    .enumerate()
    {
        let mut plan = saved.clone();
        plan["groups"]
            .as_array_mut()
            .expect("groups")
            .push(serde_json::json!({
                "digest": base,
                "blob": blob,
                "entries": [global_entry, member_entry],
            }));
        let (code, out, err) = apply(&plan, &format!("own{i}.json"));
        assert_eq!(code, 0, "{blob}: {err}\n{out}");
        let result = &json(&out)["result"];
        let base_result = result["results"]
            .as_array()
            .expect("results")
            .iter()
            .find(|r| r["digest"] == base.as_str())
            .expect("the base group");
        assert_eq!(base_result["outcome"], "came-back", "{blob}: {base_result}");
        let after = s.redis.dump();
        for (k, v) in &before {
            let key = String::from_utf8_lossy(k);
            if key.ends_with(&base) {
                assert!(
                    after.iter().any(|(a, b)| a == k && b == v),
                    "{blob}: {key} touched"
                );
            }
        }
        let mut c = s.redis.conn();
        let member: bool = redis::cmd("SISMEMBER")
            .arg("repository::team/app1::blobs")
            .arg(&base)
            .query(&mut c)
            .expect("sismember");
        assert!(member, "{blob}: the base layer left team/app1");
    }
    assert_eq!(s.registry.head_blob("team/app1", &base), Some(200));
    let (ok, err) = pull(&s.registry, "team/app1:v1", &s.dir.path("pull-app1"));
    assert!(ok, "{err}");
}
