//! Cache readiness that any number of reconciles can wait for at once.
//!
//! kube-runtime's `Store::wait_until_ready` polls one oneshot receiver from
//! every waiter, and a oneshot keeps a single waker: when several reconciles
//! start before the cache's first list is in (more of them, for longer, when
//! that list fails and is retried), only the one that polled last is woken.
//! The others stay pending for good, and their objects are never reconciled
//! again (the controller does not start a second reconcile of an object
//! whose first one has not finished). One shared future per cache wakes
//! every waiter.

use std::fmt;

use futures_util::future::{BoxFuture, FutureExt, Shared};

/// Resolves once the caches it was built from are filled: `true`, or
/// `false` if one of them stopped before that.
#[derive(Clone)]
pub struct Ready(Shared<BoxFuture<'static, bool>>);

impl Ready {
    /// `filled` waits on the caches; it is polled through one shared future.
    pub fn new(filled: impl std::future::Future<Output = bool> + Send + 'static) -> Self {
        Ready(filled.boxed().shared())
    }

    /// Waits until the caches are filled; `false` if one stopped first.
    pub async fn wait(&self) -> bool {
        self.0.clone().await
    }
}

impl fmt::Debug for Ready {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ready")
            .field("filled", &self.0.peek().copied())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::future::Future;
    use std::pin::Pin;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::task::{Context, Poll};

    use futures_util::task::{waker, ArcWake};
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::runtime::{reflector, watcher};

    use super::*;

    struct Woken(AtomicBool);

    impl ArcWake for Woken {
        fn wake_by_ref(this: &Arc<Self>) {
            this.0.store(true, Ordering::SeqCst);
        }
    }

    /// Polls each future once with its own waker (all must be pending),
    /// fills the cache, and says which waiters were woken.
    fn woken_after_fill<F: Future>(mut waits: Vec<Pin<Box<F>>>, fill: impl FnOnce()) -> Vec<bool> {
        let flags: Vec<Arc<Woken>> = waits.iter().map(|_| Arc::new(Woken(AtomicBool::new(false)))).collect();
        for (w, flag) in waits.iter_mut().zip(&flags) {
            let wk = waker(flag.clone());
            assert!(w.as_mut().poll(&mut Context::from_waker(&wk)).is_pending());
        }
        fill();
        flags.iter().map(|f| f.0.load(Ordering::SeqCst)).collect()
    }

    #[test]
    fn every_waiting_reconcile_is_woken_when_the_cache_fills() {
        let (store, mut writer) = reflector::store::<ConfigMap>();
        let ready = Ready::new(async move { store.wait_until_ready().await.is_ok() });
        let waits = (0..4).map(|_| Box::pin(ready.wait())).collect();
        let woken = woken_after_fill(waits, || writer.apply_watcher_event(&watcher::Event::InitDone));
        assert_eq!(woken, vec![true; 4]);
        let mut done = Box::pin(ready.wait());
        let wk = waker(Arc::new(Woken(AtomicBool::new(false))));
        assert_eq!(done.as_mut().poll(&mut Context::from_waker(&wk)), Poll::Ready(true));
    }

    /// Why [`Ready`] exists. If this fails, kube-runtime wakes every waiter
    /// itself and the wrapper could go.
    #[test]
    fn kube_runtime_wakes_only_the_last_of_several_waiters() {
        let (store, mut writer) = reflector::store::<ConfigMap>();
        let waits = (0..4).map(|_| Box::pin(store.wait_until_ready())).collect();
        let woken = woken_after_fill(waits, || writer.apply_watcher_event(&watcher::Event::InitDone));
        assert_eq!(woken, vec![false, false, false, true]);
    }

    #[test]
    fn a_cache_that_stops_before_filling_reads_not_ready() {
        let (store, writer) = reflector::store::<ConfigMap>();
        let ready = Ready::new(async move { store.wait_until_ready().await.is_ok() });
        let waits = (0..2).map(|_| Box::pin(ready.wait())).collect();
        assert_eq!(woken_after_fill(waits, || drop(writer)), vec![true; 2]);
        let mut done = Box::pin(ready.wait());
        let wk = waker(Arc::new(Woken(AtomicBool::new(false))));
        assert_eq!(done.as_mut().poll(&mut Context::from_waker(&wk)), Poll::Ready(false));
    }
}
