//! registry-audit: finds the blob-descriptor cache entries of a container registry that
//! its storage no longer backs, and verifies the blobs themselves. The binary only
//! parses the command line and calls [`run`]; the layers live in private modules (see
//! README's design section), tested by their own unit tests.

mod audit;
mod cache;
pub mod cli;
mod commands;
mod digest;
mod files;
mod finding;
mod lock;
mod output;
mod progress;
mod registry;
mod registry_config;
mod repair;
mod repo_name;
mod settings;
mod shard;
mod storage;
mod summary;
mod timestamp;

pub use cli::Cli;
pub use finding::terminal_safe;

/// Exit status when the tool could not do its job.
pub const EXIT_CANNOT_RUN: u8 = 2;

/// Runs one command; `Ok` carries the exit status (0 clean, 1 findings at or above
/// the threshold), `Err` a one-line message for exit status 2.
pub fn run(cli: cli::Cli) -> Result<u8, String> {
    use commands::pushgateway;
    match cli.command {
        cli::Command::Check(args) => {
            let result = pushgateway::around(
                &args.report.push,
                args.shard.as_deref(),
                || pushgateway::storage_of(&args.source),
                || settings::CheckSettings::from_args(&args).and_then(|s| commands::check::run(&s)),
            );
            // A run that could not run still updates the failure metrics it can write.
            if let (Err(message), Some(cli::Format::Prometheus), Some(path)) =
                (&result, args.report.format, &args.report.output)
                && let Err(e) = output::metrics::write_failure(path, message)
            {
                tracing::warn!("{e}");
            }
            result
        }
        cli::Command::Purge(args) => commands::purge::run(&args),
        cli::Command::Restore(args) => commands::restore::run(&args),
        cli::Command::ExportCache(args) => commands::export::run(&args),
        cli::Command::Probe(args) => pushgateway::around(
            &args.report.push,
            None,
            || pushgateway::storage_of_probe(&args),
            || commands::probe::run(&args),
        ),
        cli::Command::Gc(args) => pushgateway::around(
            &args.report.push,
            None,
            || pushgateway::storage_of(&args.source),
            || commands::gc::run(&args),
        ),
        cli::Command::Merge(args) => pushgateway::around(
            &args.report.push,
            None,
            || pushgateway::storage_of_reports(&args.reports),
            || commands::merge::run(&args),
        ),
        cli::Command::Completions(args) => commands::completions::print_completions(args.shell),
        cli::Command::Man(args) => commands::completions::print_man(args.command.as_deref()),
    }
}

/// Logs (at -v) the run's peak resident memory, as the kernel counts it for this
/// process (`VmHWM`): the figure benchmarks and the memory-bound tests read.
pub fn log_peak_memory() {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    if let Some(kib) = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
    {
        tracing::info!("peak memory: {kib} KiB");
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
