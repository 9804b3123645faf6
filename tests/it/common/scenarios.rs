//! Test harness: the scenarios the suites share (shared layers, a manifest delete and GC), a storage root written by hand, and the expectations computed from them.

use super::*;

/// Three repositories sharing a base layer: `team/app1` and `mirror/app1` hold the same
/// image, `team/app2` shares only the base layer.
pub(crate) struct Scenario {
    pub dir: Scratch,
    pub redis: Redis,
    pub registry: Registry,
    pub app1: Image,
    pub app2: Image,
    /// The manifest digest of team/app2:v1 as the registry stored it.
    pub app2_manifest: String,
}

pub(crate) fn shared_layers_scenario(tag: &str) -> Scenario {
    let dir = Scratch::new(tag);
    let redis = Redis::start();
    let registry = Registry::start(&dir, Cache::Redis(&redis));
    let (app1, app2, app2_manifest) = push_two_apps(&registry, &dir, [300_000, 70_000, 90_000]);
    push(&registry, &app1, "mirror/app1:v1");
    let (ok, err) = pull(&registry, "mirror/app1:v1", &dir.path("pulled"));
    assert!(ok, "pull mirror/app1:v1: {err}");
    Scenario {
        dir,
        redis,
        registry,
        app1,
        app2,
        app2_manifest,
    }
}

/// Deletes team/app2's manifest and runs the registry's GC.
pub(crate) fn delete_app2_and_gc(s: &Scenario) {
    s.registry.delete_manifest("team/app2", &s.app2_manifest);
    s.registry.garbage_collect();
    assert!(
        !s.registry.has_blob(&s.app2.layers[1]),
        "GC should delete app2's own layer"
    );
    assert!(
        s.registry.has_blob(&s.app2.layers[0]),
        "GC keeps the shared base layer"
    );
}

/// Two images sharing a base layer of `sizes[0]` bytes (app1 with a layer of `sizes[1]`,
/// app2 with one of `sizes[2]`), pushed as team/app1:v1 and team/app2:v1 and pulled
/// back; returns them and the manifest digest of team/app2:v1.
pub(crate) fn push_two_apps(
    reg: &Registry,
    dir: &Scratch,
    sizes: [usize; 3],
) -> (Image, Image, String) {
    let base = bytes(1, sizes[0]);
    let app1 = make_image(
        &dir.path("img1"),
        "app1",
        &[base.clone(), bytes(2, sizes[1])],
    );
    let app2 = make_image(&dir.path("img2"), "app2", &[base, bytes(3, sizes[2])]);
    push(reg, &app1, "team/app1:v1");
    let app2_manifest = push(reg, &app2, "team/app2:v1");
    for r in ["team/app1:v1", "team/app2:v1"] {
        let (ok, err) = pull(reg, r, &dir.path("pulled"));
        assert!(ok, "pull {r}: {err}");
    }
    (app1, app2, app2_manifest)
}

/// `gc --config CONFIG --journal JOURNAL --format json EXTRA -- COMMAND`.
pub(crate) fn gc_with(
    config: &str,
    journal: &str,
    extra: &[&str],
    command: &[&str],
) -> (i32, serde_json::Value, String) {
    let mut args = vec![
        "gc",
        "--config",
        config,
        "--journal",
        journal,
        "--format",
        "json",
    ];
    args.extend_from_slice(extra);
    args.push("--");
    args.extend_from_slice(command);
    let (code, out, err) = run_tool(&args);
    (code, json_or_null(&out), err)
}

/// `check --root --redis --format json` of the scenario's registry, with `extra` flags.
pub(crate) fn check_fs(s: &Scenario, extra: &[&str]) -> (i32, serde_json::Value, String) {
    let root = s.registry.root.display().to_string();
    let url = s.redis.url();
    let mut args = vec![
        "check", "--root", &root, "--redis", &url, "--format", "json",
    ];
    args.extend_from_slice(extra);
    let (code, out, err) = run_tool(&args);
    (code, json(&out), err)
}

/// `purge --apply PLAN --config CONFIG --yes --journal JOURNAL --format json`.
pub(crate) fn purge_apply(
    config: &str,
    plan: &str,
    journal: &str,
) -> (i32, serde_json::Value, String) {
    let (code, out, err) = run_tool(&[
        "purge",
        "--apply",
        plan,
        "--config",
        config,
        "--yes",
        "--journal",
        journal,
        "--format",
        "json",
    ]);
    let report = json_or_null(&out);
    (code, report, err)
}

/// Whether `report` has a finding of `kind` for `digest`.
pub(crate) fn has_finding(report: &serde_json::Value, kind: &str, digest: &str) -> bool {
    report["findings"]
        .as_array()
        .is_some_and(|f| f.iter().any(|f| f["kind"] == kind && f["digest"] == digest))
}

/// The phantom entries, computed independently of the tool: straight from Redis and the
/// filesystem, by the registry's key shapes.
pub(crate) fn expected_phantoms(
    s: &Scenario,
) -> BTreeSet<(String, Option<String>, Option<String>)> {
    let mut c = s.redis.conn();
    let keys: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut c).expect("keys");
    let mut out = BTreeSet::new();
    for k in keys {
        if let Some(d) = k.strip_prefix("blobs::") {
            if !s.registry.has_blob(d) {
                out.insert((
                    "phantom-blob-descriptor".to_string(),
                    None,
                    Some(d.to_string()),
                ));
            }
        } else if let Some(repo) = k
            .strip_prefix("repository::")
            .and_then(|r| r.strip_suffix("::blobs"))
        {
            let members: Vec<String> = redis::cmd("SMEMBERS")
                .arg(&k)
                .query(&mut c)
                .expect("smembers");
            for d in members {
                if !s.registry.has_blob(&d) {
                    out.insert((
                        "phantom-repository-blob".to_string(),
                        Some(repo.to_string()),
                        Some(d),
                    ));
                }
            }
        }
    }
    out
}

/// Uploads a blob through the registry's monolithic upload API (POST, then PUT with the
/// digest): the upload writes storage whatever the cache says.
pub(crate) fn upload_blob(reg: &Registry, repo: &str, content: &[u8]) -> String {
    let digest = sha256(content);
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .build()
        .into();
    let resp = agent
        .post(&format!("{}/v2/{repo}/blobs/uploads/", reg.url()))
        .send_empty()
        .expect("POST upload");
    assert_eq!(resp.status().as_u16(), 202, "start upload");
    let location = resp
        .headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .expect("Location")
        .to_string();
    let location = if location.starts_with('/') {
        format!("{}{location}", reg.url())
    } else {
        location
    };
    let sep = if location.contains('?') { '&' } else { '?' };
    let resp = agent
        .put(&format!("{location}{sep}digest={digest}"))
        .header("Content-Type", "application/octet-stream")
        .send(content)
        .expect("PUT upload");
    assert_eq!(resp.status().as_u16(), 201, "finish upload");
    digest
}

/// The bytes of one of an image's blobs, from its OCI layout.
pub(crate) fn image_blob(image: &Image, digest: &str) -> Vec<u8> {
    fs::read(image.dir.join("blobs/sha256").join(&digest[7..])).expect("image blob")
}

/// `expected_phantoms` plus the `_layers` links to blobs that are gone, which the
/// registry's GC (2.8) leaves behind: what a default `check` reports after GC, computed
/// from Redis and the filesystem without the tool.
pub(crate) fn expected_after_gc(
    s: &Scenario,
) -> BTreeSet<(String, Option<String>, Option<String>)> {
    let mut out = expected_phantoms(s);
    let repos = s.registry.root.join("docker/registry/v2/repositories");
    for repo in ["team/app1", "mirror/app1", "team/app2"] {
        let layers = repos.join(repo).join("_layers/sha256");
        for entry in fs::read_dir(&layers).expect("layers").flatten() {
            let link = fs::read_to_string(entry.path().join("link")).expect("link");
            if !s.registry.has_blob(&link) {
                out.insert((
                    "dangling-layer-link".into(),
                    Some(repo.to_string()),
                    Some(link),
                ));
            }
        }
    }
    out
}

/// A storage root in the registry's layout, written by the test.
pub(crate) struct Store {
    pub dir: Scratch,
}

impl Store {
    pub(crate) fn new(tag: &str) -> Store {
        let dir = Scratch::new(tag);
        fs::create_dir_all(dir.path("docker/registry/v2/blobs")).expect("layout");
        fs::create_dir_all(dir.path("docker/registry/v2/repositories")).expect("layout");
        Store { dir }
    }
    pub(crate) fn root(&self) -> String {
        self.dir.0.display().to_string()
    }
    pub(crate) fn v2(&self) -> PathBuf {
        self.dir.path("docker/registry/v2")
    }
    /// Writes a blob and links it into `repo` as a layer; returns its digest.
    pub(crate) fn blob(&self, repo: &str, content: &[u8]) -> String {
        let d = sha256(content);
        self.write_data(&d, content);
        let link = self
            .v2()
            .join("repositories")
            .join(repo)
            .join("_layers/sha256")
            .join(&d[7..]);
        fs::create_dir_all(&link).expect("mkdir");
        fs::write(link.join("link"), &d).expect("link");
        d
    }
    pub(crate) fn data_path(&self, d: &str) -> PathBuf {
        self.v2()
            .join("blobs/sha256")
            .join(&d[7..9])
            .join(&d[7..])
            .join("data")
    }
    pub(crate) fn write_data(&self, d: &str, content: &[u8]) {
        let p = self.data_path(d);
        fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        fs::write(p, content).expect("write");
    }
}
