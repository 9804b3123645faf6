//! What the registry's garbage collection says it deleted, read from its output
//! (`registry garbage-collect` of distribution 2.8 and 3): blobs, manifests and layer
//! links. A parser of text; it runs nothing.

use std::collections::BTreeSet;

use crate::digest::Digest;

/// What a GC run says it deleted, from its output (distribution 2.8 and 3).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct GcLog {
    pub blobs: BTreeSet<Digest>,
    pub manifests: BTreeSet<(String, Digest)>,
    pub layer_links: BTreeSet<(String, Digest)>,
}

impl GcLog {
    /// Reads one line of `registry garbage-collect` output.
    pub(crate) fn add_line(&mut self, line: &str) {
        let digest_after = |at: usize| {
            line[at..]
                .split(|c: char| {
                    c.is_whitespace() || matches!(c, '"' | ',' | '{' | '}' | '[' | ']' | '@')
                })
                .find_map(Digest::parse_str)
        };
        if let Some(at) = line.find("blob eligible for deletion") {
            if let Some(d) = digest_after(at) {
                self.blobs.insert(d);
            }
        } else if let Some(at) = line.find("layer link eligible for deletion") {
            let repo = line[..at].trim().trim_end_matches(':').to_string();
            if let Some(d) = digest_after(at) {
                self.layer_links.insert((repo, d));
            }
        } else if let Some(at) = line.find("manifest eligible for deletion") {
            // v3 prints `{name digest [tags]}`.
            let rest = &line[at + "manifest eligible for deletion".len()..];
            let rest = rest.trim_start_matches([':', ' ', '{']);
            let name = rest.split_whitespace().next().unwrap_or("").to_string();
            if let Some(d) = digest_after(at) {
                self.manifests.insert((name, d));
            }
        }
    }

    #[cfg(test)]
    pub(crate) fn parse(text: &str) -> GcLog {
        let mut log = GcLog::default();
        text.lines().for_each(|l| log.add_line(l));
        log
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_gc_output_of_both_versions() {
        let a = format!("sha256:{}", "a".repeat(64));
        let b = format!("sha256:{}", "b".repeat(64));
        let m = format!("sha256:{}", "c".repeat(64));
        let text = format!(
            "team/app\nteam/app: marking manifest {m} \n\n3 blobs marked, 2 blobs and 1 manifests eligible for deletion\nblob eligible for deletion: {a}\ntime=\"x\" level=info msg=\"blob eligible for deletion: {b}\"\nmanifest eligible for deletion: {{team/app {m} [v1]}}\nteam/app: layer link eligible for deletion: {a}\n"
        );
        let log = GcLog::parse(&text);
        assert_eq!(log.blobs.len(), 2);
        assert_eq!(
            log.manifests
                .iter()
                .next()
                .map(|(r, d)| (r.as_str(), d.to_string())),
            Some(("team/app", m.clone()))
        );
        assert_eq!(
            log.layer_links.iter().next().map(|(r, _)| r.as_str()),
            Some("team/app")
        );
    }
}
