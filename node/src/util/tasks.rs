//! Task ownership: every task a node spawns belongs to one [`Tasks`], which
//! cancels and awaits them all when the node stops.
//!
//! A task is spawned through [`Tasks::spawn`], which runs it inside a
//! `biased` select that checks the cancellation token first: once
//! [`Tasks::stop`] cancels, each task is dropped at its next await point,
//! and `stop` returns when the last one is gone. Blocking work that must
//! finish (a ledger append) goes through [`Tasks::spawn_blocking`]: it is
//! awaited but never cut short.

use std::future::Future;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The tasks of one node, and the token that stops them. Cheap to clone:
/// clones share both.
#[derive(Clone, Debug, Default)]
pub struct Tasks {
    tracker: TaskTracker,
    cancel: CancellationToken,
}

impl Tasks {
    pub fn new() -> Self {
        Self::default()
    }

    /// Spawns `fut` as a task of this set; it is dropped at its next await
    /// once the set is stopping (at once when it already is).
    pub fn spawn<F>(&self, fut: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let cancel = self.cancel.clone();
        self.tracker.spawn(async move {
            tokio::select! {
                biased;
                () = cancel.cancelled() => {}
                () = fut => {}
            }
        });
    }

    /// Runs `f` on the blocking pool as a task of this set: [`Tasks::stop`]
    /// waits for it to finish.
    pub fn spawn_blocking<F>(&self, f: F)
    where
        F: FnOnce() + Send + 'static,
    {
        self.tracker.spawn_blocking(f);
    }

    /// Resolves once the set is stopping: for loops that end gracefully
    /// (closing a connection with a reason) rather than being dropped.
    pub async fn stopping(&self) {
        self.cancel.cancelled().await;
    }

    pub fn is_stopping(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// Tasks still running.
    pub fn len(&self) -> usize {
        self.tracker.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tracker.is_empty()
    }

    /// Cancels every task (those spawned later are cancelled at once).
    pub fn cancel(&self) {
        self.cancel.cancel();
    }

    /// Cancels every task and waits until all of them have ended.
    pub async fn stop(&self) {
        self.cancel.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn stop_cancels_waiting_tasks_and_awaits_blocking_ones() {
        let tasks = Tasks::new();
        let dropped = Arc::new(AtomicBool::new(false));
        struct Flag(Arc<AtomicBool>);
        impl Drop for Flag {
            fn drop(&mut self) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let flag = Flag(dropped.clone());
        tasks.spawn(async move {
            let _flag = flag;
            std::future::pending::<()>().await;
        });
        let finished = Arc::new(AtomicBool::new(false));
        let f = finished.clone();
        tasks.spawn_blocking(move || {
            std::thread::sleep(Duration::from_millis(50));
            f.store(true, Ordering::SeqCst);
        });
        assert_eq!(tasks.len(), 2);
        tokio::time::timeout(Duration::from_secs(5), tasks.stop())
            .await
            .expect("stop returns once every task ended");
        assert!(
            dropped.load(Ordering::SeqCst),
            "the pending task was dropped"
        );
        assert!(
            finished.load(Ordering::SeqCst),
            "the blocking task ran to its end"
        );
        assert!(tasks.is_empty());
        // A task spawned after the stop never runs its body.
        let ran = Arc::new(AtomicBool::new(false));
        let r = ran.clone();
        tasks.spawn(async move {
            tokio::task::yield_now().await;
            r.store(true, Ordering::SeqCst);
        });
        tasks.stop().await;
        assert!(!ran.load(Ordering::SeqCst));
    }
}
