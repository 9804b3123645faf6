//! The command line, as clap parses it. Nothing here is validated beyond what clap
//! checks itself; `settings` turns these flags into the checked values the rest of the
//! program uses.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// The command line: a command and the logging flags every command takes.
#[derive(Debug, Parser)]
#[command(
    name = "registry-audit",
    version,
    about = "Finds the blob-descriptor cache entries of a container registry that storage no longer backs, and verifies its blobs",
    long_about = None
)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
    /// More log output on stderr (-v, -vv).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Only errors on stderr.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Compare the cache with storage, verify storage itself, and report every wrong
    /// entry (read-only). The cache is Redis, a dump, or - when the config's cache is
    /// inmemory - the running registry, asked (HEAD only) about every blob storage lost.
    ///
    /// Exit status: 0 nothing at or above --fail-on, 1 findings at or above it (or the
    /// run is incomplete, e.g. the registry did not answer), 2 could not run.
    Check(CheckArgs),
    /// Remove exactly the cache entries `check` proves wrong, safely, while the registry
    /// serves: shows the plan, asks (or needs --yes), re-checks storage before each
    /// digest, removes atomically and journals what it removed.
    ///
    /// Exit status: 0 nothing at or above --fail-on is left, 1 something is (a storage
    /// problem, an entry that changed, or the plan was not applied), 2 could not run.
    Purge(PurgeArgs),
    /// Put back the entries a purge removed, from its journal, where the registry has
    /// not written the key since.
    Restore(RestoreArgs),
    /// Ask a running registry, read-only, whether it still vouches for blobs that storage
    /// no longer has: finds live phantoms of the in-memory cache (and of Redis).
    ///
    /// Exit status: 0 no live phantom, 1 live phantoms (storage findings are warnings),
    /// 2 could not run.
    Probe(ProbeArgs),
    /// Run the registry's own garbage collection with the cache fixed and the result
    /// verified: remembers which tags pull before, runs the GC command given after `--`,
    /// purges exactly the cache entries of what it deleted, and verifies again.
    ///
    /// Exit status: 0 clean, 1 a tag broken by GC or a phantom left, 2 could not run
    /// (the GC command failed: the cache is left untouched).
    Gc(GcArgs),
    /// Combine the reports of `check --shard K/N` runs into the report one full run
    /// would give; refuses reports of different registries or options, and missing or
    /// duplicate shards.
    Merge(MergeArgs),
    /// Write the registry's cache entries from Redis to a JSON-lines dump (read-only),
    /// for `check --cache-dump` elsewhere.
    ExportCache(ExportArgs),
    /// Print a shell completion script, generated from these definitions.
    Completions(CompletionsArgs),
    /// Print the man page (roff), generated from these definitions: the tool's, or one
    /// command's.
    Man(ManArgs),
}

/// Where the registry's storage and cache are.
#[derive(Debug, Clone, Args)]
pub struct SourceArgs {
    /// The registry's config.yml: storage root, cache kind and Redis settings are read from
    /// it, with the registry's REGISTRY_* environment overrides.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The storage root (storage.filesystem.rootdirectory); overrides the config.
    #[arg(long, value_name = "DIR", conflicts_with = "storage")]
    pub root: Option<PathBuf>,
    /// Object storage instead of a root directory: s3://bucket/prefix,
    /// gs://bucket/prefix or azure://account/container/prefix (the driver's bucket or
    /// container and rootdirectory); credentials from the service's usual environment
    /// (AWS_ACCESS_KEY_ID..., GOOGLE_APPLICATION_CREDENTIALS, AZURE_STORAGE_ACCOUNT_KEY...).
    #[arg(long, value_name = "URL")]
    pub storage: Option<String>,
    /// Another server for --storage: an S3-compatible endpoint (the s3 driver's
    /// regionendpoint) or an Azure blob service URL (the azure driver's serviceurl).
    #[arg(long, value_name = "URL", alias = "s3-endpoint")]
    pub storage_endpoint: Option<String>,
    /// The bucket's region for --storage.
    #[arg(long, value_name = "REGION")]
    pub s3_region: Option<String>,
    /// Redis URL: redis://[user:pass@]host:port/db, rediss://... (TLS) or
    /// redis+unix:///path.sock; overrides the config.
    #[arg(long, value_name = "URL")]
    pub redis: Option<String>,
    /// Keys asked for per SCAN call (and per pipeline).
    #[arg(long, value_name = "N", default_value_t = 1000)]
    pub scan_count: usize,
    /// The Redis is a cluster (found by itself from any node; this makes a server that
    /// is not one an error).
    #[arg(long)]
    pub redis_cluster: bool,
}

/// How a report is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// A table grouped by kind, ending with the verdict.
    Table,
    /// The JSON report.
    Json,
    /// node_exporter textfile format (write it with --output).
    Prometheus,
}

/// The lowest severity that makes the exit status 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FailOn {
    /// Errors only.
    Error,
    /// Warnings and errors.
    Warning,
    /// Never: exit 0 whatever was found.
    Never,
}

/// Where and how a report goes.
#[derive(Debug, Clone, Args)]
pub struct ReportArgs {
    /// Report format [default: table on a terminal, json otherwise].
    #[arg(long, value_enum)]
    pub format: Option<Format>,
    /// Write the report to FILE (atomically; `-` is stdout) instead of stdout; never
    /// over a symlink, directory, FIFO, socket or device.
    #[arg(long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Exit 1 when a finding of this severity or worse is found.
    #[arg(long, value_enum, default_value = "error")]
    pub fail_on: FailOn,
    /// Pushing the metrics to a Pushgateway.
    #[command(flatten)]
    pub push: PushArgs,
}

/// The flags of `check`.
#[derive(Debug, Clone, Args)]
pub struct CheckArgs {
    /// Where storage and the cache are.
    #[command(flatten)]
    pub source: SourceArgs,
    /// Where and how the report goes.
    #[command(flatten)]
    pub report: ReportArgs,
    /// Hashing threads [default: all cores; on object storage at least 16, as GETs wait on the network];
    /// capped at 4 per core (256 on object storage).
    #[arg(long, short = 'j', value_name = "N")]
    pub jobs: Option<usize>,
    /// Check existence and size only; do not re-hash blobs.
    #[arg(long)]
    pub quick: bool,
    /// Threads that read storage's metadata - directory listings, stats, links - while
    /// the cache is read [default: 16]; the work waits on the disk, not the CPU, so more
    /// threads than cores help a slow disk or a network filesystem. At most 256.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=256))]
    pub io_threads: Option<u16>,
    /// Audit a cache dump (written by `export-cache`) instead of Redis.
    #[arg(long, value_name = "FILE", conflicts_with = "redis")]
    pub cache_dump: Option<PathBuf>,
    /// Verify storage only (links, tags, manifests); no cache needed.
    #[arg(long)]
    pub storage_only: bool,
    /// Remember verified blobs here; later runs re-hash only new, changed or due blobs
    /// (existence and size are still checked every run).
    #[arg(long, value_name = "FILE")]
    pub state: Option<PathBuf>,
    /// With --state: re-hash a blob verified longer ago than this (30d, 12h, ...).
    #[arg(long, value_name = "DURATION", default_value = "30d")]
    pub reverify_after: String,
    /// Re-hash only a deterministic subset: a percentage (5%) or the n-th of m slices
    /// (1/20); m runs with n = 1..m cover every blob once.
    #[arg(long, value_name = "SPEC")]
    pub sample: Option<String>,
    /// Stop re-hashing after this long (20m, 1h, ...) and report the run incomplete;
    /// with --state the next run carries on.
    #[arg(long, value_name = "DURATION")]
    pub max_duration: Option<String>,
    /// Lock file against overlapping runs [default: next to --state, none without it].
    #[arg(long, value_name = "FILE")]
    pub lock: Option<PathBuf>,
    /// Do only the K-th of N slices of the work (cache keys, blobs and repositories), for
    /// N machines at once; `auto/N` takes K from JOB_COMPLETION_INDEX (a Kubernetes
    /// Indexed Job). Combine the reports with `registry-audit merge`.
    #[arg(long, value_name = "K/N")]
    pub shard: Option<String>,
    /// Audit the cache only; skip the walk of repositories, tags and manifests.
    #[arg(long)]
    pub skip_storage: bool,
    /// The running registry whose in-memory cache to probe (HEAD only), e.g.
    /// http://127.0.0.1:5000, https://reg.example or unix:///run/registry.sock
    /// [default: where the config's http section says it listens].
    #[arg(long, value_name = "URL", conflicts_with_all = ["redis", "cache_dump", "storage_only"])]
    pub registry_url: Option<String>,
    /// How to reach the running registry.
    #[command(flatten)]
    pub registry: RegistryAccessArgs,
}

/// The flags of `purge`.
#[derive(Debug, Clone, Args)]
pub struct PurgeArgs {
    /// Where storage and the cache are.
    #[command(flatten)]
    pub source: SourceArgs,
    /// Report format [default: table on a terminal, json otherwise].
    #[arg(long, value_enum)]
    pub format: Option<Format>,
    /// Exit 1 when a finding of this severity or worse is left after the purge.
    #[arg(long, value_enum, default_value = "error")]
    pub fail_on: FailOn,
    /// Hashing threads for the audit [default: all cores; on object storage at least 16, as GETs wait on the network].
    #[arg(long, short = 'j', value_name = "N")]
    pub jobs: Option<usize>,
    /// Audit existence and size only (no re-hash) before planning.
    #[arg(long)]
    pub quick: bool,
    /// Apply without asking (needed when not on a terminal).
    #[arg(long, short = 'y')]
    pub yes: bool,
    /// Show the plan only; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Save the plan as JSON for review and change nothing; apply it later with --apply.
    #[arg(long, value_name = "FILE", conflicts_with = "apply")]
    pub plan_out: Option<std::path::PathBuf>,
    /// Apply a saved plan instead of auditing again (storage is still re-checked).
    #[arg(long, value_name = "FILE")]
    pub apply: Option<std::path::PathBuf>,
    /// Journal of what is removed, for `restore` (appended to)
    /// [default: registry-audit-journal-<time>.jsonl in the current directory].
    #[arg(long, value_name = "FILE")]
    pub journal: Option<std::path::PathBuf>,
    /// Also remove malformed cache entries (keys the registry cannot use).
    #[arg(long)]
    pub include_malformed: bool,
}

/// The flags of `restore`.
#[derive(Debug, Clone, Args)]
pub struct RestoreArgs {
    /// The journal a purge wrote.
    #[arg(long, value_name = "FILE")]
    pub journal: std::path::PathBuf,
    /// The registry's config.yml, for its Redis settings.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Redis URL; overrides the config (default: the one the journal records, when it
    /// needs no password).
    #[arg(long, value_name = "URL")]
    pub redis: Option<String>,
    /// Report format [default: table on a terminal, json otherwise].
    #[arg(long, value_enum)]
    pub format: Option<Format>,
}

/// The flags of `export-cache`.
#[derive(Debug, Clone, Args)]
pub struct ExportArgs {
    /// The registry's config.yml, for its Redis settings.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Redis URL; overrides the config.
    #[arg(long, value_name = "URL")]
    pub redis: Option<String>,
    /// Write the dump to FILE (replaced atomically; `-` is stdout) instead of stdout;
    /// never over a symlink, directory, FIFO, socket or device.
    #[arg(long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Keys asked for per SCAN call (and per pipeline).
    #[arg(long, value_name = "N", default_value_t = 1000)]
    pub scan_count: usize,
}

/// The flags of `probe`.
#[derive(Debug, Clone, Args)]
pub struct ProbeArgs {
    /// The registry's base URL, e.g. http://127.0.0.1:5000 or https://reg.example.
    #[arg(long, value_name = "URL")]
    pub registry_url: String,
    /// The registry's config.yml, for its storage root.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The storage root; overrides the config.
    #[arg(long, value_name = "DIR")]
    pub root: Option<PathBuf>,
    /// Output of `registry garbage-collect`: its "blob eligible for deletion" digests are
    /// probed too.
    #[arg(long, value_name = "FILE")]
    pub gc_log: Option<PathBuf>,
    /// Try every candidate digest in every repository, not only where it is (or was) linked.
    #[arg(long)]
    pub all_repositories: bool,
    /// Requests in flight at once.
    #[arg(long, value_name = "N", default_value_t = 8)]
    pub concurrency: usize,
    /// Seconds before one request is given up.
    #[arg(long, value_name = "SECONDS", default_value_t = 10)]
    pub timeout: u64,
    /// How to reach the running registry.
    #[command(flatten)]
    pub access: RegistryAccessArgs,
    /// Where and how the report goes.
    #[command(flatten)]
    pub report: ReportArgs,
}

impl ProbeArgs {
    /// Where storage is, as the other commands' flags say it (probe reads no cache).
    pub fn source_args(&self) -> SourceArgs {
        SourceArgs {
            config: self.config.clone(),
            root: self.root.clone(),
            storage: None,
            storage_endpoint: None,
            s3_region: None,
            redis: None,
            scan_count: 1000,
            redis_cluster: false,
        }
    }
}

/// How to talk to a running registry's API: credentials and TLS.
#[derive(Debug, Clone, Default, Args)]
pub struct RegistryAccessArgs {
    /// User for basic auth or the token service (password from --password-stdin).
    #[arg(long, value_name = "USER", requires = "password_stdin")]
    pub username: Option<String>,
    /// Read the password from the first line of stdin.
    #[arg(long, requires = "username")]
    pub password_stdin: bool,
    /// Docker config.json to take credentials from [default: ~/.docker/config.json].
    #[arg(long, value_name = "FILE")]
    pub docker_config: Option<PathBuf>,
    /// Trust this CA certificate (PEM) besides the system roots.
    #[arg(long, value_name = "FILE")]
    pub ca_cert: Option<PathBuf>,
    /// Do not verify the registry's TLS certificate.
    #[arg(long)]
    pub insecure: bool,
}

/// The flags of `gc`.
#[derive(Debug, Clone, Args)]
pub struct GcArgs {
    /// Where storage and the cache are.
    #[command(flatten)]
    pub source: SourceArgs,
    /// The running registry, to confirm live phantoms of an in-memory cache with `probe`.
    #[arg(long, value_name = "URL")]
    pub registry_url: Option<String>,
    /// Pass --dry-run to the GC command and only show what would be purged.
    #[arg(long)]
    pub dry_run: bool,
    /// Journal of the cache entries removed, for `restore`
    /// [default: registry-audit-journal-<time>.jsonl in the current directory].
    #[arg(long, value_name = "FILE")]
    pub journal: Option<PathBuf>,
    /// Hashing threads for the audits [default: all cores; on object storage at least 16, as GETs wait on the network].
    #[arg(long, short = 'j', value_name = "N")]
    pub jobs: Option<usize>,
    /// Where and how the report goes.
    #[command(flatten)]
    pub report: ReportArgs,
    /// With the in-memory cache: after the GC, restart the registry with this shell
    /// command (run with `sh -c`, e.g. `systemctl restart docker-registry`), wait until
    /// it answers at --registry-url, and probe every deleted blob where it was linked.
    #[arg(long, value_name = "COMMAND", requires = "registry_url")]
    pub restart_command: Option<String>,
    /// How long the restart may take, the command and the wait for the registry
    /// together (90s, 2m, ...).
    #[arg(long, value_name = "DURATION", default_value = "2m")]
    pub restart_timeout: String,
    /// The GC command and its arguments, after `--`, e.g.
    /// `-- registry garbage-collect /etc/docker/registry/config.yml --delete-untagged`.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

/// The flags of `merge`.
#[derive(Debug, Clone, Args)]
pub struct MergeArgs {
    /// The shard reports (JSON), one per shard.
    #[arg(required = true, value_name = "REPORT")]
    pub reports: Vec<PathBuf>,
    /// Where and how the merged report goes.
    #[command(flatten)]
    pub report: MergeReportArgs,
}

/// Where and how the merged report goes.
#[derive(Debug, Clone, Args)]
pub struct MergeReportArgs {
    /// Report format [default: table on a terminal, json otherwise].
    #[arg(long, value_enum)]
    pub format: Option<Format>,
    /// Write the merged report to FILE (atomically; `-` is stdout) instead of stdout;
    /// never over a symlink, directory, FIFO, socket or device.
    #[arg(long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Exit 1 when a finding of this severity or worse is found [default: the shards'].
    #[arg(long = "fail-on", value_enum)]
    pub fail_on_given: Option<FailOn>,
    /// Pushing the metrics to a Pushgateway.
    #[command(flatten)]
    pub push: PushArgs,
}

/// Where the run's metrics are pushed, besides the report (see `pushgateway`).
#[derive(Debug, Clone, Default, Args)]
pub struct PushArgs {
    /// Push the metrics (those of --format prometheus) to this Prometheus Pushgateway,
    /// e.g. http://pushgateway:9091; a run that could not run pushes
    /// registry_audit_last_run_success 0. A failed push exits 2.
    #[arg(long, value_name = "URL")]
    pub push_gateway: Option<String>,
    /// The job name of the pushed metrics (the storage root or bucket is the other
    /// grouping label).
    #[arg(long, value_name = "NAME", default_value = "registry-audit")]
    pub push_job: String,
}

/// The flags of `completions`.
#[derive(Debug, Clone, Args)]
pub struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

/// The flags of `man`.
#[derive(Debug, Clone, Args)]
pub struct ManArgs {
    /// One command's page (registry-audit-check(1), ...) instead of the tool's.
    #[arg(value_name = "COMMAND")]
    pub command: Option<String>,
}
