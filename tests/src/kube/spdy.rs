//! SPDY/3.1 as Kubernetes speaks it for port-forward: the framing and header compression of
//! github.com/moby/spdystream (`spdy/{types,read,write,dictionary}.go`, itself the SPDY/3 draft)
//! and the kubelet's port-forward stream handling (`pkg/kubelet/cri/streaming/portforward/
//! httpstream.go`, server side of `staging/src/k8s.io/apimachinery/pkg/util/httpstream/spdy`).
//!
//! Frames: a control frame is `1 | version(15) = 3 | type(16) | flags(8) | length(24) | data`;
//! a data frame is `0 | stream id(31) | flags(8) | length(24) | data`, FIN = 0x01. Header blocks
//! (`SYN_STREAM`, `SYN_REPLY`, `HEADERS`) are `count(32)` then `len(32) name len(32) value`
//! pairs (names lowercase, multiple values NUL-separated), compressed with one zlib stream per
//! direction for the whole connection, primed with the SPDY/3 dictionary and sync-flushed after
//! each block. spdystream sends and honours no flow control (it ignores `WINDOW_UPDATE` and
//! `SETTINGS`), so neither does this.

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, OnceLock};

use bytes::{Bytes, BytesMut};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use super::forward::{self, PodKey};
use super::state::Shared;

/// The port-forward subprotocol (`PortForwardProtocolV1Name`).
pub const PORT_FORWARD_PROTOCOL: &str = "portforward.k8s.io";

const TYPE_SYN_STREAM: u16 = 1;
const TYPE_SYN_REPLY: u16 = 2;
const TYPE_RST_STREAM: u16 = 3;
const TYPE_PING: u16 = 6;
const TYPE_GOAWAY: u16 = 7;
const FLAG_FIN: u8 = 0x01;
/// RST_STREAM status the kubelet's `stream.Refuse()` sends.
const REFUSED_STREAM: u32 = 3;
/// RST_STREAM status of `stream.Reset()` / `Cancel()`.
pub const CANCEL: u32 = 5;
/// Frames queued for the writer before senders wait.
const QUEUE: usize = 64;

/// The SPDY/3 header compression dictionary (1423 bytes): length-prefixed common header
/// words, then common values (SPDY/3 draft §2.6.10.1; `spdy/dictionary.go`).
pub fn dictionary() -> &'static [u8] {
    static DICT: OnceLock<Vec<u8>> = OnceLock::new();
    DICT.get_or_init(|| {
        const WORDS: &[&str] = &[
            "options",
            "head",
            "post",
            "put",
            "delete",
            "trace",
            "accept",
            "accept-charset",
            "accept-encoding",
            "accept-language",
            "accept-ranges",
            "age",
            "allow",
            "authorization",
            "cache-control",
            "connection",
            "content-base",
            "content-encoding",
            "content-language",
            "content-length",
            "content-location",
            "content-md5",
            "content-range",
            "content-type",
            "date",
            "etag",
            "expect",
            "expires",
            "from",
            "host",
            "if-match",
            "if-modified-since",
            "if-none-match",
            "if-range",
            "if-unmodified-since",
            "last-modified",
            "location",
            "max-forwards",
            "pragma",
            "proxy-authenticate",
            "proxy-authorization",
            "range",
            "referer",
            "retry-after",
            "server",
            "te",
            "trailer",
            "transfer-encoding",
            "upgrade",
            "user-agent",
            "vary",
            "via",
            "warning",
            "www-authenticate",
            "method",
            "get",
            "status",
            "200 OK",
            "version",
            "HTTP/1.1",
            "url",
            "public",
            "set-cookie",
            "keep-alive",
            "origin",
        ];
        const TAIL: &str = "100101201202205206300302303304305306307402405406407408409410411\
            412413414415416417502504505203 Non-Authoritative Information204 No Content301 Moved \
            Permanently400 Bad Request401 Unauthorized403 Forbidden404 Not Found500 Internal \
            Server Error501 Not Implemented503 Service UnavailableJan Feb Mar Apr May Jun Jul \
            Aug Sept Oct Nov Dec 00:00:00 Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMTchunked,\
            text/html,image/png,image/jpg,image/gif,application/xml,application/xhtml+xml,\
            text/plain,text/javascript,publicprivatemax-age=gzip,deflate,sdchcharset=utf-8\
            charset=iso-8859-1,utf-,*,enq=0.";
        let mut dict = Vec::with_capacity(1423);
        for word in WORDS {
            dict.extend_from_slice(&(word.len() as u32).to_be_bytes());
            dict.extend_from_slice(word.as_bytes());
        }
        dict.extend_from_slice(TAIL.as_bytes());
        dict
    })
}

/// Inflates header blocks: one zlib stream for the connection, dictionary set when asked.
#[derive(Debug)]
pub struct HeaderDecoder {
    z: Decompress,
}

impl Default for HeaderDecoder {
    fn default() -> Self {
        HeaderDecoder {
            z: Decompress::new(true),
        }
    }
}

impl HeaderDecoder {
    /// Decompresses one frame's header block and parses it into (name, value) pairs (a
    /// NUL-separated multi-value stays one value).
    pub fn decode(&mut self, block: &[u8]) -> io::Result<Vec<(String, String)>> {
        let bad = |m: String| io::Error::new(io::ErrorKind::InvalidData, m);
        let start = self.z.total_in();
        let mut out = Vec::with_capacity(256);
        loop {
            let consumed = (self.z.total_in() - start) as usize;
            if out.capacity() - out.len() < 256 {
                out.reserve(1024);
            }
            let before = (self.z.total_in(), self.z.total_out());
            match self
                .z
                .decompress_vec(&block[consumed..], &mut out, FlushDecompress::Sync)
            {
                Ok(Status::StreamEnd) => break,
                Ok(_) => {}
                Err(e) if e.needs_dictionary().is_some() => {
                    self.z
                        .set_dictionary(dictionary())
                        .map_err(|e| bad(format!("SPDY header dictionary rejected: {e}")))?;
                    continue;
                }
                Err(e) => return Err(bad(format!("corrupt SPDY header block: {e}"))),
            }
            let consumed = (self.z.total_in() - start) as usize;
            let progressed = (self.z.total_in(), self.z.total_out()) != before;
            if consumed == block.len() && out.len() < out.capacity() {
                break;
            }
            if !progressed {
                return Err(bad("SPDY header block ends mid-stream".to_string()));
            }
        }
        parse_header_block(&out)
    }
}

/// Deflates header blocks: one zlib stream for the connection, primed with the dictionary.
#[derive(Debug)]
pub struct HeaderEncoder {
    z: Compress,
}

impl Default for HeaderEncoder {
    fn default() -> Self {
        let mut z = Compress::new(Compression::best(), true);
        z.set_dictionary(dictionary())
            .expect("a fresh zlib stream accepts a dictionary");
        HeaderEncoder { z }
    }
}

impl HeaderEncoder {
    /// Encodes and compresses one header block (sync flush, as Go's `zlib.Writer.Flush`).
    pub fn encode(&mut self, headers: &[(&str, &str)]) -> Vec<u8> {
        let mut raw = Vec::new();
        raw.extend_from_slice(&(headers.len() as u32).to_be_bytes());
        for (name, value) in headers {
            let name = name.to_ascii_lowercase();
            raw.extend_from_slice(&(name.len() as u32).to_be_bytes());
            raw.extend_from_slice(name.as_bytes());
            raw.extend_from_slice(&(value.len() as u32).to_be_bytes());
            raw.extend_from_slice(value.as_bytes());
        }
        let start = self.z.total_in();
        let mut out = Vec::with_capacity(raw.len() + 64);
        loop {
            let consumed = (self.z.total_in() - start) as usize;
            if out.capacity() - out.len() < 64 {
                out.reserve(256);
            }
            self.z
                .compress_vec(&raw[consumed..], &mut out, FlushCompress::Sync)
                .expect("zlib compression of a header block cannot fail");
            if (self.z.total_in() - start) as usize == raw.len() && out.len() < out.capacity() {
                return out;
            }
        }
    }
}

fn parse_header_block(raw: &[u8]) -> io::Result<Vec<(String, String)>> {
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "malformed SPDY header block");
    let mut pos = 0usize;
    let mut take = |n: usize| -> io::Result<&[u8]> {
        let s = raw.get(pos..pos + n).ok_or_else(bad)?;
        pos += n;
        Ok(s)
    };
    let word = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize;
    let count = word(take(4)?);
    let mut headers = Vec::with_capacity(count.min(64));
    for _ in 0..count {
        let n = word(take(4)?);
        let name = String::from_utf8_lossy(take(n)?).to_ascii_lowercase();
        let n = word(take(4)?);
        let value = String::from_utf8_lossy(take(n)?).into_owned();
        headers.push((name, value));
    }
    Ok(headers)
}

/// One frame, as the server needs it.
#[derive(Debug)]
pub enum Frame {
    /// A new stream from the peer.
    SynStream {
        /// Stream id.
        id: u32,
        /// Control flags (FIN, UNIDIRECTIONAL).
        flags: u8,
        /// Decompressed headers.
        headers: Vec<(String, String)>,
    },
    /// The reply to a stream this side opened.
    SynReply {
        /// Stream id.
        id: u32,
        /// Control flags.
        flags: u8,
        /// Decompressed headers.
        headers: Vec<(String, String)>,
    },
    /// Data on a stream.
    Data {
        /// Stream id.
        id: u32,
        /// FIN ends the sender's half.
        fin: bool,
        /// Payload.
        data: Bytes,
    },
    /// A stream reset.
    RstStream {
        /// Stream id.
        id: u32,
        /// Status code.
        status: u32,
    },
    /// A ping (to echo when its parity is not ours).
    Ping {
        /// Ping id.
        id: u32,
    },
    /// The peer goes away.
    GoAway,
    /// `SETTINGS`, `WINDOW_UPDATE`, `HEADERS`: ignored, as spdystream does.
    Ignored,
}

/// Reads one frame; `Ok(None)` at a clean end of the byte stream between frames.
pub async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    decoder: &mut HeaderDecoder,
) -> io::Result<Option<Frame>> {
    let mut head = [0u8; 8];
    let n = r.read(&mut head[..1]).await?;
    if n == 0 {
        return Ok(None);
    }
    r.read_exact(&mut head[1..]).await?;
    let first = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
    let flags = head[4];
    let len = u32::from_be_bytes([0, head[5], head[6], head[7]]) as usize;
    let mut payload = BytesMut::zeroed(len);
    r.read_exact(&mut payload).await?;
    let payload = payload.freeze();
    let bad = |m: &str| io::Error::new(io::ErrorKind::InvalidData, m.to_string());
    if first & 0x8000_0000 == 0 {
        return Ok(Some(Frame::Data {
            id: first & 0x7fff_ffff,
            fin: flags & FLAG_FIN != 0,
            data: payload,
        }));
    }
    let version = (first >> 16) & 0x7fff;
    if version != 3 {
        return Err(bad("unsupported SPDY version"));
    }
    let word = |at: usize| -> io::Result<u32> {
        payload
            .get(at..at + 4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
            .ok_or_else(|| bad("short SPDY control frame"))
    };
    Ok(Some(match (first & 0xffff) as u16 {
        TYPE_SYN_STREAM => {
            if payload.len() < 10 {
                return Err(bad("short SYN_STREAM"));
            }
            Frame::SynStream {
                id: word(0)? & 0x7fff_ffff,
                flags,
                headers: decoder.decode(&payload[10..])?,
            }
        }
        TYPE_SYN_REPLY => Frame::SynReply {
            id: word(0)? & 0x7fff_ffff,
            flags,
            headers: decoder.decode(payload.get(4..).ok_or_else(|| bad("short SYN_REPLY"))?)?,
        },
        TYPE_RST_STREAM => Frame::RstStream {
            id: word(0)? & 0x7fff_ffff,
            status: word(4)?,
        },
        TYPE_PING => Frame::Ping { id: word(0)? },
        TYPE_GOAWAY => Frame::GoAway,
        8 => {
            // HEADERS: its block still advances the shared zlib stream.
            decoder.decode(payload.get(4..).ok_or_else(|| bad("short HEADERS"))?)?;
            Frame::Ignored
        }
        _ => Frame::Ignored,
    }))
}

fn control(kind: u16, flags: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + body.len());
    out.extend_from_slice(&(0x8003u16).to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&((u32::from(flags) << 24) | body.len() as u32).to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// Encodes a `SYN_STREAM` (client side; used by tests that speak SPDY themselves).
pub fn syn_stream(encoder: &mut HeaderEncoder, id: u32, headers: &[(&str, &str)]) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&id.to_be_bytes());
    body.extend_from_slice(&0u32.to_be_bytes());
    body.extend_from_slice(&[0, 0]);
    body.extend_from_slice(&encoder.encode(headers));
    control(TYPE_SYN_STREAM, 0, &body)
}

/// Encodes a `SYN_REPLY`.
pub fn syn_reply(encoder: &mut HeaderEncoder, id: u32, headers: &[(&str, &str)]) -> Vec<u8> {
    let mut body = id.to_be_bytes().to_vec();
    body.extend_from_slice(&encoder.encode(headers));
    control(TYPE_SYN_REPLY, 0, &body)
}

/// Encodes an `RST_STREAM`.
pub fn rst_stream(id: u32, status: u32) -> Vec<u8> {
    let mut body = id.to_be_bytes().to_vec();
    body.extend_from_slice(&status.to_be_bytes());
    control(TYPE_RST_STREAM, 0, &body)
}

/// Encodes a `PING`.
pub fn ping(id: u32) -> Vec<u8> {
    control(TYPE_PING, 0, &id.to_be_bytes())
}

/// Encodes a data frame.
pub fn data(id: u32, fin: bool, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + payload.len());
    out.extend_from_slice(&(id & 0x7fff_ffff).to_be_bytes());
    let flags = if fin { u32::from(FLAG_FIN) } else { 0 };
    out.extend_from_slice(&((flags << 24) | payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// What the session's writer task sends, in order.
enum Out {
    Reply(u32),
    Refuse(u32),
    Pong(u32),
    Data {
        id: u32,
        fin: bool,
        data: Bytes,
    },
    /// The client reset this stream: nothing more is written on it (spdystream marks it
    /// finished, so a later `Close` writes no FIN).
    Forget(u32),
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Data,
    Error,
}

struct StreamState {
    kind: Kind,
    /// Data streams: bytes towards the forwarder, until FIN or reset.
    to_forwarder: Option<mpsc::Sender<Bytes>>,
}

#[derive(Default)]
struct PendingPair {
    data: Option<(u32, u16, mpsc::Receiver<Bytes>)>,
    error: Option<u32>,
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.split('\0').next().unwrap_or(""))
}

/// `httpStreamReceived`: the stream's port and type, or why it is refused.
fn validate(headers: &[(String, String)]) -> Result<(u16, Kind), String> {
    let port = header(headers, "port").unwrap_or("");
    if port.is_empty() {
        return Err("\"port\" header is required".to_string());
    }
    let port: u16 = port
        .parse()
        .map_err(|e| format!("unable to parse {port:?} as a port: {e}"))?;
    if port < 1 {
        return Err(format!("port \"{port}\" must be > 0"));
    }
    match header(headers, "streamtype").unwrap_or("") {
        "" => Err("\"streamType\" header is required".to_string()),
        "data" => Ok((port, Kind::Data)),
        "error" => Ok((port, Kind::Error)),
        other => Err(format!("invalid stream type {other:?}")),
    }
}

/// Serves one SPDY/3.1 port-forward connection (direct, or tunnelled through a WebSocket) until
/// the client goes away.
pub(crate) async fn serve<IO>(io: IO, shared: Arc<Shared>, pod: PodKey)
where
    IO: AsyncRead + AsyncWrite + Send + 'static,
{
    let (mut rd, mut wr) = tokio::io::split(io);
    let (out_tx, mut out_rx) = mpsc::channel::<Out>(QUEUE);
    let writer = tokio::spawn(async move {
        let mut encoder = HeaderEncoder::default();
        let mut forgotten = std::collections::HashSet::new();
        while let Some(out) = out_rx.recv().await {
            let bytes = match out {
                Out::Reply(id) => syn_reply(&mut encoder, id, &[]),
                Out::Refuse(id) => rst_stream(id, REFUSED_STREAM),
                Out::Pong(id) => ping(id),
                Out::Data { id, fin, data: d } => {
                    if forgotten.contains(&id) {
                        continue;
                    }
                    data(id, fin, &d)
                }
                Out::Forget(id) => {
                    forgotten.insert(id);
                    continue;
                }
            };
            if wr.write_all(&bytes).await.is_err() || wr.flush().await.is_err() {
                return;
            }
        }
        let _ = wr.shutdown().await;
    });

    let mut decoder = HeaderDecoder::default();
    let mut streams: HashMap<u32, StreamState> = HashMap::new();
    let mut pending: HashMap<String, PendingPair> = HashMap::new();
    let mut gone_away = false;
    while let Ok(Some(frame)) = read_frame(&mut rd, &mut decoder).await {
        match frame {
            Frame::SynStream { id, headers, .. } => {
                if gone_away || id == 0 || streams.contains_key(&id) {
                    continue;
                }
                let (port, kind) = match validate(&headers) {
                    Ok(v) => v,
                    Err(_) => {
                        let _ = out_tx.send(Out::Refuse(id)).await;
                        continue;
                    }
                };
                let _ = out_tx.send(Out::Reply(id)).await;
                // Older clients send no requestid: the kubelet pairs error stream N with data
                // stream N+2.
                let request_id = match header(&headers, "requestid") {
                    Some(r) if !r.is_empty() => r.to_string(),
                    _ => match kind {
                        Kind::Error => id.to_string(),
                        Kind::Data => id.saturating_sub(2).to_string(),
                    },
                };
                let pair = pending.entry(request_id.clone()).or_default();
                let duplicate = match kind {
                    Kind::Data if pair.data.is_some() => Some("data stream already assigned"),
                    Kind::Error if pair.error.is_some() => Some("error stream already assigned"),
                    _ => None,
                };
                if let Some(problem) = duplicate {
                    streams.insert(
                        id,
                        StreamState {
                            kind,
                            to_forwarder: None,
                        },
                    );
                    if let Some(error_id) = pair.error {
                        let message =
                            format!("error processing stream for request {request_id}: {problem}");
                        let _ = out_tx
                            .send(Out::Data {
                                id: error_id,
                                fin: false,
                                data: Bytes::from(message),
                            })
                            .await;
                    }
                    continue;
                }
                match kind {
                    Kind::Data => {
                        let (tx, rx) = mpsc::channel::<Bytes>(QUEUE);
                        streams.insert(
                            id,
                            StreamState {
                                kind,
                                to_forwarder: Some(tx),
                            },
                        );
                        pair.data = Some((id, port, rx));
                    }
                    Kind::Error => {
                        streams.insert(
                            id,
                            StreamState {
                                kind,
                                to_forwarder: None,
                            },
                        );
                        pair.error = Some(id);
                    }
                }
                if pair.data.is_some() && pair.error.is_some() {
                    let pair = pending.remove(&request_id).expect("just looked up");
                    let (data_id, port, from_client) = pair.data.expect("checked");
                    let error_id = pair.error.expect("checked");
                    tokio::spawn(forward_pair(
                        shared.clone(),
                        pod.clone(),
                        port,
                        data_id,
                        error_id,
                        from_client,
                        out_tx.clone(),
                    ));
                }
            }
            Frame::Data { id, fin, data } => {
                let Some(state) = streams.get_mut(&id) else {
                    continue;
                };
                if state.kind == Kind::Data {
                    if let Some(tx) = &state.to_forwarder
                        && !data.is_empty()
                    {
                        let _ = tx.send(data).await;
                    }
                    if fin {
                        state.to_forwarder = None;
                    }
                }
            }
            Frame::RstStream { id, .. } => {
                if let Some(state) = streams.get_mut(&id) {
                    state.to_forwarder = None;
                    let _ = out_tx.send(Out::Forget(id)).await;
                }
            }
            Frame::Ping { id } => {
                // The server's own pings are even; echo the client's.
                if id % 2 == 1 {
                    let _ = out_tx.send(Out::Pong(id)).await;
                }
            }
            Frame::GoAway => gone_away = true,
            Frame::SynReply { .. } | Frame::Ignored => {}
        }
    }
    // The connection is gone: every stream towards the pod ends.
    drop(streams);
    drop(pending);
    drop(out_tx);
    let _ = writer.await;
}

/// `httpStreamHandler.portForward` for one complete stream pair.
async fn forward_pair(
    shared: Arc<Shared>,
    pod: PodKey,
    port: u16,
    data_id: u32,
    error_id: u32,
    from_client: mpsc::Receiver<Bytes>,
    out: mpsc::Sender<Out>,
) {
    let (pod_tx, mut pod_rx) = mpsc::channel::<Bytes>(QUEUE);
    let out_data = out.clone();
    let relay = tokio::spawn(async move {
        while let Some(chunk) = pod_rx.recv().await {
            let frame = Out::Data {
                id: data_id,
                fin: false,
                data: chunk,
            };
            if out_data.send(frame).await.is_err() {
                break;
            }
        }
    });
    let result = forward::port_forward(shared, &pod, port, from_client, pod_tx).await;
    let _ = relay.await;
    if let Err(message) = result {
        let _ = out
            .send(Out::Data {
                id: error_id,
                fin: false,
                data: Bytes::from(message),
            })
            .await;
    }
    // Deferred closes run last-in first-out: the error stream, then the data stream.
    for id in [error_id, data_id] {
        let _ = out
            .send(Out::Data {
                id,
                fin: true,
                data: Bytes::new(),
            })
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn adler32(data: &[u8]) -> u32 {
        let (mut a, mut b) = (1u32, 0u32);
        for &byte in data {
            a = (a + u32::from(byte)) % 65521;
            b = (b + a) % 65521;
        }
        (b << 16) | a
    }

    #[test]
    fn dictionary_is_spdy3s() {
        // Length and Adler-32 of `headerDictionary` in spdystream's spdy/dictionary.go.
        assert_eq!(dictionary().len(), 1423);
        assert_eq!(adler32(dictionary()), 0xe3c6_a7c2);
    }

    #[test]
    fn header_blocks_round_trip_on_one_stream() {
        let mut enc = HeaderEncoder::default();
        let mut dec = HeaderDecoder::default();
        for round in 0..3 {
            let port = format!("{}", 8000 + round);
            let block = enc.encode(&[("streamType", "error"), ("port", &port)]);
            let headers = dec.decode(&block).unwrap();
            assert_eq!(
                headers,
                vec![
                    ("streamtype".to_string(), "error".to_string()),
                    ("port".to_string(), port.clone())
                ]
            );
        }
    }
}
