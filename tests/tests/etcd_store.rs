//! The coordinator's etcd store against a real etcd: once fenced on the leader key and its lease,
//! its writes land while that key is held under that lease and are refused, by etcd in the same
//! transaction, once another coordinator holds it (a leader replaced across a partition that
//! healed); the successor's state stays as it wrote it.

use std::time::Duration;

use awq_coordinator::leader::{LEADER_KEY, LEADER_TTL_S};
use awq_coordinator::store::{EtcdStore, Fence, Store};
use awq_e2e::cluster::Etcd;

#[tokio::test]
async fn a_fenced_store_refuses_writes_once_another_coordinator_holds_the_leader_key() {
    let dir = tempfile::tempdir().expect("a temporary folder");
    let etcd = Etcd::start(dir.path());
    let endpoint = etcd.store().trim_start_matches("etcd://").to_string();
    let connect = || EtcdStore::connect(&endpoint, Duration::from_secs(10));
    let (old, new) = (connect().await.expect("etcd answers"), connect().await.expect("etcd answers"));

    let old_lease = old.grant_lease(LEADER_TTL_S).await.unwrap();
    assert!(old.create_leased(LEADER_KEY, b"http://a:1".to_vec(), old_lease).await.unwrap());
    old.fence(Fence { key: LEADER_KEY.into(), lease: old_lease });
    old.put("/awq/v1/jobs/j1", b"by a".to_vec()).await.expect("the leader writes");
    old.put_leased("/awq/v1/workers/w0", b"w0".to_vec(), old_lease).await.expect("the leader writes");
    old.delete_prefix("/awq/v1/workers/").await.expect("the leader deletes");

    // The old lease lapses (revoked here: the key goes with it) and another coordinator leads.
    new.revoke(old_lease).await.unwrap();
    let new_lease = new.grant_lease(LEADER_TTL_S).await.unwrap();
    assert!(new.create_leased(LEADER_KEY, b"http://b:2".to_vec(), new_lease).await.unwrap());
    new.fence(Fence { key: LEADER_KEY.into(), lease: new_lease });
    new.put("/awq/v1/jobs/j1", b"by b".to_vec()).await.expect("the new leader writes");

    let refused = [
        old.put("/awq/v1/jobs/j1", b"by a, late".to_vec()).await,
        old.delete_prefix("/awq/v1/jobs/").await,
        old.put_leased("/awq/v1/workers/w1", b"w1".to_vec(), new_lease).await,
    ];
    for (i, outcome) in refused.into_iter().enumerate() {
        let err = outcome.expect_err("a replaced leader's write").to_string();
        assert!(err.contains("write refused") && err.contains(LEADER_KEY), "write {i}: {err}");
    }
    assert_eq!(new.get("/awq/v1/jobs/j1").await.unwrap().as_deref(), Some(&b"by b"[..]));
    assert_eq!(new.get("/awq/v1/workers/w1").await.unwrap(), None);
}
