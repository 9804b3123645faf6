//! What a run read and counted, as plain data: the source it audited and the counts
//! of each stage (hashing, storage verification, probing, GC, object storage), summed
//! over shards. The audit and the commands fill it, the output renders it; it reads
//! nothing and decides nothing.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::finding::{Finding, Kind, Severity};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub(crate) struct Summary {
    /// Registry-shaped keys read.
    pub keys_scanned: u64,
    /// Members of repository sets read.
    pub set_members_scanned: u64,
    /// Keys of other applications in the same database, left alone.
    pub foreign_keys_skipped: u64,
    /// Distinct digests checked against storage.
    pub blobs_checked: u64,
    /// Of those, how many storage does not have.
    pub blobs_absent: u64,
    pub bytes_hashed: u64,
    /// Blobs hashed and skipped (trusted from the state, outside the sample, not reached).
    pub hashing: HashCounts,
    pub findings_by_kind: BTreeMap<Kind, u64>,
    pub errors: u64,
    pub warnings: u64,
    /// Findings about entries the registry serves as hits.
    pub live: u64,
    /// What the storage verification covered; `None` when it did not run.
    pub storage: Option<VerifyCounts>,
    /// What the running registry was asked (`probe`, and `check` on an in-memory cache);
    /// `None` otherwise.
    pub probe: Option<ProbeCounts>,
    /// What `gc` ran, freed and purged; `None` for other commands.
    pub gc: Option<GcCounts>,
    /// Requests and bytes of object storage; `None` on a filesystem.
    pub object_storage: Option<ObjectCounts>,
}

impl Summary {
    /// Adds another run's counts (a shard's) to these; findings are tallied apart.
    pub(crate) fn add(&mut self, o: &Summary) {
        self.keys_scanned += o.keys_scanned;
        self.set_members_scanned += o.set_members_scanned;
        self.foreign_keys_skipped += o.foreign_keys_skipped;
        self.blobs_checked += o.blobs_checked;
        self.blobs_absent += o.blobs_absent;
        self.bytes_hashed += o.bytes_hashed;
        self.hashing.add(&o.hashing);
        self.object_storage = match (self.object_storage.take(), o.object_storage) {
            (Some(mut a), Some(b)) => {
                a.add(&b);
                Some(a)
            }
            (a, b) => a.or(b),
        };
        self.storage = match (self.storage.take(), o.storage) {
            (Some(mut a), Some(b)) => {
                a.add(&b);
                Some(a)
            }
            (a, b) => a.or(b),
        };
        self.probe = match (self.probe.take(), o.probe) {
            (Some(mut a), Some(b)) => {
                a.add(&b);
                Some(a)
            }
            (a, b) => a.or(b),
        };
    }

    /// Counts `findings` by kind (every kind listed, zeros included), severity and live.
    pub(crate) fn tally(&mut self, findings: &[Finding]) {
        self.findings_by_kind = Kind::ALL.iter().map(|k| (*k, 0)).collect();
        self.errors = 0;
        self.warnings = 0;
        self.live = 0;
        for f in findings {
            *self.findings_by_kind.entry(f.kind).or_default() += 1;
            match f.severity {
                Severity::Error => self.errors += 1,
                Severity::Warning => self.warnings += 1,
            }
            self.live += u64::from(f.live);
        }
    }
}

/// Counts of a verification, for the report.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
pub(crate) struct HashCounts {
    pub bytes_hashed: u64,
    pub blobs_hashed: u64,
    /// Skipped: verified before and unchanged (`--state`).
    pub blobs_trusted: u64,
    /// Skipped: outside the sample.
    pub blobs_not_sampled: u64,
    /// Skipped: `--max-duration` ran out; the run is incomplete.
    pub blobs_not_reached: u64,
}

impl HashCounts {
    pub(crate) fn add(&mut self, o: &HashCounts) {
        self.bytes_hashed += o.bytes_hashed;
        self.blobs_hashed += o.blobs_hashed;
        self.blobs_trusted += o.blobs_trusted;
        self.blobs_not_sampled += o.blobs_not_sampled;
        self.blobs_not_reached += o.blobs_not_reached;
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct VerifyCounts {
    pub repositories: u64,
    pub links_checked: u64,
    pub tags_checked: u64,
    /// Distinct manifests that tags point to, counted per repository (each followed
    /// through indexes to every blob it needs).
    pub tagged_manifests_checked: u64,
}

impl VerifyCounts {
    pub(crate) fn add(&mut self, o: &VerifyCounts) {
        self.repositories += o.repositories;
        self.links_checked += o.links_checked;
        self.tags_checked += o.tags_checked;
        self.tagged_manifests_checked += o.tagged_manifests_checked;
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub(crate) struct ProbeCounts {
    /// (repository, digest) pairs asked.
    pub probed: u64,
    pub live_phantoms: u64,
    pub answered_unknown: u64,
    pub failed: u64,
    /// Digests the GC log names.
    pub gc_log_digests: u64,
    /// Of those, digests linked in no repository and so not tried (see --all-repositories).
    pub gc_log_digests_untried: u64,
}

impl ProbeCounts {
    /// Adds another run's counts (a shard's).
    pub(crate) fn add(&mut self, o: &ProbeCounts) {
        self.probed += o.probed;
        self.live_phantoms += o.live_phantoms;
        self.answered_unknown += o.answered_unknown;
        self.failed += o.failed;
        self.gc_log_digests += o.gc_log_digests;
        self.gc_log_digests_untried += o.gc_log_digests_untried;
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub(crate) struct GcCounts {
    pub command: Vec<String>,
    pub dry_run: bool,
    pub exit_status: i32,
    /// Blobs the GC deleted (or, with --dry-run, would delete).
    pub blobs_deleted: u64,
    pub bytes_freed: u64,
    pub manifests_deleted: u64,
    pub layer_links_deleted: u64,
    pub tags_pullable_before: u64,
    pub tags_broken: u64,
    /// Cache entries removed (Redis), or that would be removed (--dry-run).
    pub cache_entries_purged: u64,
    pub journal: Option<String>,
    /// The in-memory cache still serves deleted blobs: only a restart clears it.
    pub restart_needed: bool,
    /// What `--restart-command` did, when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart: Option<RestartCounts>,
    pub output_tail: Vec<String>,
}

/// What was audited; never holds a secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct SourceInfo {
    pub storage_root: String,
    /// `redis`, `dump` or `none` (storage verification only).
    pub cache: String,
    /// The Redis URL with any password masked.
    pub redis: Option<String>,
    /// The cache dump audited instead of Redis.
    pub cache_dump: Option<String>,
    /// The registry `probe` asked.
    #[serde(default)]
    pub registry_url: Option<String>,
    pub config: Option<String>,
}

impl SourceInfo {
    /// The cache, for a report's first line.
    pub(crate) fn describe_cache(&self) -> String {
        match (&self.redis, &self.cache_dump, &self.registry_url) {
            (Some(r), _, _) => r.clone(),
            (None, Some(d), _) => format!("cache dump {d}"),
            (None, None, Some(u)) => format!("the running registry at {u}"),
            (None, None, None) => "no cache (storage only)".into(),
        }
    }
}

/// What the restart did, for `summary.gc.restart` (the command itself is not recorded:
/// it may hold a token).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct RestartCounts {
    /// The command ran (not when the GC deleted nothing).
    pub restarted: bool,
    /// From the command's start until the registry answered again.
    pub ms_until_answering: u64,
    /// (repository, digest) pairs asked after the restart.
    pub probed: u64,
    /// Of those, still answered as present when --restart-timeout ran out.
    pub still_served: u64,
    /// Of those, never answered (neither present nor unknown).
    pub failed: u64,
    /// Deleted blobs no repository linked before the GC: no HEAD can reach them.
    pub deleted_blobs_linked_nowhere: u64,
}

/// What reading object storage cost.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ObjectCounts {
    pub requests: u64,
    pub bytes: u64,
}

impl ObjectCounts {
    pub(crate) fn add(&mut self, o: &ObjectCounts) {
        self.requests += o.requests;
        self.bytes += o.bytes;
    }
}
