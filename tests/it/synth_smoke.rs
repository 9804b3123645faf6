//! A small run of the benchmark generator against a real Redis, audited by `check`:
//! the generator builds what it says, and the audit finds exactly its phantoms.

use crate::common;

use common::*;
use registry_audit_synth::{Spec, generate};

#[test]
fn generated_registry_is_audited_exactly() {
    let dir = Scratch::new("synth");
    let redis = Redis::start();
    let mut conn = redis.conn();
    let mut spec = Spec::mixed(300, 12);
    spec.phantom_fraction = 0.05;
    let g = generate(&dir.path("root"), Some(&mut conn), &spec).expect("generate");
    assert_eq!(g.phantoms, 15);
    let root = dir.path("root").display().to_string();
    let (code, out, err) = run_tool(&[
        "check",
        "--root",
        &root,
        "--redis",
        &redis.url(),
        "--format",
        "json",
    ]);
    assert_eq!(code, 1, "{err}");
    let r = json(&out);
    assert_eq!(
        r["summary"]["findings_by_kind"]["phantom-blob-descriptor"],
        g.phantoms
    );
    assert_eq!(
        r["summary"]["findings_by_kind"]["phantom-repository-blob"],
        g.phantoms * spec.repos_per_blob
    );
    assert_eq!(r["summary"]["blobs_checked"], 300);
    assert_eq!(r["summary"]["bytes_hashed"], g.bytes);
    assert_eq!(
        r["summary"]["findings_by_kind"]["unlinked-repository-blob"],
        0
    );
    assert_eq!(r["summary"]["storage"]["repositories"], 12);
}
