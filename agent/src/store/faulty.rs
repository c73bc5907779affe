//! A store that fails on purpose, for unit tests: wraps a real store (a local directory) and
//! injects, per request kind and call number, what a misbehaving object store does — an error,
//! or a download cut after some bytes — so the layers above can be shown to fail cleanly, leave
//! nothing that looks valid, and clean up. (Retries, deadlines and resumed downloads belong to
//! the S3 store and are tested against Garage behind a fault-injecting proxy.)

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt as _;

use super::{
    ByteStream, ObjectMeta, PartReceipt, PartUpload, PendingUpload, Result, Store, StoreError,
    Upload,
};

/// The requests a fault can be attached to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Op {
    Put,
    StartUpload,
    PutPart,
    Complete,
    Abort,
    Get,
    List,
    Delete,
}

/// What happens to the request.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Fault {
    /// It fails with a (retryable or not) request error.
    Fail { retryable: bool },
    /// A download hands over this many bytes, then fails as a reset connection does.
    CutAfter(usize),
}

/// A store with faults injected into the `nth` call (1-based) of each listed request kind.
#[derive(Debug)]
pub(crate) struct Faulty {
    inner: Arc<dyn Store>,
    faults: Arc<Mutex<Faults>>,
}

#[derive(Debug, Default)]
struct Faults {
    rules: Vec<(Op, u32, Fault)>,
    calls: HashMap<Op, u32>,
}

impl Faults {
    fn next(&mut self, op: Op) -> Option<Fault> {
        let n = self.calls.entry(op).or_default();
        *n += 1;
        let n = *n;
        self.rules
            .iter()
            .find(|(o, nth, _)| *o == op && *nth == n)
            .map(|(_, _, f)| *f)
    }
}

impl Faulty {
    pub(crate) fn new(inner: Arc<dyn Store>) -> Self {
        Self {
            inner,
            faults: Arc::default(),
        }
    }

    /// Injects `fault` into the `nth` call of `op`.
    pub(crate) fn inject(self, op: Op, nth: u32, fault: Fault) -> Self {
        self.faults.lock().unwrap().rules.push((op, nth, fault));
        self
    }

    /// How many calls of `op` were made.
    pub(crate) fn calls(&self, op: Op) -> u32 {
        self.faults
            .lock()
            .unwrap()
            .calls
            .get(&op)
            .copied()
            .unwrap_or(0)
    }

    fn next(faults: &Mutex<Faults>, op: Op) -> Option<Fault> {
        faults.lock().unwrap().next(op)
    }
}

fn injected(key: &str, retryable: bool) -> StoreError {
    StoreError::Request {
        key: key.to_string(),
        message: "injected failure".into(),
        retryable,
        remedy: None,
        source: None,
    }
}

/// Applies a fault to a request that is not a download.
fn apply(fault: Option<Fault>, key: &str) -> Result<()> {
    match fault {
        None => Ok(()),
        Some(Fault::Fail { retryable }) => Err(injected(key, retryable)),
        Some(Fault::CutAfter(_)) => Err(injected(key, true)),
    }
}

#[async_trait]
impl Store for Faulty {
    fn location(&self) -> String {
        self.inner.location()
    }

    async fn put(&self, key: &str, data: Bytes) -> Result<()> {
        apply(Self::next(&self.faults, Op::Put), key)?;
        self.inner.put(key, data).await
    }

    async fn start_upload(&self, key: &str) -> Result<Box<dyn Upload>> {
        apply(Self::next(&self.faults, Op::StartUpload), key)?;
        Ok(Box::new(FaultyUpload {
            inner: self.inner.start_upload(key).await?,
            key: key.to_string(),
            faults: self.faults.clone(),
        }))
    }

    async fn get(&self, key: &str) -> Result<ByteStream> {
        let fault = Self::next(&self.faults, Op::Get);
        let Some(Fault::CutAfter(limit)) = fault else {
            apply(fault, key)?;
            return self.inner.get(key).await;
        };
        let inner = self.inner.get(key).await?;
        let key = key.to_string();
        // Bytes pass until `limit`; then one error, as from a reset connection, and the end.
        let stream =
            futures::stream::unfold((inner, 0usize, false), move |(mut inner, sent, over)| {
                let key = key.clone();
                async move {
                    if over {
                        return None;
                    }
                    if sent >= limit {
                        return Some((Err(injected(&key, true)), (inner, sent, true)));
                    }
                    match inner.next().await {
                        Some(Ok(bytes)) => {
                            let head = bytes.slice(..bytes.len().min(limit - sent));
                            let sent = sent + head.len();
                            Some((Ok(head), (inner, sent, false)))
                        }
                        other => other.map(|item| (item, (inner, sent, true))),
                    }
                }
            });
        Ok(Box::pin(stream))
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectMeta>> {
        self.inner.head(key).await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        apply(Self::next(&self.faults, Op::List), prefix)?;
        self.inner.list(prefix).await
    }

    async fn delete(&self, key: &str) -> Result<()> {
        apply(Self::next(&self.faults, Op::Delete), key)?;
        self.inner.delete(key).await
    }

    async fn list_uploads(&self, prefix: &str) -> Result<Vec<PendingUpload>> {
        self.inner.list_uploads(prefix).await
    }

    async fn abort_upload(&self, upload: &PendingUpload) -> Result<()> {
        apply(Self::next(&self.faults, Op::Abort), &upload.key)?;
        self.inner.abort_upload(upload).await
    }
}

struct FaultyUpload {
    inner: Box<dyn Upload>,
    key: String,
    faults: Arc<Mutex<Faults>>,
}

#[async_trait]
impl Upload for FaultyUpload {
    fn put_part(&mut self, data: Bytes) -> PartUpload {
        let fault = Faulty::next(&self.faults, Op::PutPart);
        let part = self.inner.put_part(data);
        let key = self.key.clone();
        Box::pin(async move {
            apply(fault, &key)?;
            part.await
        })
    }

    async fn complete(self: Box<Self>, parts: Vec<PartReceipt>) -> Result<ObjectMeta> {
        // As S3 does: a failed complete leaves the upload pending until it is aborted.
        apply(Faulty::next(&self.faults, Op::Complete), &self.key)?;
        self.inner.complete(parts).await
    }

    async fn abort(self: Box<Self>) -> Result<()> {
        apply(Faulty::next(&self.faults, Op::Abort), &self.key)?;
        self.inner.abort().await
    }
}
