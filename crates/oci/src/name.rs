//! Repository names, checked against the distribution-spec grammar.

use std::fmt;

/// Longest repository name accepted, as the distribution-spec recommends.
pub const MAX_NAME_LEN: usize = 255;

/// A repository name such as `library/nginx` or `org/team/app`.
///
/// Valid names are lower-case alphanumeric components separated by `/`, each component made of
/// alphanumeric runs joined by `.`, `_`, `__` or runs of `-`. So a name never holds `..`, an empty
/// component, upper case or any byte outside `[a-z0-9._/-]`, and is safe inside a file path.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RepositoryName(Box<str>);

/// Why a repository name was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NameError {
    Empty,
    TooLong(usize),
    /// The component at this index does not match the grammar.
    BadComponent(usize),
}

impl fmt::Display for NameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NameError::Empty => f.write_str("repository name is empty"),
            NameError::TooLong(n) => {
                write!(
                    f,
                    "repository name is {n} bytes long; at most {MAX_NAME_LEN} allowed"
                )
            }
            NameError::BadComponent(i) => write!(
                f,
                "repository name component {} does not match [a-z0-9]+((\\.|_|__|-+)[a-z0-9]+)*",
                i + 1
            ),
        }
    }
}

impl std::error::Error for NameError {}

impl RepositoryName {
    /// Parses and validates a name.
    pub fn parse(s: &str) -> Result<Self, NameError> {
        if s.is_empty() {
            return Err(NameError::Empty);
        }
        if s.len() > MAX_NAME_LEN {
            return Err(NameError::TooLong(s.len()));
        }
        for (i, component) in s.split('/').enumerate() {
            if !valid_component(component) {
                return Err(NameError::BadComponent(i));
            }
        }
        Ok(RepositoryName(s.into()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Number of `/`-separated components.
    pub fn components(&self) -> usize {
        self.0.split('/').count()
    }

    /// Docker Hub's convention: a one-component name (`nginx`) means `library/nginx`.
    pub fn with_library_prefix(self) -> Self {
        if self.components() == 1 {
            RepositoryName(format!("library/{}", self.0).into())
        } else {
            self
        }
    }
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`
fn valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    let mut i = 0;
    loop {
        // an alphanumeric run
        let start = i;
        while i < b.len() && alnum(b[i]) {
            i += 1;
        }
        if i == start {
            return false;
        }
        if i == b.len() {
            return true;
        }
        // a separator: '.', '_', '__' or '-'+
        match b[i] {
            b'.' => i += 1,
            b'_' => {
                i += 1;
                if i < b.len() && b[i] == b'_' {
                    i += 1;
                }
            }
            b'-' => {
                while i < b.len() && b[i] == b'-' {
                    i += 1;
                }
            }
            _ => return false,
        }
    }
}

impl fmt::Display for RepositoryName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for RepositoryName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", &*self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_grammar() {
        for ok in [
            "a",
            "nginx",
            "library/nginx",
            "org/team/app",
            "a.b",
            "a_b",
            "a__b",
            "a---b",
            "ghcr.io",
            "0/1/2",
            "my-app.v2_x__y",
        ] {
            assert!(RepositoryName::parse(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn rejects_outside_grammar() {
        for bad in [
            "", "/", "a/", "/a", "a//b", "A", "a..b", "..", "a/../b", "a___b", "a_-b", ".a", "a.",
            "-a", "a-", "_a", "a b", "a%2fb", "%2e%2e", "a:b", "a\\b", "ä",
        ] {
            assert!(RepositoryName::parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            RepositoryName::parse("a/../b"),
            Err(NameError::BadComponent(1))
        );
    }

    #[test]
    fn limits_length() {
        let long = "a".repeat(MAX_NAME_LEN);
        assert!(RepositoryName::parse(&long).is_ok());
        assert_eq!(
            RepositoryName::parse(&format!("{long}a")),
            Err(NameError::TooLong(MAX_NAME_LEN + 1))
        );
    }

    #[test]
    fn library_prefix_only_for_single_component() {
        let n = RepositoryName::parse("nginx")
            .unwrap()
            .with_library_prefix();
        assert_eq!(n.as_str(), "library/nginx");
        let n = RepositoryName::parse("grafana/grafana")
            .unwrap()
            .with_library_prefix();
        assert_eq!(n.as_str(), "grafana/grafana");
    }
}
