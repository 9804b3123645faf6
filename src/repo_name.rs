//! Repository names as the registry accepts them (`team/app`, optionally behind a
//! `host[:port]/` component). This module only validates names; validating before a
//! path is built is what keeps a hostile cache key from pointing outside the storage
//! root. It never touches storage or Redis.

/// The registry's limit on the length of a repository name.
const MAX_NAME_LEN: usize = 255;

/// True when `name` is a repository name the registry could have served, and so is
/// safe to join under `repositories/`.
pub(crate) fn is_valid(name: &str) -> bool {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return false;
    }
    let mut components = name.split('/').peekable();
    let mut first = true;
    while let Some(component) = components.next() {
        let is_last = components.peek().is_none();
        let ok = path_component(component) || (first && !is_last && domain_component(component));
        if !ok {
            return false;
        }
        first = false;
    }
    true
}

/// True when `tag` is a tag name the registry could have served: `[\w][\w.-]{0,127}`.
pub(crate) fn is_valid_tag(tag: &str) -> bool {
    let b = tag.as_bytes();
    let word = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    !b.is_empty()
        && b.len() <= 128
        && word(b[0])
        && b[1..].iter().all(|&c| word(c) || c == b'.' || c == b'-')
}

/// `[a-z0-9]+` separated by `.`, `_`, `__` or any run of `-`.
fn path_component(c: &str) -> bool {
    let b = c.as_bytes();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &b[start..i];
        let ok = sep == b"." || sep == b"_" || sep == b"__" || sep.iter().all(|&c| c == b'-');
        if !ok {
            return false;
        }
    }
    true
}

fn alnum(c: u8) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit()
}

/// A registry host: dot-separated labels of letters, digits and inner hyphens, with an
/// optional `:port`.
fn domain_component(c: &str) -> bool {
    let (host, port) = match c.split_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (c, None),
    };
    if let Some(p) = port
        && (p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()))
    {
        return false;
    }
    !host.is_empty()
        && host.split('.').all(|label| {
            let b = label.as_bytes();
            !b.is_empty()
                && b[0].is_ascii_alphanumeric()
                && b[b.len() - 1].is_ascii_alphanumeric()
                && b.iter().all(|&c| c.is_ascii_alphanumeric() || c == b'-')
        })
}

#[cfg(test)]
mod tests {
    use super::is_valid;

    #[test]
    fn accepts_registry_names() {
        for ok in [
            "demo",
            "team/app",
            "a/b/c",
            "my-app",
            "my--app",
            "my_app",
            "my__app",
            "v1.2",
            "localhost:5000/demo",
            "Registry.example.com/team/app",
        ] {
            assert!(is_valid(ok), "rejected {ok}");
        }
    }

    #[test]
    fn rejects_traversal_and_junk() {
        for bad in [
            "",
            "..",
            "../etc",
            "a/../b",
            "a/./b",
            "/abs",
            "a//b",
            "a/",
            "UPPER",
            "a___b",
            "a.-b",
            "-a",
            "a b",
            "a::b",
            "localhost:5000",
            "host:/x",
            &"a".repeat(256),
        ] {
            assert!(!is_valid(bad), "accepted {bad:?}");
        }
    }
}
