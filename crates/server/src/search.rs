//! `GET /v1/search?q=&n=&page=`: `docker search` over what the caller may pull here, followed,
//! when upstreams have a search endpoint configured (`upstreams[].search_url`), by what those
//! find for the same term.
//!
//! The merged list is pier's matches (hosted and cached repositories, sorted by name), then each
//! searching upstream's results in configuration order, and pages are windows of it: a page that
//! pier's matches fill asks an upstream for its first page only to count its results; a window
//! that starts inside an upstream's results asks it for the page (of the same size) it starts in,
//! and for the next one when the window spans two. Upstream results are named as clients pull
//! them (plain for the default upstream, `<registry>/<name>` for the others) and kept only when
//! the caller may pull them through pier (the upstream's allow/deny lists, hosted globs, the
//! caller's rules) and pier's own matches do not list them already. Counts are the upstream's,
//! before that filtering. An upstream that fails or is slow (`search_timeout`) costs its results,
//! never the search: pier's matches are answered and a warning logged.
//!
//! An upstream's `search_timeout` bounds all its requests for one search together, from the
//! search's start. When the window starts in pier's matches, every upstream's part of it starts
//! at its first result, and the upstreams are asked at once; a window further on needs the
//! counts of the upstreams before, and they are asked in order, each still within its deadline
//! from the start. Either way a search waits at most the longest `search_timeout`.

use std::collections::HashSet;
use std::time::Instant;

use futures_util::future::join_all;

use pier_oci::{ErrorCode, Query, RegistryError};
use pier_upstream::{SearchEndpoint, SearchResult};

use crate::auth::Action;
use crate::handlers::{list_response, pullable_repositories, Answer, Caller};
use crate::routing::Target;
use crate::{Mirror, UpstreamEntry};

/// Page size of `docker search` when the client gives none, and the largest it may ask for.
const SEARCH_PAGE_SIZE: usize = 25;
const SEARCH_MAX_PAGE_SIZE: usize = 100;

/// `GET /v1/search?q=&n=&page=`: the Docker CLI's `docker search`, over the repositories the
/// caller may pull (as the catalog lists them) whose name contains `q` (ignoring case), sorted
/// by name, then the configured upstream searches' results, `n` (1-100, default 25) a page.
pub(crate) async fn search(
    mirror: &Mirror,
    caller: &Caller<'_>,
    query: Option<&str>,
    head: bool,
) -> Answer {
    let params = Query::parse_opt(query);
    let bad = |m: &str| RegistryError::new(ErrorCode::Unsupported, m).with_status(400);
    let number = |key: &str, default: usize| {
        params
            .get(key)
            .filter(|v| !v.is_empty())
            .map_or(Ok(default), |v| v.parse::<usize>())
    };
    let page_size = number("n", SEARCH_PAGE_SIZE)
        .map_err(|_| bad("n must be a number"))?
        .clamp(1, SEARCH_MAX_PAGE_SIZE);
    let page_number = number("page", 1)
        .map_err(|_| bad("page must be a number"))?
        .max(1);
    let term = params.get("q").unwrap_or("").trim().to_string();
    if term.len() > 512 {
        return Err(bad("q is too long"));
    }
    let wanted = term.to_ascii_lowercase();
    let found: Vec<String> = pullable_repositories(mirror, caller)
        .await?
        .into_iter()
        .filter(|name| name.to_ascii_lowercase().contains(&wanted))
        .collect();
    let offset = (page_number - 1).saturating_mul(page_size);
    let mut results: Vec<serde_json::Value> = found
        .iter()
        .skip(offset)
        .take(page_size)
        .map(|name| {
            serde_json::json!({
                "name": name,
                "description": "",
                "star_count": 0,
                "is_official": false,
                "is_automated": false,
            })
        })
        .collect();
    let mut total = found.len() as u64;
    // An empty term lists what pier holds; it is no question for an upstream's index.
    if !term.is_empty() {
        let started = Instant::now();
        let mut listed: HashSet<String> = found.into_iter().collect();
        // Upstream results before this page's window, not yet passed.
        let mut before = (offset as u64).saturating_sub(total);
        let searching: Vec<(&UpstreamEntry, &SearchEndpoint)> = mirror
            .upstreams
            .iter()
            .filter_map(|u| u.search.as_deref().map(|e| (u, e)))
            .collect();
        // The window starts in pier's matches: each upstream's part starts at its first
        // result, whatever the others count, so all are asked at once.
        let mut asked: Vec<Option<(Vec<SearchResult>, u64)>> =
            if before == 0 {
                let window = Window {
                    term: &term,
                    page_size,
                    skip: 0,
                    want: page_size - results.len(),
                };
                join_all(searching.iter().map(|(upstream, endpoint)| {
                    upstream_results(upstream, endpoint, &window, started)
                }))
                .await
                .into_iter()
                .map(Some)
                .collect()
            } else {
                Vec::new()
            };
        asked.resize_with(searching.len(), || None);
        for ((upstream, endpoint), asked) in searching.into_iter().zip(asked) {
            let want = page_size - results.len();
            let (mut found, count) = match asked {
                Some(found) => found,
                None => {
                    let window = Window {
                        term: &term,
                        page_size,
                        skip: before,
                        want,
                    };
                    upstream_results(upstream, endpoint, &window, started).await
                }
            };
            found.truncate(want);
            for r in found {
                if results.len() == page_size {
                    break;
                }
                let name = client_name(mirror, upstream, &r.name);
                if !listed.contains(&name) && may_pull(mirror, caller, upstream, &name) {
                    results.push(serde_json::json!({
                        "name": name,
                        "description": r.description,
                        "star_count": r.star_count,
                        "is_official": r.is_official,
                        "is_automated": r.is_automated,
                    }));
                    listed.insert(name);
                }
            }
            total = total.saturating_add(count);
            before = before.saturating_sub(count);
        }
    }
    let body = serde_json::json!({
        "num_pages": total.div_ceil(page_size as u64),
        "num_results": total,
        "results": results,
        "page": page_number,
        "page_size": page_size,
        "query": term,
    })
    .to_string();
    Ok(list_response(body, None, None, head))
}

/// What of an upstream's results a page needs.
struct Window<'a> {
    term: &'a str,
    page_size: usize,
    /// Its results before the window.
    skip: u64,
    /// How many the page still has room for (0: only its count is wanted).
    want: usize,
}

/// The upstream's results in the window (before filtering), and how many it has in all; none
/// and 0 when it fails, with a warning. Its requests end by its `search_timeout` after
/// `started`.
async fn upstream_results(
    upstream: &UpstreamEntry,
    endpoint: &SearchEndpoint,
    w: &Window<'_>,
    started: Instant,
) -> (Vec<SearchResult>, u64) {
    let deadline = started + endpoint.timeout();
    let n = w.page_size as u64;
    let first = w.skip / n + 1;
    let within = usize::try_from(w.skip % n).unwrap_or(0);
    // Counted in pier_upstream_requests_total{kind="search"} by the endpoint.
    let failed = |e: pier_upstream::UpstreamError| {
        tracing::warn!(upstream = %upstream.name, error = %e, "upstream search failed; answering without its results");
    };
    let page = |p: u64| {
        endpoint.search(
            w.term,
            w.page_size,
            usize::try_from(p).unwrap_or(usize::MAX),
            deadline,
        )
    };
    let found = match page(first).await {
        Ok(found) => found,
        Err(e) => {
            failed(e);
            return (Vec::new(), 0);
        }
    };
    let count = found.num_results;
    let mut results: Vec<SearchResult> = found.results.into_iter().skip(within).collect();
    // The window spans this page and the next.
    if within > 0 && results.len() < w.want && first.saturating_mul(n) < count {
        match page(first + 1).await {
            Ok(next) => results.extend(next.results),
            Err(e) => failed(e),
        }
    }
    results.truncate(w.want);
    (results, count)
}

/// An upstream result's name as clients pull it through pier.
fn client_name(mirror: &Mirror, upstream: &UpstreamEntry, name: &str) -> String {
    if std::ptr::eq(upstream, &mirror.upstreams[mirror.default_upstream]) {
        name.to_string()
    } else {
        format!("{}/{name}", upstream.name)
    }
}

/// Whether the caller may pull `name` (as a client names it) from `upstream` through pier: it
/// routes there (not to a hosted repository or another upstream), the upstream's lists allow
/// it, and so do the caller's rules.
fn may_pull(mirror: &Mirror, caller: &Caller<'_>, upstream: &UpstreamEntry, name: &str) -> bool {
    match mirror.target(name, None) {
        Ok(target @ Target::Mirrored(_)) => {
            matches!(&target, Target::Mirrored(route) if std::ptr::eq(route.upstream, upstream))
                && caller.may(mirror, Action::Pull, &target)
        }
        _ => false,
    }
}
