//! `gc --restart-command`: for a registry whose blob-descriptor cache is in memory, the
//! restart that clears what the GC deleted, and the proof that it did. Before the GC it
//! checks that the registry answers and remembers which repositories link each blob (a
//! v3 GC removes the links of what it deletes); after the GC it runs the operator's
//! command with `sh -c`, waits until the registry answers again, then asks (HEAD, with
//! `registry::client`) for every deleted blob in every repository that linked it, again
//! until none is served or `--restart-timeout` runs out. It changes nothing itself: the
//! restart is the command's, and it never sends anything but HEAD to the registry.
//! Without `--restart-command`, `gc` keeps reporting that a restart is needed.

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::cli::GcArgs;
use crate::digest::Digest;
use crate::finding::{Finding, Kind, Severity};
use crate::registry::client::{Answer, ClientOptions, RegistryClient};
use crate::settings::CacheSource;
use crate::storage::Storage;
use crate::summary::RestartCounts;

/// HEAD requests in flight at once (as `probe`'s default).
const CONCURRENCY: usize = 8;
/// The longest pause between two polls of the registry.
const MAX_PAUSE: Duration = Duration::from_millis(500);

/// A restart prepared before the GC.
pub(crate) struct Plan {
    command: String,
    timeout: Duration,
    url: String,
    client: RegistryClient,
    /// The repositories that linked each blob (layers and manifest revisions).
    linked: BTreeMap<Digest, BTreeSet<String>>,
}

/// What the restart found: findings (errors), notes, and counts.
#[derive(Debug, Default)]
pub(crate) struct Outcome {
    pub counts: RestartCounts,
    pub findings: Vec<Finding>,
    pub notes: Vec<String>,
}

impl Plan {
    /// Before the GC: `None` without `--restart-command` or in a dry run; an error when
    /// the cache is Redis (purge clears it, no restart is needed), the timeout is not a
    /// duration, or the registry does not answer now (nothing has been done yet).
    pub(crate) fn prepare(
        args: &GcArgs,
        cache: &CacheSource,
        storage: &Storage,
    ) -> Result<Option<Plan>, String> {
        let Some(command) = args.restart_command.clone() else {
            return Ok(None);
        };
        if matches!(cache, CacheSource::Redis(_)) {
            return Err("--restart-command is for a registry whose cache is in memory; with Redis, gc purges the deleted blobs' entries and no restart is needed".into());
        }
        if command.trim().is_empty() {
            return Err("--restart-command is empty".into());
        }
        let timeout = crate::timestamp::parse_duration(&args.restart_timeout)
            .map_err(|e| format!("--restart-timeout: {e}"))?;
        if timeout.is_zero() {
            return Err("--restart-timeout must be more than 0".into());
        }
        if args.dry_run {
            return Ok(None);
        }
        let url = args.registry_url.clone().ok_or(
            "--restart-command needs --registry-url, to know when the registry answers again",
        )?;
        let client = RegistryClient::new(
            &url,
            &ClientOptions {
                timeout: Duration::from_secs(10),
                ca_cert: None,
                insecure: false,
                credentials: None,
            },
        )?;
        client.check_reachable()?;
        Ok(Some(Plan {
            command,
            timeout,
            url: url.trim_end_matches('/').to_string(),
            client,
            linked: linked_repositories(storage),
        }))
    }
}

/// Which repositories link each blob: their `_layers` and `_manifests/revisions` links.
pub(crate) fn linked_repositories(storage: &Storage) -> BTreeMap<Digest, BTreeSet<String>> {
    let mut linked: BTreeMap<Digest, BTreeSet<String>> = BTreeMap::new();
    let (repos, _) = storage.repositories();
    for repo in repos {
        for sub in ["_layers", "_manifests/revisions"] {
            for (_, alg, hex) in storage.links(&repo, sub) {
                if let Some(d) = Digest::parse_str(&format!("{alg}:{hex}")) {
                    linked.entry(d).or_default().insert(repo.clone());
                }
            }
        }
    }
    linked
}

/// After the GC: restarts the registry and probes what the GC deleted. `None` (no
/// plan) does nothing. Errors (exit status 2): the command failed or outlived the
/// timeout, or the registry did not answer again in time; the message says what to do.
pub(crate) fn after_gc(plan: Option<&Plan>, deleted: &BTreeSet<Digest>) -> Result<Outcome, String> {
    let Some(plan) = plan else {
        return Ok(Outcome::default());
    };
    let mut out = Outcome::default();
    if deleted.is_empty() {
        out.notes
            .push("the GC deleted no blob: the registry was not restarted".into());
        return Ok(out);
    }
    let started = Instant::now();
    let deadline = started + plan.timeout;
    let unserved = format!(
        "the registry may still serve the {} blobs the GC deleted: restart it, then run `registry-audit probe`",
        deleted.len()
    );
    run_command(&plan.command, deadline, plan.timeout).map_err(|e| format!("{e}; {unserved}"))?;
    wait_until_answering(plan, deadline).map_err(|e| format!("{e}; {unserved}"))?;
    out.counts.restarted = true;
    out.counts.ms_until_answering = started.elapsed().as_millis() as u64;

    let mut pending: Vec<(String, Digest)> = Vec::new();
    for d in deleted {
        match plan.linked.get(d) {
            Some(repos) => pending.extend(repos.iter().map(|r| (r.clone(), *d))),
            None => out.counts.deleted_blobs_linked_nowhere += 1,
        }
    }
    out.counts.probed = pending.len() as u64;
    // A rolling restart of several replicas answers from old and new processes for a
    // while: ask again what is still served until the timeout.
    let mut last: Vec<Answer> = Vec::new();
    let mut pause = Duration::from_millis(50);
    loop {
        let answers = crate::audit::rehash::parallel_map(&pending, CONCURRENCY, |(r, d)| {
            plan.client.head_blob(r, &d.to_string())
        })?;
        let mut again = Vec::new();
        last.clear();
        for (candidate, answer) in pending.into_iter().zip(answers) {
            match answer {
                Answer::Unknown => {}
                Answer::Denied(status) => {
                    return Err(format!(
                        "the registry at {} refused access ({status}) to {}: gc --restart-command probes anonymously; run `registry-audit probe` with credentials",
                        plan.url, candidate.0
                    ));
                }
                a => {
                    again.push(candidate);
                    last.push(a);
                }
            }
        }
        pending = again;
        if pending.is_empty() || Instant::now() + pause >= deadline {
            break;
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(MAX_PAUSE);
    }
    for ((repo, d), answer) in pending.iter().zip(&last) {
        let detail = match answer {
            Answer::Exists(status) => {
                out.counts.still_served += 1;
                format!(
                    "HEAD /v2/{repo}/blobs/{d} still answered {status} after the restart, although the GC deleted the blob: the restart did not reach the process that answers (another replica, another service?)"
                )
            }
            Answer::Failed(why) => {
                out.counts.failed += 1;
                format!(
                    "HEAD /v2/{repo}/blobs/{d} after the restart: {why}; whether the registry still serves the deleted blob is unknown"
                )
            }
            Answer::Unknown | Answer::Denied(_) => continue,
        };
        let kind = match answer {
            Answer::Exists(_) => Kind::LivePhantom,
            _ => Kind::ProbeFailed,
        };
        let live = matches!(answer, Answer::Exists(_));
        out.findings.push(Finding::answer(
            kind,
            Severity::Error,
            live,
            *d,
            repo,
            detail,
        ));
    }
    out.notes.push(if out.findings.is_empty() {
        format!(
            "the registry was restarted and answered again after {:.1} s; none of the {} blobs the GC deleted is served any more ({} HEAD requests)",
            out.counts.ms_until_answering as f64 / 1000.0,
            deleted.len(),
            out.counts.probed
        )
    } else {
        format!(
            "the registry was restarted, yet {} deleted blobs are still served or could not be asked about after {}",
            out.findings.len(),
            humantime(plan.timeout)
        )
    });
    Ok(out)
}

/// Runs `sh -c COMMAND`, its output on stderr (stdout is the report's), until it exits
/// or `deadline`; a command still running then is killed.
fn run_command(command: &str, deadline: Instant, timeout: Duration) -> Result<(), String> {
    use std::os::fd::AsFd;
    let stdout = std::io::stderr()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| format!("cannot run the restart command: {e}"))?;
    tracing::info!("restarting the registry: sh -c {command}");
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(command)
        .stdin(Stdio::null())
        .stdout(Stdio::from(stdout))
        .spawn()
        .map_err(|e| format!("cannot run the restart command with sh: {e}"))?;
    let mut pause = Duration::from_millis(10);
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return Ok(()),
            Ok(Some(status)) => {
                return Err(match status.code() {
                    Some(code) => format!("the restart command failed (exit status {code})"),
                    None => "the restart command was killed by a signal".into(),
                });
            }
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "the restart command did not finish within --restart-timeout {} and was stopped",
                    humantime(timeout)
                ));
            }
            Ok(None) => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(MAX_PAUSE);
            }
            Err(e) => return Err(format!("waiting for the restart command: {e}")),
        }
    }
}

/// Polls `HEAD /v2/` until the registry answers or `deadline`.
fn wait_until_answering(plan: &Plan, deadline: Instant) -> Result<(), String> {
    let mut pause = Duration::from_millis(10);
    loop {
        let why = match plan.client.check_reachable() {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        if Instant::now() + pause >= deadline {
            return Err(format!(
                "the registry at {} did not answer within --restart-timeout {} of the restart ({why})",
                plan.url,
                humantime(plan.timeout)
            ));
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(MAX_PAUSE);
    }
}

/// `2m`, `90s`, `1500ms`: a duration as the flag takes it.
fn humantime(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(60_000) {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_print_as_the_flag_takes_them() {
        assert_eq!(humantime(Duration::from_secs(120)), "2m");
        assert_eq!(humantime(Duration::from_secs(90)), "90s");
        assert_eq!(humantime(Duration::from_millis(1500)), "1500ms");
    }

    #[test]
    fn a_failing_or_slow_command_is_an_error() {
        let far = Instant::now() + Duration::from_secs(30);
        assert_eq!(run_command("exit 0", far, Duration::from_secs(30)), Ok(()));
        let e = run_command("exit 3", far, Duration::from_secs(30)).expect_err("fails");
        assert!(e.contains("exit status 3"), "{e}");
        let soon = Duration::from_millis(200);
        let started = Instant::now();
        let e = run_command("sleep 30", Instant::now() + soon, soon).expect_err("slow");
        assert!(e.contains("did not finish within"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(10));
    }
}
