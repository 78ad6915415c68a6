//! Single flight for whole small objects: concurrent callers with the same key share one run.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use futures_util::future::{BoxFuture, FutureExt, Shared};

/// Runs at most one future per key at a time; callers that arrive meanwhile get its result.
/// The future runs on its own task, so it finishes even when every caller goes away.
pub struct SingleFlight<K, V> {
    inflight: Arc<Mutex<HashMap<K, Shared<BoxFuture<'static, V>>>>>,
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
    pub async fn run<F>(&self, key: K, make: impl FnOnce() -> F) -> (V, bool)
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
                        let v = fut.await;
                        map.lock().unwrap_or_else(|p| p.into_inner()).remove(&k);
                        v
                    });
                    let shared = async move {
                        match task.await {
                            Ok(v) => v,
                            // The task only fails by panicking; surface that to every caller.
                            Err(e) => std::panic::resume_unwind(e.into_panic()),
                        }
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
            assert_eq!(v, 100);
            joined += usize::from(j);
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert_eq!(joined, 49);
        // After it finished, the next call runs again.
        let (v, j) = flight.run("k", || async { 7 }).await;
        assert_eq!((v, j), (7, false));
    }
}
