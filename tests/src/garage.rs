//! A real Garage S3 server, single node, throwaway, per test (see shared/TESTING.md).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use aws_sdk_s3::Client;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_s3::primitives::ByteStream;
use tempfile::TempDir;

use crate::util::{free_port, random_hex, tail};

/// The bucket every test Garage creates.
pub const BUCKET: &str = "soma-test";
/// Region Garage is configured with.
pub const REGION: &str = "us-east-1";
/// How long Garage may take to create its default key and bucket.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// A Garage 2.5 server on 127.0.0.1 with one bucket ([`BUCKET`]) and one key with access to it;
/// killed and deleted on drop.
///
/// Holds a small tokio runtime so tests can stay synchronous: the helper methods block on it, and
/// [`s3_client`](Self::s3_client) futures can be driven with [`block_on`](Self::block_on).
#[derive(Debug)]
pub struct Garage {
    dir: TempDir,
    child: Child,
    endpoint: String,
    access_key: String,
    secret_key: String,
    client: Client,
    rt: tokio::runtime::Runtime,
}

/// One multipart upload in progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingUpload {
    /// Object key the upload will create.
    pub key: String,
    /// The server's upload id.
    pub upload_id: String,
}

impl Garage {
    /// Starts Garage on free ports and waits until an authenticated HeadBucket on [`BUCKET`]
    /// succeeds (it listens before its key and bucket exist).
    pub fn start() -> Self {
        let binary = garage_binary();
        let mut rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("cannot build a tokio runtime");
        let mut last_failure = String::new();
        for _ in 0..3 {
            let dir = tempfile::Builder::new()
                .prefix("soma-garage-")
                .tempdir()
                .expect("cannot create a temporary directory for Garage");
            let rpc_port = free_port();
            let s3_port = free_port();
            let config = format!(
                r#"metadata_dir = "{dir}/meta"
data_dir = "{dir}/data"
db_engine = "sqlite"
replication_factor = 1
compression_level = "none"
rpc_bind_addr = "127.0.0.1:{rpc_port}"
rpc_public_addr = "127.0.0.1:{rpc_port}"
rpc_secret = "{secret}"
[s3_api]
s3_region = "{REGION}"
api_bind_addr = "127.0.0.1:{s3_port}"
root_domain = ".s3.garage.localhost"
"#,
                dir = dir.path().display(),
                secret = random_hex(32),
            );
            let config_path = dir.path().join("garage.toml");
            std::fs::write(&config_path, config).expect("cannot write garage.toml");
            let access_key = format!("GK{}", random_hex(12));
            let secret_key = random_hex(32);
            let log = std::fs::File::create(dir.path().join("garage.log"))
                .expect("cannot create garage.log");
            let child = Command::new(&binary)
                .arg("-c")
                .arg(&config_path)
                .args(["server", "--single-node", "--default-bucket"])
                .env("GARAGE_DEFAULT_ACCESS_KEY", &access_key)
                .env("GARAGE_DEFAULT_SECRET_KEY", &secret_key)
                .env("GARAGE_DEFAULT_BUCKET", BUCKET)
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("cannot clone log handle"))
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
            let endpoint = format!("http://127.0.0.1:{s3_port}");
            let client = s3_client_for(&endpoint, &access_key, &secret_key);
            let mut garage = Garage {
                dir,
                child,
                endpoint,
                access_key,
                secret_key,
                client,
                rt,
            };
            match garage.wait_ready() {
                Ok(()) => return garage,
                Err(e) => {
                    last_failure = format!("{e}\n--- garage log ---\n{}", tail(&garage.log(), 40));
                    rt = garage.into_runtime();
                }
            }
        }
        panic!("Garage did not become ready:\n{last_failure}");
    }

    /// S3 endpoint, e.g. `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The bucket ([`BUCKET`]).
    pub fn bucket(&self) -> &str {
        BUCKET
    }

    /// Access key id (`GK` + 24 hex digits).
    pub fn access_key(&self) -> &str {
        &self.access_key
    }

    /// Secret access key (64 hex digits).
    pub fn secret_key(&self) -> &str {
        &self.secret_key
    }

    /// Environment that points the AWS SDK (inside the agent) at this server.
    pub fn env(&self) -> Vec<(String, String)> {
        self.env_with_secret(&self.secret_key)
    }

    /// Like [`env`](Self::env) but with another secret key (to test bad credentials).
    pub fn env_with_secret(&self, secret_key: &str) -> Vec<(String, String)> {
        [
            ("AWS_ENDPOINT_URL", self.endpoint.as_str()),
            ("AWS_ACCESS_KEY_ID", self.access_key.as_str()),
            ("AWS_SECRET_ACCESS_KEY", secret_key),
            ("AWS_REGION", REGION),
            ("AWS_EC2_METADATA_DISABLED", "true"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
    }

    /// An S3 client for this server (path-style, us-east-1); drive its futures with
    /// [`block_on`](Self::block_on).
    pub fn s3_client(&self) -> Client {
        self.client.clone()
    }

    /// A client that signs with another secret key (to see what the server does with bad
    /// credentials).
    pub fn s3_client_with_secret(&self, secret_key: &str) -> Client {
        s3_client_for(&self.endpoint, &self.access_key, secret_key)
    }

    /// Runs a future on this server's runtime.
    pub fn block_on<F: std::future::Future>(&self, future: F) -> F::Output {
        self.rt.block_on(future)
    }

    /// Garage's own log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("garage.log")).unwrap_or_default()
    }

    /// An authenticated HeadBucket on [`BUCKET`].
    pub fn head_bucket(&self) -> Result<(), String> {
        self.block_on(self.client.head_bucket().bucket(BUCKET).send())
            .map(|_| ())
            .map_err(|e| format!("{:?}", aws_sdk_s3::error::DisplayErrorContext(e)))
    }

    /// The whole content of object `key`.
    pub fn get_object(&self, key: &str) -> Vec<u8> {
        self.block_on(async {
            let resp = self
                .client
                .get_object()
                .bucket(BUCKET)
                .key(key)
                .send()
                .await
                .unwrap_or_else(|e| panic!("GetObject {key}: {}", err(e)));
            resp.body
                .collect()
                .await
                .unwrap_or_else(|e| panic!("reading object {key}: {e}"))
                .into_bytes()
                .to_vec()
        })
    }

    /// Replaces object `key` with `body`.
    pub fn put_object(&self, key: &str, body: Vec<u8>) {
        self.block_on(
            self.client
                .put_object()
                .bucket(BUCKET)
                .key(key)
                .body(ByteStream::from(body))
                .send(),
        )
        .unwrap_or_else(|e| panic!("PutObject {key}: {}", err(e)));
    }

    /// Keys of all objects under `prefix`, sorted.
    pub fn list_keys(&self, prefix: &str) -> Vec<String> {
        self.block_on(async {
            let mut keys = Vec::new();
            let mut token = None;
            loop {
                let resp = self
                    .client
                    .list_objects_v2()
                    .bucket(BUCKET)
                    .prefix(prefix)
                    .set_continuation_token(token)
                    .send()
                    .await
                    .unwrap_or_else(|e| panic!("ListObjectsV2 {prefix}: {}", err(e)));
                keys.extend(
                    resp.contents()
                        .iter()
                        .filter_map(|o| o.key().map(str::to_owned)),
                );
                if resp.is_truncated() != Some(true) {
                    break;
                }
                token = resp.next_continuation_token().map(str::to_owned);
            }
            keys.sort();
            keys
        })
    }

    /// Multipart uploads in progress under `prefix` (ListMultipartUploads).
    pub fn multipart_uploads(&self, prefix: &str) -> Vec<PendingUpload> {
        let resp = self
            .block_on(
                self.client
                    .list_multipart_uploads()
                    .bucket(BUCKET)
                    .prefix(prefix)
                    .send(),
            )
            .unwrap_or_else(|e| panic!("ListMultipartUploads {prefix}: {}", err(e)));
        resp.uploads()
            .iter()
            .map(|u| PendingUpload {
                key: u.key().unwrap_or_default().to_owned(),
                upload_id: u.upload_id().unwrap_or_default().to_owned(),
            })
            .collect()
    }

    /// Sizes of the parts uploaded so far to `upload` (ListParts); none when the upload was
    /// completed or aborted since it was listed (a small artifact's upload may end in between).
    pub fn part_sizes(&self, upload: &PendingUpload) -> Vec<i64> {
        use aws_sdk_s3::error::ProvideErrorMetadata;
        let resp = match self.block_on(
            self.client
                .list_parts()
                .bucket(BUCKET)
                .key(&upload.key)
                .upload_id(&upload.upload_id)
                .send(),
        ) {
            Ok(resp) => resp,
            Err(e) if e.code() == Some("NoSuchUpload") => return Vec::new(),
            Err(e) => panic!("ListParts {}: {}", upload.key, err(e)),
        };
        resp.parts()
            .iter()
            .map(|p| p.size().unwrap_or_default())
            .collect()
    }

    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().map_err(|e| e.to_string())? {
                return Err(format!("garage exited early: {status}"));
            }
            let last = match self.head_bucket() {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            if Instant::now() >= deadline {
                return Err(format!(
                    "HeadBucket {BUCKET} still failing after {READY_TIMEOUT:?}: {last}"
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills the server and hands back the runtime for another attempt.
    fn into_runtime(mut self) -> tokio::runtime::Runtime {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("cannot build a tokio runtime");
        std::mem::replace(&mut self.rt, rt)
    }
}

impl Garage {
    /// Kills the server: the store becomes unreachable (connections refused).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- Garage log ({}), last lines ---\n{}",
                self.endpoint,
                tail(&self.log(), 30)
            );
        }
    }
}

/// A client with explicit credentials, path-style addressing and bounded timeouts.
fn s3_client_for(endpoint: &str, access_key: &str, secret_key: &str) -> Client {
    let config = aws_sdk_s3::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(REGION))
        .endpoint_url(endpoint)
        .force_path_style(true)
        .credentials_provider(Credentials::new(
            access_key,
            secret_key,
            None,
            None,
            "soma-tests",
        ))
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(5))
                .operation_timeout(Duration::from_secs(60))
                .build(),
        )
        .build();
    Client::from_conf(config)
}

fn err<E: std::error::Error>(e: E) -> String {
    format!("{}", aws_sdk_s3::error::DisplayErrorContext(e))
}

/// `$GARAGE_BIN`, `garage` on PATH, or `~/.cargo/bin/garage`; panics with the install command.
fn garage_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("GARAGE_BIN") {
        return PathBuf::from(path);
    }
    let mut candidates: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("garage"))
                .collect()
        })
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("HOME") {
        candidates.push(PathBuf::from(home).join(".cargo/bin/garage"));
    }
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "the Garage S3 server is not installed (no `garage` on PATH nor in ~/.cargo/bin): \
                 run `cargo install garage@2.5.0 --locked`"
            )
        })
}
