//! Synthetic registries for benchmarks and tests: storage in the registry's real layout
//! (blobs, layer and revision links, tags) and a Redis filled with the registry's key
//! shapes for it, with a chosen fraction of phantom entries. Content is generated from
//! a seed, so the same parameters give the same registry. This is the only module that
//! writes a registry's storage, and it only ever writes into a directory it is given
//! for that purpose. A crate of its own, used only by the benchmarks and the tests
//! (`examples/synth.rs`, `scripts/bench`), so the tool itself ships no code that writes
//! storage or Redis.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::Digest as _;

/// A sha256 digest, as the registry writes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Digest {
    hex: String,
}

impl Digest {
    fn of(hash: &[u8]) -> Digest {
        Digest {
            hex: hash.iter().map(|b| format!("{b:02x}")).collect(),
        }
    }
    pub fn hex(&self) -> &str {
        &self.hex
    }
}

impl std::fmt::Display for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sha256:{}", self.hex)
    }
}

#[derive(Debug, Clone)]
pub struct Spec {
    /// Blobs in storage (layers, configs and manifests together).
    pub blobs: u64,
    pub repositories: u64,
    /// Repositories each blob is in, on average (sharing layers).
    pub repos_per_blob: u64,
    /// Of the cached digests, this fraction has no blob data: phantoms.
    pub phantom_fraction: f64,
    /// Sizes of the blobs, cycled: a realistic mix is many small ones and a few large.
    pub sizes: Vec<u64>,
    pub seed: u64,
}

impl Spec {
    /// Many small manifests and configs, layers from KiB to MiB.
    pub fn mixed(blobs: u64, repositories: u64) -> Spec {
        Spec {
            blobs,
            repositories,
            repos_per_blob: 3,
            phantom_fraction: 0.01,
            sizes: vec![
                700, 1500, 3000, 900, 12_000, 64_000, 2_000, 1_200, 400_000, 5_000,
            ],
            seed: 1,
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct Generated {
    pub blobs: u64,
    pub bytes: u64,
    pub phantoms: u64,
    pub keys: u64,
}

/// Deterministic pseudo-random bytes.
pub fn fill(seed: u64, out: &mut [u8]) {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for chunk in out.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
}

fn repo_name(i: u64) -> String {
    format!("team{}/app{}", i % 10, i)
}

fn blob_dir(root: &Path, d: &Digest) -> PathBuf {
    let hex = d.hex();
    root.join("docker/registry/v2/blobs/sha256")
        .join(&hex[..2])
        .join(hex)
}

fn link(root: &Path, repo: &str, sub: &str, d: &Digest) -> std::io::Result<()> {
    let dir = root
        .join("docker/registry/v2/repositories")
        .join(repo)
        .join(sub)
        .join("sha256")
        .join(d.hex());
    fs::create_dir_all(&dir)?;
    fs::write(dir.join("link"), d.to_string())
}

/// Writes the storage under `root` (which must be empty or absent) and, when `redis`
/// is given, the registry's cache entries for it. Streams: memory does not grow with
/// the registry.
pub fn generate(
    root: &Path,
    redis: Option<&mut redis::Connection>,
    spec: &Spec,
) -> Result<Generated, String> {
    let io = |e: std::io::Error| format!("writing {}: {e}", root.display());
    fs::create_dir_all(root.join("docker/registry/v2/repositories")).map_err(io)?;
    let mut g = Generated::default();
    let mut pipe = redis::pipe();
    let mut pending = 0usize;
    let mut redis = redis;
    let max_size = spec.sizes.iter().copied().max().unwrap_or(1) as usize;
    let mut buf = vec![0u8; max_size.min(64 << 20)];
    let phantom_every = if spec.phantom_fraction > 0.0 {
        (1.0 / spec.phantom_fraction).round().max(1.0) as u64
    } else {
        u64::MAX
    };
    let per_blob = spec.repos_per_blob.clamp(1, spec.repositories.max(1));
    for i in 0..spec.blobs {
        let size = spec.sizes[(i as usize) % spec.sizes.len().max(1)];
        let seed = spec.seed.wrapping_mul(1_000_003).wrapping_add(i);
        let phantom = i % phantom_every == phantom_every - 1;
        let (digest, written) = write_blob(root, seed, size, &mut buf, !phantom).map_err(io)?;
        let first_repo = (i.wrapping_mul(7919)) % spec.repositories.max(1);
        let repos: Vec<String> = (0..per_blob)
            .map(|k| repo_name((first_repo + k * 37) % spec.repositories.max(1)))
            .collect();
        if !phantom {
            g.blobs += 1;
            g.bytes += written;
            for r in &repos {
                link(root, r, "_layers", &digest).map_err(io)?;
            }
        } else {
            g.phantoms += 1;
        }
        if redis.is_some() {
            let d = digest.to_string();
            pipe.cmd("HSET")
                .arg(format!("blobs::{d}"))
                .arg("digest")
                .arg(&d)
                .arg("size")
                .arg(size)
                .arg("mediatype")
                .arg("application/vnd.oci.image.layer.v1.tar+gzip")
                .ignore();
            g.keys += 1;
            for r in &repos {
                pipe.cmd("SADD")
                    .arg(format!("repository::{r}::blobs"))
                    .arg(&d)
                    .ignore();
                pipe.cmd("HSET")
                    .arg(format!("repository::{r}::blobs::{d}"))
                    .arg("mediatype")
                    .arg("application/vnd.oci.image.layer.v1.tar+gzip")
                    .ignore();
                g.keys += 1;
            }
            pending += 1;
            if pending >= 500
                && let Some(conn) = redis.as_mut()
            {
                pipe.query::<()>(conn)
                    .map_err(|e| format!("filling Redis: {e}"))?;
                pipe = redis::pipe();
                pending = 0;
            }
        }
    }
    if pending > 0
        && let Some(conn) = redis.as_mut()
    {
        pipe.query::<()>(conn)
            .map_err(|e| format!("filling Redis: {e}"))?;
    }
    g.keys += spec.repositories.min(spec.blobs * per_blob);
    Ok(g)
}

/// Writes one blob of `size` bytes (in chunks, so large blobs need no large buffer);
/// returns its digest. With `store` false only the digest is computed (a phantom).
fn write_blob(
    root: &Path,
    seed: u64,
    size: u64,
    buf: &mut [u8],
    store: bool,
) -> std::io::Result<(Digest, u64)> {
    let mut hasher = sha2::Sha256::new();
    // First pass: hash, to learn the digest (and so the path).
    let mut left = size;
    let mut k = 0u64;
    while left > 0 {
        let n = (left as usize).min(buf.len());
        fill(seed.wrapping_add(k << 32), &mut buf[..n]);
        hasher.update(&buf[..n]);
        left -= n as u64;
        k += 1;
    }
    let digest = Digest::of(&hasher.finalize());
    if !store {
        return Ok((digest, 0));
    }
    let dir = blob_dir(root, &digest);
    fs::create_dir_all(&dir)?;
    let mut f = std::io::BufWriter::with_capacity(1 << 20, fs::File::create(dir.join("data"))?);
    let mut left = size;
    let mut k = 0u64;
    while left > 0 {
        let n = (left as usize).min(buf.len());
        fill(seed.wrapping_add(k << 32), &mut buf[..n]);
        f.write_all(&buf[..n])?;
        left -= n as u64;
        k += 1;
    }
    f.flush()?;
    Ok((digest, size))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generates_the_registry_layout_deterministically() {
        let dir = std::env::temp_dir().join(format!("ra-synth-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let spec = Spec {
            blobs: 40,
            repositories: 5,
            repos_per_blob: 2,
            phantom_fraction: 0.1,
            sizes: vec![100, 5000, 70_000],
            seed: 9,
        };
        let g = generate(&dir, None, &spec).expect("generate");
        assert_eq!(g.blobs + g.phantoms, 40);
        assert_eq!(g.phantoms, 4);
        // team<k>/app<i>: five repositories in all.
        let repos: usize = fs::read_dir(dir.join("docker/registry/v2/repositories"))
            .expect("repositories")
            .flatten()
            .map(|team| fs::read_dir(team.path()).map_or(0, |r| r.count()))
            .sum();
        assert_eq!(repos, 5);
        let again = dir.with_extension("again");
        let _ = fs::remove_dir_all(&again);
        let g2 = generate(&again, None, &spec).expect("generate");
        assert_eq!(g2.bytes, g.bytes);
        let _ = fs::remove_dir_all(&dir);
        let _ = fs::remove_dir_all(&again);
    }
}
