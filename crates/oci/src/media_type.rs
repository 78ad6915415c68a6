//! Manifest media types.

pub const DOCKER_MANIFEST_V2: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST_V1_SIGNED: &str =
    "application/vnd.docker.distribution.manifest.v1+prettyjws";

/// The manifest media types pier knows, in the order pier lists them to an upstream (lists before
/// single manifests, so that a multi-platform client is offered the index first).
const KNOWN: [&str; 5] = [
    OCI_INDEX,
    DOCKER_MANIFEST_LIST,
    OCI_MANIFEST,
    DOCKER_MANIFEST_V2,
    DOCKER_MANIFEST_V1_SIGNED,
];

/// What pier asks an upstream for when the client named no manifest type: every manifest type a
/// current runtime understands.
pub const DEFAULT_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.v2+json";

/// The `Accept` to send upstream for a header value: the value itself when it names a manifest
/// type, else [`DEFAULT_ACCEPT`]. pier's own requests send [`AcceptSet::header`], which always
/// names one.
pub fn upstream_accept(accept: &str) -> &str {
    if accept
        .split(',')
        .any(|p| p.trim().starts_with("application/vnd."))
    {
        accept
    } else {
        DEFAULT_ACCEPT
    }
}

/// The manifest media types a client accepts: what an upstream negotiates on, and so the key
/// under which pier keeps the upstream's answer for a tag.
///
/// Two clients with the same set get the same answer from a registry that negotiates like Docker
/// Hub or the Distribution registry (an index for clients that take one, the linux/amd64 single
/// manifest for those that do not); two clients with different sets may not. pier sends an
/// upstream the set, never the client's raw header, so one upstream request serves every client
/// of the set. A header that names no manifest type pier knows (empty, `*/*`, `application/json`)
/// counts as [`AcceptSet::MODERN`]: a bare `*/*` would make Distribution 2.x fall back to schema 1
/// or answer an OCI manifest with 404.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AcceptSet(u8);

impl AcceptSet {
    /// Image indexes, manifest lists and single manifests, OCI and Docker: what current runtimes
    /// accept.
    pub const MODERN: AcceptSet = AcceptSet(0b0_1111);
    /// Every manifest type pier knows, schema 1 included: for requests by digest, where no
    /// negotiation happens.
    pub const ALL: AcceptSet = AcceptSet(0b1_1111);

    /// The set a request's `Accept` header values (all of them, joined with `,`) name.
    ///
    /// As the Distribution registry reads it: a type counts when it is named; a wildcard
    /// (`*/*`, `application/*`) does not add types to those named (`v2, */*` is a client of
    /// single manifests). A header that names no type pier knows counts as [`AcceptSet::MODERN`].
    /// Types refused with `q=0` are left out in every case.
    pub fn from_header(accept: &str) -> AcceptSet {
        let (mut named, mut refused) = (0u8, 0u8);
        for part in accept.split(',') {
            let mut params = part.split(';');
            let t = params.next().unwrap_or("").trim();
            let Some(i) = KNOWN.iter().position(|k| k.eq_ignore_ascii_case(t)) else {
                continue;
            };
            let q0 = params.any(|p| {
                p.trim()
                    .strip_prefix("q=")
                    .and_then(|q| q.trim().parse::<f32>().ok())
                    .is_some_and(|q| q <= 0.0)
            });
            if q0 {
                refused |= 1 << i;
            } else {
                named |= 1 << i;
            }
        }
        let bits = match named & !refused {
            0 => Self::MODERN.0 & !refused,
            bits => bits,
        };
        // Everything pier knows refused: ask for what a runtime would (the upstream decides).
        AcceptSet(if bits == 0 { Self::MODERN.0 } else { bits })
    }

    /// Rebuilds a set from [`AcceptSet::bits`]; `None` for bits pier does not know.
    pub fn from_bits(bits: u8) -> Option<AcceptSet> {
        (bits != 0 && bits & !Self::ALL.0 == 0).then_some(AcceptSet(bits))
    }

    /// The set as a number, for keys and records.
    pub fn bits(self) -> u8 {
        self.0
    }

    /// Whether a manifest of `media_type` is acceptable to a client of this set.
    pub fn accepts(self, media_type: &str) -> bool {
        KNOWN
            .iter()
            .position(|k| k.eq_ignore_ascii_case(media_type))
            .is_some_and(|i| self.0 & (1 << i) != 0)
    }

    /// Whether the set takes an image index or a manifest list: if not, a negotiating registry
    /// answers a multi-platform tag with one platform's manifest.
    pub fn takes_index(self) -> bool {
        self.accepts(OCI_INDEX) || self.accepts(DOCKER_MANIFEST_LIST)
    }

    /// The media types of the set, in the order pier offers them.
    pub fn types(self) -> impl Iterator<Item = &'static str> {
        KNOWN
            .iter()
            .enumerate()
            .filter(move |(i, _)| self.0 & (1 << i) != 0)
            .map(|(_, t)| *t)
    }

    /// The `Accept` header pier sends an upstream for this set.
    pub fn header(self) -> String {
        self.types().collect::<Vec<_>>().join(", ")
    }
}

impl std::fmt::Display for AcceptSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.header())
    }
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
    fn accept_sets() {
        let modern = AcceptSet::from_header("");
        assert_eq!(modern, AcceptSet::MODERN);
        assert_eq!(AcceptSet::from_header("*/*"), AcceptSet::MODERN);
        assert_eq!(
            AcceptSet::from_header("application/json, */*"),
            AcceptSet::MODERN
        );
        assert_eq!(AcceptSet::from_header(DEFAULT_ACCEPT), AcceptSet::MODERN);
        assert_eq!(AcceptSet::MODERN.header(), DEFAULT_ACCEPT);
        let single = AcceptSet::from_header(&format!("{DOCKER_MANIFEST_V2}; q=0.5"));
        assert!(single.accepts(DOCKER_MANIFEST_V2));
        assert!(!single.accepts(OCI_INDEX) && !single.takes_index());
        assert_eq!(single.header(), DOCKER_MANIFEST_V2);
        // Docker sends one header per type; they arrive joined, in any order.
        let docker = AcceptSet::from_header(&format!(
            "{DOCKER_MANIFEST_V2}, {DOCKER_MANIFEST_LIST}, {OCI_MANIFEST}, {OCI_INDEX}"
        ));
        assert_eq!(docker, AcceptSet::MODERN);
        // q=0 refuses a type, also next to a wildcard or alone.
        let no_index = AcceptSet::from_header(&format!("{OCI_INDEX};q=0, {OCI_MANIFEST}"));
        assert!(!no_index.takes_index() && no_index.accepts(OCI_MANIFEST));
        for h in [
            format!("*/*, {OCI_INDEX};q=0, {DOCKER_MANIFEST_LIST};q=0"),
            format!("{OCI_INDEX};q=0, {DOCKER_MANIFEST_LIST};q=0"),
            format!("application/*, {OCI_INDEX}; q=0, {DOCKER_MANIFEST_LIST}; q=0.0"),
        ] {
            let set = AcceptSet::from_header(&h);
            assert!(!set.takes_index(), "{h}");
            assert!(
                set.accepts(OCI_MANIFEST) && set.accepts(DOCKER_MANIFEST_V2),
                "{h}"
            );
        }
        // A wildcard next to a named type adds nothing (as Distribution reads it).
        assert_eq!(
            AcceptSet::from_header(&format!("{DOCKER_MANIFEST_V2}, */*")),
            single
        );
        // Only unknown types: what a runtime would take.
        assert_eq!(
            AcceptSet::from_header("application/vnd.example+json"),
            AcceptSet::MODERN
        );
        assert!(!AcceptSet::MODERN.accepts(DOCKER_MANIFEST_V1_SIGNED));
        assert!(AcceptSet::ALL.accepts(DOCKER_MANIFEST_V1_SIGNED));
        assert!(!modern.accepts("application/vnd.example+json"));
        assert_eq!(AcceptSet::from_bits(single.bits()), Some(single));
        assert_eq!(AcceptSet::from_bits(0), None);
        assert_eq!(AcceptSet::from_bits(0x80), None);
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
