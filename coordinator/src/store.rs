//! Where the coordinator keeps its state: a small key-value interface with leases, backed by memory
//! (the embedded default) or by etcd (a cluster that must survive a coordinator restart).
//!
//! The coordinator writes jobs (`/awq/v1/jobs/{id}`, the `Job` message), finished blocks
//! (`/awq/v1/blocks/{id}/{block:05}`), finished tails (`/awq/v1/tails/{id}`), live workers
//! (`/awq/v1/workers/{id}`, under a lease that lapses when the coordinator stops renewing it) and
//! deployments (`/awq/v1/deployments/{name}`, the `Deployment` message);
//! [`keys`] spells every key and prefix, nothing else does. Values are opaque bytes here: what
//! they hold is the caller's (the service encodes `awq.v1` messages).
//!
//! Fencing: once a coordinator leads (`crate::leader`), its store is fenced on the leader key and
//! the lease it holds that key under ([`Store::fence`]): every write from then on lands only while
//! that key is still held under that lease, checked by the store in the same step as the write
//! (an etcd transaction). A leader that was replaced without noticing yet (a partition from etcd
//! that healed) has its writes refused instead of landing over its successor's state.

use std::collections::BTreeMap;
use std::sync::Mutex;

use etcd_client::{Client, Compare, CompareOp, DeleteOptions, GetOptions, PutOptions, Txn, TxnOp};

use crate::{Error, Result};

/// Every key the coordinator reads or writes, and the prefixes it lists or deletes by.
pub mod keys {
    /// The prefix of every job record.
    pub const JOBS: &str = "/awq/v1/jobs/";

    /// Read (never written) to see whether the store answers before taking new work.
    pub const PROBE: &str = "/awq/v1/probe";
    /// A key read once, to prove a store answers.
    pub(crate) const PING: &str = "/awq/v1/ping";

    /// Job `id`'s record (the `Job` message).
    pub fn job(id: &str) -> String {
        format!("{JOBS}{id}")
    }

    /// The prefix of job `id`'s finished blocks.
    pub fn blocks(id: &str) -> String {
        format!("/awq/v1/blocks/{id}/")
    }

    /// Block `block` of job `id`, finished (its result is staged).
    pub fn block(id: &str, block: u32) -> String {
        format!("{}{block:05}", blocks(id))
    }

    /// The block a key under [`blocks`] names.
    pub fn block_of(key: &str) -> Option<u32> {
        key.rsplit('/').next().and_then(|b| b.parse::<u32>().ok())
    }

    /// Job `id`'s tail, finished (its result is staged).
    pub fn tail(id: &str) -> String {
        format!("/awq/v1/tails/{id}")
    }

    /// Job `id`'s output, renamed into place: the identity of its folder (`DEV:INO`,
    /// `awq_model::writer::FolderId`), written just before the rename. A coordinator that restarts
    /// with the job still assembling finds the output committed when the folder at the output path
    /// is that one, and does not assemble it again.
    pub fn committed(id: &str) -> String {
        format!("/awq/v1/committed/{id}")
    }

    /// Worker `id`, while it is joined (the `WorkerInfo` message, leased).
    pub fn worker(id: &str) -> String {
        format!("/awq/v1/workers/{id}")
    }

    /// The prefix of every deployment record.
    pub const DEPLOYMENTS: &str = "/awq/v1/deployments/";

    /// Deployment `name`'s record (the `Deployment` message: its spec and its replicas'
    /// generations).
    pub fn deployment(name: &str) -> String {
        format!("{DEPLOYMENTS}{name}")
    }
}

/// What a fenced store's writes require: `key` held under `lease` (see the module docs).
#[derive(Clone, Debug, PartialEq)]
pub struct Fence {
    pub key: String,
    pub lease: i64,
}

/// The error of a write a fence refused.
fn fenced(fence: &Fence) -> Error {
    Error::Store(format!(
        "write refused: {} is no longer held under this coordinator's lease {} (another coordinator leads)",
        fence.key, fence.lease
    ))
}

/// The state store interface; every call is one round trip.
#[tonic::async_trait]
pub trait Store: Send + Sync + 'static {
    /// From now on, writes (`put`, `put_leased`, `delete_prefix`) land only while `fence.key` is
    /// held under `fence.lease`, and fail naming the fence otherwise; `create_leased` (how the
    /// leader key itself is taken) is not fenced. A later fence replaces an earlier one.
    fn fence(&self, fence: Fence);
    async fn put(&self, key: &str, value: Vec<u8>) -> Result<()>;
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>>;
    /// Every key under `prefix`, sorted by key.
    async fn list(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>>;
    async fn delete_prefix(&self, prefix: &str) -> Result<()>;
    /// A lease that expires `ttl_s` seconds after its last renewal; returns its id.
    async fn grant_lease(&self, ttl_s: i64) -> Result<i64>;
    /// Renews a lease once.
    async fn keep_alive(&self, lease: i64) -> Result<()>;
    /// Writes a key that disappears with `lease`.
    async fn put_leased(&self, key: &str, value: Vec<u8>, lease: i64) -> Result<()>;
    /// Writes `key` with `lease` only if no one holds it (one atomic step); returns whether it did.
    async fn create_leased(&self, key: &str, value: Vec<u8>, lease: i64) -> Result<bool>;
    async fn revoke(&self, lease: i64) -> Result<()>;
    /// What kind of store this is, for logs (`memory`, `etcd://...`).
    fn describe(&self) -> String;
}

/// State in this process's memory: lost when it exits. Leases never expire on their own (the
/// process that would renew them is the one holding them).
#[derive(Default)]
pub struct MemoryStore {
    data: Mutex<BTreeMap<String, Vec<u8>>>,
    leases: Mutex<BTreeMap<i64, Vec<String>>>,
    /// The last lease id granted (ids are never reused, as etcd's are not).
    last_lease: std::sync::atomic::AtomicI64,
    fence: Mutex<Option<Fence>>,
}

impl MemoryStore {
    fn data(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Vec<u8>>> {
        self.data.lock().expect("store lock is never held across a panic")
    }

    /// Refuses a write while the fence's key is not held under its lease.
    fn check_fence(&self) -> Result<()> {
        let fence = self.fence.lock().expect("fence lock").clone();
        let Some(fence) = fence else { return Ok(()) };
        let held = self.data().contains_key(&fence.key)
            && self.leases.lock().expect("lease lock").get(&fence.lease).is_some_and(|keys| keys.contains(&fence.key));
        if held {
            Ok(())
        } else {
            Err(fenced(&fence))
        }
    }

    /// Writes `key` (with `lease`), fence or not.
    fn insert(&self, key: &str, value: Vec<u8>, lease: Option<i64>) {
        if let Some(lease) = lease {
            self.leases.lock().expect("lease lock").entry(lease).or_default().push(key.to_string());
        }
        self.data().insert(key.to_string(), value);
    }
}

#[tonic::async_trait]
impl Store for MemoryStore {
    fn fence(&self, fence: Fence) {
        *self.fence.lock().expect("fence lock") = Some(fence);
    }

    async fn put(&self, key: &str, value: Vec<u8>) -> Result<()> {
        self.check_fence()?;
        self.insert(key, value, None);
        Ok(())
    }

    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.data().get(key).cloned())
    }

    async fn list(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>> {
        Ok(self
            .data()
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    async fn delete_prefix(&self, prefix: &str) -> Result<()> {
        self.check_fence()?;
        self.data().retain(|k, _| !k.starts_with(prefix));
        Ok(())
    }

    async fn grant_lease(&self, _ttl_s: i64) -> Result<i64> {
        let id = self.last_lease.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        self.leases.lock().expect("lease lock").insert(id, Vec::new());
        Ok(id)
    }

    async fn keep_alive(&self, lease: i64) -> Result<()> {
        if self.leases.lock().expect("lease lock").contains_key(&lease) {
            Ok(())
        } else {
            Err(Error::Store(format!("lease {lease} does not exist")))
        }
    }

    async fn put_leased(&self, key: &str, value: Vec<u8>, lease: i64) -> Result<()> {
        self.check_fence()?;
        self.insert(key, value, Some(lease));
        Ok(())
    }

    async fn create_leased(&self, key: &str, value: Vec<u8>, lease: i64) -> Result<bool> {
        if self.data().contains_key(key) {
            return Ok(false);
        }
        self.insert(key, value, Some(lease));
        Ok(true)
    }

    async fn revoke(&self, lease: i64) -> Result<()> {
        let keys = self.leases.lock().expect("lease lock").remove(&lease).unwrap_or_default();
        let mut data = self.data();
        for k in keys {
            data.remove(&k);
        }
        Ok(())
    }

    fn describe(&self) -> String {
        "memory".into()
    }
}

/// State in etcd (v3 API).
pub struct EtcdStore {
    client: Client,
    endpoint: String,
    fence: Mutex<Option<Fence>>,
}

impl EtcdStore {
    /// Connects to `endpoint` (`host:port` or `http://host:port`), failing within `timeout`.
    pub async fn connect(endpoint: &str, timeout: std::time::Duration) -> Result<EtcdStore> {
        let options = etcd_client::ConnectOptions::new().with_connect_timeout(timeout).with_timeout(timeout);
        let client = Client::connect([endpoint], Some(options))
            .await
            .map_err(|e| Error::Store(format!("cannot connect to etcd at {endpoint}: {e}")))?;
        let store = EtcdStore { client, endpoint: endpoint.to_string(), fence: Mutex::new(None) };
        // connect() is lazy about the first request; make a real one so a wrong address fails here.
        store.get(keys::PING).await?;
        Ok(store)
    }

    fn err(&self, what: &str, e: etcd_client::Error) -> Error {
        Error::Store(format!("etcd {} {what}: {e}", self.endpoint))
    }

    /// `op` in one transaction with the fence's check (none before a fence: the transaction has
    /// no condition then).
    async fn write(&self, what: &str, op: TxnOp) -> Result<()> {
        let fence = self.fence.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let when: Vec<Compare> =
            fence.iter().map(|f| Compare::lease(f.key.as_str(), CompareOp::Equal, f.lease)).collect();
        let reply =
            self.client.clone().txn(Txn::new().when(when).and_then([op])).await.map_err(|e| self.err(what, e))?;
        match (reply.succeeded(), fence) {
            (false, Some(fence)) => Err(fenced(&fence)),
            _ => Ok(()),
        }
    }
}

#[tonic::async_trait]
impl Store for EtcdStore {
    fn fence(&self, fence: Fence) {
        *self.fence.lock().unwrap_or_else(|e| e.into_inner()) = Some(fence);
    }

    async fn put(&self, key: &str, value: Vec<u8>) -> Result<()> {
        self.write("put", TxnOp::put(key, value, None)).await
    }

    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let resp = self.client.clone().get(key, None).await.map_err(|e| self.err("get", e))?;
        Ok(resp.kvs().first().map(|kv| kv.value().to_vec()))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>> {
        let options = GetOptions::new().with_prefix().with_sort(etcd_client::SortTarget::Key, etcd_client::SortOrder::Ascend);
        let resp = self.client.clone().get(prefix, Some(options)).await.map_err(|e| self.err("list", e))?;
        resp.kvs()
            .iter()
            .map(|kv| {
                let key = kv.key_str().map_err(|e| self.err("list (key is not UTF-8)", e))?;
                Ok((key.to_string(), kv.value().to_vec()))
            })
            .collect()
    }

    async fn delete_prefix(&self, prefix: &str) -> Result<()> {
        self.write("delete", TxnOp::delete(prefix, Some(DeleteOptions::new().with_prefix()))).await
    }

    async fn grant_lease(&self, ttl_s: i64) -> Result<i64> {
        let resp = self.client.clone().lease_grant(ttl_s, None).await.map_err(|e| self.err("lease grant", e))?;
        Ok(resp.id())
    }

    async fn keep_alive(&self, lease: i64) -> Result<()> {
        let (mut keeper, mut stream) = self.client.clone().lease_keep_alive(lease).await.map_err(|e| self.err("keep-alive", e))?;
        keeper.keep_alive().await.map_err(|e| self.err("keep-alive", e))?;
        match stream.message().await.map_err(|e| self.err("keep-alive", e))? {
            Some(resp) if resp.ttl() > 0 => Ok(()),
            _ => Err(Error::Store(format!("etcd lease {lease} has expired"))),
        }
    }

    async fn put_leased(&self, key: &str, value: Vec<u8>, lease: i64) -> Result<()> {
        self.write("put", TxnOp::put(key, value, Some(PutOptions::new().with_lease(lease)))).await
    }

    async fn create_leased(&self, key: &str, value: Vec<u8>, lease: i64) -> Result<bool> {
        // A key no one holds has never been created (create_revision 0).
        let txn = Txn::new()
            .when([Compare::create_revision(key, CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key, value, Some(PutOptions::new().with_lease(lease)))]);
        let reply = self.client.clone().txn(txn).await.map_err(|e| self.err("txn", e))?;
        Ok(reply.succeeded())
    }

    async fn revoke(&self, lease: i64) -> Result<()> {
        self.client.clone().lease_revoke(lease).await.map_err(|e| self.err("lease revoke", e))?;
        Ok(())
    }

    fn describe(&self) -> String {
        format!("etcd://{}", self.endpoint)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_the_ones_records_were_written_under() {
        assert_eq!(keys::job("j18f"), "/awq/v1/jobs/j18f");
        assert!(keys::job("j18f").starts_with(keys::JOBS));
        assert_eq!(keys::block("j18f", 7), "/awq/v1/blocks/j18f/00007");
        assert!(keys::block("j18f", 7).starts_with(&keys::blocks("j18f")));
        assert_eq!(keys::block_of(&keys::block("j18f", 123456)), Some(123456));
        assert_eq!(keys::block_of("/awq/v1/blocks/j18f/tail"), None);
        assert_eq!(keys::tail("j18f"), "/awq/v1/tails/j18f");
        assert_eq!(keys::worker("gpu-3"), "/awq/v1/workers/gpu-3");
    }

    #[tokio::test]
    async fn memory_store_lists_by_prefix_in_order_and_drops_leased_keys() {
        let s = MemoryStore::default();
        s.put("/a/2", b"two".to_vec()).await.unwrap();
        s.put("/a/1", b"one".to_vec()).await.unwrap();
        s.put("/b/1", b"other".to_vec()).await.unwrap();
        let keys: Vec<String> = s.list("/a/").await.unwrap().into_iter().map(|(k, _)| k).collect();
        assert_eq!(keys, ["/a/1", "/a/2"]);
        let lease = s.grant_lease(5).await.unwrap();
        s.put_leased("/w/1", b"w".to_vec(), lease).await.unwrap();
        s.keep_alive(lease).await.unwrap();
        s.revoke(lease).await.unwrap();
        assert_eq!(s.get("/w/1").await.unwrap(), None);
        assert!(s.keep_alive(lease).await.is_err());
        s.delete_prefix("/a/").await.unwrap();
        assert!(s.list("/a/").await.unwrap().is_empty());
        assert_eq!(s.get("/b/1").await.unwrap().as_deref(), Some(&b"other"[..]));
    }
}
