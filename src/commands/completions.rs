//! The `completions` and `man` commands: a shell completion script (clap_complete) and
//! roff man pages (clap_mangen), both generated from the clap definitions in `cli`, so
//! they name exactly the flags the parser accepts. They print to stdout and read
//! nothing; packaging them (`/usr/share/bash-completion/...`, `man1/`) is the
//! installer's job.

use std::io::Write;

use clap::CommandFactory;

use crate::cli::Cli;

const BIN: &str = "registry-audit";

/// Prints the completion script for `shell`.
pub(crate) fn print_completions(shell: clap_complete::Shell) -> Result<u8, String> {
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), BIN, &mut out);
    write_stdout(&out)
}

/// Prints the man page of the tool, or of one of its commands
/// (`registry-audit-check(1)`, ...).
pub(crate) fn print_man(command: Option<&str>) -> Result<u8, String> {
    write_stdout(&man_page(command)?)
}

/// The roff text of a man page; an unknown command is an error naming the known ones.
pub(crate) fn man_page(command: Option<&str>) -> Result<Vec<u8>, String> {
    let mut cli = Cli::command();
    cli.build();
    let page = match command {
        None => cli,
        Some(name) => {
            let known: Vec<String> = cli
                .get_subcommands()
                .map(|c| c.get_name().to_string())
                .filter(|n| n != "help")
                .collect();
            let sub = cli
                .find_subcommand(name)
                .filter(|_| name != "help")
                .ok_or_else(|| {
                    format!(
                        "no command '{}': one of {}",
                        crate::finding::terminal_safe(name),
                        known.join(", ")
                    )
                })?;
            let full = format!("{BIN}-{}", sub.get_name());
            sub.clone()
                .name(full.clone())
                .bin_name(format!("{BIN} {}", sub.get_name()))
                .version(env!("CARGO_PKG_VERSION"))
                .display_name(full)
        }
    };
    let mut out = Vec::new();
    clap_mangen::Man::new(page)
        .render(&mut out)
        .map_err(|e| format!("cannot render the man page: {e}"))?;
    Ok(out)
}

fn write_stdout(bytes: &[u8]) -> Result<u8, String> {
    let mut out = std::io::stdout().lock();
    out.write_all(bytes)
        .and_then(|()| out.flush())
        .map_err(|e| format!("cannot write to stdout: {e}"))?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn man_pages_for_the_tool_and_each_command() {
        let top = String::from_utf8(man_page(None).expect("page")).expect("utf-8");
        assert!(top.contains(".TH registry-audit 1"), "{top}");
        assert!(top.contains("registry\\-audit\\-check(1)"), "{top}");
        let check = String::from_utf8(man_page(Some("check")).expect("page")).expect("utf-8");
        assert!(check.contains(".TH registry-audit-check 1"), "{check}");
        assert!(check.contains("\\-\\-push\\-gateway"), "{check}");
        let gc = String::from_utf8(man_page(Some("gc")).expect("page")).expect("utf-8");
        assert!(gc.contains("\\-\\-restart\\-command"), "{gc}");
        let e = man_page(Some("chek")).expect_err("unknown");
        assert!(e.contains("check") && !e.contains("help"), "{e}");
    }
}
