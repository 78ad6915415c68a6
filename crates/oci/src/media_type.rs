//! Manifest media types.

pub const DOCKER_MANIFEST_V2: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST_V1_SIGNED: &str =
    "application/vnd.docker.distribution.manifest.v1+prettyjws";

/// What pier asks an upstream for when the client sent no `Accept`: every manifest type a
/// current runtime understands.
pub const DEFAULT_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.v2+json";

/// The `Accept` to send upstream for a client's: the client's own when it names a manifest type,
/// else [`DEFAULT_ACCEPT`]. A bare `*/*` would make some registries (Distribution 2.x) answer an
/// OCI manifest with 404, as they fall back to schema 1 for clients that name no type.
pub fn upstream_accept(client_accept: &str) -> &str {
    let names_manifest_type = client_accept
        .split(',')
        .map(|part| part.split(';').next().unwrap_or("").trim())
        .any(|t| t.starts_with("application/vnd."));
    if names_manifest_type {
        client_accept
    } else {
        DEFAULT_ACCEPT
    }
}

/// Whether a client's `Accept` header value admits `media_type`. An empty header, `*/*` and
/// `application/*` admit everything.
pub fn accepts(accept: &str, media_type: &str) -> bool {
    if accept.trim().is_empty() {
        return true;
    }
    accept
        .split(',')
        .map(|part| part.split(';').next().unwrap_or("").trim())
        .any(|t| t == media_type || t == "*/*" || t == "application/*")
}

/// The media type a manifest document declares in its `mediaType` field, if any.
pub fn declared(manifest: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Probe {
        #[serde(rename = "mediaType")]
        media_type: Option<String>,
    }
    serde_json::from_slice::<Probe>(manifest).ok()?.media_type
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_matching() {
        assert!(accepts("", OCI_INDEX));
        assert!(accepts("*/*", OCI_INDEX));
        assert!(accepts(DEFAULT_ACCEPT, OCI_INDEX));
        assert!(accepts(
            &format!("{DOCKER_MANIFEST_V2}; q=0.5"),
            DOCKER_MANIFEST_V2
        ));
        assert!(!accepts(DOCKER_MANIFEST_V2, OCI_INDEX));
    }

    #[test]
    fn upstream_accept_fills_in_for_vague_clients() {
        assert_eq!(upstream_accept(""), DEFAULT_ACCEPT);
        assert_eq!(upstream_accept("*/*"), DEFAULT_ACCEPT);
        assert_eq!(upstream_accept("application/json, */*"), DEFAULT_ACCEPT);
        assert_eq!(upstream_accept(DOCKER_MANIFEST_V2), DOCKER_MANIFEST_V2);
    }

    #[test]
    fn declared_media_type() {
        assert_eq!(
            declared(
                br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json"}"#
            )
            .as_deref(),
            Some(OCI_INDEX)
        );
        assert_eq!(declared(br#"{"schemaVersion":2}"#), None);
        assert_eq!(declared(b"not json"), None);
    }
}
