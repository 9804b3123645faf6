//! `check --shard K/N` on a generated registry, and `merge`: for N in 1, 3 and 8 the
//! merged report equals a single full run (timings apart), the shards' work is balanced,
//! and merge refuses reports that do not belong together.

use crate::common;

use std::fs;

use common::*;
use registry_audit_synth::{Spec, generate};

fn without_timings(mut v: serde_json::Value) -> serde_json::Value {
    let o = v.as_object_mut().expect("object");
    o.remove("started_at");
    o.remove("duration_ms");
    v
}

#[test]
fn merged_shards_equal_a_single_run() {
    let dir = Scratch::new("shards");
    let redis = Redis::start();
    let mut conn = redis.conn();
    let mut spec = Spec::mixed(3000, 24);
    spec.phantom_fraction = 0.03;
    // Sizes of one order of magnitude: balance is about the slicing, not about a few
    // giant blobs landing together.
    spec.sizes = vec![4000, 8000, 16_000, 32_000, 64_000];
    let g = generate(&dir.path("root"), Some(&mut conn), &spec).expect("generate");
    assert!(g.phantoms > 0);
    // Variety: a corrupt blob, malformed keys, other applications' keys, a broken tag.
    let root = dir.path("root");
    let mut c = redis.conn();
    redis::pipe()
        .cmd("SET")
        .arg("session:1")
        .arg("x")
        .cmd("SADD")
        .arg("repository::team1/app1::blobs")
        .arg("sha256:bad")
        .cmd("HSET")
        .arg("blobs::sha256:nope")
        .arg("size")
        .arg(1)
        .query::<()>(&mut c)
        .expect("keys");
    let some_blob = fs::read_dir(root.join("docker/registry/v2/blobs/sha256"))
        .expect("ls")
        .flatten()
        .next()
        .expect("a prefix dir")
        .path();
    let data = fs::read_dir(&some_blob)
        .expect("ls")
        .flatten()
        .next()
        .expect("blob")
        .path()
        .join("data");
    let mut bytes = fs::read(&data).expect("read");
    bytes[0] ^= 1;
    fs::write(&data, bytes).expect("corrupt");

    let (r, u) = (root.display().to_string(), redis.url());
    let base = [
        "check",
        "--root",
        r.as_str(),
        "--redis",
        u.as_str(),
        "--format",
        "json",
    ];
    let (code_single, single, err) = run_tool(&base);
    assert_eq!(code_single, 1, "{err}");
    let single = json(&single);
    assert!(single["summary"]["findings_by_kind"]["digest-mismatch"] == 1);

    for n in [1u64, 3, 8] {
        let mut files = Vec::new();
        let mut blobs = Vec::new();
        let mut bytes = Vec::new();
        for k in 1..=n {
            let out = dir
                .path(&format!("shard-{k}-of-{n}.json"))
                .display()
                .to_string();
            let shard = format!("{k}/{n}");
            let mut args = base.to_vec();
            args.extend_from_slice(&["--shard", &shard, "--output", &out]);
            let (code, _, err) = run_tool(&args);
            assert!(code == 0 || code == 1, "{err}");
            let rep = json(&fs::read_to_string(&out).expect("shard report"));
            assert_eq!(rep["shard"], shard.as_str());
            blobs.push(rep["summary"]["blobs_checked"].as_f64().expect("n"));
            bytes.push(rep["summary"]["bytes_hashed"].as_f64().expect("n"));
            files.push(out);
        }
        // Balanced within 20% of the mean.
        for work in [&blobs, &bytes] {
            let mean = work.iter().sum::<f64>() / n as f64;
            for w in work.iter() {
                assert!(
                    (w - mean).abs() <= 0.2 * mean,
                    "unbalanced shards for n={n}: {work:?}"
                );
            }
        }
        // Merging in any order gives the single run's report.
        files.reverse();
        let mut args = vec!["merge", "--format", "json"];
        args.extend(files.iter().map(String::as_str));
        let (code, merged, err) = run_tool(&args);
        assert_eq!(code, code_single, "{err}");
        assert_eq!(
            without_timings(json(&merged)),
            without_timings(single.clone()),
            "n={n}"
        );
    }

    // Refusals: a missing shard, a duplicate, another registry, other options.
    let f = |k: u64, n: u64| {
        dir.path(&format!("shard-{k}-of-{n}.json"))
            .display()
            .to_string()
    };
    let (code, _, err) = run_tool(&["merge", &f(1, 3), &f(2, 3)]);
    assert_eq!(code, 2);
    assert!(err.contains("missing shard reports: 3/3"), "{err}");
    let (code, _, err) = run_tool(&["merge", &f(1, 3), &f(2, 3), &f(2, 3)]);
    assert_eq!(code, 2);
    assert!(err.contains("given twice"), "{err}");
    let (code, _, err) = run_tool(&["merge", &f(1, 3), &f(2, 8)]);
    assert_eq!(code, 2, "{err}");
    let other = dir.path("other.json").display().to_string();
    let mut v = json(&fs::read_to_string(f(3, 3)).expect("read"));
    v["source"]["storage_root"] = serde_json::json!("/elsewhere");
    fs::write(&other, v.to_string()).expect("write");
    let (code, _, err) = run_tool(&["merge", &f(1, 3), &f(2, 3), &other]);
    assert_eq!(code, 2);
    assert!(err.contains("different registries"), "{err}");
    let quick = dir.path("quick.json").display().to_string();
    let mut args = base.to_vec();
    args.extend_from_slice(&["--shard", "3/3", "--quick", "--output", &quick]);
    run_tool(&args);
    let (code, _, err) = run_tool(&["merge", &f(1, 3), &f(2, 3), &quick]);
    assert_eq!(code, 2);
    assert!(err.contains("same options"), "{err}");
    let plain = dir.path("plain.json").display().to_string();
    fs::write(&plain, single.to_string()).expect("write");
    let (code, _, err) = run_tool(&["merge", &plain]);
    assert_eq!(code, 2);
    assert!(err.contains("not a shard report"), "{err}");
}
