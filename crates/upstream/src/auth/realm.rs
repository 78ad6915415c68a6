//! Which token realms pier asks for tokens, and which of them may see the upstream's credentials.
//!
//! The realm comes from the upstream's `WWW-Authenticate`, that is from whoever answered on the
//! upstream's address. Credentials sent to it as Basic are readable by anyone on the path unless
//! the realm is https, so they only go to an https realm (any host: TLS proves who gets them, and
//! registries commonly put their token service on another host) or to the very origin the
//! credentials were configured for.

use reqwest::Url;

use crate::error::UpstreamError;

/// The realm as a URL to ask for a token, if pier may ask it; `with_credentials` says whether the
/// request would carry the configured credentials.
pub(crate) fn token_endpoint(
    realm: &str,
    upstream: &Url,
    with_credentials: bool,
) -> Result<Url, UpstreamError> {
    let url = Url::parse(realm)
        .map_err(|_| UpstreamError::Invalid("challenge realm is not a URL".into()))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(UpstreamError::Invalid(
            "challenge realm is not an http(s) URL".into(),
        ));
    }
    if with_credentials && !may_receive_credentials(&url, upstream) {
        return Err(UpstreamError::InsecureRealm {
            realm: realm.to_string(),
        });
    }
    Ok(url)
}

/// Whether the upstream's credentials may be sent to `realm`: https anywhere, or plain http on
/// the upstream's own origin (scheme, host and port; a loopback alias is another host).
pub(crate) fn may_receive_credentials(realm: &Url, upstream: &Url) -> bool {
    realm.scheme() == "https" || realm.origin() == upstream.origin()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(s: &str) -> Url {
        Url::parse(s).unwrap()
    }

    #[test]
    fn https_realms_on_any_host_get_credentials() {
        for upstream in ["https://registry.example", "http://127.0.0.1:5000"] {
            let upstream = url(upstream);
            for realm in [
                "https://auth.docker.io/token",
                "https://registry.example/token",
                "https://127.0.0.2:8443/token",
            ] {
                assert!(
                    token_endpoint(realm, &upstream, true).is_ok(),
                    "{realm} for {upstream}"
                );
            }
        }
    }

    #[test]
    fn plain_http_realms_get_credentials_only_on_the_upstreams_origin() {
        let upstream = url("http://127.0.0.1:5000");
        for ok in [
            "http://127.0.0.1:5000/token",
            "http://127.0.0.1:5000/auth/token?x=y",
        ] {
            assert!(token_endpoint(ok, &upstream, true).is_ok(), "{ok}");
        }
        for refused in [
            "http://127.0.0.2:5000/token",
            "http://localhost:5000/token",
            "http://127.0.0.1:5001/token",
            "http://127.0.0.1/token",
            "http://evil.example/token",
        ] {
            match token_endpoint(refused, &upstream, true) {
                Err(UpstreamError::InsecureRealm { realm }) => assert_eq!(realm, refused),
                other => panic!("{refused}: {other:?}"),
            }
        }
        // Default ports count as the port they stand for.
        let upstream = url("http://registry.example");
        assert!(token_endpoint("http://registry.example:80/token", &upstream, true).is_ok());
        // An https upstream's credentials never go down to plain http, even on its own host.
        let upstream = url("https://registry.example");
        assert!(matches!(
            token_endpoint("http://registry.example/token", &upstream, true),
            Err(UpstreamError::InsecureRealm { .. })
        ));
    }

    #[test]
    fn anonymous_token_requests_may_go_to_any_http_realm() {
        let upstream = url("https://registry.example");
        for realm in [
            "http://evil.example/token",
            "http://127.0.0.2:1234/token",
            "https://auth.docker.io/token",
        ] {
            assert!(token_endpoint(realm, &upstream, false).is_ok(), "{realm}");
        }
    }

    #[test]
    fn realms_that_are_not_http_urls_are_invalid() {
        let upstream = url("https://registry.example");
        for realm in [
            "",
            "/token",
            "ftp://registry.example/token",
            "file:///etc/passwd",
        ] {
            for creds in [true, false] {
                assert!(
                    matches!(
                        token_endpoint(realm, &upstream, creds),
                        Err(UpstreamError::Invalid(_))
                    ),
                    "{realm:?}"
                );
            }
        }
    }
}
