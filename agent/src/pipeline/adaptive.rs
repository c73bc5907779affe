//! Compression chosen per stream, and chosen again as the stream goes on.
//!
//! Random vectors, encrypted columns and already-compressed files do not shrink under zstd, yet
//! compressing them costs more CPU than the rest of the pipeline together (measured: a 212 MiB
//! Qdrant snapshot took 3.4–3.7 s where the raw download took 1.5 s). So the stream is judged by
//! what zstd makes of it:
//!
//! - the first [`SAMPLE`] bytes of a chunk are compressed on their own first; when they do not
//!   shrink by [`USEFUL_SAVING_PER_MILLE`], the chunk is stored raw;
//! - while storing raw, one chunk in every [`REPROBE_EVERY`] bytes is sampled again, so a stream
//!   that turns compressible later (a dump's table after a table of hashes) is compressed again;
//! - while compressing, output and input are compared every [`CHECK_EVERY`] bytes, and the frame
//!   ends when the last stretch did not shrink by the same margin.
//!
//! Every stored object stays one valid zstd stream: compressed stretches are ordinary frames,
//! raw stretches are frames of raw blocks (RFC 8878 §3.1.1.2.2, `Block_Type` 0), and
//! concatenated frames decode as one stream. Readers, `verify`, drills, old backups, the
//! manifest and the `zstd` command line are unchanged.

use std::io::{self, Write};

use zstd::stream::write::Encoder;

use super::MT_JOB_SIZE;
#[cfg(test)]
use super::READ_CHUNK;

/// Compressing must save at least this many thousandths of a stretch to be worth its CPU: 10 %.
/// Float vectors save 5–8 % (the exponent bytes), text and dumps 60–99 %.
pub(super) const USEFUL_SAVING_PER_MILLE: u64 = 100;
/// How much of a chunk is compressed to judge it: enough for zstd to find a page's repeats.
pub(super) const SAMPLE: usize = 64 << 10;
/// While storing raw, one chunk in every this many raw bytes is sampled again: about 1/64 of the
/// CPU of compressing everything, and at most this much of a stream that turned compressible
/// stored raw.
pub(super) const REPROBE_EVERY: u64 = 4 << 20;
/// While compressing, how many raw bytes each judgement of the output covers. Several of zstd's
/// multithreaded jobs, so that output still inside the encoder skews the judgement little.
pub(super) const CHECK_EVERY: u64 = 8 << 20;
/// The largest block a frame may hold (RFC 8878 §3.1.1.2.4: `Block_Maximum_Size`).
const MAX_BLOCK: usize = 128 << 10;
/// A zstd frame's magic number, little-endian.
const MAGIC: [u8; 4] = 0xFD2F_B528u32.to_le_bytes();
/// Frame header descriptor of a raw frame: `Single_Segment_flag` (the window is the content)
/// and a 4-byte `Frame_Content_Size`; no checksum (the pipeline's sha256 covers every byte), no
/// dictionary.
const RAW_FRAME_DESCRIPTOR: u8 = 0b1010_0000;

/// A sink that says how many bytes it has taken, so the encoder's output can be judged.
pub(super) trait Counted: Write {
    /// Bytes written so far.
    fn written(&self) -> u64;
}

/// How the bytes of one stream were stored, for the log and the tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Choice {
    /// Raw bytes that went through zstd.
    pub compressed_raw: u64,
    /// Raw bytes stored in raw frames.
    pub stored_raw: u64,
    /// Times the stream switched between the two.
    pub switches: u32,
}

enum State<W: Counted> {
    /// Inside a zstd frame. `mark` is the raw and stored counts at the last check, unknown for
    /// the first stretch after the frame started (the encoder still held part of its output).
    Compressing {
        enc: Encoder<'static, W>,
        since_check: u64,
        mark: Option<(u64, u64)>,
    },
    /// Writing raw frames; `since_probe` counts raw bytes since the last sample.
    Raw { sink: W, since_probe: u64 },
    /// Only while switching, or after an error left the encoder behind.
    Gone,
}

/// The compressing stage: chunks in, a zstd stream out, compressed where it pays.
pub(super) struct Adaptive<W: Counted> {
    state: State<W>,
    level: i32,
    threads: u32,
    /// One-shot compressor for samples; its tables are allocated once and reused.
    probe: Option<zstd::bulk::Compressor<'static>>,
    /// Where samples are compressed to; never larger than zstd's bound for one chunk.
    probe_out: Vec<u8>,
    raw_in: u64,
    choice: Choice,
}

impl<W: Counted> Adaptive<W> {
    /// A stream that starts by sampling its first chunk.
    pub(super) fn new(sink: W, level: i32, threads: u32) -> Self {
        Self {
            state: State::Raw {
                sink,
                since_probe: REPROBE_EVERY,
            },
            level,
            threads,
            probe: None,
            probe_out: Vec::new(),
            raw_in: 0,
            choice: Choice::default(),
        }
    }

    /// The sink, as far as it has been written.
    #[cfg(test)]
    fn sink(&self) -> Option<&W> {
        match &self.state {
            State::Compressing { enc, .. } => Some(enc.get_ref()),
            State::Raw { sink, .. } => Some(sink),
            State::Gone => None,
        }
    }

    /// Compresses or stores `chunk` (at most a few MiB; the pipeline hands 256 KiB chunks).
    pub(super) fn write_chunk(&mut self, chunk: &[u8]) -> io::Result<()> {
        if chunk.is_empty() {
            return Ok(());
        }
        let len = chunk.len() as u64;
        self.raw_in += len;
        match std::mem::replace(&mut self.state, State::Gone) {
            State::Compressing {
                mut enc,
                since_check,
                mark,
            } => {
                enc.write_all(chunk)?;
                self.choice.compressed_raw += len;
                let since_check = since_check + len;
                if since_check < CHECK_EVERY {
                    self.state = State::Compressing {
                        enc,
                        since_check,
                        mark,
                    };
                    return Ok(());
                }
                let now = (self.raw_in, enc.get_ref().written());
                match mark {
                    Some((raw, stored)) if !useful(now.0 - raw, now.1 - stored) => {
                        let sink = enc.finish()?;
                        self.choice.switches += 1;
                        self.state = State::Raw {
                            sink,
                            since_probe: 0,
                        };
                    }
                    _ => {
                        self.state = State::Compressing {
                            enc,
                            since_check: 0,
                            mark: Some(now),
                        };
                    }
                }
            }
            State::Raw {
                mut sink,
                since_probe,
            } => {
                if since_probe >= REPROBE_EVERY && self.compresses(chunk)? {
                    if self.choice != Choice::default() {
                        self.choice.switches += 1;
                    }
                    let mut enc = self.encoder(sink)?;
                    enc.write_all(chunk)?;
                    self.choice.compressed_raw += len;
                    self.state = State::Compressing {
                        enc,
                        since_check: len,
                        mark: None,
                    };
                    return Ok(());
                }
                write_raw_frame(&mut sink, chunk)?;
                self.choice.stored_raw += len;
                let since_probe = if since_probe >= REPROBE_EVERY {
                    len
                } else {
                    since_probe + len
                };
                self.state = State::Raw { sink, since_probe };
            }
            State::Gone => return Err(gone()),
        }
        Ok(())
    }

    /// Ends the stream: closes an open frame and gives the sink back. An empty stream is stored
    /// as one empty zstd frame, as it always was.
    pub(super) fn finish(self) -> io::Result<(W, Choice)> {
        let sink = match self.state {
            State::Compressing { enc, .. } => enc.finish()?,
            State::Raw { sink, .. } if self.raw_in == 0 => {
                Encoder::new(sink, self.level)?.finish()?
            }
            State::Raw { sink, .. } => sink,
            State::Gone => return Err(gone()),
        };
        Ok((sink, self.choice))
    }

    fn encoder(&self, sink: W) -> io::Result<Encoder<'static, W>> {
        let mut enc = Encoder::new(sink, self.level)?;
        if self.threads > 0 {
            enc.multithread(self.threads)?;
            // zstd's default job is several windows long and each worker buffers a few jobs;
            // small jobs keep multithreaded compression within the memory budget.
            enc.set_parameter(zstd::stream::raw::CParameter::JobSize(MT_JOB_SIZE))?;
        }
        enc.include_checksum(true)?;
        Ok(enc)
    }

    /// Whether zstd, at the stream's level, shrinks `sample` by a useful margin.
    fn compresses(&mut self, sample: &[u8]) -> io::Result<bool> {
        let sample = &sample[..sample.len().min(SAMPLE)];
        let probe = match &mut self.probe {
            Some(probe) => probe,
            None => self.probe.insert(zstd::bulk::Compressor::new(self.level)?),
        };
        self.probe_out.clear();
        self.probe_out
            .reserve(zstd::zstd_safe::compress_bound(sample.len()));
        let n = probe.compress_to_buffer(sample, &mut self.probe_out)?;
        Ok(useful(sample.len() as u64, n as u64))
    }
}

/// Whether `stored` bytes for `raw` bytes save at least [`USEFUL_SAVING_PER_MILLE`].
fn useful(raw: u64, stored: u64) -> bool {
    raw > 0 && stored.saturating_mul(1000) <= raw.saturating_mul(1000 - USEFUL_SAVING_PER_MILLE)
}

fn gone() -> io::Error {
    io::Error::other("the compressor failed earlier in this stream")
}

/// Writes `data` (1 byte to 4 GiB) as one zstd frame of raw blocks: 9 bytes of frame header and
/// 3 per 128 KiB block, so incompressible bytes cost a copy and 0.003 % more space.
pub(super) fn write_raw_frame<W: Write>(sink: &mut W, data: &[u8]) -> io::Result<()> {
    let size = u32::try_from(data.len())
        .ok()
        .filter(|&n| n > 0)
        .ok_or_else(|| io::Error::other("a raw frame holds 1 byte to 4 GiB"))?;
    let mut header = [0u8; 9];
    header[..4].copy_from_slice(&MAGIC);
    header[4] = RAW_FRAME_DESCRIPTOR;
    header[5..].copy_from_slice(&size.to_le_bytes());
    sink.write_all(&header)?;
    let mut blocks = data.chunks(MAX_BLOCK).peekable();
    while let Some(block) = blocks.next() {
        let last = u32::from(blocks.peek().is_none());
        // Block_Header: Last_Block (bit 0), Block_Type 0 = raw (bits 1–2), Block_Size (3–23).
        let block_header = ((block.len() as u32) << 3) | last;
        sink.write_all(&block_header.to_le_bytes()[..3])?;
        sink.write_all(block)?;
    }
    Ok(())
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use proptest::prelude::*;

    const MIB: usize = 1 << 20;

    /// A sink that keeps everything, as the part sink would upload it.
    #[derive(Default)]
    struct Kept(Vec<u8>);

    impl Write for Kept {
        fn write(&mut self, data: &[u8]) -> io::Result<usize> {
            self.0.extend_from_slice(data);
            Ok(data.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Counted for Kept {
        fn written(&self) -> u64 {
            self.0.len() as u64
        }
    }

    /// Bytes zstd cannot shrink (xorshift), like random float vectors.
    pub(in crate::pipeline) fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    /// Bytes that shrink about tenfold, like a dump's rows.
    fn rows(len: usize, seed: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(len + 64);
        let mut i = seed;
        while out.len() < len {
            out.extend_from_slice(
                format!("{i}\tcustomer {}\tactive\t2026-12-07\n", i % 977).as_bytes(),
            );
            i += 1;
        }
        out.truncate(len);
        out
    }

    /// Feeds `data` in pipeline-sized chunks; returns what was stored and how.
    fn store(data: &[u8], level: i32, threads: u32) -> (Vec<u8>, Choice) {
        let mut enc = Adaptive::new(Kept::default(), level, threads);
        for chunk in data.chunks(READ_CHUNK) {
            enc.write_chunk(chunk).unwrap();
        }
        let (sink, choice) = enc.finish().unwrap();
        assert_eq!(choice.compressed_raw + choice.stored_raw, data.len() as u64);
        (sink.0, choice)
    }

    /// What the pipeline stored before compression was chosen: one frame, same settings.
    fn plain(data: &[u8], level: i32, threads: u32) -> Vec<u8> {
        let enc = Adaptive::new(Kept::default(), level, threads);
        let mut enc = enc.encoder(Kept::default()).unwrap();
        enc.write_all(data).unwrap();
        enc.finish().unwrap().0
    }

    /// Decodes as every reader does: one zstd stream, frames one after another.
    fn decode(stored: &[u8]) -> Vec<u8> {
        zstd::decode_all(stored).expect("the stored bytes are one valid zstd stream")
    }

    #[test]
    fn incompressible_bytes_are_stored_raw_and_round_trip() {
        for threads in [0, 1] {
            let data = noise(24 * MIB + 12_345, 7);
            let (stored, choice) = store(&data, 3, threads);
            assert_eq!(choice.compressed_raw, 0, "{choice:?}");
            assert_eq!(choice.switches, 0, "{choice:?}");
            // 9 bytes per 256 KiB frame and 3 per 128 KiB block.
            let overhead = stored.len() - data.len();
            assert!(
                overhead <= data.len() / 10_000,
                "{overhead} bytes of framing"
            );
            assert!(decode(&stored) == data, "restored bytes differ");
        }
    }

    #[test]
    fn compressible_bytes_are_compressed_as_well_as_plain_zstd() {
        for threads in [0, 1] {
            let data = rows(24 * MIB, 1);
            let (stored, choice) = store(&data, 3, threads);
            assert_eq!(choice.stored_raw, 0, "{choice:?}");
            let plain = plain(&data, 3, threads);
            assert!(
                stored.len() <= plain.len() + plain.len() / 20,
                "{} stored bytes, plain zstd makes {}",
                stored.len(),
                plain.len()
            );
            assert!(
                stored.len() * 5 < data.len(),
                "{} of {}",
                stored.len(),
                data.len()
            );
            assert!(decode(&stored) == data, "restored bytes differ");
        }
    }

    #[test]
    fn a_stream_that_changes_mid_way_is_compressed_where_it_pays() {
        // Noise, then rows, then noise again: each stretch longer than a re-probe and a check.
        let mut data = noise(40 * MIB, 3);
        data.extend(rows(40 * MIB, 5));
        data.extend(noise(40 * MIB, 11));
        // One thread, for the same reason as below: bounds that do not depend on timing.
        let (stored, choice) = store(&data, 3, 0);
        assert!(choice.switches >= 2, "{choice:?}");
        // Rows are caught within a re-probe of starting, noise within two checks.
        assert!(
            choice.compressed_raw >= (40 * MIB) as u64 - REPROBE_EVERY
                && choice.compressed_raw <= (40 * MIB) as u64 + 3 * CHECK_EVERY,
            "{choice:?}"
        );
        let rows_alone = zstd::encode_all(&rows(40 * MIB, 5)[..], 3).unwrap().len();
        assert!(
            stored.len() as u64 <= (80 * MIB) as u64 + REPROBE_EVERY + 2 * rows_alone as u64,
            "{} stored bytes for 80 MiB of noise and rows zstd makes {rows_alone} of",
            stored.len()
        );
        assert!(decode(&stored) == data, "restored bytes differ");
    }

    #[test]
    fn a_compressed_stream_that_turns_incompressible_stops_compressing() {
        let mut data = rows(16 * MIB, 1);
        data.extend(noise(64 * MIB, 9));
        // One thread: with zstd's worker threads the output lags the input by however far the
        // workers are behind (a loaded machine), and the switch comes later than these bounds.
        let (stored, choice) = store(&data, 3, 0);
        assert_eq!(choice.switches, 1, "{choice:?}");
        assert!(
            choice.stored_raw >= (64 * MIB) as u64 - 3 * CHECK_EVERY,
            "{choice:?}"
        );
        assert!(decode(&stored) == data, "restored bytes differ");
    }

    #[test]
    fn the_zstd_command_line_reads_raw_frames() {
        let Ok(zstd_cli) = which("zstd") else {
            panic!("the zstd command is needed for this test (apt-get install zstd)");
        };
        let mut data = noise(3 * MIB + 1, 5);
        data.extend(rows(MIB, 2));
        let (stored, _) = store(&data, 3, 0);
        let mut child = std::process::Command::new(zstd_cli)
            .args(["-d", "-c", "-q"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let writer = std::thread::spawn(move || stdin.write_all(&stored));
        let out = child.wait_with_output().unwrap();
        writer.join().unwrap().unwrap();
        assert!(out.status.success(), "zstd -d failed: {:?}", out.status);
        assert!(out.stdout == data, "zstd -d gave other bytes");
    }

    fn which(name: &str) -> Result<std::path::PathBuf, ()> {
        std::env::var_os("PATH")
            .into_iter()
            .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
            .ok_or(())
    }

    #[test]
    fn an_empty_stream_is_one_empty_frame_and_a_byte_is_a_frame() {
        let (stored, choice) = store(&[], 3, 0);
        assert_eq!(choice, Choice::default());
        assert!(stored.starts_with(&MAGIC), "{stored:?}");
        assert!(decode(&stored).is_empty());
        let (stored, _) = store(&[42], 3, 0);
        assert_eq!(decode(&stored), vec![42]);
    }

    #[test]
    fn samples_are_bounded_whatever_the_chunk() {
        // A chunk far larger than the pipeline hands on: only its first SAMPLE is sampled,
        // and the sample buffer never grows past zstd's bound for that.
        let mut enc = Adaptive::new(Kept::default(), 3, 0);
        let big = noise(8 * MIB, 13);
        for _ in 0..3 {
            enc.write_chunk(&big).unwrap();
        }
        assert!(
            enc.probe_out.capacity() <= zstd::zstd_safe::compress_bound(SAMPLE),
            "{} bytes kept for samples",
            enc.probe_out.capacity()
        );
        assert_eq!(enc.sink().unwrap().0.len(), 3 * (8 * MIB + 9 + 64 * 3));
        let (stored, _) = enc.finish().unwrap();
        assert!(decode(&stored.0) == [&big[..], &big, &big].concat());
    }

    #[derive(Debug, Clone)]
    enum Stretch {
        Noise(usize, u64),
        Rows(usize, u64),
        Zeros(usize),
    }

    fn stretch() -> impl Strategy<Value = Stretch> {
        prop_oneof![
            (1..3 * MIB, any::<u64>()).prop_map(|(n, s)| Stretch::Noise(n, s)),
            (1..3 * MIB, any::<u64>()).prop_map(|(n, s)| Stretch::Rows(n, s)),
            (1..MIB).prop_map(Stretch::Zeros),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        #[test]
        fn any_mix_of_stretches_and_chunk_sizes_round_trips(
            stretches in proptest::collection::vec(stretch(), 1..12),
            chunk in 1..2 * READ_CHUNK,
            threads in 0u32..2,
        ) {
            let data: Vec<u8> = stretches
                .iter()
                .flat_map(|s| match *s {
                    Stretch::Noise(n, seed) => noise(n, seed),
                    Stretch::Rows(n, seed) => rows(n, seed),
                    Stretch::Zeros(n) => vec![0; n],
                })
                .collect();
            let mut enc = Adaptive::new(Kept::default(), 1, threads);
            for piece in data.chunks(chunk) {
                enc.write_chunk(piece).unwrap();
            }
            let (sink, choice) = enc.finish().unwrap();
            prop_assert_eq!(choice.compressed_raw + choice.stored_raw, data.len() as u64);
            // Raw frames never cost more than their framing.
            prop_assert!(sink.0.len() as u64 <= data.len() as u64 + choice.stored_raw / 1000 + 64 + data.len() as u64 / 100);
            prop_assert!(decode(&sink.0) == data, "restored bytes differ");
        }
    }
}
