//! Findings: what the audit found wrong, as plain data. One `Finding` type whose `kind`
//! says what is wrong, how severe it is, whether the registry would serve the entry
//! (`live`), and exactly which key, repository and digest it is about. This module owns
//! the ordering that makes reports reproducible and the lossless text form of raw Redis
//! keys; it never reads Redis or storage.

use serde::{Deserialize, Serialize};

use crate::digest::Digest;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Kind {
    PhantomBlobDescriptor,
    PhantomRepositoryBlob,
    UnlinkedRepositoryBlob,
    SizeMismatch,
    DigestMismatch,
    UnreadableBlob,
    MalformedCacheEntry,
    OrphanRepositoryDescriptor,
    DanglingLayerLink,
    DanglingManifestRevision,
    DanglingTag,
    MissingReferencedBlob,
    BadLink,
    LivePhantom,
    ProbeFailed,
    TagBrokenByGc,
    BadManifest,
    UnreadableStorage,
}

impl Kind {
    pub(crate) const ALL: [Kind; 18] = [
        Kind::PhantomBlobDescriptor,
        Kind::PhantomRepositoryBlob,
        Kind::UnlinkedRepositoryBlob,
        Kind::SizeMismatch,
        Kind::DigestMismatch,
        Kind::UnreadableBlob,
        Kind::MalformedCacheEntry,
        Kind::OrphanRepositoryDescriptor,
        Kind::DanglingLayerLink,
        Kind::DanglingManifestRevision,
        Kind::DanglingTag,
        Kind::MissingReferencedBlob,
        Kind::BadLink,
        Kind::LivePhantom,
        Kind::ProbeFailed,
        Kind::TagBrokenByGc,
        Kind::BadManifest,
        Kind::UnreadableStorage,
    ];

    /// The kebab-case name used in JSON and on the command line.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Kind::PhantomBlobDescriptor => "phantom-blob-descriptor",
            Kind::PhantomRepositoryBlob => "phantom-repository-blob",
            Kind::UnlinkedRepositoryBlob => "unlinked-repository-blob",
            Kind::SizeMismatch => "size-mismatch",
            Kind::DigestMismatch => "digest-mismatch",
            Kind::UnreadableBlob => "unreadable-blob",
            Kind::MalformedCacheEntry => "malformed-cache-entry",
            Kind::OrphanRepositoryDescriptor => "orphan-repository-descriptor",
            Kind::DanglingLayerLink => "dangling-layer-link",
            Kind::DanglingManifestRevision => "dangling-manifest-revision",
            Kind::DanglingTag => "dangling-tag",
            Kind::MissingReferencedBlob => "missing-referenced-blob",
            Kind::BadLink => "bad-link",
            Kind::LivePhantom => "live-phantom",
            Kind::ProbeFailed => "probe-failed",
            Kind::TagBrokenByGc => "tag-broken-by-gc",
            Kind::BadManifest => "bad-manifest",
            Kind::UnreadableStorage => "unreadable-storage",
        }
    }

    #[cfg(test)]
    /// Problems of storage itself, which no change to the cache can fix.
    pub(crate) fn is_storage_problem(self) -> bool {
        !self.is_cache_entry() && self != Kind::ProbeFailed
    }

    #[cfg(test)]
    /// Findings about a cache entry (as opposed to blobs and links in storage).
    pub(crate) fn is_cache_entry(self) -> bool {
        matches!(
            self,
            Kind::PhantomBlobDescriptor
                | Kind::PhantomRepositoryBlob
                | Kind::UnlinkedRepositoryBlob
                | Kind::SizeMismatch
                | Kind::MalformedCacheEntry
                | Kind::OrphanRepositoryDescriptor
                | Kind::LivePhantom
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Severity {
    Warning,
    Error,
}

impl Severity {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Severity::Warning => "warning",
            Severity::Error => "error",
        }
    }
}

/// One inconsistency between the cache and storage, or within storage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Finding {
    pub kind: Kind,
    pub severity: Severity,
    /// Would the registry answer a lookup from this cache entry (a cache hit)? Always
    /// false for findings about storage alone.
    pub live: bool,
    /// Always well formed; `None` when the key's digest is not.
    pub digest: Option<Digest>,
    /// `None` for the global descriptor (`blobs::<digest>`).
    pub repository: Option<String>,
    /// The Redis key, in the lossless text form of [`escape`]; `None` for findings about
    /// storage alone.
    pub key: Option<String>,
    /// For a finding about one member of a repository set: that member, escaped.
    pub member: Option<String>,
    /// The tag a storage finding is about.
    pub tag: Option<String>,
    /// The manifest that references the missing blob.
    pub manifest: Option<Digest>,
    /// The file in storage, relative to the storage root.
    pub path: Option<String>,
    pub detail: String,
}

impl Finding {
    /// A finding about a cache key.
    pub(crate) fn cache(
        kind: Kind,
        severity: Severity,
        live: bool,
        digest: Option<Digest>,
        repository: Option<String>,
        key: String,
        detail: String,
    ) -> Finding {
        Finding {
            kind,
            severity,
            live,
            digest,
            repository,
            key: Some(key),
            member: None,
            tag: None,
            manifest: None,
            path: None,
            detail,
        }
    }

    /// A finding about storage alone.
    pub(crate) fn storage(
        kind: Kind,
        severity: Severity,
        digest: Option<Digest>,
        repository: Option<String>,
        path: String,
        detail: String,
    ) -> Finding {
        Finding {
            kind,
            severity,
            live: false,
            digest,
            repository,
            key: None,
            member: None,
            tag: None,
            manifest: None,
            path: Some(path),
            detail,
        }
    }

    /// A finding about what a running registry answered for a blob of a repository.
    pub(crate) fn answer(
        kind: Kind,
        severity: Severity,
        live: bool,
        digest: Digest,
        repository: &str,
        detail: String,
    ) -> Finding {
        Finding {
            kind,
            severity,
            live,
            digest: Some(digest),
            repository: Some(repository.to_string()),
            key: None,
            member: None,
            tag: None,
            manifest: None,
            path: None,
            detail,
        }
    }

    /// The order of reports: kind, then repository (global first), digest, key, member.
    pub(crate) fn sort_key(&self) -> impl Ord + '_ {
        (
            self.kind,
            self.repository.as_deref(),
            self.digest,
            self.key.as_deref(),
            self.member.as_deref(),
            (self.tag.as_deref(), self.manifest, self.path.as_deref()),
            self.detail.as_str(),
        )
    }

    /// The key, or the storage path, for display.
    pub(crate) fn location(&self) -> &str {
        self.key.as_deref().or(self.path.as_deref()).unwrap_or("")
    }
}

pub(crate) fn sort(findings: &mut [Finding]) {
    findings.sort_by(|a, b| a.sort_key().cmp(&b.sort_key()));
}

/// Lossless text for raw key bytes: valid UTF-8 stays as it is, a backslash becomes
/// `\\`, control characters and bytes that are not UTF-8 become `\xNN`.
pub(crate) fn escape(raw: &[u8]) -> String {
    let mut out = String::with_capacity(raw.len());
    for chunk in raw.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                // Each byte of the character, so that `unescape` gives the same bytes
                // back (a C1 control such as U+0080 is two bytes in UTF-8).
                c if c.is_control() && (c as u32) < 0x100 => {
                    let mut utf8 = [0u8; 4];
                    for b in c.encode_utf8(&mut utf8).bytes() {
                        out.push_str(&format!("\\x{b:02x}"));
                    }
                }
                c => out.push(c),
            }
        }
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

/// Text that is safe to show on a terminal: control characters (ESC, CR, LF, BEL, ...,
/// C1 controls) and the invisible Unicode characters that reorder or hide text (bidi
/// overrides, zero-width marks) become `\xNN` / `\u{NNNN}`; everything else, backslashes
/// included, stays as it is (already-escaped names are not escaped twice). For tables,
/// logs and error lines; JSON keeps [`escape`]'s lossless form.
pub fn terminal_safe(text: &str) -> String {
    let hidden = |c: char| matches!(c, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2060}'..='\u{2069}' | '\u{feff}');
    if !text.chars().any(|c| c.is_control() || hidden(c)) {
        return text.to_string();
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            c if c.is_control() && (c as u32) < 0x100 => {
                out.push_str(&format!("\\x{:02x}", c as u32))
            }
            c if c.is_control() || hidden(c) => out.push_str(&format!("\\u{{{:04x}}}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

/// The inverse of [`escape`]; `None` for text `escape` cannot produce.
pub(crate) fn unescape(text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len());
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'\\' {
            out.push(bytes[i]);
            i += 1;
            continue;
        }
        match bytes.get(i + 1) {
            Some(b'\\') => {
                out.push(b'\\');
                i += 2;
            }
            Some(b'x') => {
                let hex = text.get(i + 2..i + 4)?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 4;
            }
            _ => return None,
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_serialise_in_kebab_case() {
        for k in Kind::ALL {
            let json = serde_json::to_string(&k).expect("serialise");
            assert_eq!(json, format!("\"{}\"", k.name()));
        }
    }

    #[test]
    fn escape_is_lossless() {
        for raw in [
            &b"blobs::sha256:abc"[..],
            b"repository::\xff\xfe::blobs",
            b"back\\slash\\x41",
            b"nl\ncr\rtab\t\x00",
            "caf\u{e9}".as_bytes(),
            "c1 \u{80}\u{9b} controls".as_bytes(),
        ] {
            let text = escape(raw);
            assert_eq!(unescape(&text).as_deref(), Some(raw), "{text}");
        }
        assert_eq!(escape(b"a\xffb"), "a\\xffb");
        assert_eq!(escape(b"a\\xffb"), "a\\\\xffb");
    }

    #[test]
    fn terminal_text_carries_no_control_characters() {
        let shown = terminal_safe("a\x1b[31mred\r\nbell\x07 \u{202e}txt.exe \u{9b}c\\x41");
        assert!(!shown.chars().any(|c| c.is_control()), "{shown}");
        assert!(!shown.contains('\u{202e}'));
        assert_eq!(
            shown,
            "a\\x1b[31mred\\x0d\\x0abell\\x07 \\u{202e}txt.exe \\x9bc\\x41"
        );
        assert_eq!(terminal_safe("plain team/app"), "plain team/app");
    }
}
