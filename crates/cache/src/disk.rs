//! The one blocking boundary: async code reaches the disk store only through [`Disk::run`], which
//! runs the store's (blocking) call on tokio's blocking pool.

use std::io;
use std::sync::Arc;

use crate::store::DiskStore;

/// The disk store, for async callers.
#[derive(Clone, Debug)]
pub struct Disk(Arc<DiskStore>);

impl Disk {
    pub(crate) fn new(store: DiskStore) -> Self {
        Disk(Arc::new(store))
    }

    /// Runs `f` with the store on a blocking thread. A panic in `f` becomes an error.
    pub async fn run<T, F>(&self, f: F) -> io::Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&DiskStore) -> io::Result<T> + Send + 'static,
    {
        let store = self.0.clone();
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .map_err(|_| io::Error::other("disk store call panicked"))?
    }

    /// The store itself, for code that is already on a blocking thread (the CLI, tests).
    pub fn blocking(&self) -> &DiskStore {
        &self.0
    }
}
