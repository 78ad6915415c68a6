//! Single flight for whole small objects: concurrent callers with the same key share one run.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use futures_util::future::{BoxFuture, FutureExt, Shared};

/// The shared run panicked. Every caller gets this rather than the panic (which would take its
/// connection down) or a wait that never ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Panicked;

/// Runs at most one future per key at a time; callers that arrive meanwhile get its result.
/// The future runs on its own task, so it finishes even when every caller goes away.
pub struct SingleFlight<K, V> {
    inflight: InFlight<K, V>,
}

impl<K, V> Default for SingleFlight<K, V> {
    fn default() -> Self {
        SingleFlight {
            inflight: Arc::default(),
        }
    }
}

impl<K, V> SingleFlight<K, V>
where
    K: Hash + Eq + Clone + Send + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// The result of `make()` for `key`, run now or joined if already running. The flag says
    /// whether this call joined a run another caller started.
    pub async fn run<F>(&self, key: K, make: impl FnOnce() -> F) -> (Result<V, Panicked>, bool)
    where
        F: Future<Output = V> + Send + 'static,
    {
        let (shared, joined) = {
            let mut inflight = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
            match inflight.get(&key) {
                Some(s) => (s.clone(), true),
                None => {
                    let map = self.inflight.clone();
                    let k = key.clone();
                    let fut = make();
                    let task = tokio::spawn(async move {
                        // The key leaves the map whether the future ends or panics.
                        let _leave = Leave { map, key: Some(k) };
                        fut.await
                    });
                    let shared = async move {
                        task.await.map_err(|e| {
                            tracing::error!(error = %e, "a single-flight task panicked");
                            Panicked
                        })
                    }
                    .boxed()
                    .shared();
                    inflight.insert(key, shared.clone());
                    (shared, false)
                }
            }
        };
        (shared.await, joined)
    }
}

/// Removes a run's key from the in-flight map when dropped (also while unwinding).
struct Leave<K: Hash + Eq, V> {
    map: InFlight<K, V>,
    key: Option<K>,
}

impl<K: Hash + Eq, V> Drop for Leave<K, V> {
    fn drop(&mut self) {
        if let Some(k) = self.key.take() {
            self.map
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&k);
        }
    }
}

type InFlight<K, V> = Arc<Mutex<HashMap<K, Shared<BoxFuture<'static, Result<V, Panicked>>>>>>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[tokio::test]
    async fn concurrent_callers_share_one_run() {
        let flight = Arc::new(SingleFlight::<&'static str, usize>::default());
        let runs = Arc::new(AtomicUsize::new(0));
        let mut handles = Vec::new();
        for _ in 0..50 {
            let (flight, runs) = (flight.clone(), runs.clone());
            handles.push(tokio::spawn(async move {
                flight
                    .run("k", || async move {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        runs.fetch_add(1, Ordering::SeqCst) + 100
                    })
                    .await
            }));
        }
        let mut joined = 0;
        for h in handles {
            let (v, j) = h.await.unwrap();
            assert_eq!(v, Ok(100));
            joined += usize::from(j);
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert_eq!(joined, 49);
        // After it finished, the next call runs again.
        let (v, j) = flight.run("k", || async { 7 }).await;
        assert_eq!((v, j), (Ok(7), false));
    }

    #[tokio::test]
    async fn a_panic_reaches_every_caller_as_an_error() {
        let flight = Arc::new(SingleFlight::<&'static str, usize>::default());
        let mut handles = Vec::new();
        for _ in 0..5 {
            let flight = flight.clone();
            handles.push(tokio::spawn(async move {
                flight
                    .run("k", || async {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        panic!("boom")
                    })
                    .await
                    .0
            }));
        }
        for h in handles {
            let r = tokio::time::timeout(Duration::from_secs(5), h)
                .await
                .expect("a caller hung")
                .expect("a caller panicked");
            assert_eq!(r, Err(Panicked));
        }
        // The key was released: the next run runs.
        assert_eq!(flight.run("k", || async { 1 }).await.0, Ok(1));
    }
}
