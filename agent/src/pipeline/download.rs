//! The way back: stored bytes → sha256 → zstd decode → sha256 → sink, the tail held back until
//! every check passed.

use super::*;
use crate::store::ByteStream;

/// The largest window a stored frame may make the decoder allocate: 2^27 bytes (128 MiB). zstd
/// needs no more for any level the agent compresses at (1..=22, never in long-distance mode) and
/// limits itself to this by default; pinned here because a frame header may ask for up to 2 GiB,
/// and anyone who can write to the bucket can write the frame.
const WINDOW_LOG_MAX: u32 = 27;

/// The zstd decoder of every download, refusing frames whose window is over [`WINDOW_LOG_MAX`].
fn bounded_decoder<R: Read>(
    reader: R,
) -> io::Result<zstd::stream::read::Decoder<'static, io::BufReader<R>>> {
    let mut dec = zstd::stream::read::Decoder::new(reader)?;
    dec.window_log_max(WINDOW_LOG_MAX)?;
    Ok(dec)
}

/// A `Read` over chunks arriving on a channel, for the zstd decoder's thread.
struct ChannelReader {
    rx: mpsc::Receiver<Bytes>,
    current: Bytes,
}

impl Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                Some(chunk) => self.current = chunk,
                None => return Ok(0),
            }
        }
        let n = out.len().min(self.current.len());
        out[..n].copy_from_slice(&self.current[..n]);
        let _ = self.current.split_to(n);
        Ok(n)
    }
}

/// Streams the object at `key` back through zstd into `sink`, checking sizes and digests against
/// `expected`. The last `holdback` raw bytes reach the sink only after every check passed; on a
/// mismatch the sink is left without them (and not shut down), and an error names the mismatch.
pub(crate) async fn download<W>(
    store: &dyn Store,
    key: &str,
    expected: &Expected,
    mut sink: W,
    holdback: usize,
    counters: Arc<Counters>,
) -> Result<(), PipelineError>
where
    W: AsyncWrite + Unpin + Send,
{
    let stream = store.get(key).await?;
    let (stored_tx, stored_rx) = mpsc::channel::<Bytes>(RAW_QUEUE);
    let (raw_tx, raw_rx) = mpsc::channel::<Bytes>(RAW_QUEUE);
    let limit = RawLimit::of(expected);
    let decoder = tokio::task::spawn_blocking(move || decode(stored_rx, raw_tx, limit, holdback));
    let mut tail = Tail::new(holdback);
    let (fetch_res, write_res) = tokio::join!(
        fetch(stream, stored_tx, &counters),
        tail.write_released(raw_rx, &mut sink, &counters)
    );
    let decode_res = decoder.await.expect("decoder thread panicked");

    let (stored_sha256, stored_bytes) = fetch_res?;
    let stored = (expected.stored_bytes, expected.stored_sha256);
    check(key, "stored", stored, stored_bytes, stored_sha256)?;
    if let Err(source) = decode_res {
        return Err(PipelineError::Decode {
            key: key.to_string(),
            source,
        });
    }
    let (raw_sha256, raw_bytes) = write_res?;
    let raw = (expected.raw_bytes, Some(expected.raw_sha256));
    check(key, "raw", raw, raw_bytes, raw_sha256)?;
    // Every check passed: release the tail.
    for chunk in tail.held {
        sink.write_all(&chunk).await.map_err(PipelineError::Sink)?;
        counters
            .raw
            .fetch_add(chunk.len() as u64, Ordering::Relaxed);
    }
    sink.flush().await.map_err(PipelineError::Sink)?;
    sink.shutdown().await.map_err(PipelineError::Sink)?;
    Ok(())
}

/// The most raw bytes an object may decode to, and whose number that is (for the error).
#[derive(Clone, Copy)]
struct RawLimit {
    bytes: Option<u64>,
    whose: &'static str,
}

impl RawLimit {
    fn of(expected: &Expected) -> Self {
        RawLimit {
            bytes: expected.raw_bytes.or(expected.raw_at_most),
            whose: if expected.raw_bytes.is_some() {
                "its manifest's"
            } else {
                "the most it may hold,"
            },
        }
    }
}

/// The decoder thread: stored bytes from `stored_rx` through zstd, raw chunks to `raw_tx`,
/// stopping once the output passes `limit`.
fn decode(
    stored_rx: mpsc::Receiver<Bytes>,
    raw_tx: mpsc::Sender<Bytes>,
    limit: RawLimit,
    holdback: usize,
) -> io::Result<()> {
    let reader = ChannelReader {
        rx: stored_rx,
        current: Bytes::new(),
    };
    let mut dec = bounded_decoder(reader)?;
    let mut produced = 0u64;
    // Chunks wait in the channel and in the held-back tail: the pool keeps as many for reuse.
    let chunks = ChunkPool::new(RAW_QUEUE + holdback / READ_CHUNK + 3);
    loop {
        // Fill a whole chunk (zstd returns at most one block per call), so the sink gets
        // few large writes.
        let mut buf = chunks.take();
        buf.resize(READ_CHUNK, 0);
        let mut len = 0;
        while len < READ_CHUNK {
            match dec.read(&mut buf[len..])? {
                0 => break,
                n => len += n,
            }
        }
        if len == 0 {
            return Ok(());
        }
        // A frame that decodes to more than the manifest says (a decompression bomb) stops
        // here, not after every byte of it was decoded and hashed.
        produced += len as u64;
        if let Some(limit_bytes) = limit.bytes
            && produced > limit_bytes
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "it decompresses to more than {} {limit_bytes} bytes",
                    limit.whose
                ),
            ));
        }
        buf.truncate(len);
        if raw_tx.blocking_send(chunks.lend(buf)).is_err() {
            return Ok(());
        }
    }
}

/// Reads the stored object into the decoder's channel, hashing it: its sha256 and size.
async fn fetch(
    mut stream: ByteStream,
    stored_tx: mpsc::Sender<Bytes>,
    counters: &Counters,
) -> Result<(Sha256Digest, u64), PipelineError> {
    let mut hasher = Sha256::new();
    let mut total = 0u64;
    let mut tx = Some(stored_tx);
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        hasher.update(&chunk);
        total += chunk.len() as u64;
        counters
            .stored
            .fetch_add(chunk.len() as u64, Ordering::Relaxed);
        // Keep hashing after the decoder gave up, so a corrupted object is reported by its
        // digest rather than by whatever zstd tripped over first.
        if let Some(t) = &tx
            && t.send(chunk).await.is_err()
        {
            tx = None;
        }
    }
    drop(tx);
    Ok((hasher.finalize().into(), total))
}

/// The tail held back until every check passed: whole chunks, never copied; a chunk is released
/// once the chunks after it hold at least `holdback` bytes.
struct Tail {
    held: std::collections::VecDeque<Bytes>,
    held_len: usize,
    holdback: usize,
}

impl Tail {
    fn new(holdback: usize) -> Self {
        Tail {
            held: std::collections::VecDeque::new(),
            held_len: 0,
            holdback,
        }
    }

    /// Hashes the raw chunks from the decoder and writes to `sink` all but the held-back tail:
    /// the raw sha256 and size.
    async fn write_released<W>(
        &mut self,
        // Owned, so a failed sink drops it and the decoder stops instead of waiting forever.
        mut raw_rx: mpsc::Receiver<Bytes>,
        sink: &mut W,
        counters: &Counters,
    ) -> Result<(Sha256Digest, u64), PipelineError>
    where
        W: AsyncWrite + Unpin + Send,
    {
        let mut hasher = Sha256::new();
        let mut total = 0u64;
        while let Some(chunk) = raw_rx.recv().await {
            hasher.update(&chunk);
            total += chunk.len() as u64;
            self.held_len += chunk.len();
            self.held.push_back(chunk);
            while let Some(front) = self.held.front()
                && self.held_len - front.len() >= self.holdback
            {
                let release = self.held.pop_front().expect("front exists");
                self.held_len -= release.len();
                sink.write_all(&release)
                    .await
                    .map_err(PipelineError::Sink)?;
                counters
                    .raw
                    .fetch_add(release.len() as u64, Ordering::Relaxed);
            }
        }
        Ok((hasher.finalize().into(), total))
    }
}

/// Compares what arrived (`bytes`, `sha256`) with what was expected (`want`: a size and a
/// digest, each when known), naming `what` (stored or raw) of `key` on a mismatch.
fn check(
    key: &str,
    what: &'static str,
    want: (Option<u64>, Option<Sha256Digest>),
    bytes: u64,
    sha256: Sha256Digest,
) -> Result<(), PipelineError> {
    let (want_bytes, want_sha256) = want;
    if let Some(want) = want_bytes
        && bytes != want
    {
        return Err(PipelineError::SizeMismatch {
            key: key.to_string(),
            what,
            expected: want,
            actual: bytes,
        });
    }
    if let Some(want) = want_sha256
        && sha256 != want
    {
        return Err(PipelineError::ChecksumMismatch {
            key: key.to_string(),
            what,
            expected: want,
            actual: sha256,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::local::LocalStore;

    fn frame(data: &[u8], level: i32, window_log: Option<u32>) -> Vec<u8> {
        let mut enc = zstd::stream::write::Encoder::new(Vec::new(), level).unwrap();
        if let Some(log) = window_log {
            enc.set_parameter(zstd::stream::raw::CParameter::WindowLog(log))
                .unwrap();
        }
        enc.write_all(data).unwrap();
        enc.finish().unwrap()
    }

    /// Stores `stored` as an object and downloads it with digests that match it, as a forger who
    /// also rewrote the manifest would have them.
    async fn forged_download(
        stored: Vec<u8>,
        raw: &[u8],
        raw_bytes: u64,
    ) -> Result<Vec<u8>, PipelineError> {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path().to_path_buf()).await.unwrap();
        std::fs::create_dir_all(dir.path().join("a")).unwrap();
        std::fs::write(dir.path().join("a/obj.zst"), &stored).unwrap();
        let expected = Expected::all(
            Sha256Digest::of(raw),
            raw_bytes,
            Sha256Digest::of(&stored),
            stored.len() as u64,
        );
        let mut out = Vec::new();
        download(&store, "a/obj.zst", &expected, &mut out, 0, Arc::default())
            .await
            .map(|()| out)
    }

    /// Models a forged object whose frame header asks for a 1 GiB window: the decoder refuses it
    /// instead of allocating the window, while the largest window the agent's own levels use
    /// still decodes.
    #[tokio::test]
    async fn a_frame_asking_for_a_window_over_128_mib_is_refused() {
        let data = vec![42u8; 1 << 20];
        let huge = frame(&data, 3, Some(30));
        let err = bounded_decoder(&huge[..])
            .and_then(|mut d| d.read_to_end(&mut Vec::new()))
            .unwrap_err();
        assert!(
            err.to_string().to_lowercase().contains("memory"),
            "zstd's refusal: {err}"
        );
        let err = forged_download(huge, &data, data.len() as u64)
            .await
            .unwrap_err();
        assert!(matches!(err, PipelineError::Decode { .. }), "{err}");

        for (level, log) in [(22, None), (3, Some(WINDOW_LOG_MAX))] {
            let fits = frame(&data, level, log);
            assert_eq!(
                forged_download(fits, &data, data.len() as u64)
                    .await
                    .unwrap(),
                data,
                "level {level}, window log {log:?}"
            );
        }
    }

    /// Models a decompression bomb whose manifest claims a small raw size: decoding stops once it
    /// passes that size instead of decoding (and hashing) all of it first.
    #[tokio::test]
    async fn decoding_stops_past_the_manifest_raw_size() {
        let data = vec![0u8; 64 << 20];
        let bomb = frame(&data, 3, None);
        assert!(bomb.len() < 64 << 10, "a bomb is small: {}", bomb.len());
        let err = forged_download(bomb, &data[..1 << 20], 1 << 20)
            .await
            .unwrap_err();
        assert!(matches!(err, PipelineError::Decode { .. }), "{err}");
        assert!(
            err.to_string()
                .contains(&format!("more than its manifest's {} bytes", 1 << 20)),
            "{err}"
        );
    }
}
