//! Request paths of the distribution API, split into what they address.
//!
//! Paths are taken raw, never percent-decoded: an encoded `/` or `.` stays a `%` and fails the
//! name grammar later, so it cannot address anything.

use crate::digest::{Digest, DigestError};
use crate::reference::{Reference, ReferenceError};

/// Longest request path considered at all.
pub const MAX_PATH_LEN: usize = 1024;

/// What a `/v2/...` path addresses. `name` is still raw: the server decides which upstream it is
/// for (a registry host may lead it) before checking it as a [`crate::RepositoryName`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// `/v2/`
    Base,
    /// `/v2/_catalog`
    Catalog,
    /// `/v2/<name>/manifests/<reference>`
    Manifest { name: String, reference: Reference },
    /// `/v2/<name>/blobs/<digest>`
    Blob { name: String, digest: Digest },
    /// `/v2/<name>/tags/list`
    TagsList { name: String },
    /// `/v2/<name>/referrers/<digest>`: the manifests whose `subject` is that digest (OCI 1.1).
    Referrers { name: String, digest: Digest },
    /// `/v2/<name>/blobs/uploads/` (start an upload) or `/v2/<name>/blobs/uploads/<session>`
    /// (one under way). A session id is `[A-Za-z0-9_-]{1,64}`, safe as a file name.
    Upload {
        name: String,
        session: Option<String>,
    },
}

/// Why a path addresses nothing pier serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathError {
    /// Not under `/v2/`, or no known endpoint.
    NotFound,
    TooLong,
    BadReference(ReferenceError),
    BadDigest(DigestError),
    /// An upload session id outside its grammar: no such session can exist.
    BadSession,
}

/// Longest upload session id.
pub const MAX_SESSION_LEN: usize = 64;

/// Whether `id` can be an upload session id: `[A-Za-z0-9_-]{1,64}`.
pub fn valid_session_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_SESSION_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl Endpoint {
    /// Splits a request path (without query).
    pub fn parse(path: &str) -> Result<Endpoint, PathError> {
        if path.len() > MAX_PATH_LEN {
            return Err(PathError::TooLong);
        }
        let rest = match path {
            "/v2" | "/v2/" => return Ok(Endpoint::Base),
            "/v2/_catalog" => return Ok(Endpoint::Catalog),
            _ => path.strip_prefix("/v2/").ok_or(PathError::NotFound)?,
        };
        if let Some(name) = rest.strip_suffix("/tags/list") {
            return Ok(Endpoint::TagsList { name: name.into() });
        }
        if let Some(name) = rest
            .strip_suffix("/blobs/uploads/")
            .or_else(|| rest.strip_suffix("/blobs/uploads"))
        {
            return Ok(Endpoint::Upload {
                name: name.into(),
                session: None,
            });
        }
        // The usual shape, `<name>/<kind>/<last>`, found from its last two slashes (every pull
        // parses one). A name may itself have a component called "manifests", "blobs" or
        // "referrers": the kind is the component right before the last.
        if let Some((name, kind, last)) = rest
            .rsplit_once('/')
            .and_then(|(head, last)| head.rsplit_once('/').map(|(n, k)| (n, k, last)))
        {
            match kind {
                "manifests" => {
                    let reference = Reference::parse(last).map_err(PathError::BadReference)?;
                    return Ok(Endpoint::Manifest {
                        name: name.into(),
                        reference,
                    });
                }
                "blobs" => {
                    let digest = last.parse().map_err(PathError::BadDigest)?;
                    return Ok(Endpoint::Blob {
                        name: name.into(),
                        digest,
                    });
                }
                "referrers" => {
                    let digest = last.parse().map_err(PathError::BadDigest)?;
                    return Ok(Endpoint::Referrers {
                        name: name.into(),
                        digest,
                    });
                }
                _ => {}
            }
        }
        if let Some((name, session)) = rest.rsplit_once("/blobs/uploads/") {
            if !valid_session_id(session) {
                return Err(PathError::BadSession);
            }
            return Ok(Endpoint::Upload {
                name: name.into(),
                session: Some(session.into()),
            });
        }
        // What is left has a slash after its kind: a reference or digest with a slash, refused
        // as a bad one (split at the last kind, as a name may contain another).
        if let Some((name, digest)) = rest
            .rsplit_once("/referrers/")
            .filter(|(_, d)| !d.contains('/'))
        {
            let digest = digest.parse().map_err(PathError::BadDigest)?;
            return Ok(Endpoint::Referrers {
                name: name.into(),
                digest,
            });
        }
        if let Some((name, reference)) = rest.rsplit_once("/manifests/") {
            let reference = Reference::parse(reference).map_err(PathError::BadReference)?;
            return Ok(Endpoint::Manifest {
                name: name.into(),
                reference,
            });
        }
        if let Some((name, digest)) = rest.rsplit_once("/blobs/") {
            let digest = digest.parse().map_err(PathError::BadDigest)?;
            return Ok(Endpoint::Blob {
                name: name.into(),
                digest,
            });
        }
        Err(PathError::NotFound)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        assert_eq!(Endpoint::parse("/v2/"), Ok(Endpoint::Base));
        assert_eq!(Endpoint::parse("/v2"), Ok(Endpoint::Base));
        assert_eq!(Endpoint::parse("/v2/_catalog"), Ok(Endpoint::Catalog));
        match Endpoint::parse("/v2/library/nginx/manifests/latest").unwrap() {
            Endpoint::Manifest { name, reference } => {
                assert_eq!(name, "library/nginx");
                assert_eq!(reference.to_string(), "latest");
            }
            e => panic!("{e:?}"),
        }
        let d = format!("sha256:{}", "a".repeat(64));
        match Endpoint::parse(&format!("/v2/a/blobs/x/blobs/{d}")).unwrap() {
            Endpoint::Blob { name, digest } => {
                assert_eq!(name, "a/blobs/x");
                assert_eq!(digest.to_string(), d);
            }
            e => panic!("{e:?}"),
        }
        assert_eq!(
            Endpoint::parse("/v2/ghcr.io/org/app/tags/list"),
            Ok(Endpoint::TagsList {
                name: "ghcr.io/org/app".into()
            })
        );
        assert_eq!(
            Endpoint::parse("/v2/a/blobs/uploads/"),
            Ok(Endpoint::Upload {
                name: "a".into(),
                session: None
            })
        );
        assert_eq!(
            Endpoint::parse("/v2/team/app/blobs/uploads/0f-A_9"),
            Ok(Endpoint::Upload {
                name: "team/app".into(),
                session: Some("0f-A_9".into())
            })
        );
        for bad in ["..", "a/b", "a%2fb", &"x".repeat(65)] {
            assert_eq!(
                Endpoint::parse(&format!("/v2/a/blobs/uploads/{bad}")),
                Err(PathError::BadSession),
                "{bad}"
            );
        }
        assert_eq!(
            Endpoint::parse(&format!("/v2/org/app/referrers/{d}")),
            Ok(Endpoint::Referrers {
                name: "org/app".into(),
                digest: d.parse().unwrap()
            })
        );
        // A repository may be called "referrers", or have a component called "manifests".
        match Endpoint::parse(&format!("/v2/a/manifests/b/blobs/{d}")).unwrap() {
            Endpoint::Blob { name, .. } => assert_eq!(name, "a/manifests/b"),
            e => panic!("{e:?}"),
        }
        match Endpoint::parse("/v2/a/blobs/b/manifests/latest").unwrap() {
            Endpoint::Manifest { name, .. } => assert_eq!(name, "a/blobs/b"),
            e => panic!("{e:?}"),
        }
        assert!(matches!(
            Endpoint::parse("/v2/a/referrers/x/manifests/latest"),
            Ok(Endpoint::Manifest { .. })
        ));
        assert!(matches!(
            Endpoint::parse("/v2/a/referrers/sha256:zz"),
            Err(PathError::BadDigest(_))
        ));
    }

    #[test]
    fn rejects() {
        assert_eq!(Endpoint::parse("/v1/"), Err(PathError::NotFound));
        assert_eq!(Endpoint::parse("/v2/a/other/x"), Err(PathError::NotFound));
        assert!(matches!(
            Endpoint::parse("/v2/a/blobs/sha256:zz"),
            Err(PathError::BadDigest(_))
        ));
        assert!(matches!(
            Endpoint::parse("/v2/a/manifests/..%2f"),
            Err(PathError::BadReference(_))
        ));
        assert_eq!(
            Endpoint::parse(&format!("/v2/{}", "a/".repeat(600))),
            Err(PathError::TooLong)
        );
    }
}
