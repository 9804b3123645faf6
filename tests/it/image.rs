//! The container image end to end: `scripts/image` builds it (the static binary once per
//! test run, and only when these tests run), skopeo pushes it to the real registry and
//! pulls it back, its layers are unpacked into a root file system, and its entrypoint
//! runs there (chroot, as the image's user, with the image's environment only): `check`
//! verifies a storage root copied in, and TLS finds the roots of the image's bundle.
//! Needs root (buildah, chroot), as `scripts/test` runs in CI.

use crate::common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::Instant;

use common::*;

fn root_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The OCI archive `scripts/image` built, once for all tests of this file.
fn archive() -> &'static Path {
    static ARCHIVE: OnceLock<PathBuf> = OnceLock::new();
    ARCHIVE.get_or_init(|| {
        let root = std::process::Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| o.stdout.trim_ascii() == b"0");
        assert!(
            root,
            "the image tests need root (buildah with chroot isolation, chroot): run scripts/test as root"
        );
        let started = Instant::now();
        let out = Command::new(root_dir().join("scripts/image"))
            .stdin(Stdio::null())
            .output()
            .expect("run scripts/image");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "scripts/image failed:\n{stderr}");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let path = PathBuf::from(stdout.lines().last().expect("the archive's path").trim());
        assert!(path.is_file(), "{}", path.display());
        eprintln!(
            "scripts/image took {:.0} s: {}",
            started.elapsed().as_secs_f64(),
            stderr.lines().last().unwrap_or("")
        );
        path
    })
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&fs::read(path).expect("read")).expect("JSON")
}

/// An OCI layout directory's blob.
fn blob(layout: &Path, digest: &str) -> PathBuf {
    let (alg, hex) = digest.split_once(':').expect("digest");
    layout.join("blobs").join(alg).join(hex)
}

/// The image as pulled back from the registry: its config and an unpacked root.
struct Unpacked {
    config: serde_json::Value,
    rootfs: PathBuf,
    compressed: u64,
}

/// Pushes the image with skopeo to `registry`, pulls it back into an OCI layout and
/// unpacks its layers, in order, into `dir/rootfs`.
fn push_pull_unpack(registry: &Registry, dir: &Scratch) -> Unpacked {
    let reference = registry.docker_ref(&format!(
        "tools/registry-audit:{}",
        env!("CARGO_PKG_VERSION")
    ));
    run(Command::new("skopeo")
        .args(["--insecure-policy", "copy", "-q", "--dest-tls-verify=false"])
        .arg(format!("oci-archive:{}", archive().display()))
        .arg(&reference));
    let layout = dir.path("pulled");
    run(Command::new("skopeo")
        .args(["--insecure-policy", "copy", "-q", "--src-tls-verify=false"])
        .arg(&reference)
        .arg(format!("oci:{}:pulled", layout.display())));
    let index = read_json(&layout.join("index.json"));
    let manifest = read_json(&blob(
        &layout,
        index["manifests"][0]["digest"].as_str().expect("manifest"),
    ));
    let config = read_json(&blob(
        &layout,
        manifest["config"]["digest"].as_str().expect("config"),
    ));
    let rootfs = dir.path("rootfs");
    fs::create_dir_all(&rootfs).expect("rootfs");
    let mut compressed = 0;
    for layer in manifest["layers"].as_array().expect("layers") {
        compressed += layer["size"].as_u64().expect("size");
        let path = blob(&layout, layer["digest"].as_str().expect("digest"));
        run(Command::new("tar")
            .args(["--same-owner", "--same-permissions", "-xf"])
            .arg(&path)
            .arg("-C")
            .arg(&rootfs));
    }
    Unpacked {
        config,
        rootfs,
        compressed,
    }
}

/// Runs the image's entrypoint with `args` in `rootfs` as the image would: chroot, as
/// its user, with its environment and working directory only.
fn entrypoint(image: &Unpacked, env: bool, args: &[&str]) -> (i32, String, String) {
    let c = &image.config["config"];
    let user = c["User"].as_str().expect("User");
    let chroot = std::env::var_os("PATH")
        .and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("chroot"))
                .find(|c| c.is_file())
        })
        .expect("chroot (coreutils)");
    let mut cmd = Command::new(chroot);
    cmd.arg(format!("--userspec={user}"))
        .arg(&image.rootfs)
        .args(
            c["Entrypoint"]
                .as_array()
                .expect("Entrypoint")
                .iter()
                .map(|s| s.as_str().expect("arg")),
        )
        .args(args)
        .env_clear()
        .stdin(Stdio::null());
    if env {
        for kv in c["Env"].as_array().expect("Env") {
            let (k, v) = kv.as_str().expect("env").split_once('=').expect("k=v");
            cmd.env(k, v);
        }
    }
    let out = cmd.output().expect("chroot");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn dir_size(p: &Path) -> u64 {
    let m = fs::symlink_metadata(p).expect("metadata");
    if m.is_dir() {
        fs::read_dir(p)
            .expect("read_dir")
            .map(|e| dir_size(&e.expect("entry").path()))
            .sum()
    } else {
        m.len()
    }
}

#[test]
fn the_image_pushed_and_pulled_back_runs_check_as_its_user_and_finds_tls_roots() {
    let started = Instant::now();
    archive();
    let built = started.elapsed();
    let dir = Scratch::new("image");
    // The registry stores the image itself, and a pushed app: real storage to check.
    let registry = Registry::start(&dir, Cache::InMemory);
    let app = make_image(
        &dir.path("app"),
        "app",
        &[bytes(21, 20_000), bytes(22, 30_000)],
    );
    push(&registry, &app, "team/app:v1");
    let image = push_pull_unpack(&registry, &dir);

    // What the image says about itself.
    let c = &image.config["config"];
    assert_eq!(c["Entrypoint"], serde_json::json!(["/registry-audit"]));
    assert_eq!(c["User"], "65532:65532");
    let labels = &c["Labels"];
    assert_eq!(
        labels["org.opencontainers.image.version"],
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(labels["org.opencontainers.image.licenses"], "Apache-2.0");
    assert!(labels["org.opencontainers.image.revision"].is_string());
    let rootfs = &image.rootfs;
    let mode = |p: &str| {
        fs::symlink_metadata(rootfs.join(p))
            .unwrap_or_else(|e| panic!("{p}: {e}"))
            .permissions()
            .mode()
    };
    assert_eq!(mode("registry-audit") & 0o7777, 0o755);
    assert_eq!(mode("tmp") & 0o7777, 0o1777);
    assert!(
        fs::read_to_string(rootfs.join("etc/ssl/certs/ca-certificates.crt"))
            .expect("CA bundle")
            .contains("BEGIN CERTIFICATE")
    );
    assert!(
        fs::read_to_string(rootfs.join("etc/passwd"))
            .expect("passwd")
            .contains(":65532:65532:")
    );
    let unpacked = dir_size(rootfs);
    eprintln!(
        "image: {} bytes compressed, {} bytes unpacked; built in {:.0} s",
        image.compressed,
        unpacked,
        built.as_secs_f64()
    );
    // A static binary and a CA bundle: far below any base image.
    assert!(unpacked < 40 << 20, "{unpacked} bytes unpacked");

    // No shell, no libc: the binary runs on its own.
    let (code, out, err) = entrypoint(&image, true, &["--version"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(env!("CARGO_PKG_VERSION")), "{out}");

    // `check` against a storage root copied into the image's file system.
    run(Command::new("cp")
        .arg("-a")
        .arg(&registry.root)
        .arg(rootfs.join("storage")));
    let (code, out, err) = entrypoint(
        &image,
        true,
        &[
            "check",
            "--storage-only",
            "--root",
            "/storage",
            "--format",
            "json",
        ],
    );
    assert_eq!(code, 0, "{err}\n{out}");
    let report = json(&out);
    assert_eq!(
        report["summary"]["storage"]["tags_checked"], 2,
        "{report:#}"
    );
    assert!(
        report["verdict"]
            .as_str()
            .expect("verdict")
            .starts_with("OK"),
        "{report:#}"
    );

    // TLS: a registry whose certificate a private CA signed. The image's bundle does
    // not hold that CA: the roots are found, and the certificate is refused.
    let pki = Pki::new(&["registry"]);
    let tls_dir = Scratch::new("image-tls");
    let tls = Registry::start_tls(
        &tls_dir,
        Cache::InMemory,
        &pki.path("registry.crt"),
        &pki.path("registry.key"),
    );
    let url = tls.url();
    let probe = [
        "probe",
        "--registry-url",
        &url,
        "--root",
        "/storage",
        "--format",
        "json",
    ];
    let (code, _, err) = entrypoint(&image, true, &probe);
    eprintln!("without the CA: {}", err.trim());
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("cannot reach the registry"), "{err}");
    assert!(
        err.to_lowercase().contains("certificate") || err.contains("UnknownIssuer"),
        "{err}"
    );
    assert!(!err.to_lowercase().contains("no ca certificates"), "{err}");
    assert!(!err.to_lowercase().contains("native root"), "{err}");
    // With the CA added to the image's bundle, the same probe connects: the roots come
    // from the bundle at the standard path, with SSL_CERT_FILE set and without it.
    let bundle = rootfs.join("etc/ssl/certs/ca-certificates.crt");
    let mut pem = fs::read(&bundle).expect("bundle");
    pem.extend(fs::read(pki.path("ca.crt")).expect("ca"));
    fs::write(&bundle, pem).expect("bundle");
    for env in [true, false] {
        let (code, out, err) = entrypoint(&image, env, &probe);
        assert_eq!(code, 0, "environment {env}: {err}");
        assert_eq!(json(&out)["command"], "probe");
    }
    // A name, resolved from the /etc/hosts a container runtime mounts (the certificate
    // names localhost too): the static binary resolves without any NSS library.
    fs::write(rootfs.join("etc/hosts"), "127.0.0.1 localhost\n").expect("hosts");
    let by_name = format!("https://localhost:{}", tls.port);
    let (code, _, err) = entrypoint(
        &image,
        true,
        &[
            "probe",
            "--registry-url",
            &by_name,
            "--root",
            "/storage",
            "--format",
            "json",
        ],
    );
    assert_eq!(code, 0, "{err}");
}
