//! Live phantoms of a running registry, the step `probe` and `check` (on an in-memory
//! cache) share: which (repository, digest) pairs to ask about - the links storage
//! verification found dangling - and one HEAD per pair through `registry::client`, turned into findings and counts. It reads no storage
//! and writes nothing; deciding exit statuses and writing reports is the commands' job.

use std::collections::{BTreeMap, BTreeSet};

use crate::audit::Audit;
use crate::digest::Digest;
use crate::finding::{self, Finding, Kind, Severity};
use crate::registry::client::{Answer, RegistryClient};
use crate::summary::ProbeCounts;

/// Digests storage no longer has, with the repositories that still link them: the
/// `dangling-layer-link` and `dangling-manifest-revision` findings.
pub(crate) fn dangling_links(findings: &[Finding]) -> BTreeMap<Digest, BTreeSet<String>> {
    let mut linked: BTreeMap<Digest, BTreeSet<String>> = BTreeMap::new();
    for f in findings {
        if matches!(
            f.kind,
            Kind::DanglingLayerLink | Kind::DanglingManifestRevision
        ) && let (Some(d), Some(r)) = (f.digest, &f.repository)
        {
            linked.entry(d).or_default().insert(r.clone());
        }
    }
    linked
}

/// One HEAD per (repository, digest), `concurrency` at once: a blob the registry says
/// exists is a `live-phantom` (error, live); 404 is counted; anything else is a
/// `probe-failed` warning. Stops at the first refusal (401 or 403 with the credentials
/// there are), with a message that says what to give.
pub(crate) fn head_each(
    client: &RegistryClient,
    candidates: &[(String, Digest)],
    concurrency: usize,
    counts: &mut ProbeCounts,
) -> Result<Vec<Finding>, String> {
    let answers = crate::audit::rehash::parallel_map(candidates, concurrency, |(repo, d)| {
        client.head_blob(repo, &d.to_string())
    })?;
    let mut findings = Vec::new();
    for ((repo, d), answer) in candidates.iter().zip(answers) {
        counts.probed += 1;
        match answer {
            Answer::Exists(status) => {
                counts.live_phantoms += 1;
                findings.push(Finding::answer(
                    Kind::LivePhantom,
                    Severity::Error,
                    true,
                    *d,
                    repo,
                    format!(
                        "HEAD /v2/{repo}/blobs/{d} answered {status} although storage has no such blob: the registry serves it from its cache"
                    ),
                ));
            }
            Answer::Unknown => counts.answered_unknown += 1,
            Answer::Denied(status) => {
                return Err(format!(
                    "the registry at {} refused access ({status}) to {repo}: give credentials with --username and --password-stdin, or --docker-config",
                    client.describe()
                ));
            }
            Answer::Failed(why) => {
                counts.failed += 1;
                findings.push(Finding::answer(
                    Kind::ProbeFailed,
                    Severity::Warning,
                    false,
                    *d,
                    repo,
                    format!("HEAD /v2/{repo}/blobs/{d}: {why}"),
                ));
            }
        }
    }
    Ok(findings)
}

/// `check` on an in-memory cache, after the audit verified storage: asks the running
/// registry about every dangling link found, adds the live phantoms (and failed probes)
/// to the findings and the counts to the summary. What could not be asked - the registry
/// did not answer, refused access, or some requests failed - makes the audit incomplete,
/// with a note naming the address tried. Returns whether every candidate was asked.
pub(crate) fn probe_audit(client: &RegistryClient, concurrency: usize, audit: &mut Audit) -> bool {
    let linked = dangling_links(&audit.findings);
    let candidates: Vec<(String, Digest)> = linked
        .iter()
        .flat_map(|(d, repos)| repos.iter().map(move |r| (r.clone(), *d)))
        .collect();
    let mut counts = ProbeCounts::default();
    let mut asked = false;
    match client.check_reachable() {
        Err(e) => audit.incomplete.push(format!(
            "the registry's in-memory cache was not probed: {e}"
        )),
        Ok(()) => match head_each(client, &candidates, concurrency, &mut counts) {
            Ok(found) => {
                audit.findings.extend(found);
                asked = counts.failed == 0;
                if counts.failed > 0 {
                    audit.incomplete.push(format!(
                        "{} of {} HEAD requests to {} failed (probe-failed): whether the registry still serves those blobs is unknown",
                        counts.failed,
                        candidates.len(),
                        client.describe()
                    ));
                }
            }
            Err(why) => audit.incomplete.push(format!(
                "the registry's in-memory cache was not probed: {why}"
            )),
        },
    }
    if !asked && let Some(why) = audit.incomplete.last() {
        tracing::warn!("{why}");
    }
    audit.summary.probe = Some(counts);
    finding::sort(&mut audit.findings);
    audit.summary.tally(&audit.findings);
    asked
}

/// The note every `check` on an in-memory cache carries: what no request can show.
pub(crate) const GLOBAL_DESCRIPTORS_NOTE: &str = "the registry's global in-memory blob descriptors cannot be audited: no request shows them (HEAD answers from the repository's entries, and DELETE /v2/<repo>/blobs/<digest> clears only those), yet a global descriptor of a deleted manifest makes a re-push skip writing it and the pull fail; only a restart clears them, so restart the registry after every garbage collection (`registry-audit gc` says when one is needed)";

/// The verdict of `check` on an in-memory cache. It never calls the cache clean: HEAD
/// shows the repository entries only, never the global descriptors (see
/// `GLOBAL_DESCRIPTORS_NOTE`), so a clean run says what HEAD showed and that a restart
/// after a GC is still needed.
pub(crate) fn verdict(audit: &Audit, registry: &str, asked: bool, complete: bool) -> String {
    let probed = audit.summary.probe.map_or(0, |c| c.probed);
    let unseen = format!(
        " The registry's global in-memory descriptors cannot be seen through its API (see the notes): if a garbage collection ran since the registry at {registry} started, restart it, or a re-push of a deleted image can \"succeed\" and its pull fail."
    );
    let mut v = if !audit.findings.is_empty() || !complete {
        crate::output::report::verdict(&audit.summary, &audit.findings, complete)
    } else if !asked {
        "Storage verified: nothing wrong.".to_string()
    } else if probed == 0 {
        format!(
            "OK as far as storage and HEAD show: storage holds every blob its links name, so there was no deleted blob to ask the registry at {registry} about.{unseen}"
        )
    } else {
        format!(
            "OK as far as HEAD shows: the registry at {registry} answered 404 for all {probed} blobs storage no longer has.{unseen}"
        )
    };
    if !asked {
        v.push_str(&format!(
            " The in-memory cache of the registry at {registry} was not fully probed: see the notes."
        ));
    }
    v
}
