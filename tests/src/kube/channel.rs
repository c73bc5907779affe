//! Port-forward over the WebSocket channel protocol `v4.channel.k8s.io` (and its base64
//! variant): the kubelet's `handleWebSocketStreams` (`pkg/kubelet/cri/streaming/portforward/
//! websocket.go`) on top of `wsstream.Conn` (`staging/src/k8s.io/apimachinery/pkg/util/
//! httpstream/wsstream/conn.go`).

use std::sync::Arc;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;

use super::forward::{self, PodKey};
use super::state::Shared;

/// The subprotocols the kubelet's port-forward WebSocket accepts, in its terms: `""` (none
/// offered) and `v4.channel.k8s.io` are binary, `v4.base64.channel.k8s.io` is text.
pub(crate) const BINARY: &str = "v4.channel.k8s.io";
pub(crate) const BASE64: &str = "v4.base64.channel.k8s.io";

/// Messages queued for the client before the reader applies backpressure.
const QUEUE: usize = 16;

/// `wsstream` `handshake`: the first protocol the client offered that the server supports;
/// `""` when the client offered none. `None`: the handshake fails.
pub(crate) fn negotiate(offered: &[String]) -> Option<String> {
    if offered.is_empty() {
        return Some(String::new());
    }
    offered
        .iter()
        .find(|p| matches!(p.as_str(), BINARY | BASE64))
        .cloned()
}

/// Frames `data` for channel `channel`: the channel byte then the payload, or with the base64
/// protocol the channel as an ASCII digit then standard base64 in a text message.
fn frame(base64: bool, channel: u8, data: &[u8]) -> Message {
    if base64 {
        let mut text = String::with_capacity(1 + data.len().div_ceil(3) * 4);
        text.push(char::from(b'0' + channel));
        text.push_str(&b64::encode(data));
        Message::text(text)
    } else {
        let mut bin = Vec::with_capacity(1 + data.len());
        bin.push(channel);
        bin.extend_from_slice(data);
        Message::binary(bin)
    }
}

/// Serves one upgraded connection for `ports` until every port's forwarding has ended (then
/// the server closes the WebSocket) or the client closes it.
pub(crate) async fn serve<S>(
    ws: WebSocketStream<S>,
    base64: bool,
    ports: Vec<u16>,
    shared: Arc<Shared>,
    pod: PodKey,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sink, mut stream) = ws.split();
    let (out_tx, mut out_rx) = mpsc::channel::<Message>(QUEUE);
    let writer = tokio::spawn(async move {
        while let Some(msg) = out_rx.recv().await {
            if sink.send(msg).await.is_err() {
                return;
            }
        }
        // `conn.Close()`: a close frame, then the connection goes.
        let _ = sink.send(Message::Close(None)).await;
        let _ = sink.close().await;
    });

    // The port goes out first on both channels of each pair, data channel first.
    for (i, port) in ports.iter().enumerate() {
        let le = port.to_le_bytes();
        let data = (2 * i) as u8;
        let _ = out_tx.send(frame(base64, data, &le)).await;
        let _ = out_tx.send(frame(base64, data + 1, &le)).await;
    }

    let mut to_pairs = Vec::with_capacity(ports.len());
    let mut pairs = Vec::with_capacity(ports.len());
    for (i, port) in ports.iter().copied().enumerate() {
        let (client_tx, client_rx) = mpsc::channel::<Bytes>(QUEUE);
        to_pairs.push(client_tx);
        let out = out_tx.clone();
        let shared = shared.clone();
        let pod = pod.clone();
        pairs.push(tokio::spawn(async move {
            let data = (2 * i) as u8;
            let (pod_tx, mut pod_rx) = mpsc::channel::<Bytes>(QUEUE);
            let out_data = out.clone();
            let relay = tokio::spawn(async move {
                while let Some(chunk) = pod_rx.recv().await {
                    if out_data.send(frame(base64, data, &chunk)).await.is_err() {
                        break;
                    }
                }
            });
            let result = forward::port_forward(shared, &pod, port, client_rx, pod_tx).await;
            let _ = relay.await;
            if let Err(message) = result {
                let _ = out.send(frame(base64, data + 1, message.as_bytes())).await;
            }
        }));
    }
    drop(out_tx);

    let reader = async move {
        while let Some(Ok(msg)) = stream.next().await {
            let (channel, payload) = match msg {
                Message::Binary(b) if !base64 && b.len() > 1 => (b[0], b.slice(1..)),
                Message::Text(t) if base64 && t.len() > 1 => {
                    let bytes = t.as_bytes();
                    let Some(channel) = bytes[0].checked_sub(b'0') else {
                        continue;
                    };
                    match b64::decode(&bytes[1..]) {
                        Some(decoded) => (channel, Bytes::from(decoded)),
                        // "Unable to write frame": logged and skipped upstream.
                        None => continue,
                    }
                }
                Message::Close(_) => break,
                _ => continue,
            };
            // Odd channels are write-only (errors), unknown channels are ignored.
            let index = usize::from(channel / 2);
            if channel % 2 == 0
                && let Some(tx) = to_pairs.get(index)
            {
                let _ = tx.send(payload).await;
            }
        }
        // Dropping `to_pairs` closes every data channel towards the pod.
    };
    let all_done = futures::future::join_all(pairs);
    tokio::pin!(all_done);
    tokio::select! {
        () = reader => { all_done.await; }
        _ = &mut all_done => {}
    }
    let _ = writer.await;
}

/// Standard base64 (RFC 4648 with padding), as Go's `base64.StdEncoding`.
pub(crate) mod b64 {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

    pub(crate) fn encode(data: &[u8]) -> String {
        let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
        for chunk in data.chunks(3) {
            let b = [
                chunk[0],
                chunk.get(1).copied().unwrap_or(0),
                chunk.get(2).copied().unwrap_or(0),
            ];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
                } else {
                    out.push('=');
                }
            }
        }
        out
    }

    pub(super) fn decode(text: &[u8]) -> Option<Vec<u8>> {
        if !text.len().is_multiple_of(4) {
            return None;
        }
        let mut out = Vec::with_capacity(text.len() / 4 * 3);
        for chunk in text.chunks(4) {
            let mut n = 0u32;
            let mut pad = 0;
            for &c in chunk {
                let v = match c {
                    b'=' => {
                        pad += 1;
                        0
                    }
                    _ if pad > 0 => return None,
                    _ => ALPHABET.iter().position(|&a| a == c)? as u32,
                };
                n = (n << 6) | v;
            }
            let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
            out.extend_from_slice(&bytes[..3 - pad.min(2)]);
        }
        Some(out)
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn round_trip() {
            for s in [&b""[..], b"f", b"fo", b"foo", b"foo\n", b"\x00\xff\x10"] {
                assert_eq!(super::decode(super::encode(s).as_bytes()).unwrap(), s);
            }
            assert_eq!(super::encode(b"foo\n"), "Zm9vCg==");
        }
    }
}
