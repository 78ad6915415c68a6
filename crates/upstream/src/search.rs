//! An upstream's search endpoint: Docker Hub's index answers `GET /v1/search?q=&n=&page=`, the
//! API `docker search` speaks. pier asks it only when one is configured, with a short timeout,
//! and without the upstream's credentials (the index is another host than the registry, and a
//! search needs none). Redirects are not followed: the configured host is the one pier asks,
//! and a redirect (to another host, an internal address) is a failed search.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use pier_metrics::Metrics;
use reqwest::Url;

use crate::client::{http_client_builder, outcome};
use crate::error::{SetupError, TransportError, TransportKind, UpstreamError};
use crate::wire::check_status;

/// Largest search answer read: a page is at most 100 short entries.
const MAX_SEARCH_BYTES: usize = 1 << 20;

/// One repository an upstream's search found, with what `docker search` shows of it.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct SearchResult {
    /// The repository as the upstream names it (`nginx`, `bitnami/nginx`).
    pub name: String,
    pub description: String,
    pub star_count: u64,
    pub is_official: bool,
    pub is_automated: bool,
}

/// One page of an upstream's search.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SearchPage {
    /// Repositories matching, in all pages, as the upstream counts them.
    pub num_results: u64,
    /// This page's results (entries without a name left out).
    pub results: Vec<SearchResult>,
}

/// The search endpoint of one upstream (`upstreams[].search_url`).
pub struct SearchEndpoint {
    /// The upstream it searches for, in metrics and logs.
    name: String,
    /// `<search_url>/v1/search`.
    url: Url,
    http: reqwest::Client,
    /// Longest a search may take, connection included, all its requests together.
    timeout: Duration,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for SearchEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SearchEndpoint")
            .field("name", &self.name)
            .field("url", &self.url.as_str())
            .finish()
    }
}

impl SearchEndpoint {
    /// The search endpoint at `base` (`https://index.docker.io`) for upstream `name`, trusting
    /// `ca_file` besides the platform's roots. Fails on a URL that is not http(s) with a host,
    /// or holds credentials.
    pub fn new(
        name: &str,
        base: &str,
        ca_file: Option<&Path>,
        timeout: Duration,
        metrics: Arc<Metrics>,
    ) -> Result<SearchEndpoint, SetupError> {
        let bad = |message: &str| SetupError::Url {
            url: base.to_string(),
            message: message.to_string(),
        };
        let parsed = Url::parse(base).map_err(|e| bad(&e.to_string()))?;
        if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
            return Err(bad("must be http:// or https:// with a host"));
        }
        if !parsed.username().is_empty() || parsed.password().is_some() {
            return Err(SetupError::CredentialsInUrl);
        }
        if parsed.query().is_some() || parsed.fragment().is_some() {
            return Err(bad("must have no query or fragment"));
        }
        let url = Url::parse(&format!("{}/v1/search", base.trim_end_matches('/')))
            .map_err(|e| bad(&e.to_string()))?;
        Ok(SearchEndpoint {
            name: name.to_string(),
            url,
            http: http_client_builder(timeout, timeout, ca_file)?
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .map_err(|e| SetupError::Client(e.to_string()))?,
            timeout,
            metrics,
        })
    }

    /// `search_timeout`: the longest one search (all the pages it asks for) may take.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Page `page` (from 1) of `n` results for `query`, given up at `deadline` (one search's
    /// requests share one `search_timeout`). Counted in
    /// `pier_upstream_requests_total{kind="search"}`; nothing here touches the upstream's
    /// health (the index is not the registry).
    pub async fn search(
        &self,
        query: &str,
        n: usize,
        page: usize,
        deadline: Instant,
    ) -> Result<SearchPage, UpstreamError> {
        let started = Instant::now();
        let result = self.search_once(query, n, page, deadline).await;
        self.metrics
            .upstream_duration
            .with_label_values(&[&self.name, "search"])
            .observe(started.elapsed().as_secs_f64());
        let label = match &result {
            Ok((status, _)) => outcome(*status),
            Err(_) => "error",
        };
        self.metrics
            .upstream_requests
            .with_label_values(&[&self.name, "search", label])
            .inc();
        result.map(|(_, page)| page)
    }

    async fn search_once(
        &self,
        query: &str,
        n: usize,
        page: usize,
        deadline: Instant,
    ) -> Result<(reqwest::StatusCode, SearchPage), UpstreamError> {
        let left = deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| {
                UpstreamError::Transport(TransportError::new(
                    TransportKind::Timeout,
                    "search_timeout spent before this page was asked for",
                ))
            })?;
        let mut url = self.url.clone();
        url.query_pairs_mut()
            .append_pair("q", query)
            .append_pair("n", &n.to_string())
            .append_pair("page", &page.to_string());
        let mut resp = self
            .http
            .get(url)
            .header(reqwest::header::ACCEPT, "application/json")
            .timeout(left.min(self.timeout))
            .send()
            .await
            .map_err(UpstreamError::from_reqwest)?;
        let status = resp.status();
        if status.is_redirection() {
            return Err(UpstreamError::Invalid(format!(
                "search answered HTTP {}: redirects are not followed",
                status.as_u16()
            )));
        }
        check_status(status, resp.headers())?;
        let mut body = BytesMut::new();
        while let Some(chunk) = resp.chunk().await.map_err(UpstreamError::from_reqwest)? {
            if body.len() + chunk.len() > MAX_SEARCH_BYTES {
                return Err(UpstreamError::Invalid(
                    "search answer larger than 1 MiB".into(),
                ));
            }
            body.extend_from_slice(&chunk);
        }
        let page = parse(&body)
            .ok_or_else(|| UpstreamError::Invalid("search answer is not a search result".into()))?;
        Ok((status, page))
    }
}

/// A `/v1/search` answer: `{"num_results": N, "results": [{"name": ..., ...}]}`. Entries are
/// taken field by field, so that nothing else an upstream sends reaches a client.
fn parse(body: &[u8]) -> Option<SearchPage> {
    let doc: serde_json::Value = serde_json::from_slice(body).ok()?;
    let results = doc.get("results")?.as_array()?;
    let results: Vec<SearchResult> = results
        .iter()
        .filter_map(|r| {
            Some(SearchResult {
                name: r.get("name")?.as_str()?.to_string(),
                description: r
                    .get("description")
                    .and_then(|d| d.as_str())
                    .unwrap_or_default()
                    .chars()
                    .take(1000)
                    .collect(),
                star_count: r.get("star_count").and_then(|s| s.as_u64()).unwrap_or(0),
                is_official: r.get("is_official").and_then(|b| b.as_bool()) == Some(true),
                is_automated: r.get("is_automated").and_then(|b| b.as_bool()) == Some(true),
            })
        })
        .collect();
    let num_results = doc
        .get("num_results")
        .and_then(|n| n.as_u64())
        .unwrap_or(results.len() as u64);
    Some(SearchPage {
        num_results,
        results,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_read_field_by_field() {
        let body = br#"{"num_results": 7, "results": [
            {"name": "nginx", "description": "web", "star_count": 20000, "is_official": true,
             "is_automated": false, "extra": {"x": 1}},
            {"description": "no name"},
            {"name": "bitnami/nginx", "star_count": "many"}
        ]}"#;
        let page = parse(body).unwrap();
        assert_eq!(page.num_results, 7);
        assert_eq!(page.results.len(), 2);
        assert_eq!(page.results[0].name, "nginx");
        assert!(page.results[0].is_official);
        assert_eq!(page.results[0].star_count, 20000);
        assert_eq!(page.results[1].star_count, 0);
        assert!(parse(b"[]").is_none());
        assert!(parse(b"{\"num_results\": 1}").is_none());
    }

    #[test]
    fn urls_must_be_http_with_a_host_and_no_credentials() {
        let metrics = Arc::new(Metrics::new());
        let new = |url: &str| {
            SearchEndpoint::new(
                "docker.io",
                url,
                None,
                Duration::from_secs(1),
                metrics.clone(),
            )
        };
        for bad in [
            "ftp://x",
            "http://u:p@x",
            "index.docker.io",
            "https://x/?q=1",
        ] {
            assert!(new(bad).is_err(), "{bad}");
        }
        let ok = new("https://index.docker.io/").unwrap();
        assert_eq!(ok.url.as_str(), "https://index.docker.io/v1/search");
    }
}
