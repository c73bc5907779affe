//! SPDY tunnelled through a WebSocket (KEP-4006): the API server's `TunnelingHandler`
//! (`staging/src/k8s.io/apiserver/pkg/util/proxy/streamtunnel.go`) wraps the WebSocket in a
//! `TunnelingConnection` (`staging/src/k8s.io/client-go/tools/portforward/
//! tunneling_connection.go`): every write is one binary message, reads run across message
//! boundaries, a text message is an error, a normal close is EOF. The SPDY session itself is
//! [`super::spdy::serve`].

use std::sync::Arc;

use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use super::forward::PodKey;
use super::spdy;
use super::state::Shared;

/// Prefix of the tunnelling subprotocols (`WebsocketsSPDYTunnelingPrefix`).
pub(crate) const PREFIX: &str = "SPDY/3.1+";

/// Bytes buffered between the WebSocket and the SPDY session in each direction.
const PIPE: usize = 64 << 10;

/// Runs a SPDY port-forward session over `ws` until either side closes.
pub(crate) async fn serve<S>(ws: WebSocketStream<S>, shared: Arc<Shared>, pod: PodKey)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (session_end, tunnel_end) = tokio::io::duplex(PIPE);
    let session = tokio::spawn(spdy::serve(session_end, shared, pod));
    let (mut from_session, mut to_session) = tokio::io::split(tunnel_end);
    let (mut sink, mut stream) = ws.split();

    let inbound = async move {
        while let Some(Ok(msg)) = stream.next().await {
            let bytes = match msg {
                Message::Binary(bytes) => bytes,
                // "invalid message type received"; a close ends the stream too.
                Message::Text(_) | Message::Close(_) => break,
                _ => continue,
            };
            if to_session.write_all(&bytes).await.is_err() {
                break;
            }
        }
        let _ = to_session.shutdown().await;
    };
    let outbound = async move {
        let mut buf = vec![0u8; 32 << 10];
        loop {
            match from_session.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if sink.send(Message::binary(buf[..n].to_vec())).await.is_err() {
                        return;
                    }
                }
            }
        }
        // `TunnelingConnection.Close`: a normal-closure close message.
        let _ = sink
            .send(Message::Close(Some(CloseFrame {
                code: CloseCode::Normal,
                reason: "".into(),
            })))
            .await;
        let _ = sink.close().await;
    };
    tokio::join!(inbound, outbound);
    let _ = session.await;
}

#[cfg(test)]
mod tests {
    #[test]
    fn prefix_matches_upstream_constant() {
        assert_eq!(
            format!("{}{}", super::PREFIX, super::spdy::PORT_FORWARD_PROTOCOL),
            "SPDY/3.1+portforward.k8s.io"
        );
    }
}
