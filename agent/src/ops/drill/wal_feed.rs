//! WAL for a drill's scratch server without the store's credentials: the agent fetches each file
//! PostgreSQL asks for from the archive (checking its digest, as `wal-fetch` does) and hands it
//! over a Unix socket in the drill's mode-0700 directory to the scratch server's restore_command,
//! `soma-agent drill-wal-fetch`, which holds no credential, no key and no store location. The
//! server replays a data directory read from the store, so whatever runs inside it must find
//! nothing worth taking: this is how WAL reaches it anyway.
//!
//! The exchange is one request per connection: the file name and a newline; the answer a line
//! — `OK <bytes>` followed by the file, `NOTFOUND` (the end of the archive) or `FATAL <why>` —
//! so the client's exit status tells PostgreSQL exactly what `wal-fetch`'s would.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    task::JoinHandle,
};

use crate::{
    WalFetchOutcome,
    engine::postgres::ScratchError,
    wal::{Fetched, WalArchive, WalFile},
};

/// Longest request line: a WAL file name is 24 characters, a history file's 16.
const MAX_REQUEST: u64 = 64;
/// Longest answer line (a FATAL answer carries the reason).
const MAX_ANSWER_LINE: u64 = 4096;
/// Largest file handed over: PostgreSQL's largest WAL segment (1 GiB).
const MAX_FILE: u64 = 1 << 30;
/// How long a connection may take to send its request: a client that sends nothing cannot hold
/// up the next one for longer.
const REQUEST_LIMIT: Duration = Duration::from_secs(10);
/// How long handing over one file may take.
const ANSWER_LIMIT: Duration = Duration::from_secs(300);

/// Why the feed could not start.
fn io(action: &'static str, dir: &Path) -> impl FnOnce(std::io::Error) -> ScratchError {
    let dir = dir.to_path_buf();
    move |source| ScratchError::Io {
        action,
        dir,
        source,
    }
}

/// The agent's side: serves WAL files of one archive on one socket until dropped.
#[derive(Debug)]
pub(in crate::ops) struct WalFeed {
    task: JoinHandle<()>,
}

impl Drop for WalFeed {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl WalFeed {
    /// Listens on `socket` (given to `owner`; it lies in the drill's mode-0700 directory, so only
    /// the scratch server's user and root can connect) and fetches into `staging`, a directory of the agent's own that the
    /// scratch server cannot write (so it cannot plant a link the agent would write through).
    pub(in crate::ops) async fn start(
        archive: WalArchive,
        socket: &Path,
        staging: PathBuf,
        owner: Option<(u32, u32)>,
    ) -> Result<Self, ScratchError> {
        let dir = socket.parent().unwrap_or(socket);
        let listener = UnixListener::bind(socket).map_err(io("listening for WAL requests", dir))?;
        if let Some((uid, gid)) = owner {
            // lchown: a link put in the socket's place is changed, never what it points to.
            std::os::unix::fs::lchown(socket, Some(uid), Some(gid))
                .map_err(io("giving the WAL socket to the server's user", dir))?;
        }
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                // One at a time, as PostgreSQL's startup process asks; each bounded in time.
                let _ = tokio::time::timeout(
                    REQUEST_LIMIT + ANSWER_LIMIT,
                    serve(&archive, &staging, stream),
                )
                .await;
            }
        });
        Ok(Self { task })
    }
}

/// Answers one request.
async fn serve(archive: &WalArchive, staging: &Path, stream: UnixStream) {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut request = BufReader::new(read.take(MAX_REQUEST));
    let read_request = request.read_line(&mut line);
    if !matches!(tokio::time::timeout(REQUEST_LIMIT, read_request).await, Ok(Ok(n)) if n > 0) {
        return;
    }
    let Some(file) = WalFile::parse(line.trim_end_matches('\n')) else {
        // PostgreSQL also asks for files never archived (backup history): not ours.
        let _ = write.write_all(b"NOTFOUND\n").await;
        return;
    };
    let staged = staging.join(file.name());
    let answer = match archive.fetch(&file, &staged).await {
        Ok(Fetched::NotFound) => write.write_all(b"NOTFOUND\n").await,
        Err(e) => {
            let why = crate::error::shorten(e.to_string().replace('\n', " "), 2000);
            write.write_all(format!("FATAL {why}\n").as_bytes()).await
        }
        Ok(Fetched::Restored(_)) => hand_over(&staged, &mut write).await,
    };
    if let Err(e) = answer {
        tracing::warn!(file = %file.name(), error = %e, "could not hand a WAL file to the drill's scratch server");
    }
    let _ = tokio::fs::remove_file(&staged).await;
}

/// Sends `OK <bytes>` and the file.
async fn hand_over(
    staged: &Path,
    write: &mut tokio::net::unix::OwnedWriteHalf,
) -> std::io::Result<()> {
    let mut file = tokio::fs::File::open(staged).await?;
    let len = file.metadata().await?.len();
    write.write_all(format!("OK {len}\n").as_bytes()).await?;
    let sent = tokio::io::copy(&mut (&mut file).take(len), write).await?;
    if sent != len {
        return Err(std::io::Error::other("the staged file shrank"));
    }
    write.shutdown().await
}

/// The scratch server's restore_command: every word shell-quoted, `%` doubled so PostgreSQL
/// substitutes only its own `%f` and `%p` (the socket path comes from `--drill-dir`).
pub(in crate::ops) fn restore_command(agent_binary: &Path, socket: &Path) -> String {
    let word = |s: &str| {
        let quoted = if !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"/._-:=@".contains(&b))
        {
            s.to_string()
        } else {
            format!("'{}'", s.replace('\'', "'\\''"))
        };
        quoted.replace('%', "%%")
    };
    format!(
        "{} drill-wal-fetch --socket {} %f %p",
        word(&agent_binary.display().to_string()),
        word(&socket.display().to_string())
    )
}

/// `soma-agent drill-wal-fetch`: asks the drill's agent for `file` and writes it to
/// `destination`, through a temporary name so PostgreSQL never reads half a file.
pub async fn fetch(socket: &Path, file: &str, destination: &Path) -> WalFetchOutcome {
    let fail = |what: String| {
        eprintln!(
            "soma-agent drill-wal-fetch: FATAL: {what}; recovery stops here rather than end early"
        );
        WalFetchOutcome::Fatal
    };
    if file.len() as u64 >= MAX_REQUEST || file.contains('\n') {
        return WalFetchOutcome::NotFound;
    }
    let stream = match UnixStream::connect(socket).await {
        Ok(s) => s,
        Err(e) => {
            return fail(format!(
                "cannot reach the drill's agent at {}: {e}",
                socket.display()
            ));
        }
    };
    let (read, mut write) = stream.into_split();
    if let Err(e) = write.write_all(format!("{file}\n").as_bytes()).await {
        return fail(format!("asking the drill's agent for {file}: {e}"));
    }
    let mut reader = BufReader::new(read);
    let mut line = String::new();
    if let Err(e) = (&mut reader)
        .take(MAX_ANSWER_LINE)
        .read_line(&mut line)
        .await
    {
        return fail(format!(
            "reading the drill's agent's answer for {file}: {e}"
        ));
    }
    let line = line.trim_end_matches('\n');
    let len = match line.split_once(' ') {
        _ if line == "NOTFOUND" => return WalFetchOutcome::NotFound,
        Some(("FATAL", why)) => return fail(why.to_string()),
        Some(("OK", len)) => match len.parse::<u64>() {
            Ok(len) if len <= MAX_FILE => len,
            _ => {
                return fail(format!(
                    "the drill's agent announced {len:?} bytes for {file}"
                ));
            }
        },
        _ => return fail(format!("the drill's agent answered {line:?} for {file}")),
    };
    let tmp = destination.with_extension("soma-partial");
    let written = async {
        let mut out = tokio::fs::File::create(&tmp).await?;
        let n = tokio::io::copy(&mut reader.take(len), &mut out).await?;
        if n != len {
            return Err(std::io::Error::other(format!(
                "the drill's agent sent {n} of {len} bytes"
            )));
        }
        out.sync_all().await?;
        tokio::fs::rename(&tmp, destination).await
    };
    match written.await {
        Ok(()) => WalFetchOutcome::Restored,
        Err(e) => {
            let _ = tokio::fs::remove_file(&tmp).await;
            fail(format!("writing {file} to {}: {e}", destination.display()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restore_command_quotes_every_word() {
        assert_eq!(
            restore_command(Path::new("/soma/soma-agent"), Path::new("/d/x/wal.sock")),
            "/soma/soma-agent drill-wal-fetch --socket /d/x/wal.sock %f %p"
        );
        assert_eq!(
            restore_command(
                Path::new("/a b/soma-agent"),
                Path::new("/d/it's %p/wal.sock")
            ),
            "'/a b/soma-agent' drill-wal-fetch --socket '/d/it'\\''s %%p/wal.sock' %f %p"
        );
    }
}
