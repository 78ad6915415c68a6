//! Reading what the upstream sent: headers into values, statuses into errors. Pure functions, so
//! every quirk of a registry's answers is decided (and tested) here and nowhere else.

use pier_oci::Digest;
use reqwest::header::{self, HeaderMap, HeaderValue};
use reqwest::StatusCode;

use crate::error::UpstreamError;

/// The error an answer's status stands for, or `Ok` for a 2xx.
pub(crate) fn check_status(status: StatusCode, headers: &HeaderMap) -> Result<(), UpstreamError> {
    match status {
        s if s.is_success() => Ok(()),
        StatusCode::NOT_FOUND => Err(UpstreamError::NotFound),
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Err(UpstreamError::Unauthorized(
            format!("HTTP {}", status.as_u16()),
        )),
        StatusCode::TOO_MANY_REQUESTS => Err(UpstreamError::RateLimited {
            retry_after: retry_after(headers),
        }),
        s => Err(UpstreamError::Status(s.as_u16())),
    }
}

/// `Retry-After` in seconds; the HTTP-date form is ignored (no registry sends it).
fn retry_after(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The media type of `Content-Type`, without parameters; `None` when absent or empty.
pub(crate) fn content_type(headers: &HeaderMap) -> Option<String> {
    let v = headers.get(header::CONTENT_TYPE)?.to_str().ok()?;
    let t = v.split(';').next()?.trim();
    (!t.is_empty()).then(|| t.to_string())
}

/// Docker Hub's `ratelimit-remaining: 76;w=21600` → 76.
pub(crate) fn rate_limit_remaining(headers: &HeaderMap) -> Option<u64> {
    let v = headers.get("ratelimit-remaining")?.to_str().ok()?;
    v.split(';').next()?.trim().parse().ok()
}

/// The `Content-Length` header itself: reqwest's `content_length()` reports the (empty) body of
/// a HEAD response, not the header.
pub(crate) fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// `Docker-Content-Digest`, when present and a valid digest.
pub(crate) fn header_digest(headers: &HeaderMap) -> Option<Digest> {
    headers
        .get("docker-content-digest")?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// `Content-Range: bytes start-end/total` → (start, total); `total` is `None` for `*`.
pub(crate) fn parse_content_range(headers: &HeaderMap) -> Option<(u64, Option<u64>)> {
    let v = headers.get(header::CONTENT_RANGE)?.to_str().ok()?;
    let spec = v.trim().strip_prefix("bytes ")?;
    let (range, total) = spec.split_once('/')?;
    let (start, _end) = range.split_once('-')?;
    let total = if total == "*" {
        None
    } else {
        Some(total.parse().ok()?)
    };
    Some((start.parse().ok()?, total))
}

/// The `Accept` to send upstream for a client's `Accept`.
/// The target of `Link: <target>; rel="next"` (RFC 8288; several links may share the header).
pub(crate) fn next_link(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::LINK)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .find_map(|link| {
            let (target, params) = link.trim().strip_prefix('<')?.split_once('>')?;
            params
                .split(';')
                .any(|p| {
                    let p = p.trim().replace(' ', "");
                    p == "rel=\"next\"" || p == "rel=next"
                })
                .then(|| target.to_string())
        })
}

pub(crate) fn accept_value(accept: &str) -> HeaderValue {
    let accept = pier_oci::media_type::upstream_accept(accept);
    HeaderValue::from_str(accept)
        .unwrap_or_else(|_| HeaderValue::from_static(pier_oci::media_type::DEFAULT_ACCEPT))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_page_link() {
        let mut h = HeaderMap::new();
        assert_eq!(next_link(&h), None);
        h.insert(
            header::LINK,
            HeaderValue::from_static(r#"</v2/a/tags/list?n=2&next_page=T0K>; rel="next""#),
        );
        assert_eq!(
            next_link(&h).as_deref(),
            Some("/v2/a/tags/list?n=2&next_page=T0K")
        );
        h.insert(
            header::LINK,
            HeaderValue::from_static(r#"</v2/a/tags/list?last=x>; rel="prev""#),
        );
        assert_eq!(next_link(&h), None);
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn content_range() {
        let range = |v| parse_content_range(&headers(&[("content-range", v)]));
        assert_eq!(range("bytes 100-199/1000"), Some((100, Some(1000))));
        assert_eq!(range("bytes 5-9/*"), Some((5, None)));
        assert_eq!(range(" bytes 0-0/1"), Some((0, Some(1))));
        for bad in [
            "garbage",
            "bytes */1000",
            "bytes a-9/10",
            "bytes 0-9/x",
            "bytes 0-9",
            "items 0-9/10",
        ] {
            assert_eq!(range(bad), None, "{bad}");
        }
        assert_eq!(parse_content_range(&HeaderMap::new()), None);
    }

    #[test]
    fn rate_limit_header() {
        assert_eq!(rate_limit_remaining(&HeaderMap::new()), None);
        let h = headers(&[("ratelimit-remaining", "76;w=21600")]);
        assert_eq!(rate_limit_remaining(&h), Some(76));
        let h = headers(&[("ratelimit-remaining", " 0 ")]);
        assert_eq!(rate_limit_remaining(&h), Some(0));
        let h = headers(&[("ratelimit-remaining", "lots")]);
        assert_eq!(rate_limit_remaining(&h), None);
    }

    #[test]
    fn content_type_drops_parameters() {
        let h = headers(&[("content-type", "application/json; charset=utf-8")]);
        assert_eq!(content_type(&h).as_deref(), Some("application/json"));
        assert_eq!(content_type(&headers(&[("content-type", " ; x=y")])), None);
        assert_eq!(content_type(&HeaderMap::new()), None);
    }

    #[test]
    fn content_length_is_the_header() {
        assert_eq!(
            content_length(&headers(&[("content-length", "1234")])),
            Some(1234)
        );
        assert_eq!(content_length(&headers(&[("content-length", "-1")])), None);
        assert_eq!(content_length(&HeaderMap::new()), None);
    }

    #[test]
    fn digest_header_must_be_a_digest() {
        let good = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        let h = headers(&[("docker-content-digest", good)]);
        assert_eq!(
            header_digest(&h).map(|d| d.to_string()).as_deref(),
            Some(good)
        );
        let h = headers(&[("docker-content-digest", "sha256:nothex")]);
        assert!(header_digest(&h).is_none());
        assert!(header_digest(&HeaderMap::new()).is_none());
    }

    #[test]
    fn statuses_map_to_errors() {
        let none = HeaderMap::new();
        assert!(check_status(StatusCode::OK, &none).is_ok());
        assert!(check_status(StatusCode::PARTIAL_CONTENT, &none).is_ok());
        assert!(matches!(
            check_status(StatusCode::NOT_FOUND, &none),
            Err(UpstreamError::NotFound)
        ));
        for s in [StatusCode::UNAUTHORIZED, StatusCode::FORBIDDEN] {
            assert!(matches!(
                check_status(s, &none),
                Err(UpstreamError::Unauthorized(_))
            ));
        }
        assert!(matches!(
            check_status(
                StatusCode::TOO_MANY_REQUESTS,
                &headers(&[("retry-after", "42")])
            ),
            Err(UpstreamError::RateLimited {
                retry_after: Some(42)
            })
        ));
        assert!(matches!(
            check_status(StatusCode::TOO_MANY_REQUESTS, &none),
            Err(UpstreamError::RateLimited { retry_after: None })
        ));
        let e = check_status(StatusCode::BAD_GATEWAY, &none).unwrap_err();
        assert!(matches!(e, UpstreamError::Status(502)) && e.is_outage());
        let e = check_status(StatusCode::IM_A_TEAPOT, &none).unwrap_err();
        assert!(matches!(e, UpstreamError::Status(418)) && !e.is_outage());
    }
}
