//! One conformance suite for every store backend: the local directory store (the embedded
//! default) and S3, run against a real Garage server. Whatever the agent relies on is asserted here
//! for both, so "the local store behaves exactly like S3" is a tested fact:
//! - objects appear whole and atomically; an upload in progress is invisible to `list`/`get`/`head`;
//! - an upload that is neither completed nor aborted (a crash) is reported by `list_uploads` and
//!   removed by `abort_upload`; `abort` removes its parts and leaves the key as it was;
//! - parts form the object in the order `put_part` was called, whatever order their uploads run
//!   and finish in (the pipeline runs several at once); `complete` needs a receipt for every part;
//! - every part but the last must be at least 5 MiB (S3's rule), or the object never appears;
//! - keys cannot escape the prefix; missing objects are `NotFound`; deletes are idempotent.

use std::sync::Arc;

use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
use bytes::Bytes;
use futures::StreamExt;
use soma_agent::store::{MIN_PART_SIZE, Store, StoreError, local::LocalStore, s3::S3Store};
use soma_tests::Garage;

async fn read_all(store: &dyn Store, key: &str) -> Vec<u8> {
    let mut stream = store.get(key).await.expect("get");
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        out.extend_from_slice(&chunk.expect("chunk"));
    }
    out
}

fn part(fill: u8, len: usize) -> Bytes {
    Bytes::from(vec![fill; len])
}

async fn conformance(store: Arc<dyn Store>) {
    let s = store.as_ref();

    // Whole objects.
    s.put("backups/a/manifest.json", Bytes::from_static(b"{\"v\":1}"))
        .await
        .unwrap();
    assert_eq!(read_all(s, "backups/a/manifest.json").await, b"{\"v\":1}");
    let head = s.head("backups/a/manifest.json").await.unwrap().unwrap();
    assert_eq!(head.size, 7);
    assert!(s.head("backups/a/nothing").await.unwrap().is_none());
    match s.get("backups/a/nothing").await {
        Err(StoreError::NotFound { key }) => assert_eq!(key, "backups/a/nothing"),
        Err(e) => panic!("expected NotFound, got {e}"),
        Ok(_) => panic!("expected NotFound, got an object"),
    }
    // Overwrite replaces atomically.
    s.put("backups/a/manifest.json", Bytes::from_static(b"{\"v\":2}"))
        .await
        .unwrap();
    assert_eq!(read_all(s, "backups/a/manifest.json").await, b"{\"v\":2}");

    // Multipart: invisible until complete, then exactly the concatenation of its parts in the
    // order they were put, even when their uploads run at once and the last one starts first.
    let mut up = s.start_upload("backups/b/dump.zst").await.unwrap();
    let p1 = up.put_part(part(1, MIN_PART_SIZE));
    let p2 = up.put_part(part(2, MIN_PART_SIZE));
    let p3 = up.put_part(part(3, 1000));
    let (r3, r2, r1) = tokio::join!(p3, p2, p1);
    let receipts = vec![r3.unwrap(), r1.unwrap(), r2.unwrap()];
    assert_eq!(
        receipts.iter().map(|r| r.number()).collect::<Vec<_>>(),
        [3, 1, 2]
    );
    assert!(s.head("backups/b/dump.zst").await.unwrap().is_none());
    let listed: Vec<String> = s
        .list("backups/")
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect();
    assert_eq!(listed, vec!["backups/a/manifest.json".to_string()]);
    let pending = s.list_uploads("backups/").await.unwrap();
    assert_eq!(pending.len(), 1, "{pending:?}");
    assert_eq!(pending[0].key, "backups/b/dump.zst");
    let meta = up.complete(receipts).await.unwrap();
    assert_eq!(meta.size, (2 * MIN_PART_SIZE + 1000) as u64);
    let body = read_all(s, "backups/b/dump.zst").await;
    assert_eq!(body.len(), 2 * MIN_PART_SIZE + 1000);
    assert!(body[..MIN_PART_SIZE].iter().all(|&b| b == 1));
    assert!(
        body[MIN_PART_SIZE..2 * MIN_PART_SIZE]
            .iter()
            .all(|&b| b == 2)
    );
    assert!(body[2 * MIN_PART_SIZE..].iter().all(|&b| b == 3));
    assert!(s.list_uploads("backups/").await.unwrap().is_empty());

    // Abort leaves nothing and does not touch an existing object at the key.
    let mut up = s.start_upload("backups/b/dump.zst").await.unwrap();
    up.put_part(part(9, MIN_PART_SIZE)).await.unwrap();
    up.abort().await.unwrap();
    assert_eq!(
        read_all(s, "backups/b/dump.zst").await.len(),
        2 * MIN_PART_SIZE + 1000
    );
    assert!(s.list_uploads("backups/").await.unwrap().is_empty());

    // Completing without a receipt for every part fails, publishes nothing and cleans up.
    let mut up = s.start_upload("backups/b/dump.zst").await.unwrap();
    let r1 = up.put_part(part(5, MIN_PART_SIZE)).await.unwrap();
    up.put_part(part(6, 1000)).await.unwrap();
    assert!(up.complete(vec![r1]).await.is_err());
    assert_eq!(
        read_all(s, "backups/b/dump.zst").await.len(),
        2 * MIN_PART_SIZE + 1000
    );
    assert!(s.list_uploads("backups/").await.unwrap().is_empty());

    // A writer that vanishes (crash) leaves an incomplete upload that can be found and aborted.
    let mut up = s.start_upload("backups/c/dump.zst").await.unwrap();
    up.put_part(part(7, MIN_PART_SIZE)).await.unwrap();
    drop(up);
    let pending = s.list_uploads("backups/").await.unwrap();
    assert_eq!(pending.len(), 1, "{pending:?}");
    assert_eq!(pending[0].key, "backups/c/dump.zst");
    assert!(s.head("backups/c/dump.zst").await.unwrap().is_none());
    s.abort_upload(&pending[0]).await.unwrap();
    assert!(s.list_uploads("backups/").await.unwrap().is_empty());
    // Aborting twice is harmless.
    s.abort_upload(&pending[0]).await.unwrap();

    // S3's part-size rule holds everywhere: a short part that is not last means no object.
    let mut up = s.start_upload("backups/d/dump.zst").await.unwrap();
    let mut receipts = Vec::new();
    let mut result = up.put_part(part(1, 1000)).await.map(|r| receipts.push(r));
    if result.is_ok() {
        result = up
            .put_part(part(2, MIN_PART_SIZE))
            .await
            .map(|r| receipts.push(r));
    }
    let result = match result {
        Ok(()) => up.complete(receipts).await.map(|_| ()),
        Err(e) => {
            up.abort().await.unwrap();
            Err(e)
        }
    };
    assert!(result.is_err(), "a short middle part must be refused");
    assert!(s.head("backups/d/dump.zst").await.unwrap().is_none());
    assert!(s.list_uploads("backups/").await.unwrap().is_empty());

    // Keys cannot escape the prefix.
    for bad in ["../x", "/abs", "a//b", "a/./b"] {
        assert!(
            matches!(
                s.put(bad, Bytes::new()).await,
                Err(StoreError::InvalidKey { .. })
            ),
            "{bad:?} must be refused"
        );
    }

    // Deletes are idempotent and list follows them.
    s.delete("backups/a/manifest.json").await.unwrap();
    s.delete("backups/a/manifest.json").await.unwrap();
    let listed: Vec<String> = s
        .list("")
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect();
    assert_eq!(listed, vec!["backups/b/dump.zst".to_string()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_store_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::open(dir.path().join("store")).await.unwrap();
    conformance(Arc::new(store)).await;
}

#[test]
fn s3_store_on_garage_conforms() {
    let garage = Garage::start();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let config = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .endpoint_url(garage.endpoint())
            .region(Region::new("us-east-1"))
            .credentials_provider(Credentials::new(
                garage.access_key(),
                garage.secret_key(),
                None,
                None,
                "garage-test",
            ))
            .force_path_style(true)
            .build();
        let client = aws_sdk_s3::Client::from_conf(config);
        let store = S3Store::from_client(client, garage.bucket(), "conformance/run");
        conformance(Arc::new(store)).await;
    });
}
