//! Content digests (`sha256:<64 hex>`, `sha512:<128 hex>`) and the hasher that checks them.

use std::fmt;
use std::str::FromStr;

use sha2::Digest as _;

/// A digest algorithm pier can verify.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Algorithm {
    Sha256,
    Sha512,
}

impl Algorithm {
    /// The name used in digest strings and on disk.
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::Sha256 => "sha256",
            Algorithm::Sha512 => "sha512",
        }
    }

    /// Length of the hex-encoded value.
    pub fn hex_len(self) -> usize {
        match self {
            Algorithm::Sha256 => 64,
            Algorithm::Sha512 => 128,
        }
    }

    fn from_name(name: &str) -> Option<Self> {
        match name {
            "sha256" => Some(Algorithm::Sha256),
            "sha512" => Some(Algorithm::Sha512),
            _ => None,
        }
    }
}

/// A validated content digest. The hex part is always lower case and of the algorithm's length,
/// so it is safe to use in a file path.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    algorithm: Algorithm,
    /// `algorithm:hex`, kept whole: headers, keys and paths write it as it is, per request.
    text: Box<str>,
}

/// Why a digest string was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DigestError {
    /// No `algorithm:` prefix.
    MissingAlgorithm,
    /// Grammatically an algorithm, but not one pier verifies (e.g. `blake3`).
    UnsupportedAlgorithm(String),
    /// The encoded part is not lower-case hex of the right length.
    BadEncoding,
}

impl fmt::Display for DigestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DigestError::MissingAlgorithm => f.write_str("digest has no algorithm prefix"),
            DigestError::UnsupportedAlgorithm(a) => {
                write!(
                    f,
                    "unsupported digest algorithm {a:?} (sha256 and sha512 are)"
                )
            }
            DigestError::BadEncoding => {
                f.write_str("digest value is not lower-case hex of the algorithm's length")
            }
        }
    }
}

impl std::error::Error for DigestError {}

impl Digest {
    /// The algorithm.
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// The lower-case hex value, without the algorithm.
    pub fn hex(&self) -> &str {
        &self.text[self.algorithm.as_str().len() + 1..]
    }

    /// The whole digest, `algorithm:hex` (what `Display` writes).
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The sha256 digest of `data`.
    pub fn sha256_of(data: &[u8]) -> Digest {
        let mut h = Hasher::new(Algorithm::Sha256);
        h.update(data);
        h.finish()
    }

    /// The digest of `data` with this digest's algorithm, compared with this digest.
    pub fn verifies(&self, data: &[u8]) -> bool {
        let mut h = Hasher::new(self.algorithm);
        h.update(data);
        h.finish() == *self
    }
}

impl FromStr for Digest {
    type Err = DigestError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // Every request for a blob or manifest by digest parses one: the usual algorithm first.
        if let Some(hex) = s.strip_prefix("sha256:") {
            return if is_lower_hex(hex, Algorithm::Sha256) {
                Ok(Digest {
                    algorithm: Algorithm::Sha256,
                    text: s.into(),
                })
            } else {
                Err(DigestError::BadEncoding)
            };
        }
        let (alg, hex) = s.split_once(':').ok_or(DigestError::MissingAlgorithm)?;
        // The spec's algorithm grammar: [a-z0-9]+([+._-][a-z0-9]+)*
        let alg_ok = !alg.is_empty()
            && alg.len() <= 32
            && alg
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+._-".contains(&b));
        if !alg_ok {
            return Err(DigestError::MissingAlgorithm);
        }
        let algorithm = Algorithm::from_name(alg)
            .ok_or_else(|| DigestError::UnsupportedAlgorithm(alg.to_string()))?;
        if !is_lower_hex(hex, algorithm) {
            return Err(DigestError::BadEncoding);
        }
        Ok(Digest {
            algorithm,
            text: s.into(),
        })
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Incremental hashing with either algorithm; `finish` gives the [`Digest`].
#[derive(Clone)]
pub enum Hasher {
    Sha256(sha2::Sha256),
    Sha512(sha2::Sha512),
}

impl Hasher {
    pub fn new(algorithm: Algorithm) -> Self {
        match algorithm {
            Algorithm::Sha256 => Hasher::Sha256(sha2::Sha256::new()),
            Algorithm::Sha512 => Hasher::Sha512(sha2::Sha512::new()),
        }
    }

    pub fn update(&mut self, data: &[u8]) {
        match self {
            Hasher::Sha256(h) => h.update(data),
            Hasher::Sha512(h) => h.update(data),
        }
    }

    pub fn finish(self) -> Digest {
        let (algorithm, bytes): (Algorithm, Vec<u8>) = match self {
            Hasher::Sha256(h) => (Algorithm::Sha256, h.finalize().to_vec()),
            Hasher::Sha512(h) => (Algorithm::Sha512, h.finalize().to_vec()),
        };
        let mut text = String::with_capacity(algorithm.as_str().len() + 1 + bytes.len() * 2);
        text.push_str(algorithm.as_str());
        text.push(':');
        push_hex(&mut text, &bytes);
        Digest {
            algorithm,
            text: text.into(),
        }
    }
}

/// Whether `hex` is lower-case hex of `algorithm`'s length.
fn is_lower_hex(hex: &str, algorithm: Algorithm) -> bool {
    hex.len() == algorithm.hex_len() && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn push_hex(s: &mut String, bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        s.push(HEX[(b >> 4) as usize] as char);
        s.push(HEX[(b & 0xf) as usize] as char);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY_SHA256: &str =
        "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn parses_sha256_and_sha512() {
        let d: Digest = EMPTY_SHA256.parse().unwrap();
        assert_eq!(d.algorithm(), Algorithm::Sha256);
        assert_eq!(d.to_string(), EMPTY_SHA256);
        let long = format!("sha512:{}", "a".repeat(128));
        assert_eq!(
            long.parse::<Digest>().unwrap().algorithm(),
            Algorithm::Sha512
        );
    }

    #[test]
    fn rejects_malformed() {
        assert_eq!("abc".parse::<Digest>(), Err(DigestError::MissingAlgorithm));
        assert_eq!(":abc".parse::<Digest>(), Err(DigestError::MissingAlgorithm));
        assert_eq!(
            "md5:d41d8cd98f00b204e9800998ecf8427e".parse::<Digest>(),
            Err(DigestError::UnsupportedAlgorithm("md5".into()))
        );
        // upper case, short, long, non-hex, path tricks
        for bad in [
            EMPTY_SHA256.to_uppercase().replace("SHA256", "sha256"),
            "sha256:abc".to_string(),
            format!("{EMPTY_SHA256}0"),
            format!("sha256:{}", "g".repeat(64)),
            format!("sha256:../{}", "a".repeat(61)),
        ] {
            assert_eq!(
                bad.parse::<Digest>(),
                Err(DigestError::BadEncoding),
                "{bad}"
            );
        }
        assert!("SHA256:abc".parse::<Digest>().is_err());
    }

    #[test]
    fn hashes_and_verifies() {
        assert_eq!(Digest::sha256_of(b"").to_string(), EMPTY_SHA256);
        let d: Digest = EMPTY_SHA256.parse().unwrap();
        assert!(d.verifies(b""));
        assert!(!d.verifies(b"x"));
        let mut h = Hasher::new(Algorithm::Sha512);
        h.update(b"ab");
        h.update(b"c");
        assert_eq!(
            h.finish().hex(),
            "ddaf35a193617abacc417349ae20413112e6fa4e89a97ea20a9eeee64b55d39a2192992a274fc1a836ba3c23a3feebbd454d4423643ce80e2a9ac94fa54ca49f"
        );
    }
}
