//! Storage as a broken or hostile system leaves it: manifests that are FIFOs, sockets,
//! directories, garbage, oversized or not what their digest names; index graphs with a
//! large fan-out, chains deeper than the limit; directories the tool may not list; names
//! with terminal control characters. Each case is built from scratch and run through
//! `check --storage-only`, asserting the exit code, the finding and that the run ends
//! (never blocks) in bounded memory.

use crate::common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Store, sha256};
use serde_json::Value;

/// Writes a manifest blob, its revision link and (with `tag`) the tag's current link.
fn manifest(store: &Store, repo: &str, tag: Option<&str>, content: &[u8]) -> String {
    let d = sha256(content);
    store.write_data(&d, content);
    link(store, repo, tag, &d);
    d
}

/// Links `d` into `repo` as a manifest revision and, with `tag`, tags it.
fn link(store: &Store, repo: &str, tag: Option<&str>, d: &str) {
    let base = store
        .v2()
        .join("repositories")
        .join(repo)
        .join("_manifests");
    let rev = base.join("revisions/sha256").join(&d[7..]);
    fs::create_dir_all(&rev).expect("mkdir");
    fs::write(rev.join("link"), d).expect("link");
    if let Some(tag) = tag {
        let cur = base.join("tags").join(tag).join("current");
        fs::create_dir_all(&cur).expect("mkdir");
        fs::write(cur.join("link"), d).expect("link");
    }
}

fn image_manifest(config: &str, layers: &[&str]) -> Vec<u8> {
    let layers: Vec<String> = layers
        .iter()
        .map(|l| {
            format!(
                r#"{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{l}","size":1}}"#
            )
        })
        .collect();
    format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config}","size":1}},"layers":[{}]}}"#,
        layers.join(",")
    )
    .into_bytes()
}

fn index_manifest(children: &[String], label: &str) -> Vec<u8> {
    let children: Vec<String> = children
        .iter()
        .map(|c| {
            format!(
                r#"{{"mediaType":"application/vnd.oci.image.index.v1+json","digest":"{c}","size":1}}"#
            )
        })
        .collect();
    format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{}],"annotations":{{"label":"{label}"}}}}"#,
        children.join(",")
    )
    .into_bytes()
}

/// A valid image in `repo` (config and one layer present, both linked); returns the
/// manifest's bytes.
fn good_image(store: &Store, repo: &str, seed: &str) -> Vec<u8> {
    let config = store.blob(repo, format!("config {seed}").as_bytes());
    let layer = store.blob(repo, format!("layer {seed}").as_bytes());
    image_manifest(&config, &[&layer])
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
    /// Peak resident memory of the tool, in KiB.
    max_rss_kib: u64,
    args: Vec<String>,
}

impl Run {
    /// Fails unless the tool logged a peak memory (`-v`) below `mib` MiB.
    fn assert_memory_below(&self, mib: u64) {
        assert!(
            (1..mib * 1024).contains(&self.max_rss_kib),
            "peak memory {} KiB, over {mib} MiB (0: not logged){self}",
            self.max_rss_kib
        );
    }

    fn report(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {self}"))
    }
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "\n$ registry-audit {}\nexit {}\n--- stdout\n{}\n--- stderr\n{}",
            self.args.join(" "),
            self.code,
            self.stdout,
            self.stderr
        )
    }
}

/// Runs the tool (as `user` when given: the tests run as root, who may read anything),
/// failing the test if it has not ended within a minute: a FIFO must never block it.
fn run_as(user: Option<&str>, args: &[&str]) -> Run {
    let mut cmd = match user {
        Some(u) => {
            let mut c = Command::new("setpriv");
            c.args([
                &format!("--reuid={u}"),
                &format!("--regid={u}"),
                "--clear-groups",
                "--",
                common::BIN,
            ]);
            c
        }
        None => Command::new(common::BIN),
    };
    let out_file = tempfile(&format!("out-{}", std::process::id()));
    let err_file = tempfile(&format!("err-{}", std::process::id()));
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(fs::File::create(&out_file).expect("stdout file"))
        .stderr(fs::File::create(&err_file).expect("stderr file"));
    let mut child = cmd.spawn().expect("run registry-audit");
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if start.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("registry-audit {args:?} did not end within a minute");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let code = status.code().unwrap_or(-1);
    let stderr = fs::read_to_string(&err_file).unwrap_or_default();
    // The tool logs its own peak memory (VmHWM) at -v.
    let max_rss_kib = stderr
        .lines()
        .find_map(|l| l.split("peak memory: ").nth(1))
        .and_then(|v| v.trim_end_matches(" KiB").trim().parse().ok())
        .unwrap_or(0);
    let run = Run {
        code,
        stdout: fs::read_to_string(&out_file).unwrap_or_default(),
        stderr,
        max_rss_kib,
        args: args.iter().map(|a| a.to_string()).collect(),
    };
    let _ = fs::remove_file(out_file);
    let _ = fs::remove_file(err_file);
    run
}

fn tempfile(name: &str) -> std::path::PathBuf {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    std::env::temp_dir().join(format!(
        "ra-hostile-{name}-{}",
        N.fetch_add(1, Ordering::Relaxed)
    ))
}

fn check(store: &Store) -> Run {
    check_as(None, store, "json")
}

/// `check --storage-only` of `store` (as `user`), in `format`, logging its peak memory.
fn check_as(user: Option<&str>, store: &Store, format: &str) -> Run {
    run_as(
        user,
        &[
            "check",
            "--storage-only",
            "--root",
            &store.root(),
            "--format",
            format,
            "-v",
        ],
    )
}

fn findings<'a>(report: &'a Value, kind: &str) -> Vec<&'a Value> {
    report["findings"]
        .as_array()
        .expect("findings")
        .iter()
        .filter(|f| f["kind"] == kind)
        .collect()
}

/// Every unusable tagged manifest: the tag is an error finding that names the tag, the
/// manifest and why, and the tool never blocks on a FIFO.
#[test]
fn unusable_tagged_manifests_are_errors_naming_the_tag() {
    let store = Store::new("bad-manifests");
    // One pullable image, so the run has something sound too.
    let good = good_image(&store, "demo", "good");
    manifest(&store, "demo", Some("good"), &good);

    let mut cases: Vec<(&str, String, &str)> = Vec::new();
    let mut add = |tag: &'static str, d: String, why: &'static str| cases.push((tag, d, why));

    // Not JSON; JSON that is not a manifest; an unknown media type.
    add(
        "garbage",
        manifest(&store, "demo", Some("garbage"), b"\x00\xffnot json"),
        "not JSON",
    );
    add(
        "notmanifest",
        manifest(&store, "demo", Some("notmanifest"), br#"{"hello":"world"}"#),
        "not a manifest",
    );
    add(
        "strange",
        manifest(
            &store,
            "demo",
            Some("strange"),
            br#"{"schemaVersion":2,"mediaType":"text/plain","layers":[]}"#,
        ),
        "unknown mediaType",
    );
    // JSON nested far deeper than any manifest.
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    add(
        "deepjson",
        manifest(&store, "demo", Some("deepjson"), deep.as_bytes()),
        "not JSON",
    );
    // Content that does not hash to its digest.
    let other = good_image(&store, "demo", "other");
    let d = manifest(&store, "demo", Some("mismatch"), &other);
    fs::write(
        store.data_path(&d),
        b"{\"schemaVersion\":2,\"manifests\":[]}",
    )
    .expect("write");
    add("mismatch", d, "does not hash to its digest");
    // Larger than the registry accepts: a sparse 5 GiB file costs no disk.
    let d = sha256(b"oversized");
    link(&store, "demo", Some("oversized"), &d);
    store.write_data(&d, b"");
    fs::File::options()
        .write(true)
        .open(store.data_path(&d))
        .and_then(|f| f.set_len(5 << 30))
        .expect("sparse file");
    add("oversized", d, "larger than");
    // A FIFO (must not block), a socket and a directory where the data should be.
    let d = sha256(b"fifo");
    link(&store, "demo", Some("fifo"), &d);
    fs::create_dir_all(store.data_path(&d).parent().expect("parent")).expect("mkdir");
    let status = Command::new("mkfifo")
        .arg(store.data_path(&d))
        .status()
        .expect("mkfifo");
    assert!(status.success());
    add("fifo", d, "not a regular file");
    let d = sha256(b"socket");
    link(&store, "demo", Some("socket"), &d);
    fs::create_dir_all(store.data_path(&d).parent().expect("parent")).expect("mkdir");
    // A socket's path is short: bind it nearby, then move it into place.
    let short = tempfile("sock");
    let _socket = std::os::unix::net::UnixListener::bind(&short).expect("socket");
    fs::rename(&short, store.data_path(&d)).expect("move the socket");
    add("socket", d, "not a regular file");
    let d = sha256(b"directory");
    link(&store, "demo", Some("directory"), &d);
    fs::create_dir_all(store.data_path(&d)).expect("mkdir");
    add("directory", d, "not a regular file");
    // A tagged index whose child manifest is garbage.
    let child = manifest(
        &store,
        "demo",
        None,
        b"{\"schemaVersion\":2,\"manifests\":3}",
    );
    let index = index_manifest(std::slice::from_ref(&child), "bad child");
    let idx = manifest(&store, "demo", Some("badchild"), &index);

    let run = check(&store);
    assert_eq!(run.code, 1, "{run}");
    let report = run.report();
    let bad = findings(&report, "bad-manifest");
    for (tag, digest, why) in &cases {
        let f = bad
            .iter()
            .find(|f| f["tag"] == *tag)
            .unwrap_or_else(|| panic!("no bad-manifest for tag {tag}: {run}"));
        assert_eq!(f["severity"], "error", "{run}");
        assert_eq!(f["manifest"], digest.as_str(), "{run}");
        assert_eq!(f["repository"], "demo", "{run}");
        let detail = f["detail"].as_str().expect("detail");
        assert!(detail.contains(why), "tag {tag}: {detail}");
        assert!(detail.contains("cannot be pulled"), "{detail}");
    }
    let f = bad
        .iter()
        .find(|f| f["tag"] == "badchild")
        .unwrap_or_else(|| panic!("no bad-manifest for the index's child: {run}"));
    assert_eq!(f["manifest"], idx.as_str());
    assert_eq!(f["digest"], child.as_str());
    assert!(!bad.iter().any(|f| f["tag"] == "good"), "{run}");
    assert_eq!(bad.len(), cases.len() + 1, "{run}");
}

/// An index DAG with fan-out 16 and depth 7 (each index names all 16 of the next
/// level: 16^7 paths, 113 distinct manifests): every manifest is followed once, the one
/// missing layer is reported for each image that needs it, and memory stays small.
#[test]
fn index_dags_are_walked_once_per_manifest() {
    let store = Store::new("dag");
    let repo = "dag/app";
    let config = store.blob(repo, b"shared config");
    let missing = sha256(b"a layer GC took");
    let mut level: Vec<String> = (0..16)
        .map(|i| {
            let present = store.blob(repo, format!("layer {i}").as_bytes());
            manifest(
                &store,
                repo,
                None,
                &image_manifest(&config, &[&present, &missing]),
            )
        })
        .collect();
    let images = level.clone();
    for depth in 0..6 {
        level = (0..16)
            .map(|i| {
                manifest(
                    &store,
                    repo,
                    None,
                    &index_manifest(&level, &format!("{depth}-{i}")),
                )
            })
            .collect();
    }
    let root = manifest(&store, repo, Some("v1"), &index_manifest(&level, "root"));
    // A second tag on the same root costs nothing more.
    link(&store, repo, Some("v1-again"), &root);

    let run = check(&store);
    assert_eq!(run.code, 1, "{run}");
    let report = run.report();
    let missing_found = findings(&report, "missing-referenced-blob");
    for tag in ["v1", "v1-again"] {
        let mut vias: Vec<&str> = missing_found
            .iter()
            .filter(|f| f["tag"] == tag)
            .map(|f| {
                assert_eq!(f["digest"], missing.as_str());
                f["manifest"].as_str().expect("manifest")
            })
            .collect();
        vias.sort();
        let mut expected: Vec<&str> = images.iter().map(String::as_str).collect();
        expected.sort();
        assert_eq!(vias, expected, "{run}");
    }
    assert!(findings(&report, "bad-manifest").is_empty(), "{run}");
    run.assert_memory_below(100);
}

/// A chain of indexes deeper than the limit is an error finding, and the missing blob
/// at its bottom is still reported: nothing stops silently.
#[test]
fn chains_deeper_than_the_limit_are_reported_to_the_bottom() {
    let store = Store::new("chain");
    let repo = "chain";
    let config = store.blob(repo, b"config");
    let missing = sha256(b"gone");
    let image = manifest(&store, repo, None, &image_manifest(&config, &[&missing]));
    let mut top = image.clone();
    for i in 0..12 {
        top = manifest(&store, repo, None, &index_manifest(&[top], &format!("{i}")));
    }
    link(&store, repo, Some("deep"), &top);

    let run = check(&store);
    assert_eq!(run.code, 1, "{run}");
    let report = run.report();
    let deep = findings(&report, "bad-manifest");
    assert_eq!(deep.len(), 1, "{run}");
    assert!(
        deep[0]["detail"]
            .as_str()
            .is_some_and(|d| d.contains("nest 13 deep") && d.contains("limit of 8")),
        "{run}"
    );
    let m = findings(&report, "missing-referenced-blob");
    assert_eq!(m.len(), 1, "{run}");
    assert_eq!(m[0]["manifest"], image.as_str());
    assert_eq!(m[0]["digest"], missing.as_str());
}

fn nobody_can_run_the_tool() -> bool {
    // The binary under target/ must be reachable by an unprivileged user.
    let mut dir = Path::new(common::BIN).parent();
    while let Some(d) = dir {
        match fs::metadata(d) {
            Ok(m) if m.permissions().mode() & 0o001 != 0 => {}
            _ => return false,
        }
        dir = d.parent();
    }
    true
}

/// A directory the tool may not list, or a link it may not read, is a finding and
/// makes the run incomplete: `complete: false`, exit 1, never "OK".
#[test]
fn unreadable_directories_make_the_run_incomplete() {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0");
    if root && !nobody_can_run_the_tool() {
        eprintln!("skipped: an unprivileged user cannot reach {}", common::BIN);
        return;
    }
    let store = Store::new("unreadable");
    fs::set_permissions(&store.dir.0, fs::Permissions::from_mode(0o755)).expect("chmod");
    let good = good_image(&store, "open", "open");
    manifest(&store, "open", Some("v1"), &good);
    let hidden = good_image(&store, "closed", "closed");
    manifest(&store, "closed", Some("v1"), &hidden);
    let tagged = good_image(&store, "tags", "tags");
    manifest(&store, "tags", Some("v1"), &tagged);
    // Everything readable by others, then three places closed.
    let status = Command::new("chmod")
        .args(["-R", "a+rX", &store.root()])
        .status()
        .expect("chmod");
    assert!(status.success());
    let v2 = store.v2();
    let locked = good_image(&store, "locked", "locked");
    manifest(&store, "locked", Some("v1"), &locked);
    let closed_link = v2.join("repositories/locked/_manifests/tags/v1/current/link");
    let closed_layers = v2.join("repositories/closed/_layers/sha256");
    let closed_tags = v2.join("repositories/tags/_manifests/tags");
    for dir in [&closed_layers, &closed_tags] {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).expect("chmod");
    }
    fs::set_permissions(&closed_link, fs::Permissions::from_mode(0o600)).expect("chmod");
    // nobody:nogroup
    let user = root.then_some("65534");

    let run = check_as(user, &store, "json");
    assert_eq!(run.code, 1, "{run}");
    let report = run.report();
    assert_eq!(report["complete"], false, "{run}");
    let unread: Vec<&str> = findings(&report, "unreadable-storage")
        .iter()
        .map(|f| f["path"].as_str().expect("path"))
        .collect();
    assert!(
        unread.contains(&"docker/registry/v2/repositories/closed/_layers/sha256"),
        "{run}"
    );
    assert!(
        unread.contains(&"docker/registry/v2/repositories/tags/_manifests/tags"),
        "{run}"
    );
    assert!(
        unread.contains(&"docker/registry/v2/repositories/locked/_manifests/tags/v1/current/link"),
        "{run}"
    );
    // Not being allowed to read a link is not a broken link.
    assert!(findings(&report, "bad-link").is_empty(), "{run}");
    assert!(
        !report["verdict"].as_str().unwrap_or("").starts_with("OK"),
        "{run}"
    );
    assert!(
        report["notes"].as_array().is_some_and(|n| n
            .iter()
            .any(|n| n.as_str().is_some_and(|n| n.contains("could not be read")))),
        "{run}"
    );

    // The table says so too, and never "OK".
    let table = check_as(user, &store, "table");
    assert_eq!(table.code, 1, "{table}");
    assert!(table.stdout.contains("INCOMPLETE"), "{table}");
    assert!(!table.stdout.contains("OK:"), "{table}");
    for dir in [&closed_layers, &closed_tags] {
        let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o755));
    }
}

/// Names from storage with terminal control characters never reach the terminal raw,
/// and JSON keeps every byte in the lossless escaping.
#[test]
fn control_characters_in_names_are_escaped() {
    let store = Store::new("names");
    let evil = "evil\x1b[2J\x07\r/app";
    good_image(&store, evil, "evil");
    let image = good_image(&store, "fine", "fine");
    manifest(&store, "fine", Some("v1"), &image);
    // A tag whose name holds an escape sequence and a newline.
    link(
        &store,
        "fine",
        Some("t\x1b]0;pwned\x07\nx"),
        &sha256(&image),
    );
    // A repository name that is not UTF-8.
    let raw = std::ffi::OsStr::new("caf\u{e9}");
    use std::os::unix::ffi::OsStrExt;
    let mut bytes = raw.as_bytes().to_vec();
    bytes.push(0xff);
    let not_utf8 = store
        .v2()
        .join("repositories")
        .join(std::ffi::OsStr::from_bytes(&bytes))
        .join("_layers");
    fs::create_dir_all(&not_utf8).expect("mkdir");

    let run = check(&store);
    assert_eq!(run.code, 1, "{run}");
    assert!(
        !run.stdout.contains('\x1b') && !run.stderr.contains('\x1b'),
        "{run}"
    );
    let report = run.report();
    let bad = findings(&report, "bad-link");
    let paths: Vec<&str> = bad.iter().filter_map(|f| f["path"].as_str()).collect();
    assert!(
        paths.contains(&"docker/registry/v2/repositories/evil\\x1b[2J\\x07\\x0d/app"),
        "{paths:?}"
    );
    assert!(
        paths.contains(&"docker/registry/v2/repositories/caf\u{e9}\\xff"),
        "{paths:?}"
    );
    let tag = bad
        .iter()
        .find(|f| f["repository"] == "fine")
        .unwrap_or_else(|| panic!("no finding for the bad tag: {run}"));
    assert_eq!(tag["tag"], "t\\x1b]0;pwned\\x07\\x0ax");
    assert_eq!(tag["severity"], "error");
    assert!(bad.iter().all(|f| f["severity"] == "error"), "{run}");

    let table = check_as(None, &store, "table");
    assert_eq!(table.code, 1, "{table}");
    for text in [&table.stdout, &table.stderr] {
        assert!(
            !text.chars().any(|c| c.is_control() && c != '\n'),
            "raw control characters reached the terminal: {table}"
        );
    }
    assert!(table.stdout.contains("evil\\x1b[2J"), "{table}");
}

/// A link that is a FIFO or endless is a bad link, read without blocking and within its
/// bound.
#[test]
fn hostile_link_files_are_bad_links() {
    let store = Store::new("links");
    let layer = store.blob("repo", b"a layer");
    let link_path = store
        .v2()
        .join("repositories/repo/_layers/sha256")
        .join(&layer[7..])
        .join("link");
    fs::remove_file(&link_path).expect("rm");
    let status = Command::new("mkfifo")
        .arg(&link_path)
        .status()
        .expect("mkfifo");
    assert!(status.success());
    let other = store.blob("repo", b"another layer");
    let other_link = store
        .v2()
        .join("repositories/repo/_layers/sha256")
        .join(&other[7..])
        .join("link");
    fs::File::options()
        .write(true)
        .open(&other_link)
        .and_then(|f| f.set_len(10 << 30))
        .expect("sparse link");

    let run = check(&store);
    assert_eq!(run.code, 1, "{run}");
    let report = run.report();
    let bad = findings(&report, "bad-link");
    let detail = |d: &str| {
        bad.iter()
            .find(|f| f["digest"] == d)
            .and_then(|f| f["detail"].as_str())
            .unwrap_or_else(|| panic!("no bad-link for {d}: {run}"))
            .to_string()
    };
    assert!(detail(&layer).contains("FIFO"), "{run}");
    assert!(detail(&other).contains("larger than 1024 bytes"), "{run}");
    run.assert_memory_below(100);
}

/// Links the registry cannot parse (white space around the digest: it answers 500),
/// tags it lists but cannot serve (no current/link), manifests whose keys differ in
/// case (Go's decoder, the registry's and the clients', ignores case): each is reported
/// as the registry sees it.
#[test]
fn links_tags_and_keys_are_read_as_the_registry_reads_them() {
    let store = Store::new("as-registry");
    let image = good_image(&store, "demo", "ws");
    let d = manifest(&store, "demo", Some("ok"), &image);
    for (tag, content) in [
        ("nl", format!("{d}\n")),
        ("sp", format!(" {d} ")),
        ("tab", format!("{d}\t\r\n")),
    ] {
        link(&store, "demo", Some(tag), &d);
        let cur = store
            .v2()
            .join("repositories/demo/_manifests/tags")
            .join(tag)
            .join("current/link");
        fs::write(cur, content).expect("write");
    }
    fs::create_dir_all(
        store
            .v2()
            .join("repositories/demo/_manifests/tags/nocurrent"),
    )
    .expect("mkdir");
    // "Layers", not "layers": clients still need the missing layer.
    let config = store.blob("demo", b"cased config");
    let missing = sha256(b"cased layer, gone");
    let cased = format!(
        r#"{{"SchemaVersion":2,"MediaType":"application/vnd.oci.image.manifest.v1+json","Config":{{"Digest":"{config}"}},"Layers":[{{"Digest":"{missing}"}}]}}"#
    );
    manifest(&store, "demo", Some("cased"), cased.as_bytes());

    let run = check(&store);
    assert_eq!(run.code, 1, "{run}");
    let report = run.report();
    let bad = findings(&report, "bad-link");
    for tag in ["nl", "sp", "tab"] {
        let f = bad
            .iter()
            .find(|f| f["tag"] == tag)
            .unwrap_or_else(|| panic!("no bad-link for tag {tag}: {run}"));
        assert!(
            f["detail"]
                .as_str()
                .is_some_and(|d| d.contains("white space")),
            "{run}"
        );
    }
    assert!(
        findings(&report, "dangling-tag")
            .iter()
            .any(|f| f["tag"] == "nocurrent"),
        "{run}"
    );
    let m = findings(&report, "missing-referenced-blob");
    assert!(
        m.iter()
            .any(|f| f["tag"] == "cased" && f["digest"] == missing.as_str()),
        "{run}"
    );
    assert!(
        !findings(&report, "bad-link")
            .iter()
            .any(|f| f["tag"] == "ok")
    );
}

/// Symlinked repositories and tags are followed as the registry follows them, inside
/// the root; one that leads out of the root is never followed, and the run says so.
#[test]
fn symlinked_repositories_are_followed_inside_the_root_only() {
    let store = Store::new("symlinks");
    let outside = Store::new("symlinks-outside");
    // A repository kept elsewhere in the root, reached through a symlink, with a tag
    // whose manifest is gone.
    let stash = store.v2().join("repositories/stash-repo");
    let gone = sha256(b"a manifest GC took");
    link(&store, "stash-repo", Some("broken"), &gone);
    std::os::unix::fs::symlink(&stash, store.v2().join("repositories/team")).expect("symlink");
    // A tag directory that is a symlink to another tag of the same repository.
    let image = good_image(&store, "linked", "linked");
    manifest(&store, "linked", Some("v1"), &image);
    let tags = store.v2().join("repositories/linked/_manifests/tags");
    std::os::unix::fs::symlink(tags.join("v1"), tags.join("alias")).expect("symlink");
    // A repository that is a symlink out of the root.
    link(&outside, "away", Some("v1"), &sha256(b"elsewhere"));
    std::os::unix::fs::symlink(
        outside.v2().join("repositories/away"),
        store.v2().join("repositories/escape"),
    )
    .expect("symlink");

    let run = check(&store);
    assert_eq!(run.code, 1, "{run}");
    let report = run.report();
    assert_eq!(report["complete"], false, "{run}");
    let dangling = findings(&report, "dangling-tag");
    assert!(
        dangling
            .iter()
            .any(|f| f["repository"] == "team" && f["tag"] == "broken"),
        "{run}"
    );
    assert!(
        report["summary"]["storage"]["tags_checked"].as_u64() >= Some(4),
        "{run}"
    );
    let unread = findings(&report, "unreadable-storage");
    assert!(
        unread
            .iter()
            .any(|f| f["path"] == "docker/registry/v2/repositories/escape"
                && f["detail"]
                    .as_str()
                    .is_some_and(|d| d.contains("outside the storage root"))),
        "{run}"
    );
    assert!(
        !dangling.iter().any(|f| f["repository"] == "escape"),
        "{run}"
    );
}

/// A manifest graph built to blow up: 40 indexes each naming the same 40 images, each
/// image missing 50 layers (2,000 problems), tagged at the root and at every index.
/// Problems are never copied up the graph, and a tag lists at most
/// MAX_PROBLEMS_PER_TAG of them plus one finding that counts the rest.
#[test]
fn problems_are_bounded_per_tag_and_never_copied_up_the_graph() {
    let store = Store::new("wide");
    let repo = "wide";
    let config = store.blob(repo, b"config");
    let images: Vec<String> = (0..40)
        .map(|i| {
            let layers: Vec<String> = (0..50)
                .map(|k| sha256(format!("gone {i} {k}").as_bytes()))
                .collect();
            let refs: Vec<&str> = layers.iter().map(String::as_str).collect();
            manifest(&store, repo, None, &image_manifest(&config, &refs))
        })
        .collect();
    let middles: Vec<String> = (0..40)
        .map(|i| {
            manifest(
                &store,
                repo,
                Some(&format!("mid{i}")),
                &index_manifest(&images, &format!("mid {i}")),
            )
        })
        .collect();
    manifest(
        &store,
        repo,
        Some("root"),
        &index_manifest(&middles, "root"),
    );

    let run = check(&store);
    assert_eq!(run.code, 1, "{run}");
    let report = run.report();
    let m = findings(&report, "missing-referenced-blob");
    for tag in ["root", "mid0", "mid39"] {
        let under: Vec<_> = m.iter().filter(|f| f["tag"] == tag).collect();
        assert_eq!(under.len(), 1001, "tag {tag}");
        let more: Vec<_> = under.iter().filter(|f| f["digest"].is_null()).collect();
        assert_eq!(more.len(), 1, "tag {tag}");
        assert!(
            more[0]["detail"]
                .as_str()
                .is_some_and(|d| d.contains("1000 more problems")),
            "{}",
            more[0]
        );
    }
    run.assert_memory_below(200);
}
