//! Content digests as the registry writes them (`sha256:<hex>`, and the other OCI
//! algorithms `sha384` and `sha512`). This module owns parsing and validation: a
//! `Digest` value is always well formed, so anything that builds a storage path from
//! one cannot be led outside the storage root. It never touches storage or Redis.

use std::fmt;

/// A digest algorithm the registry accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Algorithm {
    Sha256,
    Sha384,
    Sha512,
}

impl Algorithm {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Algorithm::Sha256 => "sha256",
            Algorithm::Sha384 => "sha384",
            Algorithm::Sha512 => "sha512",
        }
    }

    /// Length of the raw digest in bytes.
    pub(crate) fn output_len(self) -> usize {
        match self {
            Algorithm::Sha256 => 32,
            Algorithm::Sha384 => 48,
            Algorithm::Sha512 => 64,
        }
    }

    fn from_name(name: &[u8]) -> Option<Self> {
        match name {
            b"sha256" => Some(Algorithm::Sha256),
            b"sha384" => Some(Algorithm::Sha384),
            b"sha512" => Some(Algorithm::Sha512),
            _ => None,
        }
    }
}

/// A well-formed digest: a known algorithm and exactly its number of bytes, kept raw
/// (65 bytes) so that an index of millions of digests stays compact.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct Digest {
    alg: Algorithm,
    bytes: [u8; 64],
}

impl Digest {
    /// Parses `alg:hex` strictly: lowercase hex of the algorithm's exact length.
    pub(crate) fn parse(text: &[u8]) -> Option<Digest> {
        let colon = text.iter().position(|&b| b == b':')?;
        let alg = Algorithm::from_name(&text[..colon])?;
        let hex = &text[colon + 1..];
        if hex.len() != alg.output_len() * 2 {
            return None;
        }
        let mut bytes = [0u8; 64];
        for (i, pair) in hex.chunks_exact(2).enumerate() {
            bytes[i] = (hex_value(pair[0])? << 4) | hex_value(pair[1])?;
        }
        Some(Digest { alg, bytes })
    }

    pub(crate) fn parse_str(text: &str) -> Option<Digest> {
        Digest::parse(text.as_bytes())
    }

    /// Builds a digest from a finished hash of the given algorithm.
    pub(crate) fn from_raw(alg: Algorithm, raw: &[u8]) -> Option<Digest> {
        if raw.len() != alg.output_len() {
            return None;
        }
        let mut bytes = [0u8; 64];
        bytes[..raw.len()].copy_from_slice(raw);
        Some(Digest { alg, bytes })
    }

    /// A sha256 digest from its 32 raw bytes (how compact indexes keep them).
    pub(crate) fn sha256(raw: [u8; 32]) -> Digest {
        let mut bytes = [0u8; 64];
        bytes[..32].copy_from_slice(&raw);
        Digest {
            alg: Algorithm::Sha256,
            bytes,
        }
    }

    pub(crate) fn algorithm(&self) -> Algorithm {
        self.alg
    }

    pub(crate) fn raw(&self) -> &[u8] {
        &self.bytes[..self.alg.output_len()]
    }

    /// The lowercase hex part, without the algorithm.
    pub(crate) fn hex(&self) -> String {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut out = String::with_capacity(self.alg.output_len() * 2);
        for &b in self.raw() {
            out.push(HEX[(b >> 4) as usize] as char);
            out.push(HEX[(b & 15) as usize] as char);
        }
        out
    }
}

fn hex_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.alg.name(), self.hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Digest::parse_str(&text)
            .ok_or_else(|| serde::de::Error::custom(format!("not a valid digest: {text:?}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn round_trips_sha256() {
        let d = Digest::parse_str(EMPTY).expect("valid");
        assert_eq!(d.to_string(), EMPTY);
        assert_eq!(d.algorithm(), Algorithm::Sha256);
        assert_eq!(d.raw().len(), 32);
    }

    #[test]
    fn accepts_sha384_and_sha512_of_exact_length() {
        let d384 = format!("sha384:{}", "ab".repeat(48));
        let d512 = format!("sha512:{}", "cd".repeat(64));
        assert_eq!(Digest::parse_str(&d384).map(|d| d.to_string()), Some(d384));
        assert_eq!(Digest::parse_str(&d512).map(|d| d.to_string()), Some(d512));
    }

    #[test]
    fn rejects_everything_else() {
        for bad in [
            "",
            "sha256:",
            "sha256",
            "md5:d41d8cd98f00b204e9800998ecf8427e",
            &EMPTY.to_uppercase(),
            &EMPTY.replace("sha256", "SHA256"),
            &format!("{EMPTY}0"),
            &EMPTY[..EMPTY.len() - 1],
            "sha256:../../../../etc/passwd",
            &format!("sha512:{}", "ab".repeat(32)),
            &format!("sha256:{}", "g".repeat(64)),
            &format!(" {EMPTY}"),
        ] {
            assert!(Digest::parse_str(bad).is_none(), "accepted {bad:?}");
        }
        assert!(Digest::parse(b"sha256:\xff\xfe").is_none());
    }

    #[test]
    fn orders_like_its_text() {
        let a = Digest::parse_str(&format!("sha256:{}", "0f".repeat(32))).expect("valid");
        let b = Digest::parse_str(&format!("sha256:{}", "a0".repeat(32))).expect("valid");
        assert!(a < b);
        assert!(a.to_string() < b.to_string());
    }
}
