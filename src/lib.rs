//! registry-audit: finds the blob-descriptor cache entries of a container registry that
//! its storage no longer backs, and verifies the blobs themselves. The binary only
//! parses the command line and calls [`run`]; every command lives in a module a test can
//! call.

pub mod audit;
pub mod cache_dump;
pub mod cache_index;
pub mod check;
pub mod cli;
pub mod completions;
pub mod config;
pub mod digest;
pub mod finding;
pub mod gc;
pub mod lock;
pub mod merge;
pub mod metrics;
pub mod object_storage;
pub mod probe;
pub mod progress;
pub mod purge;
pub mod purge_command;
pub mod pushgateway;
pub mod redis_cache;
pub mod redis_cluster;
pub mod registry_client;
pub mod rehash;
pub mod repo_name;
pub mod report;
pub mod restart;
pub mod settings;
pub mod shard;
pub mod state;
pub mod storage;
pub mod synth;
pub mod verify;

/// Exit status when the tool could not do its job.
pub const EXIT_CANNOT_RUN: u8 = 2;

/// Runs one command; `Ok` carries the exit status (0 clean, 1 findings at or above
/// the threshold), `Err` a one-line message for exit status 2.
pub fn run(cli: cli::Cli) -> Result<u8, String> {
    match cli.command {
        cli::Command::Check(args) => {
            let result = pushgateway::around(
                &args.report.push,
                args.shard.as_deref(),
                || pushgateway::storage_of(&args.source),
                || settings::CheckSettings::from_args(&args).and_then(|s| check::run(&s)),
            );
            // A run that could not run still updates the failure metrics it can write.
            if let (Err(message), Some(cli::Format::Prometheus), Some(path)) =
                (&result, args.report.format, &args.report.output)
                && let Err(e) = metrics::write_failure(path, message)
            {
                tracing::warn!("{e}");
            }
            result
        }
        cli::Command::Purge(args) => purge_command::run(&args),
        cli::Command::Restore(args) => purge_command::run_restore(&args),
        cli::Command::ExportCache(args) => cache_dump::run_export(&args),
        cli::Command::Probe(args) => pushgateway::around(
            &args.report.push,
            None,
            || pushgateway::storage_of_probe(&args),
            || probe::run(&args),
        ),
        cli::Command::Gc(args) => pushgateway::around(
            &args.report.push,
            None,
            || pushgateway::storage_of(&args.source),
            || gc::run(&args),
        ),
        cli::Command::Merge(args) => pushgateway::around(
            &args.report.push,
            None,
            || pushgateway::storage_of_reports(&args.reports),
            || merge::run(&args),
        ),
        cli::Command::Completions(args) => completions::print_completions(args.shell),
        cli::Command::Man(args) => completions::print_man(args.command.as_deref()),
    }
}

/// Sets up logging on stderr, so stdout carries only the report.
/// Logs of the libraries below (TLS, HTTP, Redis) show only with -vv: their errors are
/// reported once, as this tool's one-line error.
pub fn init_logging(verbose: u8, quiet: bool) {
    use tracing_subscriber::filter::{LevelFilter, Targets};
    use tracing_subscriber::prelude::*;
    let level = match (quiet, verbose) {
        (true, _) => LevelFilter::ERROR,
        (false, 0) => LevelFilter::WARN,
        (false, 1) => LevelFilter::INFO,
        (false, _) => LevelFilter::DEBUG,
    };
    let others = if verbose >= 2 {
        LevelFilter::DEBUG
    } else {
        LevelFilter::OFF
    };
    progress::init(quiet);
    let filter = Targets::new()
        .with_default(others)
        .with_target(env!("CARGO_CRATE_NAME"), level);
    let _ = tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(progress::LogWriter)
                .with_ansi(false)
                .with_target(false),
        )
        .with(filter)
        .try_init();
}
