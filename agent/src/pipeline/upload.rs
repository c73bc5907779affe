//! The way out: engine bytes → sha256 → zstd → sha256 → parts → concurrent part uploads, with
//! every buffer drawn from a bounded pool.

use super::*;
use adaptive::Adaptive;

/// An artifact whose bytes are all in the store but not yet visible: `commit` publishes it,
/// `abort` discards it. Dropping it without either aborts in the background.
pub(crate) struct Staged {
    upload: Option<Box<dyn Upload>>,
    receipts: Vec<PartReceipt>,
    /// What was uploaded.
    pub summary: UploadSummary,
}

impl std::fmt::Debug for Staged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Staged")
            .field("summary", &self.summary)
            .finish()
    }
}

impl Staged {
    /// Makes the object visible.
    pub(crate) async fn commit(mut self) -> Result<ObjectMeta, StoreError> {
        let receipts = std::mem::take(&mut self.receipts);
        self.upload
            .take()
            .expect("upload present")
            .complete(receipts)
            .await
    }

    /// Discards the object's parts.
    pub(crate) async fn abort(mut self) -> Result<(), StoreError> {
        self.upload.take().expect("upload present").abort().await
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if let Some(upload) = self.upload.take()
            && let Ok(handle) = tokio::runtime::Handle::try_current()
        {
            handle.spawn(async move {
                if let Err(e) = upload.abort().await {
                    tracing::warn!(error = %e, "aborting an abandoned upload failed; the agent removes it at its next start");
                }
            });
        }
    }
}

/// A part buffer: an anonymous memory mapping of its own, not a heap allocation. glibc serves
/// a 16 MiB `Vec` from a thread's arena once it has freed one such block (its mmap threshold
/// rises to the freed size), and keeps that memory after the pipeline ends; the next operation,
/// compressing on another thread, then fills other arenas. Measured: 123–129 MiB peak RSS on a
/// second backup against 67–78 MiB on the first. A mapping is returned to the kernel when it
/// is dropped, so resident part memory is exactly the parts alive now.
type PartMap = memmap2::MmapMut;

/// A part's bytes; the mapping goes back to the pool when the last reference is dropped.
struct PartBuf {
    map: Option<PartMap>,
    len: usize,
    home: std::sync::mpsc::SyncSender<Option<PartMap>>,
}

impl AsRef<[u8]> for PartBuf {
    fn as_ref(&self) -> &[u8] {
        &self.map.as_ref().expect("present until dropped")[..self.len]
    }
}

impl Drop for PartBuf {
    fn drop(&mut self) {
        // The pool has room for every buffer; it is gone only when the pipeline is, and then
        // the mapping is simply unmapped.
        let _ = self.home.try_send(self.map.take());
    }
}

/// Compressed output of the zstd encoder, cut into parts and sent to the uploader.
struct PartSink {
    /// The part being filled (`Some` while filling) and how much of it is filled.
    map: Option<PartMap>,
    len: usize,
    /// Free part buffers; `None` is a buffer not mapped yet (short streams never map them all).
    pool: std::sync::mpsc::Receiver<Option<PartMap>>,
    home: std::sync::mpsc::SyncSender<Option<PartMap>>,
    base: usize,
    index: u32,
    max_part: usize,
    tx: mpsc::Sender<Bytes>,
    hasher: Sha256,
    stored: u64,
    counters: Arc<Counters>,
}

impl PartSink {
    fn target(&self) -> usize {
        part_size_for(self.base, self.index)
    }

    /// Waits (on this blocking thread) for a free buffer from the pool; maps it on first use, or
    /// anew when the part size has grown past it.
    fn start_part(&mut self) -> io::Result<()> {
        let free = self
            .pool
            .recv()
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "part buffer pool closed"))?;
        let target = self.target();
        let map = match free {
            Some(map) if map.len() >= target => map,
            _ => memmap2::MmapOptions::new().len(target).map_anon()?,
        };
        self.map = Some(map);
        self.len = 0;
        Ok(())
    }

    fn emit(&mut self) -> io::Result<()> {
        let map = self.map.take();
        self.max_part = self.max_part.max(self.len);
        self.index += 1;
        let part = Bytes::from_owner(PartBuf {
            map,
            len: self.len,
            home: self.home.clone(),
        });
        self.tx
            .blocking_send(part)
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "uploader stopped"))
    }
}

impl adaptive::Counted for PartSink {
    fn written(&self) -> u64 {
        self.stored
    }
}

impl Write for PartSink {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.map.is_none() {
            self.start_part()?;
        }
        let target = self.target();
        let n = data.len().min(target - self.len);
        let map = self.map.as_mut().expect("started above");
        map[self.len..self.len + n].copy_from_slice(&data[..n]);
        self.len += n;
        self.hasher.update(&data[..n]);
        self.stored += n as u64;
        self.counters.stored.fetch_add(n as u64, Ordering::Relaxed);
        if self.len == target {
            self.emit()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Streams `source` through zstd into `upload`, returning a [`Staged`] artifact once every byte is
/// in the store. On any error the upload is aborted before returning.
pub(crate) async fn upload<R>(
    mut source: R,
    mut upload: Box<dyn Upload>,
    settings: &Settings,
    counters: Arc<Counters>,
) -> Result<Staged, PipelineError>
where
    R: AsyncRead + Unpin + Send,
{
    let (raw_tx, raw_rx) = mpsc::channel::<Bytes>(RAW_QUEUE);
    let (part_tx, part_rx) = mpsc::channel::<Bytes>(PART_QUEUE);
    let base = settings.part_size.max(MIN_PART_SIZE);
    let (level, threads) = (settings.compression_level, settings.compression_threads);
    let sink = PartSink::new(
        settings.parts_in_flight.max(1) + 1,
        base,
        part_tx,
        counters.clone(),
    );
    let compressor = tokio::task::spawn_blocking(move || compress(raw_rx, sink, level, threads));
    let in_flight_cap = settings.parts_in_flight.max(1);
    let (read_res, send_res) = tokio::join!(
        read_source(&mut source, raw_tx, &counters),
        send_parts(&mut upload, part_rx, in_flight_cap)
    );
    let compress_res = compressor.await.expect("compressor thread panicked");

    let outcome = (|| {
        let receipts = send_res?;
        let (raw_sha256, raw_bytes) = read_res?;
        let compressed = compress_res.map_err(PipelineError::Compress)?;
        let summary = UploadSummary {
            digest: Digest256 {
                raw_bytes,
                stored_bytes: compressed.stored_bytes,
                raw_sha256,
                stored_sha256: compressed.stored_sha256,
            },
            parts: compressed.parts,
            max_part_size: compressed.max_part_size,
            choice: compressed.choice,
        };
        tracing::debug!(
            compressed_raw = summary.choice.compressed_raw,
            stored_raw = summary.choice.stored_raw,
            switches = summary.choice.switches,
            "stream compressed where it paid, stored raw where it did not"
        );
        Ok::<_, PipelineError>((summary, receipts))
    })();
    match outcome {
        Ok((summary, receipts)) => Ok(Staged {
            upload: Some(upload),
            receipts,
            summary,
        }),
        Err(e) => {
            if let Err(abort_err) = upload.abort().await {
                tracing::warn!(error = %abort_err, "aborting the failed upload failed; the agent removes it at its next start");
            }
            Err(e)
        }
    }
}

/// What the compressor thread made of the raw bytes.
struct Compressed {
    stored_sha256: Sha256Digest,
    stored_bytes: u64,
    parts: u32,
    max_part_size: usize,
    choice: Choice,
}

impl PartSink {
    /// A sink cutting parts of `base` bytes (growing, see [`part_size_for`]) from a pool of
    /// `buffers` part buffers, none mapped yet.
    fn new(buffers: usize, base: usize, tx: mpsc::Sender<Bytes>, counters: Arc<Counters>) -> Self {
        let (home, pool) = std::sync::mpsc::sync_channel(buffers);
        for _ in 0..buffers {
            home.send(None).expect("the pool has room for every buffer");
        }
        PartSink {
            map: None,
            len: 0,
            pool,
            home,
            base,
            index: 0,
            max_part: 0,
            tx,
            hasher: Sha256::new(),
            stored: 0,
            counters,
        }
    }
}

/// The compressor thread: raw chunks from `raw_rx` through zstd (adaptively, see [`Adaptive`])
/// into `sink`'s parts, the last one emitted at the end.
fn compress(
    mut raw_rx: mpsc::Receiver<Bytes>,
    sink: PartSink,
    level: i32,
    threads: u32,
) -> io::Result<Compressed> {
    let mut enc = Adaptive::new(sink, level, threads);
    while let Some(chunk) = raw_rx.blocking_recv() {
        enc.write_chunk(&chunk)?;
    }
    let (mut sink, choice) = enc.finish()?;
    tracing::debug!(
        compressed_raw = choice.compressed_raw,
        stored_raw = choice.stored_raw,
        switches = choice.switches,
        "compression chosen per stretch"
    );
    if sink.map.is_none() && sink.index == 0 {
        // An object needs at least one part, even an empty one.
        sink.start_part()?;
    }
    if sink.map.is_some() {
        sink.emit()?;
    }
    Ok(Compressed {
        stored_sha256: sink.hasher.finalize().into(),
        stored_bytes: sink.stored,
        parts: sink.index,
        max_part_size: sink.max_part,
        choice,
    })
}

/// Reads `source` in whole chunks into the compressor's channel, hashing it: its sha256 and size.
async fn read_source<R>(
    source: &mut R,
    raw_tx: mpsc::Sender<Bytes>,
    counters: &Counters,
) -> Result<(Sha256Digest, u64), PipelineError>
where
    R: AsyncRead + Unpin + Send,
{
    let mut hasher = Sha256::new();
    let mut total = 0u64;
    let chunks = ChunkPool::new(RAW_QUEUE + 2);
    let mut eof = false;
    while !eof {
        let mut buf = chunks.take();
        while buf.len() < READ_CHUNK {
            let n = source
                .read_buf(&mut buf)
                .await
                .map_err(PipelineError::Source)?;
            if n == 0 {
                eof = true;
                break;
            }
        }
        if buf.is_empty() {
            break;
        }
        let n = buf.len();
        hasher.update(&buf);
        total += n as u64;
        counters.raw.fetch_add(n as u64, Ordering::Relaxed);
        if raw_tx.send(chunks.lend(buf)).await.is_err() {
            // The compressor stopped; its own error explains why.
            break;
        }
    }
    drop(raw_tx);
    Ok((hasher.finalize().into(), total))
}

/// Uploads the parts from `part_rx`, at most `in_flight_cap` at once, and returns their receipts.
///
/// Owning the receiver means a failed uploader drops it on return, which stops the compressor,
/// which stops the reader: no stage can wait forever on a dead neighbour. Returning early also
/// drops the part uploads still running, which cancels them.
async fn send_parts(
    upload: &mut Box<dyn Upload>,
    mut part_rx: mpsc::Receiver<Bytes>,
    in_flight_cap: usize,
) -> Result<Vec<PartReceipt>, PipelineError> {
    let mut running = FuturesUnordered::new();
    let mut receipts = Vec::new();
    let mut more = true;
    while more || !running.is_empty() {
        tokio::select! {
            // Finished parts first: their buffers go back to the pool sooner.
            biased;
            Some(done) = running.next(), if !running.is_empty() => {
                receipts.push(done?);
            }
            part = part_rx.recv(), if more && running.len() < in_flight_cap => {
                match part {
                    Some(part) => running.push(upload.put_part(part)),
                    None => more = false,
                }
            }
        }
    }
    Ok(receipts)
}
