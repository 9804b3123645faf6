//! Test harness: OCI images and indexes generated on the fly, pushed and pulled with `skopeo`.

use super::*;

/// An OCI image written as an OCI layout directory, ready for `skopeo copy oci:DIR:TAG`.
pub(crate) struct Image {
    pub dir: PathBuf,
    pub tag: String,
    pub layers: Vec<String>,
    pub config: String,
    pub manifest: String,
}

impl Image {
    pub(crate) fn blobs(&self) -> Vec<String> {
        let mut v = self.layers.clone();
        v.push(self.config.clone());
        v.push(self.manifest.clone());
        v
    }
}

fn put_blob(dir: &Path, bytes: &[u8]) -> String {
    let d = sha256(bytes);
    let p = dir.join("blobs/sha256").join(&d[7..]);
    fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
    fs::write(p, bytes).expect("write blob");
    d
}

/// Gzips layer content, so skopeo pushes the layer as it is (it compresses
/// uncompressed layers on push, which would change their digests).
pub(crate) fn gzip(content: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(content).expect("gzip");
    enc.finish().expect("gzip")
}

/// Builds an image from layer contents (gzipped here); the config names `label` so
/// configs differ.
pub(crate) fn make_image(dir: &Path, label: &str, layers: &[Vec<u8>]) -> Image {
    fs::create_dir_all(dir).expect("image dir");
    let layers: Vec<Vec<u8>> = layers.iter().map(|l| gzip(l)).collect();
    fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).expect("layout");
    let layer_digests: Vec<String> = layers.iter().map(|l| put_blob(dir, l)).collect();
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Labels": {"test": label}},
        "rootfs": {"type": "layers", "diff_ids": layer_digests},
    });
    let config_bytes = serde_json::to_vec(&config).expect("config json");
    let config_digest = put_blob(dir, &config_bytes);
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config_bytes.len()},
        "layers": layers.iter().zip(&layer_digests).map(|(l, d)| serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d, "size": l.len()
        })).collect::<Vec<_>>(),
    });
    let manifest_bytes = serde_json::to_vec(&manifest).expect("manifest json");
    let manifest_digest = put_blob(dir, &manifest_bytes);
    write_layout_index(
        dir,
        "application/vnd.oci.image.manifest.v1+json",
        &manifest_digest,
        manifest_bytes.len(),
    );
    Image {
        dir: dir.to_path_buf(),
        tag: "latest".into(),
        layers: layer_digests,
        config: config_digest,
        manifest: manifest_digest,
    }
}

/// The OCI layout's `index.json`, its `latest` tag naming the given manifest or index.
fn write_layout_index(dir: &Path, media_type: &str, digest: &str, size: usize) {
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": media_type, "digest": digest, "size": size,
            "annotations": {"org.opencontainers.image.ref.name": "latest"}
        }]
    });
    fs::write(
        dir.join("index.json"),
        serde_json::to_vec(&index).expect("index"),
    )
    .expect("index.json");
}

/// An OCI image index of one image per label (each with its own layer and config),
/// written as an OCI layout whose `latest` is the index. `layers`/`config` of the
/// returned Image list every child's blobs; `children` their manifests.
pub(crate) fn make_index_image(dir: &Path, labels: &[&str]) -> (Image, Vec<String>) {
    fs::create_dir_all(dir).expect("image dir");
    let mut children = Vec::new();
    let mut layers = Vec::new();
    let mut configs = Vec::new();
    let mut descriptors = Vec::new();
    for (i, label) in labels.iter().enumerate() {
        let sub = dir.join(format!("child-{i}"));
        let child = make_image(&sub, label, &[bytes(100 + i as u64, 20_000)]);
        for d in child.blobs() {
            let from = sub.join("blobs/sha256").join(&d[7..]);
            let to = dir.join("blobs/sha256").join(&d[7..]);
            fs::create_dir_all(to.parent().expect("parent")).expect("mkdir");
            fs::copy(from, to).expect("copy blob");
        }
        let manifest_bytes =
            fs::read(dir.join("blobs/sha256").join(&child.manifest[7..])).expect("manifest");
        descriptors.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": child.manifest, "size": manifest_bytes.len(),
            "platform": {"architecture": if i == 0 { "amd64" } else { "arm64" }, "os": "linux"}
        }));
        children.push(child.manifest.clone());
        layers.extend(child.layers.clone());
        configs.push(child.config.clone());
        fs::remove_dir_all(&sub).expect("cleanup");
    }
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": descriptors,
    });
    let index_bytes = serde_json::to_vec(&index).expect("index");
    let index_digest = put_blob(dir, &index_bytes);
    fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).expect("layout");
    write_layout_index(
        dir,
        "application/vnd.oci.image.index.v1+json",
        &index_digest,
        index_bytes.len(),
    );
    let image = Image {
        dir: dir.to_path_buf(),
        tag: "latest".into(),
        layers,
        config: configs.join(","),
        manifest: index_digest,
    };
    (image, children)
}

/// Pushes an image; returns the digest of the manifest as the registry stored it
/// (skopeo may re-encode the manifest on the way).
pub(crate) fn push(reg: &Registry, image: &Image, repo_tag: &str) -> String {
    push_with(reg, image, repo_tag, &[])
}

/// Pushes an image index with all its images.
pub(crate) fn push_all(reg: &Registry, image: &Image, repo_tag: &str) -> String {
    push_with(reg, image, repo_tag, &["--all"])
}

fn push_with(reg: &Registry, image: &Image, repo_tag: &str, extra: &[&str]) -> String {
    let digestfile = image
        .dir
        .with_extension(format!("pushed-{}", repo_tag.replace(['/', ':'], "_")));
    need("skopeo");
    let out = Command::new("skopeo")
        .args(["--insecure-policy", "copy", "--dest-tls-verify=false", "-q"])
        .args(extra)
        .args(reg.skopeo_creds("--dest-creds"))
        .arg("--digestfile")
        .arg(&digestfile)
        .arg(format!("oci:{}:{}", image.dir.display(), image.tag))
        .arg(reg.docker_ref(repo_tag))
        .output()
        .expect("run skopeo");
    assert!(
        out.status.success(),
        "push {repo_tag}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let digest = fs::read_to_string(&digestfile).expect("digestfile");
    let _ = fs::remove_file(&digestfile);
    digest.trim().to_string()
}

/// Pulls into a fresh OCI directory; true when the pull worked.
pub(crate) fn pull(reg: &Registry, repo_tag: &str, into: &Path) -> (bool, String) {
    let _ = fs::remove_dir_all(into);
    need("skopeo");
    let out = Command::new("skopeo")
        .args(["--insecure-policy", "copy", "--src-tls-verify=false", "-q"])
        .args(reg.skopeo_creds("--src-creds"))
        .arg(reg.docker_ref(repo_tag))
        .arg(format!("oci:{}:pulled", into.display()))
        .output()
        .expect("run skopeo");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
