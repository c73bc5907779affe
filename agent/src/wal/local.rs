//! Local WAL files, before they are shipped or after they are fetched: their digest, where the
//! WAL in them ends, and their first page's header.

use std::path::Path;

use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;

use super::{WalError, header::LONG_HEADER_LEN};
use crate::digest::Sha256Digest;

/// PostgreSQL aligns every WAL record to this many bytes (MAXALIGN), padding with zeros.
const WAL_ALIGN: u64 = 8;
/// A local file's digest and the number of its bytes that hold WAL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FileDigest {
    /// sha256 of the whole file.
    pub sha256: Sha256Digest,
    /// File size.
    pub size: u64,
    /// Where the WAL in it ends: after its last non-zero byte, aligned as records are. The rest of
    /// a segment being written is zeros, so this is the end of its last record (or a few bytes
    /// short of it, never beyond it).
    pub end: u64,
}

/// Hashes a local file and finds where its WAL ends, in one read.
pub(crate) async fn digest_file(path: &Path) -> Result<FileDigest, WalError> {
    let io = |source| WalError::Io {
        path: path.display().to_string(),
        source,
    };
    let mut file = tokio::fs::File::open(path).await.map_err(io)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let (mut size, mut end) = (0u64, 0u64);
    loop {
        let mut filled = 0;
        while filled < buf.len() {
            let n = file.read(&mut buf[filled..]).await.map_err(io)?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        if filled == 0 {
            break;
        }
        hasher.update(&buf[..filled]);
        if let Some(last) = buf[..filled].iter().rposition(|&b| b != 0) {
            end = (size + last as u64 + 1).div_ceil(WAL_ALIGN) * WAL_ALIGN;
        }
        size += filled as u64;
        if filled < buf.len() {
            break;
        }
    }
    Ok(FileDigest {
        sha256: hasher.finalize().into(),
        size,
        // A file whose length is not a multiple of the alignment (a history file) ends at its end.
        end: end.min(size),
    })
}

/// The size of the file at `path` and its first [`LONG_HEADER_LEN`] bytes (fewer if it is shorter).
pub(super) async fn read_head(path: &Path) -> std::io::Result<(u64, Vec<u8>)> {
    let mut file = tokio::fs::File::open(path).await?;
    let size = file.metadata().await?.len();
    let mut head = Vec::with_capacity(LONG_HEADER_LEN);
    (&mut file)
        .take(LONG_HEADER_LEN as u64)
        .read_to_end(&mut head)
        .await?;
    Ok((size, head))
}
