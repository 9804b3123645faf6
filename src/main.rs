use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = registry_audit::cli::Cli::parse();
    registry_audit::init_logging(cli.verbose, cli.quiet);
    match registry_audit::run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(message) => {
            eprintln!(
                "registry-audit: {}",
                registry_audit::finding::terminal_safe(&message)
            );
            ExitCode::from(registry_audit::EXIT_CANNOT_RUN)
        }
    }
}
