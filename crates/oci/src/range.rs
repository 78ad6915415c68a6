//! The `Range` request header, for the single byte ranges registries serve.

use std::fmt;

/// One byte range as a client asked for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ByteRange {
    /// `bytes=start-` or `bytes=start-end` (end inclusive).
    From { start: u64, end: Option<u64> },
    /// `bytes=-n`: the last n bytes.
    Suffix(u64),
}

/// Why a `Range` header cannot be served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeError {
    /// Not `bytes=` followed by one well-formed range (several ranges are not served either).
    Malformed,
    /// Well-formed but outside the object: answered with 416 and `Content-Range: bytes */size`.
    Unsatisfiable,
}

impl fmt::Display for RangeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RangeError::Malformed => {
                f.write_str("Range must be a single range: bytes=N-, bytes=N-M or bytes=-N")
            }
            RangeError::Unsatisfiable => f.write_str("requested range is outside the object"),
        }
    }
}

impl ByteRange {
    /// Parses a `Range` header value.
    pub fn parse(header: &str) -> Result<ByteRange, RangeError> {
        let spec = header
            .trim()
            .strip_prefix("bytes=")
            .ok_or(RangeError::Malformed)?
            .trim();
        if spec.contains(',') {
            return Err(RangeError::Malformed);
        }
        let (first, last) = spec.split_once('-').ok_or(RangeError::Malformed)?;
        let num = |s: &str| -> Result<u64, RangeError> {
            if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
                return Err(RangeError::Malformed);
            }
            s.parse().map_err(|_| RangeError::Malformed)
        };
        match (first.trim(), last.trim()) {
            ("", n) => Ok(ByteRange::Suffix(num(n)?)),
            (s, "") => Ok(ByteRange::From {
                start: num(s)?,
                end: None,
            }),
            (s, e) => {
                let (start, end) = (num(s)?, num(e)?);
                if end < start {
                    return Err(RangeError::Malformed);
                }
                Ok(ByteRange::From {
                    start,
                    end: Some(end),
                })
            }
        }
    }

    /// The inclusive `(first, last)` byte positions within an object of `size` bytes.
    pub fn resolve(self, size: u64) -> Result<(u64, u64), RangeError> {
        match self {
            ByteRange::From { start, end } => {
                if start >= size {
                    return Err(RangeError::Unsatisfiable);
                }
                let last = end.map_or(size - 1, |e| e.min(size - 1));
                Ok((start, last))
            }
            ByteRange::Suffix(0) => Err(RangeError::Unsatisfiable),
            ByteRange::Suffix(n) => {
                if size == 0 {
                    return Err(RangeError::Unsatisfiable);
                }
                Ok((size.saturating_sub(n), size - 1))
            }
        }
    }
}

/// The `Content-Range` of an upload chunk: `<first>-<last>`, inclusive, as the distribution
/// spec writes it (`bytes ` before it and `/<total>` after it are taken too, as some clients
/// send the HTTP form). `None` when malformed or `last < first`.
pub fn upload_chunk_range(header: &str) -> Option<(u64, u64)> {
    let spec = header.trim();
    let spec = spec.strip_prefix("bytes ").unwrap_or(spec).trim();
    let spec = spec.split_once('/').map_or(spec, |(r, _)| r);
    let (first, last) = spec.split_once('-')?;
    let num = |s: &str| -> Option<u64> {
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    let (first, last) = (num(first)?, num(last)?);
    (last >= first).then_some((first, last))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses() {
        assert_eq!(
            ByteRange::parse("bytes=10-"),
            Ok(ByteRange::From {
                start: 10,
                end: None
            })
        );
        assert_eq!(
            ByteRange::parse("bytes=0-99"),
            Ok(ByteRange::From {
                start: 0,
                end: Some(99)
            })
        );
        assert_eq!(ByteRange::parse("bytes=-5"), Ok(ByteRange::Suffix(5)));
        for bad in [
            "",
            "bytes=",
            "bytes=-",
            "items=0-1",
            "bytes=5-4",
            "bytes=a-",
            "bytes=0-1,3-4",
            "bytes=+1-",
            "bytes=99999999999999999999999-",
        ] {
            assert_eq!(ByteRange::parse(bad), Err(RangeError::Malformed), "{bad}");
        }
    }

    #[test]
    fn upload_chunk_ranges() {
        assert_eq!(upload_chunk_range("0-99"), Some((0, 99)));
        assert_eq!(upload_chunk_range("bytes 100-199/*"), Some((100, 199)));
        assert_eq!(upload_chunk_range("bytes 5-5/10"), Some((5, 5)));
        for bad in ["", "5", "-5", "5-", "9-3", "a-b", "bytes=0-1", "0-1-2"] {
            assert_eq!(upload_chunk_range(bad), None, "{bad}");
        }
    }

    #[test]
    fn resolves() {
        let r = |s: &str| ByteRange::parse(s).unwrap();
        assert_eq!(r("bytes=0-").resolve(10), Ok((0, 9)));
        assert_eq!(r("bytes=9-").resolve(10), Ok((9, 9)));
        assert_eq!(r("bytes=2-100").resolve(10), Ok((2, 9)));
        assert_eq!(r("bytes=-3").resolve(10), Ok((7, 9)));
        assert_eq!(r("bytes=-30").resolve(10), Ok((0, 9)));
        assert_eq!(r("bytes=10-").resolve(10), Err(RangeError::Unsatisfiable));
        assert_eq!(r("bytes=0-").resolve(0), Err(RangeError::Unsatisfiable));
        assert_eq!(r("bytes=-0").resolve(10), Err(RangeError::Unsatisfiable));
    }
}
