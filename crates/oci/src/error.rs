//! The registry's JSON error format: `{"errors":[{"code":"...","message":"...","detail":...}]}`.

/// An error code of the distribution-spec, with the HTTP status pier answers it with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorCode {
    NameInvalid,
    NameUnknown,
    DigestInvalid,
    ManifestUnknown,
    ManifestInvalid,
    BlobUnknown,
    /// An upload session that does not exist (never did, finished, cancelled or expired).
    BlobUploadUnknown,
    /// An upload that cannot go on as sent (a chunk's length not matching its range, say).
    BlobUploadInvalid,
    /// A pushed manifest names a blob or manifest its repository does not hold.
    ManifestBlobUnknown,
    /// A body larger than pier takes, or a size that does not match.
    SizeInvalid,
    Unauthorized,
    Denied,
    TooManyRequests,
    Unsupported,
    RangeInvalid,
    /// The upstream could not be reached or answered with a server error (502/504 territory).
    Unavailable,
    /// Something failed inside pier (its disk, say).
    Unknown,
}

impl ErrorCode {
    /// The code as it appears in the JSON body.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::NameInvalid => "NAME_INVALID",
            ErrorCode::NameUnknown => "NAME_UNKNOWN",
            ErrorCode::DigestInvalid => "DIGEST_INVALID",
            ErrorCode::ManifestUnknown => "MANIFEST_UNKNOWN",
            ErrorCode::ManifestInvalid => "MANIFEST_INVALID",
            ErrorCode::BlobUnknown => "BLOB_UNKNOWN",
            ErrorCode::BlobUploadUnknown => "BLOB_UPLOAD_UNKNOWN",
            ErrorCode::BlobUploadInvalid => "BLOB_UPLOAD_INVALID",
            ErrorCode::ManifestBlobUnknown => "MANIFEST_BLOB_UNKNOWN",
            ErrorCode::SizeInvalid => "SIZE_INVALID",
            ErrorCode::Unauthorized => "UNAUTHORIZED",
            ErrorCode::Denied => "DENIED",
            ErrorCode::TooManyRequests => "TOOMANYREQUESTS",
            ErrorCode::Unsupported => "UNSUPPORTED",
            ErrorCode::RangeInvalid => "RANGE_INVALID",
            ErrorCode::Unavailable => "UNAVAILABLE",
            ErrorCode::Unknown => "UNKNOWN",
        }
    }

    /// The HTTP status for this code.
    pub fn status(self) -> u16 {
        match self {
            ErrorCode::NameInvalid
            | ErrorCode::DigestInvalid
            | ErrorCode::ManifestInvalid
            | ErrorCode::BlobUploadInvalid
            | ErrorCode::ManifestBlobUnknown
            | ErrorCode::SizeInvalid => 400,
            ErrorCode::NameUnknown
            | ErrorCode::ManifestUnknown
            | ErrorCode::BlobUnknown
            | ErrorCode::BlobUploadUnknown => 404,
            ErrorCode::Unauthorized => 401,
            ErrorCode::Denied => 403,
            ErrorCode::TooManyRequests => 429,
            ErrorCode::Unsupported => 405,
            ErrorCode::RangeInvalid => 416,
            ErrorCode::Unavailable => 502,
            ErrorCode::Unknown => 500,
        }
    }
}

/// One error, ready to be answered to a client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegistryError {
    pub code: ErrorCode,
    pub message: String,
    /// HTTP status; usually `code.status()`, but e.g. a HEAD 405 or a 504 differ.
    pub status: u16,
    /// Seconds for `Retry-After`, on TOOMANYREQUESTS.
    pub retry_after: Option<u64>,
}

impl RegistryError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        RegistryError {
            code,
            message: message.into(),
            status: code.status(),
            retry_after: None,
        }
    }

    pub fn with_status(mut self, status: u16) -> Self {
        self.status = status;
        self
    }

    pub fn with_retry_after(mut self, secs: Option<u64>) -> Self {
        self.retry_after = secs;
        self
    }

    /// The JSON body.
    pub fn to_json(&self) -> String {
        serde_json::json!({
            "errors": [{ "code": self.code.as_str(), "message": self.message, "detail": null }]
        })
        .to_string()
    }
}

impl std::fmt::Display for RegistryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code.as_str(), self.message)
    }
}

impl std::error::Error for RegistryError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_body() {
        let e = RegistryError::new(ErrorCode::NameInvalid, "bad \"name\"");
        let v: serde_json::Value = serde_json::from_str(&e.to_json()).unwrap();
        assert_eq!(v["errors"][0]["code"], "NAME_INVALID");
        assert_eq!(v["errors"][0]["message"], "bad \"name\"");
        assert_eq!(e.status, 400);
        assert_eq!(RegistryError::new(ErrorCode::BlobUnknown, "").status, 404);
    }
}
