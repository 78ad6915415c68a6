//! Bearer tokens: cached per (realm, service, scope) until shortly before they expire, dropped
//! as soon as the upstream refuses one, and fetched by one request however many want one at once.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::OnceCell;

use crate::error::UpstreamError;

/// What a token is good for: the token endpoint that issued it and the access it grants.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct TokenKey {
    pub(crate) realm: String,
    pub(crate) service: Option<String>,
    pub(crate) scope: String,
}

/// Largest number of cached tokens before the expired ones are swept out.
const SWEEP_ABOVE: usize = 10_000;

/// One token fetch that every caller wanting the same token waits on.
type Flight = Arc<OnceCell<Result<String, UpstreamError>>>;

/// Cached tokens and the fetches under way.
#[derive(Default)]
pub(crate) struct Tokens {
    cached: Mutex<HashMap<TokenKey, (String, Instant)>>,
    flights: Mutex<HashMap<TokenKey, Flight>>,
}

impl Tokens {
    /// The cached, unexpired token for `key`.
    pub(crate) fn get(&self, key: &TokenKey) -> Option<String> {
        let cached = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        cached
            .get(key)
            .filter(|(_, until)| *until > Instant::now())
            .map(|(t, _)| t.clone())
    }

    /// Caches `token` for a little less than `lifetime`.
    pub(crate) fn put(&self, key: &TokenKey, token: String, lifetime: Duration) {
        // Renew a little early so a token never expires between check and use.
        let margin = (lifetime / 10).min(Duration::from_secs(30));
        let until = Instant::now() + lifetime.saturating_sub(margin);
        let mut cached = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        if cached.len() > SWEEP_ABOVE {
            let now = Instant::now();
            cached.retain(|_, (_, u)| *u > now);
        }
        cached.insert(key.clone(), (token, until));
    }

    /// Forgets `token`, which the upstream refused. Only that token: when another request has
    /// already replaced it with a fresh one, the fresh one stays.
    pub(crate) fn discard(&self, key: &TokenKey, token: &str) {
        let mut cached = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        if cached.get(key).is_some_and(|(t, _)| t == token) {
            cached.remove(key);
        }
    }

    /// The cached token for `key`, or one from `fetch` (which yields the token and its lifetime).
    /// Concurrent callers for one key share one fetch and its outcome, failures included.
    pub(crate) async fn get_or_fetch<F, Fut>(
        &self,
        key: &TokenKey,
        fetch: F,
    ) -> Result<String, UpstreamError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<(String, Duration), UpstreamError>>,
    {
        if let Some(token) = self.get(key) {
            return Ok(token);
        }
        let flight = self
            .flights
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.clone())
            .or_default()
            .clone();
        // If the caller running `fetch` goes away mid-way, OnceCell hands the job to a waiter.
        let result = flight
            .get_or_init(|| async {
                // A flight that just landed may have cached the token after our first look.
                if let Some(token) = self.get(key) {
                    return Ok(token);
                }
                let (token, lifetime) = fetch().await?;
                self.put(key, token.clone(), lifetime);
                Ok(token)
            })
            .await
            .clone();
        // The flight is over: the next miss (after expiry or a refusal) must start a new one,
        // not read this one's outcome. Only this flight, not one started since.
        let mut flights = self.flights.lock().unwrap_or_else(|p| p.into_inner());
        if flights.get(key).is_some_and(|f| Arc::ptr_eq(f, &flight)) {
            flights.remove(key);
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn key(scope: &str) -> TokenKey {
        TokenKey {
            realm: "https://auth.example/token".into(),
            service: Some("registry".into()),
            scope: scope.into(),
        }
    }

    #[test]
    fn cached_tokens_expire() {
        let c = Tokens::default();
        c.put(&key("a"), "t".into(), Duration::from_secs(60));
        assert_eq!(c.get(&key("a")).as_deref(), Some("t"));
        c.put(&key("b"), "t".into(), Duration::ZERO);
        assert_eq!(c.get(&key("b")), None);
        assert_eq!(c.get(&key("c")), None);
        // Same scope at another realm is another token.
        let other = TokenKey {
            realm: "https://elsewhere/token".into(),
            ..key("a")
        };
        assert_eq!(c.get(&other), None);
    }

    #[test]
    fn discard_drops_only_the_refused_token() {
        let c = Tokens::default();
        c.put(&key("a"), "old".into(), Duration::from_secs(60));
        c.discard(&key("a"), "old");
        assert_eq!(c.get(&key("a")), None);
        c.put(&key("a"), "new".into(), Duration::from_secs(60));
        // A late refusal of the old token leaves the new one alone.
        c.discard(&key("a"), "old");
        assert_eq!(c.get(&key("a")).as_deref(), Some("new"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_misses_share_one_fetch() {
        let tokens = Arc::new(Tokens::default());
        let fetches = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..20 {
            let (tokens, fetches) = (tokens.clone(), fetches.clone());
            tasks.push(tokio::spawn(async move {
                tokens
                    .get_or_fetch(&key("a"), || async {
                        fetches.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        Ok(("t1".to_string(), Duration::from_secs(60)))
                    })
                    .await
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap().unwrap(), "t1");
        }
        assert_eq!(fetches.load(Ordering::SeqCst), 1);
        // Cached now: no fetch at all.
        let t = tokens
            .get_or_fetch(&key("a"), || async { panic!("fetched a cached token") })
            .await;
        assert_eq!(t.unwrap(), "t1");
    }

    #[tokio::test]
    async fn a_failed_fetch_is_shared_but_not_remembered() {
        let tokens = Tokens::default();
        let failed = tokens
            .get_or_fetch(&key("a"), || async {
                Err(UpstreamError::Unauthorized(
                    "token endpoint answered 401".into(),
                ))
            })
            .await;
        assert!(matches!(failed, Err(UpstreamError::Unauthorized(_))));
        let next = tokens
            .get_or_fetch(&key("a"), || async {
                Ok(("t2".to_string(), Duration::from_secs(60)))
            })
            .await;
        assert_eq!(next.unwrap(), "t2");
    }

    #[tokio::test]
    async fn a_cancelled_fetch_is_taken_over() {
        let tokens = Arc::new(Tokens::default());
        let t = tokens.clone();
        let leader = tokio::spawn(async move {
            t.get_or_fetch(&key("a"), || async {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                Ok(("never".to_string(), Duration::from_secs(60)))
            })
            .await
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        leader.abort();
        let _ = leader.await;
        let t = tokens
            .get_or_fetch(&key("a"), || async {
                Ok(("t3".to_string(), Duration::from_secs(60)))
            })
            .await;
        assert_eq!(t.unwrap(), "t3");
    }
}
