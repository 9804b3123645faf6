//! The `registry-audit` binary: parses the command line, runs the library, and turns
//! the result into the exit status (0 clean, 1 findings, 2 could not run).

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = registry_audit::Cli::parse();
    registry_audit::init_logging(cli.verbose, cli.quiet);
    let result = registry_audit::run(cli);
    registry_audit::log_peak_memory();
    match result {
        Ok(code) => ExitCode::from(code),
        Err(message) => {
            eprintln!(
                "registry-audit: {}",
                registry_audit::terminal_safe(&message)
            );
            ExitCode::from(registry_audit::EXIT_CANNOT_RUN)
        }
    }
}
