//! Storage verification after GC: walks every repository's layer links, manifest
//! revisions and tags, and follows each tagged manifest (OCI image manifest and index,
//! Docker schema 2 manifest and manifest list, schema 1) to every blob it needs, so that
//! a tag that can no longer be pulled is reported with the tag, the manifest and the
//! missing digest. It reads storage only and knows nothing about the cache.

use std::collections::{BTreeSet, HashMap, HashSet};

use crate::digest::Digest;
use crate::finding::{Finding, Kind, Severity};
use crate::shard::Shard;
use crate::storage::{BlobStat, Storage};

/// Manifests larger than this are not parsed (the registry's own limit is 4 MiB).
const MAX_MANIFEST: u64 = 4 * 1024 * 1024;
/// Link files hold one digest; anything larger is not a link.
const MAX_LINK: u64 = 1024;
/// Links asked of storage at a time (object storage fetches them concurrently).
const PREFETCH: usize = 1024;
/// How deep indexes may nest.
const MAX_DEPTH: usize = 8;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VerifyCounts {
    pub repositories: u64,
    pub links_checked: u64,
    pub tags_checked: u64,
    /// Distinct manifests that tags point to, counted per repository (each followed
    /// through indexes to every blob it needs).
    pub tagged_manifests_checked: u64,
}

impl VerifyCounts {
    pub fn add(&mut self, o: &VerifyCounts) {
        self.repositories += o.repositories;
        self.links_checked += o.links_checked;
        self.tags_checked += o.tags_checked;
        self.tagged_manifests_checked += o.tagged_manifests_checked;
    }
}

/// Verifies all of storage; returns findings (unsorted) and counts.
pub fn verify(storage: &Storage) -> (Vec<Finding>, VerifyCounts) {
    verify_shard(storage, Shard::ALL)
}

/// Verifies the repositories `shard` owns.
pub fn verify_shard(storage: &Storage, shard: Shard) -> (Vec<Finding>, VerifyCounts) {
    let mut v = Verifier {
        storage,
        present: HashMap::new(),
        missing_by_manifest: HashMap::new(),
        findings: Vec::new(),
        counts: VerifyCounts::default(),
        followed: HashSet::new(),
    };
    let (repos, bad) = storage.repositories();
    let bad: Vec<String> = if shard.owns_unsharded() {
        bad
    } else {
        Vec::new()
    };
    for name in bad {
        v.findings.push(Finding::storage(
            Kind::BadLink,
            Severity::Warning,
            None,
            None,
            format!("docker/registry/v2/repositories/{name}"),
            format!("'{name}' is not a valid repository name; the registry cannot serve it"),
        ));
    }
    // Repositories go in batches of about PREFETCH reads, so object storage fetches the
    // links (and then the manifests) of many small repositories together.
    let owned: Vec<&String> = repos.iter().filter(|r| shard.owns_repository(r)).collect();
    let mut batch: Vec<Read> = Vec::new();
    for repo in owned {
        v.counts.repositories += 1;
        batch.extend(v.reads(repo));
        if batch.len() >= PREFETCH {
            v.batch(std::mem::take(&mut batch));
        }
    }
    v.batch(batch);
    (v.findings, v.counts)
}

/// One link to read: a layer link, a manifest revision link or a tag's current link.
struct Read {
    repo: String,
    path: String,
    what: LinkKind,
}

enum LinkKind {
    /// A link in `_layers` or `_manifests/revisions`, named after the digest it should
    /// hold (None when the name is not a valid digest).
    Named {
        expected: Option<Digest>,
        kind: Kind,
        severity: Severity,
        what: &'static str,
    },
    Tag(String),
}

struct Verifier<'a> {
    storage: &'a Storage,
    /// Blob presence, checked once per digest.
    present: HashMap<Digest, bool>,
    /// For each manifest already followed: (manifest that references it, missing digest).
    missing_by_manifest: HashMap<Digest, Vec<(Digest, Digest)>>,
    findings: Vec<Finding>,
    counts: VerifyCounts,
    /// (repository, manifest) followed from a tag (for the count).
    followed: HashSet<(String, Digest)>,
}

impl Verifier<'_> {
    /// Every link of `repo` to read, in order: layers, revisions, then tags that have one.
    fn reads(&mut self, repo: &str) -> Vec<Read> {
        let storage = self.storage;
        let mut out = Vec::new();
        for (sub, kind, severity, what) in [
            (
                "_layers",
                Kind::DanglingLayerLink,
                Severity::Warning,
                "layer link",
            ),
            (
                "_manifests/revisions",
                Kind::DanglingManifestRevision,
                Severity::Error,
                "manifest revision",
            ),
        ] {
            for (path, alg, hex) in storage.links(repo, sub) {
                out.push(Read {
                    repo: repo.to_string(),
                    path,
                    what: LinkKind::Named {
                        expected: Digest::parse(format!("{alg}:{hex}").as_bytes()),
                        kind,
                        severity,
                        what,
                    },
                });
            }
        }
        for tag in storage.tags(repo) {
            self.counts.tags_checked += 1;
            let path = storage.tag_link(repo, &tag);
            // A tag directory without current/link is not a tag the registry lists.
            if storage.exists(&path) {
                out.push(Read {
                    repo: repo.to_string(),
                    path,
                    what: LinkKind::Tag(tag),
                });
            }
        }
        out
    }

    fn has_blob(&mut self, d: &Digest) -> bool {
        if let Some(&p) = self.present.get(d) {
            return p;
        }
        // An unreadable blob is not "absent": other checks report it.
        let p = !matches!(self.storage.stat_blob(d), BlobStat::Absent);
        self.present.insert(*d, p);
        p
    }

    /// Checks a batch of links: read PREFETCH at a time, then the manifests of the tags
    /// among them, PREFETCH at a time.
    fn batch(&mut self, reads: Vec<Read>) {
        // A repository's reads are never split between batches.
        self.followed.clear();
        let mut tags = Vec::new();
        for window in reads.chunks(PREFETCH) {
            let paths: Vec<String> = window.iter().map(|r| r.path.clone()).collect();
            self.storage.prefetch(&paths, MAX_LINK);
            for r in window {
                match &r.what {
                    LinkKind::Named {
                        expected,
                        kind,
                        severity,
                        what,
                    } => {
                        self.counts.links_checked += 1;
                        let Some(d) = self.read_link(&r.repo, &r.path, Some(*expected)) else {
                            continue;
                        };
                        if !self.has_blob(&d) {
                            let detail = if *kind == Kind::DanglingLayerLink {
                                format!(
                                    "{what} to a blob that is gone (garbage collection of distribution 2.8 leaves these; harmless unless a manifest still needs the blob)"
                                )
                            } else {
                                format!(
                                    "{what} to a manifest whose blob is gone: pulls by this digest fail"
                                )
                            };
                            self.findings.push(Finding::storage(
                                *kind,
                                *severity,
                                Some(d),
                                Some(r.repo.clone()),
                                self.storage.relative(&r.path),
                                detail,
                            ));
                        }
                    }
                    LinkKind::Tag(tag) => {
                        if let Some(manifest) = self.read_link(&r.repo, &r.path, None) {
                            tags.push((r, tag, manifest));
                        }
                    }
                }
            }
        }
        for window in tags.chunks(PREFETCH) {
            let unread: BTreeSet<Digest> = window
                .iter()
                .map(|t| t.2)
                .filter(|m| !self.missing_by_manifest.contains_key(m))
                .collect();
            let locs: Vec<String> = unread.iter().map(|m| self.storage.blob_loc(m)).collect();
            self.storage.prefetch(&locs, MAX_MANIFEST);
            for (r, tag, manifest) in window {
                self.tag(&r.repo, tag, &r.path, *manifest);
            }
        }
    }

    /// Checks one tag that resolved to `manifest`: its blob, and every blob under it.
    fn tag(&mut self, repo: &str, tag: &str, path: &str, manifest: Digest) {
        if !self.has_blob(&manifest) {
            let mut f = Finding::storage(
                Kind::DanglingTag,
                Severity::Error,
                Some(manifest),
                Some(repo.to_string()),
                self.storage.relative(path),
                format!(
                    "tag {tag} points to manifest {manifest}, whose blob is gone: the tag cannot be pulled"
                ),
            );
            f.tag = Some(tag.to_string());
            self.findings.push(f);
            return;
        }
        if self.followed.insert((repo.to_string(), manifest)) {
            self.counts.tagged_manifests_checked += 1;
        }
        let mut visiting = HashSet::new();
        let missing = self.missing_under(manifest, 0, &mut visiting);
        for (via, blob) in missing {
            let mut f = Finding::storage(
                Kind::MissingReferencedBlob,
                Severity::Error,
                Some(blob),
                Some(repo.to_string()),
                self.storage.relative(path),
                format!(
                    "tag {tag}: manifest {via} references {blob}, whose blob is gone: the image cannot be pulled"
                ),
            );
            f.tag = Some(tag.to_string());
            f.manifest = Some(via);
            self.findings.push(f);
        }
    }

    /// Reads a link; reports it as `bad-link` when it is not a digest or not the one its
    /// path names.
    fn read_link(
        &mut self,
        repo: &str,
        path: &str,
        expected: Option<Option<Digest>>,
    ) -> Option<Digest> {
        let bad = |v: &mut Self, why: String| {
            v.findings.push(Finding::storage(
                Kind::BadLink,
                Severity::Error,
                expected.flatten(),
                Some(repo.to_string()),
                v.storage.relative(path),
                why,
            ));
            None
        };
        let content = match self.storage.read_small(path, MAX_LINK) {
            Ok(c) => c,
            Err(e) => return bad(self, format!("link cannot be read: {e}")),
        };
        let Some(d) = Digest::parse(content.trim_ascii()) else {
            return bad(
                self,
                format!(
                    "link holds '{}', not a digest",
                    crate::finding::escape(&content)
                ),
            );
        };
        match expected {
            Some(None) => bad(
                self,
                "the link's directory is not named after a valid digest".into(),
            ),
            Some(Some(e)) if e != d => bad(self, format!("link holds {d} but its path names {e}")),
            _ => Some(d),
        }
    }

    /// Every (referencing manifest, missing blob) under `manifest`, following indexes.
    fn missing_under(
        &mut self,
        manifest: Digest,
        depth: usize,
        visiting: &mut HashSet<Digest>,
    ) -> Vec<(Digest, Digest)> {
        if let Some(known) = self.missing_by_manifest.get(&manifest) {
            return known.clone();
        }
        if depth > MAX_DEPTH || !visiting.insert(manifest) {
            return Vec::new();
        }
        let mut missing = Vec::new();
        let refs = self.references(&manifest);
        for r in refs {
            if !self.has_blob(&r.digest) {
                missing.push((manifest, r.digest));
            } else if r.is_manifest {
                missing.extend(self.missing_under(r.digest, depth + 1, visiting));
            }
        }
        visiting.remove(&manifest);
        self.missing_by_manifest.insert(manifest, missing.clone());
        missing
    }

    /// The blobs a manifest needs, from its JSON; none when it cannot be parsed (the
    /// blob's own check reports a corrupt blob).
    fn references(&mut self, manifest: &Digest) -> Vec<Reference> {
        let loc = self.storage.blob_loc(manifest);
        let Ok(bytes) = self.storage.read_small(&loc, MAX_MANIFEST) else {
            return Vec::new();
        };
        parse_references(&bytes)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    pub digest: Digest,
    pub is_manifest: bool,
}

/// The references of an OCI or Docker manifest, index or list (schema 2), or a
/// schema 1 manifest. Foreign layers (`urls` set, or a non-distributable or foreign
/// media type) are not expected in storage and are skipped.
pub fn parse_references(bytes: &[u8]) -> Vec<Reference> {
    let Ok(doc) = serde_json::from_slice::<serde_json::Value>(bytes) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let descriptor = |v: &serde_json::Value| -> Option<Digest> {
        let media = v["mediaType"].as_str().unwrap_or("");
        let foreign = media.contains("foreign") || media.contains("nondistributable");
        let has_urls = v["urls"].as_array().is_some_and(|u| !u.is_empty());
        if foreign || has_urls {
            return None;
        }
        v["digest"].as_str().and_then(Digest::parse_str)
    };
    if let Some(children) = doc["manifests"].as_array() {
        out.extend(
            children
                .iter()
                .filter_map(descriptor)
                .map(|digest| Reference {
                    digest,
                    is_manifest: true,
                }),
        );
    }
    if let Some(d) = descriptor(&doc["config"]) {
        out.push(Reference {
            digest: d,
            is_manifest: false,
        });
    }
    if let Some(layers) = doc["layers"].as_array() {
        out.extend(
            layers
                .iter()
                .filter_map(descriptor)
                .map(|digest| Reference {
                    digest,
                    is_manifest: false,
                }),
        );
    }
    if let Some(fs_layers) = doc["fsLayers"].as_array() {
        out.extend(
            fs_layers
                .iter()
                .filter_map(|l| l["blobSum"].as_str().and_then(Digest::parse_str))
                .map(|digest| Reference {
                    digest,
                    is_manifest: false,
                }),
        );
    }
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(c: char) -> String {
        format!("sha256:{}", c.to_string().repeat(64))
    }

    #[test]
    fn parses_image_manifests_indexes_and_schema1() {
        let image = format!(
            r#"{{"schemaVersion":2,"config":{{"digest":"{}"}},"layers":[{{"digest":"{}"}},{{"digest":"{}","urls":["http://x"]}},{{"mediaType":"application/vnd.docker.image.rootfs.foreign.diff.tar.gzip","digest":"{}"}}]}}"#,
            d('a'),
            d('b'),
            d('c'),
            d('e')
        );
        let refs = parse_references(image.as_bytes());
        assert_eq!(refs.len(), 2, "{refs:?}");
        assert!(refs.iter().all(|r| !r.is_manifest));

        let index = format!(
            r#"{{"manifests":[{{"digest":"{}"}},{{"digest":"{}"}}]}}"#,
            d('a'),
            d('b')
        );
        let refs = parse_references(index.as_bytes());
        assert_eq!(refs.len(), 2);
        assert!(refs.iter().all(|r| r.is_manifest));

        let schema1 = format!(
            r#"{{"schemaVersion":1,"fsLayers":[{{"blobSum":"{}"}}]}}"#,
            d('f')
        );
        assert_eq!(parse_references(schema1.as_bytes()).len(), 1);
        assert!(parse_references(b"not json").is_empty());
    }
}
