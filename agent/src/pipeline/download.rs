//! The way back: stored bytes → sha256 → zstd decode → sha256 → sink, the tail held back until
//! every check passed.

use super::*;

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
pub async fn download<W>(
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
    let mut stream = store.get(key).await?;
    let (stored_tx, stored_rx) = mpsc::channel::<Bytes>(RAW_QUEUE);
    let (raw_tx, raw_rx) = mpsc::channel::<Bytes>(RAW_QUEUE);

    let decoder = tokio::task::spawn_blocking(move || -> io::Result<()> {
        let reader = ChannelReader {
            rx: stored_rx,
            current: Bytes::new(),
        };
        let mut dec = zstd::stream::read::Decoder::new(reader)?;
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
            buf.truncate(len);
            if raw_tx.blocking_send(chunks.lend(buf)).is_err() {
                return Ok(());
            }
        }
    });

    let fetch = async {
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
        Ok::<_, PipelineError>((hex::encode(hasher.finalize()), total))
    };

    // The tail held back until every check passed: whole chunks, never copied; a chunk is released
    // once the chunks after it hold at least `holdback` bytes.
    let mut held = std::collections::VecDeque::<Bytes>::new();
    let mut held_len = 0usize;
    let write = async {
        // Owned, so a failed sink drops it and the decoder stops instead of waiting forever.
        let mut raw_rx = raw_rx;
        let mut hasher = Sha256::new();
        let mut total = 0u64;
        while let Some(chunk) = raw_rx.recv().await {
            hasher.update(&chunk);
            total += chunk.len() as u64;
            held_len += chunk.len();
            held.push_back(chunk);
            while let Some(front) = held.front()
                && held_len - front.len() >= holdback
            {
                let release = held.pop_front().expect("front exists");
                held_len -= release.len();
                sink.write_all(&release)
                    .await
                    .map_err(PipelineError::Sink)?;
                counters
                    .raw
                    .fetch_add(release.len() as u64, Ordering::Relaxed);
            }
        }
        Ok::<_, PipelineError>((hex::encode(hasher.finalize()), total))
    };

    let (fetch_res, write_res) = tokio::join!(fetch, write);
    let decode_res = decoder.await.expect("decoder thread panicked");

    let (stored_sha256, stored_bytes) = fetch_res?;
    if let Some(want) = expected.stored_bytes
        && stored_bytes != want
    {
        return Err(PipelineError::SizeMismatch {
            key: key.to_string(),
            what: "stored",
            expected: want,
            actual: stored_bytes,
        });
    }
    if let Some(want) = &expected.stored_sha256
        && stored_sha256 != *want
    {
        return Err(PipelineError::ChecksumMismatch {
            key: key.to_string(),
            what: "stored",
            expected: want.clone(),
            actual: stored_sha256,
        });
    }
    if let Err(source) = decode_res {
        return Err(PipelineError::Decode {
            key: key.to_string(),
            source,
        });
    }
    let (raw_sha256, raw_bytes) = write_res?;
    if let Some(want) = expected.raw_bytes
        && raw_bytes != want
    {
        return Err(PipelineError::SizeMismatch {
            key: key.to_string(),
            what: "raw",
            expected: want,
            actual: raw_bytes,
        });
    }
    if raw_sha256 != expected.raw_sha256 {
        return Err(PipelineError::ChecksumMismatch {
            key: key.to_string(),
            what: "raw",
            expected: expected.raw_sha256.clone(),
            actual: raw_sha256,
        });
    }
    // Every check passed: release the tail.
    for chunk in held {
        sink.write_all(&chunk).await.map_err(PipelineError::Sink)?;
        counters
            .raw
            .fetch_add(chunk.len() as u64, Ordering::Relaxed);
    }
    sink.flush().await.map_err(PipelineError::Sink)?;
    sink.shutdown().await.map_err(PipelineError::Sink)?;
    Ok(())
}
