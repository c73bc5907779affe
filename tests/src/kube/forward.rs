//! The "container runtime" end of a port-forward: what containerd's `PortForward` does inside
//! the pod's network namespace (`internal/cri/server/sandbox_portforward_linux.go`), with the
//! kubelet's error wrapping (`pkg/kubelet/cri/streaming/portforward/{websocket,httpstream}.go`).
//! Both wire protocols (v4 channels and SPDY streams) hand each forwarded connection here as a
//! pair of bounded byte channels.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use super::RUNTIME_CLOSE_GRACE;
use super::state::Shared;

/// Read size from the pod's port (what Go's `io.Copy` uses).
const COPY_CHUNK: usize = 32 << 10;

/// Which pod a port-forward session is for.
#[derive(Clone, Debug)]
pub(crate) struct PodKey {
    pub namespace: String,
    pub name: String,
}

/// Where the kubelet would dial, resolved when a forwarded connection starts.
enum Dial {
    Target(SocketAddr),
    Nothing,
    SandboxGone,
}

/// Forwards one connection to container port `port` of the pod: bytes from `from_client` go to
/// the pod until that channel closes (client EOF, stream reset, connection gone), bytes from the
/// pod go to `to_client`. Returns the message the kubelet writes on the error channel/stream.
pub(crate) async fn port_forward(
    shared: Arc<Shared>,
    pod: &PodKey,
    port: u16,
    mut from_client: mpsc::Receiver<Bytes>,
    to_client: mpsc::Sender<Bytes>,
) -> Result<(), String> {
    let (dial, sandbox, netns) = {
        let inner = shared.lock();
        match inner.pods.get(&(pod.namespace.clone(), pod.name.clone())) {
            Some(p) => (
                if Shared::sandbox_running(p.spec.phase) {
                    p.spec
                        .forward_to
                        .get(&port)
                        .map_or(Dial::Nothing, |a| Dial::Target(*a))
                } else {
                    Dial::SandboxGone
                },
                p.sandbox_id.clone(),
                p.netns.clone(),
            ),
            // Deleted since the upgrade: its sandbox is gone.
            None => (Dial::SandboxGone, String::new(), String::new()),
        }
    };
    let kubelet = |runtime_error: String| {
        // The kubelet passes the sandbox id as the pod name and no uid to the CRI streaming
        // server, hence "uid :".
        format!("error forwarding port {port} to pod {sandbox}, uid : {runtime_error}")
    };
    let refused = || {
        format!(
            "dial tcp4 127.0.0.1:{port}: connect: connection refused IPv6 dial tcp6 [::1]:{port}: connect: connection refused"
        )
    };
    let connect_error = |v4_and_v6: String| {
        kubelet(format!(
            "failed to execute portforward in network namespace \"{netns}\": failed to connect to localhost:{port} inside namespace \"{sandbox}\", IPv4: {v4_and_v6} "
        ))
    };
    let stream = match dial {
        Dial::SandboxGone => {
            return Err(kubelet(format!(
                "network namespace for sandbox \"{sandbox}\" is closed"
            )));
        }
        Dial::Nothing => return Err(connect_error(refused())),
        Dial::Target(addr) => match TcpStream::connect(addr).await {
            Ok(s) => s,
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                return Err(connect_error(refused()));
            }
            Err(e) => {
                return Err(connect_error(format!(
                    "dial tcp4 127.0.0.1:{port}: connect: {e} IPv6 dial tcp6 [::1]:{port}: connect: {e}"
                )));
            }
        },
    };
    shared.lock().forwarded_connections += 1;
    let _ = stream.set_nodelay(true);
    let (mut rd, mut wr) = stream.into_split();

    let to_pod = async move {
        while let Some(chunk) = from_client.recv().await {
            if wr.write_all(&chunk).await.is_err() {
                break;
            }
        }
        // `wr` is dropped only with the whole future: containerd does not half-close.
        wr
    };
    let from_pod = async move {
        loop {
            let mut buf = BytesMut::with_capacity(COPY_CHUNK);
            match rd.read_buf(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    if to_client.send(buf.freeze()).await.is_err() {
                        break;
                    }
                }
            }
        }
    };
    tokio::pin!(to_pod, from_pod);
    // "Wait until the first error is returned by one of the connections", then give the other
    // direction up to a second, then close everything.
    tokio::select! {
        wr = &mut to_pod => {
            let _ = tokio::time::timeout(RUNTIME_CLOSE_GRACE, &mut from_pod).await;
            drop(wr);
        }
        () = &mut from_pod => {
            let _ = tokio::time::timeout(RUNTIME_CLOSE_GRACE, &mut to_pod).await;
        }
    }
    Ok(())
}
