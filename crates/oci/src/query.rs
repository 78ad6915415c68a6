//! Query strings, `application/x-www-form-urlencoded` style: what registry clients send after the
//! `?` of `/v2/<name>/tags/list?n=10&last=v1`, `/auth/token?service=pier&scope=...` or
//! `?ns=ghcr.io`.
//!
//! The rules, those of the WHATWG URL standard's form-urlencoded parser:
//! - pairs are separated by `&`; empty pairs (`a=1&&b=2`) are skipped;
//! - a pair splits at its first `=`; a key without `=` has the empty value (`?flag` is `flag=`);
//! - `+` is a space, `%XX` is the byte with hex value XX, in keys and values alike;
//! - keys may repeat: every value is kept, in the order sent.
//!
//! Parsing never fails. A `%` not followed by two hex digits (`%zz`, `%4`, a trailing `%`) is kept
//! literally, and bytes that do not decode to UTF-8 (`%ff`) become U+FFFD: what a caller reads
//! back is then not a valid name, digest or number, and the caller's own check of the value
//! refuses it.

use std::borrow::Cow;

/// A parsed query string. Borrows from the query when nothing in it is encoded.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Query<'a> {
    pairs: Vec<(Cow<'a, str>, Cow<'a, str>)>,
}

impl<'a> Query<'a> {
    /// Parses a query string (without its leading `?`). An empty string has no pairs.
    pub fn parse(query: &'a str) -> Query<'a> {
        Query {
            pairs: form_urlencoded::parse(query.as_bytes()).collect(),
        }
    }

    /// Parses a URI's query, if it has one: no query has no pairs.
    pub fn parse_opt(query: Option<&'a str>) -> Query<'a> {
        Query::parse(query.unwrap_or(""))
    }

    /// The first value of `key` (decoded), if the key is present at all.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_ref())
    }

    /// Every value of `key` (decoded), in the order they were sent.
    pub fn all<'s>(&'s self, key: &'s str) -> impl Iterator<Item = &'s str> + 's {
        self.pairs
            .iter()
            .filter(move |(k, _)| k == key)
            .map(|(_, v)| v.as_ref())
    }

    /// Every pair (decoded), in the order they were sent.
    pub fn pairs(&self) -> impl Iterator<Item = (&str, &str)> {
        self.pairs.iter().map(|(k, v)| (k.as_ref(), v.as_ref()))
    }

    /// Whether the query has no pairs.
    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_encoded_colon_and_slash() {
        let q = Query::parse("service=pier&scope=repository%3Alibrary%2Fnginx%3Apull");
        assert_eq!(q.get("scope"), Some("repository:library/nginx:pull"));
        assert_eq!(q.get("service"), Some("pier"));
        // Lower-case hex digits are the same escapes.
        assert_eq!(
            Query::parse("image=ghcr.io%2forg%2fapp%3a1").get("image"),
            Some("ghcr.io/org/app:1")
        );
        // Unencoded : and / are taken as they are.
        assert_eq!(
            Query::parse("scope=repository:ghcr.io/o/a:pull").get("scope"),
            Some("repository:ghcr.io/o/a:pull")
        );
    }

    #[test]
    fn plus_is_a_space_and_an_encoded_plus_is_a_plus() {
        let q = Query::parse("scope=repository:a:pull+repository:b:pull&x=1%2B1&y=a%20b");
        assert_eq!(q.get("scope"), Some("repository:a:pull repository:b:pull"));
        assert_eq!(q.get("x"), Some("1+1"));
        assert_eq!(q.get("y"), Some("a b"));
    }

    #[test]
    fn repeated_keys_keep_every_value_in_order() {
        let q = Query::parse("image=a&platform=linux/amd64&image=b&image=c");
        assert_eq!(q.all("image").collect::<Vec<_>>(), ["a", "b", "c"]);
        assert_eq!(q.get("image"), Some("a"));
        assert_eq!(q.all("platform").collect::<Vec<_>>(), ["linux/amd64"]);
        assert_eq!(q.all("missing").count(), 0);
        assert_eq!(
            q.pairs().collect::<Vec<_>>(),
            [
                ("image", "a"),
                ("platform", "linux/amd64"),
                ("image", "b"),
                ("image", "c")
            ]
        );
    }

    #[test]
    fn keys_without_a_value_and_empty_pairs() {
        let q = Query::parse("flag&n=&&last=v1=x");
        assert_eq!(q.get("flag"), Some(""));
        assert_eq!(q.get("n"), Some(""));
        // Only the first `=` separates.
        assert_eq!(q.get("last"), Some("v1=x"));
        assert_eq!(q.pairs().count(), 3, "the empty pair is skipped");
        assert!(Query::parse("").is_empty());
        assert!(Query::parse("&&").is_empty());
        assert!(Query::parse_opt(None).is_empty());
        assert_eq!(
            Query::parse_opt(Some("ns=ghcr.io")).get("ns"),
            Some("ghcr.io")
        );
    }

    #[test]
    fn keys_are_decoded_and_matched_exactly() {
        let q = Query::parse("n%73=docker.io&nsx=no&NS=no");
        assert_eq!(q.get("ns"), Some("docker.io"));
        // A key is not a prefix match.
        assert_eq!(Query::parse("nsx=1").get("ns"), None);
        assert_eq!(Query::parse("last=a").get("la"), None);
    }

    #[test]
    fn bad_percent_sequences_are_kept_literally() {
        let q = Query::parse("a=%zz&b=50%&c=%4&d=%%41");
        assert_eq!(q.get("a"), Some("%zz"));
        assert_eq!(q.get("b"), Some("50%"));
        assert_eq!(q.get("c"), Some("%4"));
        assert_eq!(q.get("d"), Some("%A"));
    }

    #[test]
    fn bytes_that_are_not_utf8_become_replacement_characters() {
        let q = Query::parse("last=v%FF1");
        assert_eq!(q.get("last"), Some("v\u{FFFD}1"));
    }

    #[test]
    fn nothing_encoded_borrows() {
        let q = Query::parse("n=10&last=v1");
        assert!(q
            .pairs
            .iter()
            .all(|(k, v)| matches!((k, v), (Cow::Borrowed(_), Cow::Borrowed(_)))));
    }
}
