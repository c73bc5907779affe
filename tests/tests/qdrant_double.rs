//! Proves the Qdrant double behaves as its module docs say (soma_tests::qdrant), with a plain
//! HTTP client as the agent would use: envelopes and status codes, the snapshot life cycle with
//! checksums that match the bytes, uploads that restore the same fingerprint, shard streaming,
//! full snapshots, the API key, version gating, and every fault knob. Sizes are small.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use reqwest::blocking::{Client, Response, multipart};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use soma_tests::poll_until;
use soma_tests::qdrant::{
    ApiKeyUse, DOWNLOAD_CHUNK, QdrantDouble, Times, full_snapshot_fingerprints,
    shard_snapshot_fingerprint, snapshot_fingerprint,
};

const KEY: &str = "test-key-123";

fn client() -> Client {
    Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Status and JSON body.
fn json_of(response: Response) -> (StatusCode, Value) {
    let status = response.status();
    let body = response.text().unwrap();
    let value = serde_json::from_str(&body)
        .unwrap_or_else(|e| panic!("not JSON ({e}), status {status}: {body:?}"));
    (status, value)
}

fn get(q: &QdrantDouble, path: &str) -> (StatusCode, Value) {
    json_of(client().get(format!("{}{path}", q.url())).send().unwrap())
}

fn post(q: &QdrantDouble, path: &str, body: Option<Value>) -> (StatusCode, Value) {
    let mut request = client().post(format!("{}{path}", q.url()));
    if let Some(body) = body {
        request = request.json(&body);
    }
    json_of(request.send().unwrap())
}

fn delete(q: &QdrantDouble, path: &str) -> (StatusCode, Value) {
    json_of(
        client()
            .delete(format!("{}{path}", q.url()))
            .send()
            .unwrap(),
    )
}

/// Asserts the success envelope and returns `result`.
fn ok_result((status, body): (StatusCode, Value)) -> Value {
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "ok", "{body}");
    assert!(body["time"].is_f64(), "{body}");
    body["result"].clone()
}

/// Asserts the error envelope and returns the message.
fn error_message((status, body): (StatusCode, Value), expected: StatusCode) -> String {
    assert_eq!(status, expected, "{body}");
    assert!(body.get("result").is_none(), "{body}");
    assert!(body["time"].is_f64(), "{body}");
    body["status"]["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no status.error in {body}"))
        .to_string()
}

fn download(q: &QdrantDouble, path: &str) -> Vec<u8> {
    let response = client().get(format!("{}{path}", q.url())).send().unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    response.bytes().unwrap().to_vec()
}

/// Reads a download to its end or its first error: (bytes received, clean end).
fn read_until_error(mut response: Response) -> (usize, bool) {
    let mut buf = vec![0u8; 8192];
    let mut total = 0;
    loop {
        match response.read(&mut buf) {
            Ok(0) => return (total, true),
            Ok(n) => total += n,
            Err(_) => return (total, false),
        }
    }
}

fn create_snapshot(q: &QdrantDouble, collection: &str) -> Value {
    ok_result(post(
        q,
        &format!("/collections/{collection}/snapshots?wait=true"),
        None,
    ))
}

fn upload(
    q: &QdrantDouble,
    path_and_query: &str,
    file_name: &str,
    bytes: Vec<u8>,
) -> (StatusCode, Value) {
    let part = multipart::Part::bytes(bytes).file_name(file_name.to_string());
    let form = multipart::Form::new().part("snapshot", part);
    json_of(
        client()
            .post(format!("{}{path_and_query}", q.url()))
            .multipart(form)
            .send()
            .unwrap(),
    )
}

fn double_with(collection: &str, data_bytes: u64) -> QdrantDouble {
    let q = QdrantDouble::start(None);
    q.add_collection(collection, 8, 1000, data_bytes, 42);
    q
}

#[test]
fn root_collections_and_error_envelopes() {
    let q = double_with("docs", 10_000);

    // GET / is a bare VersionInfo, not an envelope.
    let (status, root) = get(&q, "/");
    assert_eq!(status, StatusCode::OK);
    assert_eq!(root["title"], "qdrant - vector search engine");
    assert_eq!(root["version"], "1.18.3");
    assert!(root["commit"].is_string());
    assert!(root.get("result").is_none());
    q.set_version("1.17.2");
    assert_eq!(get(&q, "/").1["version"], "1.17.2");

    let list = ok_result(get(&q, "/collections"));
    assert_eq!(list, json!({"collections": [{"name": "docs"}]}));

    let info = ok_result(get(&q, "/collections/docs/"));
    assert_eq!(info["status"], "green");
    assert_eq!(info["optimizer_status"], "ok");
    assert_eq!(info["points_count"], 1000);
    assert_eq!(info["indexed_vectors_count"], 1000);
    assert!(info["segments_count"].as_u64().unwrap() >= 1);
    assert_eq!(
        info["config"]["params"]["vectors"],
        json!({"size": 8, "distance": "Cosine"})
    );
    for key in ["hnsw_config", "optimizer_config", "wal_config"] {
        assert!(info["config"][key].is_object(), "{key} missing: {info}");
    }
    assert_eq!(info["payload_schema"], json!({}));
    assert_eq!(
        ok_result(get(&q, "/collections/docs/exists")),
        json!({"exists": true})
    );

    let message = error_message(get(&q, "/collections/nope"), StatusCode::NOT_FOUND);
    assert_eq!(message, "Not found: Collection `nope` doesn't exist!");
    let message = error_message(
        post(&q, "/collections/nope/snapshots", None),
        StatusCode::NOT_FOUND,
    );
    assert_eq!(message, "Not found: Collection `nope` doesn't exist!");

    // A path no route matches: actix's empty 404.
    let response = client()
        .get(format!("{}/no/such/route", q.url()))
        .send()
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    assert_eq!(response.text().unwrap(), "");

    // Creating and deleting collections.
    let created = client()
        .put(format!("{}/collections/fresh", q.url()))
        .json(&json!({"vectors": {"size": 4, "distance": "Dot"}}))
        .send()
        .unwrap();
    assert_eq!(ok_result(json_of(created)), json!(true));
    let again = client()
        .put(format!("{}/collections/fresh", q.url()))
        .json(&json!({"vectors": {"size": 4, "distance": "Dot"}}))
        .send()
        .unwrap();
    assert_eq!(
        error_message(json_of(again), StatusCode::CONFLICT),
        "Wrong input: Collection `fresh` already exists!"
    );
    assert_eq!(ok_result(delete(&q, "/collections/fresh")), json!(true));
    assert_eq!(ok_result(delete(&q, "/collections/fresh")), json!(false));
    assert_eq!(q.collections(), vec!["docs".to_string()]);

    let log = q.requests();
    assert_eq!(log[0].method, "GET");
    assert_eq!(log[0].path, "/");
    assert_eq!(log[0].status, 200);
    assert!(
        log.iter().any(|r| r.path == "/collections/nope/snapshots"
            && r.method == "POST"
            && r.status == 404)
    );
}

#[test]
fn aliases_apply_in_order_and_keep_earlier_actions_on_error() {
    let q = QdrantDouble::start(None);
    q.add_collection("a", 4, 1, 10, 1);
    q.add_collection("b", 4, 1, 10, 2);

    let change = |actions: Value| {
        post(
            &q,
            "/collections/aliases",
            Some(json!({"actions": actions})),
        )
    };
    assert_eq!(
        ok_result(change(json!([
            {"create_alias": {"collection_name": "a", "alias_name": "x"}},
            {"rename_alias": {"old_alias_name": "x", "new_alias_name": "y"}},
            {"create_alias": {"collection_name": "b", "alias_name": "z"}},
        ]))),
        json!(true)
    );
    assert_eq!(
        ok_result(get(&q, "/aliases")),
        json!({"aliases": [
            {"alias_name": "y", "collection_name": "a"},
            {"alias_name": "z", "collection_name": "b"},
        ]})
    );
    assert_eq!(
        ok_result(get(&q, "/collections/a/aliases")),
        json!({"aliases": [{"alias_name": "y", "collection_name": "a"}]})
    );
    // Names resolve through aliases.
    assert_eq!(ok_result(get(&q, "/collections/y"))["points_count"], 1);

    // The first action applies, the second fails: Qdrant keeps the first.
    let message = error_message(
        change(json!([
            {"delete_alias": {"alias_name": "z"}},
            {"create_alias": {"collection_name": "missing", "alias_name": "w"}},
        ])),
        StatusCode::NOT_FOUND,
    );
    assert_eq!(message, "Not found: Collection `missing` doesn't exist!");
    assert_eq!(q.aliases(), vec![("y".to_string(), "a".to_string())]);

    // Deleting an unknown alias is fine; an alias cannot shadow a collection.
    assert_eq!(
        ok_result(change(json!([{"delete_alias": {"alias_name": "never"}}]))),
        json!(true)
    );
    let message = error_message(
        change(json!([{"create_alias": {"collection_name": "a", "alias_name": "b"}}])),
        StatusCode::CONFLICT,
    );
    assert_eq!(message, "Wrong input: Collection `b` already exists!");
    let message = error_message(
        change(json!([{"rename_alias": {"old_alias_name": "nope", "new_alias_name": "n"}}])),
        StatusCode::NOT_FOUND,
    );
    assert_eq!(message, "Not found: Alias nope does not exists!");

    // Deleting a collection drops its aliases.
    ok_result(delete(&q, "/collections/a"));
    assert!(q.aliases().is_empty());
}

#[test]
fn collection_snapshot_create_list_download_delete() {
    let q = double_with("docs", 3 * (1 << 20) + 12_345);
    let description = create_snapshot(&q, "docs");
    let name = description["name"].as_str().unwrap().to_string();
    let parts: Vec<&str> = name.trim_end_matches(".snapshot").splitn(3, '-').collect();
    assert_eq!(parts[0], "docs");
    assert!(parts[1].chars().all(|c| c.is_ascii_digit()), "{name}");
    assert_eq!(parts[2].len(), "2024-07-22-08-31-55".len(), "{name}");
    assert!(name.ends_with(".snapshot"));
    let checksum = description["checksum"].as_str().unwrap().to_string();
    assert!(description["creation_time"].as_str().unwrap().contains('T'));

    let list = ok_result(get(&q, "/collections/docs/snapshots"));
    assert_eq!(list, json!([description]));

    let response = client()
        .get(format!("{}/collections/docs/snapshots/{name}", q.url()))
        .send()
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let headers = response.headers().clone();
    assert_eq!(headers["content-type"], "application/octet-stream");
    assert_eq!(
        headers["content-disposition"],
        format!("attachment; filename=\"{name}\"").as_str()
    );
    let bytes = response.bytes().unwrap();
    assert_eq!(
        headers["content-length"].to_str().unwrap(),
        bytes.len().to_string()
    );
    assert_eq!(bytes.len() as u64, description["size"].as_u64().unwrap());
    assert_eq!(sha256_hex(&bytes), checksum);
    assert_eq!(
        snapshot_fingerprint(&bytes[..]).unwrap(),
        q.fingerprint("docs")
    );
    // The snapshot and its checksum file are on the node's disk.
    assert_eq!(q.snapshot_files_on_node().len(), 2);

    // A byte range, as actix-files serves it.
    let partial = client()
        .get(format!("{}/collections/docs/snapshots/{name}", q.url()))
        .header("range", "bytes=100-")
        .send()
        .unwrap();
    assert_eq!(partial.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(&partial.bytes().unwrap()[..], &bytes[100..]);

    assert_eq!(
        ok_result(delete(
            &q,
            &format!("/collections/docs/snapshots/{name}?wait=true")
        )),
        json!(true)
    );
    assert_eq!(ok_result(get(&q, "/collections/docs/snapshots")), json!([]));
    assert!(q.snapshot_files_on_node().is_empty());

    // Gone: the download handler answers in plain text, delete in the envelope.
    let missing = client()
        .get(format!("{}/collections/docs/snapshots/{name}", q.url()))
        .send()
        .unwrap();
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        missing.text().unwrap(),
        format!("Not found: Snapshot {name} not found")
    );
    let message = error_message(
        delete(&q, &format!("/collections/docs/snapshots/{name}")),
        StatusCode::NOT_FOUND,
    );
    assert_eq!(message, format!("Not found: Snapshot {name} not found"));

    // wait=false answers 202 and the snapshot appears later.
    let (status, body) = post(&q, "/collections/docs/snapshots?wait=false", None);
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(body["status"], "accepted");
    assert!(body.get("result").is_none());
    poll_until(Duration::from_secs(10), "the background snapshot", || {
        let list = ok_result(get(&q, "/collections/docs/snapshots"));
        (list.as_array().unwrap().len() == 1).then_some(())
    });
    let message = error_message(
        post(&q, "/collections/docs/snapshots?wait=maybe", None),
        StatusCode::BAD_REQUEST,
    );
    assert_eq!(
        message,
        "Deserialize error in query parameters: provided string was not `true` or `false`"
    );
}

#[test]
fn upload_restores_the_same_fingerprint_under_a_new_name() {
    let q = double_with("docs", (1 << 20) + 7);
    q.add_collection("other", 16, 5, 100, 9);
    let name = create_snapshot(&q, "docs")["name"]
        .as_str()
        .unwrap()
        .to_string();
    let bytes = download(&q, &format!("/collections/docs/snapshots/{name}"));
    ok_result(delete(&q, &format!("/collections/docs/snapshots/{name}")));
    let checksum = sha256_hex(&bytes);

    let result = ok_result(upload(
        &q,
        &format!(
            "/collections/restored/snapshots/upload?wait=true&priority=snapshot&checksum={checksum}"
        ),
        "restore.snapshot",
        bytes.clone(),
    ));
    assert_eq!(result, json!(true));
    assert_eq!(q.fingerprint("restored"), q.fingerprint("docs"));
    let restored = q.collection("restored").unwrap();
    assert_eq!(
        (
            restored.vector_size,
            restored.points_count,
            restored.data_bytes
        ),
        (8, 1000, (1 << 20) + 7)
    );

    // Like Qdrant 1.18, the uploaded file stays in the collection's snapshot directory until
    // deleted through the API.
    let left = q.snapshot_files_on_node();
    assert_eq!(left.len(), 1, "{left:?}");
    assert!(left[0].ends_with("restored/restore.snapshot"), "{left:?}");
    assert_eq!(
        ok_result(get(&q, "/collections/restored/snapshots"))[0]["name"],
        "restore.snapshot"
    );
    ok_result(delete(
        &q,
        "/collections/restored/snapshots/restore.snapshot",
    ));
    assert!(q.snapshot_files_on_node().is_empty());

    // Overwriting a compatible collection works; an incompatible one is refused.
    assert_eq!(
        ok_result(upload(
            &q,
            "/collections/restored/snapshots/upload?priority=replica",
            "again.snapshot",
            bytes.clone(),
        )),
        json!(true)
    );
    let message = error_message(
        upload(
            &q,
            "/collections/other/snapshots/upload",
            "x.snapshot",
            bytes,
        ),
        StatusCode::BAD_REQUEST,
    );
    assert!(
        message.starts_with("Wrong input: Snapshot is not compatible with existing collection"),
        "{message}"
    );
    assert_eq!(q.collection("other").unwrap().vector_size, 16);
}

#[test]
fn upload_with_wrong_checksum_or_bad_params_creates_nothing() {
    let q = double_with("docs", 50_000);
    let name = create_snapshot(&q, "docs")["name"]
        .as_str()
        .unwrap()
        .to_string();
    let bytes = download(&q, &format!("/collections/docs/snapshots/{name}"));
    ok_result(delete(&q, &format!("/collections/docs/snapshots/{name}")));
    let actual = sha256_hex(&bytes);
    let wrong = "ab".repeat(32);

    let message = error_message(
        upload(
            &q,
            &format!("/collections/copy/snapshots/upload?checksum={wrong}"),
            "copy.snapshot",
            bytes.clone(),
        ),
        StatusCode::BAD_REQUEST,
    );
    assert_eq!(
        message,
        format!("Checksum mismatch: expected {actual}, actual {wrong}")
    );
    assert!(q.collection("copy").is_none());
    assert!(q.snapshot_files_on_node().is_empty());

    let message = error_message(
        upload(
            &q,
            "/collections/copy/snapshots/upload?priority=bogus",
            "copy.snapshot",
            bytes.clone(),
        ),
        StatusCode::BAD_REQUEST,
    );
    assert_eq!(
        message,
        "Deserialize error in query parameters: unknown variant `bogus`, expected one of \
         `no_sync`, `snapshot`, `replica`"
    );
    let message = error_message(
        upload(
            &q,
            "/collections/copy/snapshots/upload?checksum=abc",
            "copy.snapshot",
            bytes,
        ),
        StatusCode::UNPROCESSABLE_ENTITY,
    );
    assert!(
        message.starts_with("Validation error in query parameters: [checksum:"),
        "{message}"
    );
    assert!(q.collection("copy").is_none());
    assert!(q.snapshot_files_on_node().is_empty());
}

#[test]
fn upload_cut_off_mid_body_recovers_nothing() {
    let q = double_with("docs", 2 << 20);
    let name = create_snapshot(&q, "docs")["name"]
        .as_str()
        .unwrap()
        .to_string();
    let bytes = download(&q, &format!("/collections/docs/snapshots/{name}"));
    ok_result(delete(&q, &format!("/collections/docs/snapshots/{name}")));

    let boundary = "soma-boundary-7d1";
    let mut body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"snapshot\"; \
         filename=\"cut.snapshot\"\r\nContent-Type: application/octet-stream\r\n\r\n"
    )
    .into_bytes();
    body.extend_from_slice(&bytes);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());

    let address = q.url().trim_start_matches("http://").to_string();
    let mut stream = TcpStream::connect(&address).unwrap();
    write!(
        stream,
        "POST /collections/cut/snapshots/upload?wait=true HTTP/1.1\r\nHost: {address}\r\n\
         Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    stream.write_all(&body[..body.len() / 2]).unwrap();
    stream.flush().unwrap();
    drop(stream);

    poll_until(
        Duration::from_secs(10),
        "the cut upload to be answered",
        || {
            q.requests()
                .iter()
                .find(|r| r.path == "/collections/cut/snapshots/upload")
                .filter(|r| r.status != 0)
                .map(|_| ())
        },
    );
    assert!(q.collection("cut").is_none());
    assert!(q.snapshot_files_on_node().is_empty());
}

#[test]
fn api_key_is_required_everywhere_but_the_root() {
    let q = QdrantDouble::start(Some(KEY));
    q.add_collection("docs", 4, 1, 10, 1);
    assert_eq!(q.api_key(), Some(KEY));

    // GET / is whitelisted.
    assert_eq!(get(&q, "/").0, StatusCode::OK);

    let missing = client()
        .get(format!("{}/collections", q.url()))
        .send()
        .unwrap();
    assert_eq!(missing.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        missing.text().unwrap(),
        "Must provide an API key or an Authorization bearer token"
    );
    let wrong = client()
        .get(format!("{}/collections", q.url()))
        .header("api-key", "nope")
        .send()
        .unwrap();
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(wrong.text().unwrap(), "Invalid API key or JWT");
    // Auth runs before routing.
    let unknown = client()
        .get(format!("{}/no/such/route", q.url()))
        .send()
        .unwrap();
    assert_eq!(unknown.status(), StatusCode::UNAUTHORIZED);

    let with_key = client()
        .get(format!("{}/collections", q.url()))
        .header("api-key", KEY)
        .send()
        .unwrap();
    assert_eq!(
        ok_result(json_of(with_key))["collections"][0]["name"],
        "docs"
    );
    let bearer = client()
        .get(format!("{}/collections/docs", q.url()))
        .bearer_auth(KEY)
        .send()
        .unwrap();
    assert_eq!(bearer.status(), StatusCode::OK);

    let without: Vec<(String, ApiKeyUse, u16)> = q
        .requests_without_api_key()
        .into_iter()
        .map(|r| (r.path, r.api_key, r.status))
        .collect();
    assert_eq!(
        without,
        vec![
            ("/".to_string(), ApiKeyUse::Missing, 200),
            ("/collections".to_string(), ApiKeyUse::Missing, 401),
            ("/collections".to_string(), ApiKeyUse::Wrong, 401),
            ("/no/such/route".to_string(), ApiKeyUse::Missing, 401),
        ]
    );
    q.clear_requests();
    assert!(q.requests().is_empty());
}

#[test]
fn shard_stream_recovers_to_the_same_fingerprint_and_is_version_gated() {
    let q = double_with("docs", 5 * (1 << 20) + 3);
    let response = client()
        .get(format!("{}/collections/docs/shards/0/snapshot", q.url()))
        .send()
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers()["content-type"],
        "application/octet-stream"
    );
    assert!(response.headers().get("content-length").is_none());
    let disposition = response.headers()["content-disposition"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        disposition.starts_with("attachment; filename=\"docs-shard-0-"),
        "{disposition}"
    );
    let stream = response.bytes().unwrap().to_vec();
    assert!(
        q.snapshot_files_on_node().is_empty(),
        "streaming wrote a file"
    );
    assert_eq!(
        shard_snapshot_fingerprint(&stream[..]).unwrap(),
        q.fingerprint("docs")
    );

    // Same content as a file snapshot of the collection.
    let name = create_snapshot(&q, "docs")["name"]
        .as_str()
        .unwrap()
        .to_string();
    let file = download(&q, &format!("/collections/docs/snapshots/{name}"));
    assert_eq!(
        snapshot_fingerprint(&file[..]).unwrap(),
        shard_snapshot_fingerprint(&stream[..]).unwrap()
    );

    // A shard archive is recovered into an existing collection through the shard upload.
    let created = client()
        .put(format!("{}/collections/copy", q.url()))
        .json(&json!({"vectors": {"size": 8, "distance": "Cosine"}}))
        .send()
        .unwrap();
    ok_result(json_of(created));
    let checksum = sha256_hex(&stream);
    assert_eq!(
        ok_result(upload(
            &q,
            &format!(
                "/collections/copy/shards/0/snapshots/upload?wait=true&priority=no_sync&checksum={checksum}"
            ),
            "shard.snapshot",
            stream.clone(),
        )),
        Value::Null
    );
    assert_eq!(q.fingerprint("copy"), q.fingerprint("docs"));
    assert_eq!(
        error_message(
            upload(
                &q,
                "/collections/missing/shards/0/snapshots/upload",
                "shard.snapshot",
                stream,
            ),
            StatusCode::NOT_FOUND
        ),
        "Not found: Collection `missing` doesn't exist!"
    );

    let other_shard = client()
        .get(format!("{}/collections/docs/shards/1/snapshot", q.url()))
        .send()
        .unwrap();
    assert_eq!(other_shard.status(), StatusCode::NOT_FOUND);
    assert_eq!(other_shard.text().unwrap(), "Not found: shard 1 not found");

    // The route exists from 1.12.0; older servers answer like an unknown route.
    let status_at = |version: &str| {
        q.set_version(version);
        let response = client()
            .get(format!("{}/collections/docs/shards/0/snapshot", q.url()))
            .send()
            .unwrap();
        let status = response.status();
        let body = response.bytes().unwrap();
        (status, body.is_empty())
    };
    assert_eq!(status_at("1.11.5"), (StatusCode::NOT_FOUND, true));
    assert_eq!(status_at("1.12.0").0, StatusCode::OK);
    assert_eq!(status_at("1.17.2").0, StatusCode::OK);
    assert_eq!(status_at("1.19.0").0, StatusCode::OK);
}

#[test]
fn full_snapshot_holds_every_collection_and_leaves_checksum_files_like_qdrant() {
    let q = QdrantDouble::start(None);
    q.add_collection("a", 4, 10, 300_000, 1);
    q.add_collection("b", 6, 20, 10_000, 2);
    q.add_alias("alias-a", "a");

    let description = ok_result(post(&q, "/snapshots?wait=true", None));
    let name = description["name"].as_str().unwrap().to_string();
    assert!(name.starts_with("full-snapshot-") && name.ends_with(".snapshot"));
    assert_eq!(ok_result(get(&q, "/snapshots")), json!([description]));

    let bytes = download(&q, &format!("/snapshots/{name}"));
    assert_eq!(
        sha256_hex(&bytes),
        description["checksum"].as_str().unwrap()
    );
    let fingerprints = full_snapshot_fingerprints(&bytes[..]).unwrap();
    assert_eq!(fingerprints.len(), 2);
    assert_eq!(fingerprints["a"], q.fingerprint("a"));
    assert_eq!(fingerprints["b"], q.fingerprint("b"));

    assert_eq!(
        ok_result(delete(&q, &format!("/snapshots/{name}?wait=true"))),
        json!(true)
    );
    // Qdrant moves each collection snapshot into the full archive but not its .checksum file.
    let left = q.snapshot_files_on_node();
    assert_eq!(left.len(), 2, "{left:?}");
    assert!(
        left.iter()
            .all(|p| p.to_string_lossy().ends_with(".snapshot.checksum")),
        "{left:?}"
    );
    assert_eq!(ok_result(get(&q, "/collections/a/snapshots")), json!([]));

    let missing = client()
        .get(format!("{}/snapshots/{name}", q.url()))
        .send()
        .unwrap();
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
}

#[test]
fn fault_wrong_checksum_in_create_response() {
    let q = double_with("docs", 20_000);
    q.report_wrong_checksum(Times::Next(1));
    let description = create_snapshot(&q, "docs");
    let name = description["name"].as_str().unwrap();
    let bytes = download(&q, &format!("/collections/docs/snapshots/{name}"));
    let reported = description["checksum"].as_str().unwrap();
    assert_ne!(sha256_hex(&bytes), reported);
    assert_eq!(reported.len(), 64);
    assert_eq!(
        ok_result(get(&q, "/collections/docs/snapshots"))[0]["checksum"],
        reported
    );
    // The file itself is intact.
    assert_eq!(
        snapshot_fingerprint(&bytes[..]).unwrap(),
        q.fingerprint("docs")
    );
    ok_result(delete(&q, &format!("/collections/docs/snapshots/{name}")));

    // Next(1) has been used up.
    let description = create_snapshot(&q, "docs");
    let name = description["name"].as_str().unwrap();
    let bytes = download(&q, &format!("/collections/docs/snapshots/{name}"));
    assert_eq!(
        sha256_hex(&bytes),
        description["checksum"].as_str().unwrap()
    );
}

#[test]
fn fault_cut_downloads_after_n_bytes() {
    let q = double_with("docs", 500_000);
    let name = create_snapshot(&q, "docs")["name"]
        .as_str()
        .unwrap()
        .to_string();
    let path = format!("/collections/docs/snapshots/{name}");
    let full_len = download(&q, &path).len();

    q.cut_downloads_after(100_000, Times::Next(2));
    let response = client().get(format!("{}{path}", q.url())).send().unwrap();
    assert_eq!(
        response.headers()["content-length"].to_str().unwrap(),
        full_len.to_string()
    );
    assert_eq!(read_until_error(response), (100_000, false));

    // Shard streams are cut the same way.
    let stream = client()
        .get(format!("{}/collections/docs/shards/0/snapshot", q.url()))
        .send()
        .unwrap();
    assert_eq!(read_until_error(stream), (100_000, false));

    // Both uses are spent: whole again.
    assert_eq!(download(&q, &path).len(), full_len);

    q.cut_downloads_after(0, Times::Always);
    for _ in 0..2 {
        let response = client().get(format!("{}{path}", q.url())).send().unwrap();
        assert_eq!(read_until_error(response), (0, false));
    }
    q.clear_faults();
    assert_eq!(download(&q, &path).len(), full_len);
}

#[test]
fn fault_slow_downloads_and_slow_creation() {
    let q = double_with("docs", 4 * DOWNLOAD_CHUNK as u64);
    q.set_snapshot_create_delay(Duration::from_millis(300));
    let started = Instant::now();
    let name = create_snapshot(&q, "docs")["name"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(started.elapsed() >= Duration::from_millis(300));
    q.set_snapshot_create_delay(Duration::ZERO);

    // At least five chunks (the archive is a little larger than the data).
    q.set_download_chunk_delay(Duration::from_millis(60));
    let started = Instant::now();
    let bytes = download(&q, &format!("/collections/docs/snapshots/{name}"));
    assert!(bytes.len() > 4 * DOWNLOAD_CHUNK);
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "{:?}",
        started.elapsed()
    );
    q.set_download_chunk_delay(Duration::ZERO);
    let started = Instant::now();
    download(&q, &format!("/collections/docs/snapshots/{name}"));
    assert!(started.elapsed() < Duration::from_millis(300));
}

#[test]
fn fault_snapshot_creation_fails_with_500() {
    let q = double_with("docs", 1_000);
    q.fail_snapshot_creation(Times::Next(1));
    let message = error_message(
        post(&q, "/collections/docs/snapshots?wait=true", None),
        StatusCode::INTERNAL_SERVER_ERROR,
    );
    assert!(
        message.starts_with("Service internal error: failed to create snapshot"),
        "{message}"
    );
    assert!(q.snapshot_files_on_node().is_empty());
    create_snapshot(&q, "docs");

    q.fail_snapshot_creation(Times::Always);
    let message = error_message(
        post(&q, "/snapshots", None),
        StatusCode::INTERNAL_SERVER_ERROR,
    );
    assert!(message.contains("failed to create snapshot"), "{message}");
}

/// A single node answers the cluster API like Qdrant without `cluster.enabled`: `/cluster` is
/// `disabled`, and a collection's one shard is local and Active under the node's own peer id —
/// so a client that reads the layout treats it as a cluster of one.
#[test]
fn single_node_reports_cluster_disabled_and_its_shard_local() {
    let q = double_with("solo", 4096);
    let cluster = ok_result(get(&q, "/cluster"));
    assert_eq!(cluster, json!({"status": "disabled"}));

    let info = ok_result(get(&q, "/collections/solo/cluster"));
    assert!(info["peer_id"].as_u64().is_some_and(|p| p > 0), "{info}");
    assert_eq!(info["shard_count"], 1, "{info}");
    let local = info["local_shards"].as_array().unwrap();
    assert_eq!(local.len(), 1, "{info}");
    assert_eq!(local[0]["shard_id"], 0, "{info}");
    assert_eq!(local[0]["state"], "Active", "{info}");
    assert_eq!(
        local[0]["points_count"],
        q.collection("solo").unwrap().points_count,
        "{info}"
    );
    assert!(local[0].get("shard_key").is_none(), "{info}");
    assert_eq!(info["remote_shards"], json!([]), "{info}");
    assert_eq!(info["shard_transfers"], json!([]), "{info}");

    let message = error_message(get(&q, "/collections/nope/cluster"), StatusCode::NOT_FOUND);
    assert_eq!(message, "Not found: Collection `nope` doesn't exist!");
}
