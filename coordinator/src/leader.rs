//! One leader among coordinators that share an etcd: the others stand by.
//!
//! Each coordinator started on etcd tries to create [`LEADER_KEY`], holding its own URL, under a
//! lease of [`LEADER_TTL_S`] seconds that it renews every second. The one that creates it leads:
//! it reads the state back from the store and serves, as a restarted coordinator does. The others
//! stand by: they try again every second and meanwhile answer every call with UNAVAILABLE naming
//! the leader (the CLI's standby responder), so that workers and clients given several coordinator
//! URLs move on to the next. When the leader dies its lease expires, the key goes with it, and a
//! standby takes over within `LEADER_TTL_S` + 1 seconds; a leader that stops gracefully resigns
//! ([`Leadership::resign`]: its lease revoked, the key gone at once), and a standby takes over
//! within a second.
//!
//! A leader whose lease the store no longer knows (it went unrenewed for `LEADER_TTL_S` seconds,
//! through an outage of the store or a partition from it) looks at the key once the store answers:
//! if another coordinator holds it, it was replaced and must stop at once (`Leadership::lost`)
//! before it writes over the new leader's state; if no one does, no one took over (a standby
//! cannot either while the store is silent) and it takes the key again under a new lease. The
//! store is fenced on the key and the lease ([`Store::fence`]): a replaced leader's writes in the
//! second before it notices (a partition that let a standby reach the store while it could not,
//! then healed) are refused by the store.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tracing::{info, warn};

use crate::store::{Fence, Store};
use crate::Result;

/// The key the leader holds (its value: the leader's URL).
pub const LEADER_KEY: &str = "/awq/v1/leader";
/// Seconds after its last renewal that a leader's key disappears.
pub const LEADER_TTL_S: i64 = 5;
/// How often a standby tries, and a leader renews.
const TICK: Duration = Duration::from_secs(1);

/// This coordinator's leadership, once won.
pub struct Leadership {
    lost: watch::Receiver<Option<String>>,
    store: Arc<dyn Store>,
    /// The lease the keeper renews now (a new one after a lapse it recovered from).
    lease: Arc<std::sync::Mutex<i64>>,
    keeper: tokio::task::JoinHandle<()>,
}

impl Leadership {
    /// Waits until `url` leads: until it creates [`LEADER_KEY`] with a lease of its own.
    /// `standing_by(leader)` hears of each leader it sees meanwhile (`None`: none right now, or the
    /// store does not answer). Store errors while standing by are retried, not returned.
    pub async fn acquire(store: Arc<dyn Store>, url: &str, mut standing_by: impl FnMut(Option<String>)) -> Leadership {
        let mut seen: Option<Option<String>> = None;
        loop {
            match try_lead(&*store, url).await {
                Ok(Ok(lease)) => {
                    info!(url, "leading: this coordinator holds {LEADER_KEY}");
                    store.fence(Fence { key: LEADER_KEY.into(), lease });
                    let lease = Arc::new(std::sync::Mutex::new(lease));
                    let (lost, keeper) = keep_leading(store.clone(), url.to_string(), lease.clone());
                    return Leadership { lost, store, lease, keeper };
                }
                Ok(Err(leader)) => {
                    if seen.as_ref() != Some(&leader) {
                        info!(leader = leader.as_deref().unwrap_or("none"), "standing by");
                        standing_by(leader.clone());
                        seen = Some(leader);
                    }
                }
                Err(e) => {
                    warn!("standing by: the store does not answer: {e}");
                    if seen.as_ref() != Some(&None) {
                        standing_by(None);
                        seen = Some(None);
                    }
                }
            }
            tokio::time::sleep(TICK).await;
        }
    }

    /// Resolves when the leadership is lost, with why.
    pub async fn lost(&mut self) -> String {
        loop {
            if let Some(why) = self.lost.borrow().clone() {
                return why;
            }
            if self.lost.changed().await.is_err() {
                return "the lease keeper stopped".into();
            }
        }
    }
}

impl Leadership {
    /// Gives the leadership up (a graceful exit, once this coordinator serves no more): the lease
    /// is no longer renewed and is revoked, which deletes [`LEADER_KEY`], so that a standby leads
    /// at its next try instead of after the lease's TTL. A store that does not answer leaves the
    /// lease to expire. Errors: the store's.
    pub async fn resign(self) -> Result<()> {
        self.keeper.abort();
        let lease = *self.lease.lock().unwrap_or_else(|e| e.into_inner());
        self.store.revoke(lease).await
    }
}

/// One try: `Ok(lease)` when `url` now leads, else the current leader's URL.
async fn try_lead(store: &dyn Store, url: &str) -> Result<std::result::Result<i64, Option<String>>> {
    if let Some(leader) = store.get(LEADER_KEY).await? {
        return Ok(Err(Some(String::from_utf8_lossy(&leader).into_owned())));
    }
    let lease = store.grant_lease(LEADER_TTL_S).await?;
    if store.create_leased(LEADER_KEY, url.as_bytes().to_vec(), lease).await? {
        return Ok(Ok(lease));
    }
    let _ = store.revoke(lease).await;
    Ok(Err(store.get(LEADER_KEY).await?.map(|v| String::from_utf8_lossy(&v).into_owned())))
}

/// Renews `lease` every [`TICK`]. Once renewals have failed for [`LEADER_TTL_S`] seconds, asks the
/// store who holds the key (see the module docs): sends why when another coordinator does; takes
/// it again under a new lease when no one does; keeps asking while the store does not answer.
fn keep_leading(
    store: Arc<dyn Store>,
    url: String,
    current: Arc<std::sync::Mutex<i64>>,
) -> (watch::Receiver<Option<String>>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = watch::channel(None);
    let keeper = tokio::spawn(async move {
        let mut renewed = Instant::now();
        let mut lease = *current.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            tokio::time::sleep(TICK).await;
            let e = match store.keep_alive(lease).await {
                Ok(()) => {
                    renewed = Instant::now();
                    continue;
                }
                Err(e) => e,
            };
            if renewed.elapsed() < Duration::from_secs(LEADER_TTL_S as u64) {
                warn!("cannot renew the leader's lease (trying again): {e}");
                continue;
            }
            match try_lead(&*store, &url).await {
                Ok(Ok(new_lease)) => {
                    warn!("the leader's lease lapsed while the store was silent ({e}); no one took over: leading on");
                    (lease, renewed) = (new_lease, Instant::now());
                    *current.lock().unwrap_or_else(|e| e.into_inner()) = lease;
                    store.fence(Fence { key: LEADER_KEY.into(), lease });
                }
                Ok(Err(Some(other))) if other != url => {
                    let _ = tx.send(Some(format!("{other} leads now (this coordinator's lease lapsed: {e})")));
                    return;
                }
                Ok(Err(_)) => warn!("the leader's lease lapsed ({e}); its key is not free yet: asking again"),
                Err(store_silent) => warn!("cannot renew the leader's lease: {store_silent}; asking again"),
            }
        }
    });
    (rx, keeper)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;

    #[tokio::test]
    async fn the_first_leads_and_the_second_stands_by_naming_it() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::default());
        let _first = Leadership::acquire(store.clone(), "http://a:1", |_| panic!("nobody leads yet")).await;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let second =
            tokio::spawn(Leadership::acquire(store.clone(), "http://b:2", move |leader| drop(tx.send(leader))));
        assert_eq!(rx.recv().await, Some(Some("http://a:1".to_string())));
        assert!(!second.is_finished());
        // The leader's key gone (as when its lease expires): the standby leads.
        store.delete_prefix(LEADER_KEY).await.unwrap();
        let won = tokio::time::timeout(Duration::from_secs(5), second).await;
        assert!(won.is_ok(), "the standby did not take over");
        assert_eq!(store.get(LEADER_KEY).await.unwrap().as_deref(), Some(&b"http://b:2"[..]));
    }

    #[tokio::test]
    async fn a_leader_that_resigns_frees_the_key_for_the_standby_at_once() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::default());
        let first = Leadership::acquire(store.clone(), "http://a:1", |_| panic!("nobody leads yet")).await;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let second =
            tokio::spawn(Leadership::acquire(store.clone(), "http://b:2", move |leader| drop(tx.send(leader))));
        assert_eq!(rx.recv().await, Some(Some("http://a:1".to_string())));
        first.resign().await.unwrap();
        assert_eq!(store.get(LEADER_KEY).await.unwrap(), None, "the key went with the revoked lease");
        // Well within the lease's TTL: the standby's next try wins.
        let won = tokio::time::timeout(TICK * 3, second).await;
        assert!(won.is_ok(), "the standby did not take over within {:?}", TICK * 3);
        assert_eq!(store.get(LEADER_KEY).await.unwrap().as_deref(), Some(&b"http://b:2"[..]));
    }

    #[tokio::test]
    async fn a_replaced_leaders_writes_are_refused_by_its_fenced_store() {
        let store = Arc::new(MemoryStore::default());
        let mut old = Leadership::acquire(store.clone(), "http://a:1", |_| {}).await;
        store.put("/awq/v1/jobs/j1", b"by a".to_vec()).await.unwrap();
        // The old lease lapses and another coordinator takes the key (as across a partition): the
        // old leader's keeper is stopped first, so that it cannot notice and take the key again.
        old.keeper.abort();
        let old_lease = *old.lease.lock().unwrap();
        store.revoke(old_lease).await.unwrap();
        let new_lease = store.grant_lease(LEADER_TTL_S).await.unwrap();
        assert!(store.create_leased(LEADER_KEY, b"http://b:2".to_vec(), new_lease).await.unwrap());
        for err in [
            store.put("/awq/v1/jobs/j1", b"by a, late".to_vec()).await.unwrap_err(),
            store.delete_prefix("/awq/v1/jobs/").await.unwrap_err(),
            store.put_leased("/awq/v1/workers/w", b"w".to_vec(), old_lease).await.unwrap_err(),
        ] {
            assert!(err.to_string().contains("write refused") && err.to_string().contains(LEADER_KEY), "{err}");
        }
        assert_eq!(store.get("/awq/v1/jobs/j1").await.unwrap().as_deref(), Some(&b"by a"[..]));
        drop(old.lost());
    }

    /// A store whose lease renewals fail on demand (a silent store, from the leader's side).
    #[derive(Default)]
    struct Lapsing {
        inner: MemoryStore,
        renewals_fail: std::sync::atomic::AtomicBool,
    }

    #[tonic::async_trait]
    impl Store for Lapsing {
        fn fence(&self, fence: Fence) {
            self.inner.fence(fence)
        }
        async fn put(&self, key: &str, value: Vec<u8>) -> Result<()> {
            self.inner.put(key, value).await
        }
        async fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
            self.inner.get(key).await
        }
        async fn list(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>> {
            self.inner.list(prefix).await
        }
        async fn delete_prefix(&self, prefix: &str) -> Result<()> {
            self.inner.delete_prefix(prefix).await
        }
        async fn grant_lease(&self, ttl_s: i64) -> Result<i64> {
            self.inner.grant_lease(ttl_s).await
        }
        async fn keep_alive(&self, lease: i64) -> Result<()> {
            match self.renewals_fail.load(std::sync::atomic::Ordering::Relaxed) {
                true => Err(crate::Error::Store("lease not found".into())),
                false => self.inner.keep_alive(lease).await,
            }
        }
        async fn put_leased(&self, key: &str, value: Vec<u8>, lease: i64) -> Result<()> {
            self.inner.put_leased(key, value, lease).await
        }
        async fn create_leased(&self, key: &str, value: Vec<u8>, lease: i64) -> Result<bool> {
            self.inner.create_leased(key, value, lease).await
        }
        async fn revoke(&self, lease: i64) -> Result<()> {
            self.inner.revoke(lease).await
        }
        fn describe(&self) -> String {
            "lapsing".into()
        }
    }

    /// A leader whose renewals fail for the lease's time stops when another coordinator holds the
    /// key by then, and leads on when no one does.
    #[tokio::test]
    async fn a_lapsed_leader_stops_only_when_replaced() {
        // Both cases at once: each waits out the lease's seconds.
        let cases = [true, false].map(|replaced| tokio::spawn(lapse(replaced)));
        for case in cases {
            case.await.unwrap();
        }
    }

    async fn lapse(replaced: bool) {
        {
            let store = Arc::new(Lapsing::default());
            let mut leadership = Leadership::acquire(store.clone(), "http://a:1", |_| {}).await;
            store.renewals_fail.store(true, std::sync::atomic::Ordering::Relaxed);
            store.delete_prefix(LEADER_KEY).await.unwrap();
            if replaced {
                // Another coordinator's take (create_leased is not fenced).
                let theirs = store.grant_lease(LEADER_TTL_S).await.unwrap();
                assert!(store.create_leased(LEADER_KEY, b"http://b:2".to_vec(), theirs).await.unwrap());
            }
            let wait = Duration::from_secs(LEADER_TTL_S as u64 + 3);
            match (replaced, tokio::time::timeout(wait, leadership.lost()).await) {
                (true, Ok(why)) => assert!(why.contains("http://b:2 leads now"), "{why}"),
                (false, Err(_)) => {
                    assert_eq!(store.get(LEADER_KEY).await.unwrap().as_deref(), Some(&b"http://a:1"[..]));
                }
                (replaced, outcome) => panic!("replaced: {replaced}, lost: {:?}", outcome.ok()),
            }
        }
    }
}
