//! Progress on a terminal: counters and a bytes-hashed bar with rate and ETA, drawn on
//! stderr only when stderr is a terminal and not silenced with -q, and nothing at all in
//! a pipe. Log lines go through the same `MultiProgress`, so they never garble a bar;
//! stdout (the report) is never touched.

use std::io::{IsTerminal, Write};
use std::sync::OnceLock;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressFinish, ProgressStyle};

static MULTI: OnceLock<MultiProgress> = OnceLock::new();

/// Enables bars (or not) once, at start-up.
pub(crate) fn init(quiet: bool) {
    let target = if !quiet && std::io::stderr().is_terminal() {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    };
    let _ = MULTI.set(MultiProgress::with_draw_target(target));
}

fn multi() -> &'static MultiProgress {
    MULTI.get_or_init(|| MultiProgress::with_draw_target(ProgressDrawTarget::hidden()))
}

/// A counter ("12000 cache keys read").
pub(crate) fn counter(what: &'static str) -> ProgressBar {
    let pb = multi().add(ProgressBar::no_length());
    pb.set_style(
        ProgressStyle::with_template("{spinner} {human_pos} {msg} ({per_sec})")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    pb.set_message(what);
    pb.enable_steady_tick(Duration::from_millis(120));
    pb.with_finish(ProgressFinish::AndLeave)
}

/// A bar of bytes to hash, with rate and ETA.
pub(crate) fn bytes(total: u64) -> ProgressBar {
    let pb = multi().add(ProgressBar::new(total));
    pb.set_style(
        ProgressStyle::with_template(
            "hashed {binary_bytes}/{binary_total_bytes} [{bar:30}] {binary_bytes_per_sec}, ETA {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    pb.enable_steady_tick(Duration::from_millis(200));
    pb.with_finish(ProgressFinish::AndLeave)
}

/// A writer for log lines that suspends the bars while it writes. A log line can carry
/// names from storage or Redis, so control characters in it are escaped (the line's
/// own newline excepted): a log never moves the cursor or rings the bell.
#[derive(Clone, Copy)]
pub(crate) struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        let (body, newline) = match text.strip_suffix('\n') {
            Some(body) => (body, "\n"),
            None => (&*text, ""),
        };
        let line = format!("{}{newline}", crate::finding::terminal_safe(body));
        multi().suspend(|| std::io::stderr().write_all(line.as_bytes()))?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = LogWriter;
    fn make_writer(&'a self) -> Self::Writer {
        *self
    }
}
