//! The registry v2 / OCI distribution protocol as plain types: repository names, references (tags and
//! digests), media types, byte ranges, request paths and the registry's JSON error format.
//!
//! Nothing here does I/O. Every parser rejects what the distribution-spec grammar does not allow, so
//! a value of these types is safe to use as part of a file name or an upstream URL.

pub mod digest;
pub mod error;
pub mod manifest;
pub mod media_type;
pub mod name;
pub mod path;
pub mod query;
pub mod range;
pub mod reference;

pub use digest::{Algorithm, Digest, DigestError, Hasher};
pub use error::{ErrorCode, RegistryError};
pub use manifest::{Descriptor, Platform, References};
pub use media_type::AcceptSet;
pub use name::{NameError, RepositoryName};
pub use path::{valid_session_id, Endpoint, PathError};
pub use query::Query;
pub use range::{upload_chunk_range, ByteRange, RangeError};
pub use reference::{Reference, Tag};
