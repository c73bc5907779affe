//! The double's own snapshot archive: JSON lines, a header then one point per line. Only the
//! double reads it back; the agent treats snapshots as opaque bytes with a sha256.
//!
//! A shard archive (what `stream_shard_snapshot` sends) has `kind: "shard"` and holds one shard;
//! a collection archive has `kind: "collection"` and holds the asking node's local shards, plus
//! the collection's config, payload index schema and shard keys, as `Collection::create_snapshot`
//! writes `config.json`, `payload_index.json` and `shard_key_mapping.json` beside the shards.

use std::collections::BTreeMap;
use std::io::{self, BufRead, Read};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::state::{MAX_POINTS, Params, Point, Points};

/// Identifies the double's archives.
pub(crate) const FORMAT: &str = "soma-qdrant-cluster-double/1";
/// Longest line read back (a point of 64 dims is about 1 KiB).
const MAX_LINE: u64 = 1 << 20;

/// Which archive.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Kind {
    Shard,
    Collection,
}

/// The first line.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Header {
    pub format: String,
    pub kind: Kind,
    pub collection: String,
    pub params: Params,
    pub payload_schema: BTreeMap<String, String>,
    /// Every shard of the collection and its key, whether held here or not.
    pub shard_keys: BTreeMap<u32, Option<String>>,
    /// The shards whose points follow.
    pub shards: Vec<u32>,
}

#[derive(Serialize, Deserialize)]
struct Line {
    shard: u32,
    id: u64,
    vector: Vec<f32>,
    payload: Value,
}

/// The archive's bytes (data in tests is small; see the module docs of `qdrant_cluster`).
pub(crate) fn write(header: &Header, shards: &BTreeMap<u32, Points>) -> Vec<u8> {
    let mut out = serde_json::to_vec(header).expect("header serialises");
    out.push(b'\n');
    for (shard, points) in shards {
        for (id, point) in points {
            let line = Line {
                shard: *shard,
                id: *id,
                vector: point.vector.clone(),
                payload: point.payload.clone(),
            };
            serde_json::to_writer(&mut out, &line).expect("point serialises");
            out.push(b'\n');
        }
    }
    out
}

fn invalid(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

fn read_line(reader: &mut impl BufRead, buf: &mut Vec<u8>) -> io::Result<bool> {
    buf.clear();
    let n = reader.take(MAX_LINE + 1).read_until(b'\n', buf)?;
    if n as u64 > MAX_LINE {
        return Err(invalid("archive line longer than 1 MiB"));
    }
    Ok(n > 0)
}

/// Reads an archive back, refusing anything that is not one of the double's archives of
/// `kind`, a point of the wrong dimension, a shard the header does not list, or more than
/// [`MAX_POINTS`] points.
pub(crate) fn read(src: impl Read, kind: Kind) -> io::Result<(Header, BTreeMap<u32, Points>)> {
    let mut reader = io::BufReader::new(src);
    let mut buf = Vec::new();
    if !read_line(&mut reader, &mut buf)? {
        return Err(invalid("empty archive"));
    }
    let header: Header = serde_json::from_slice(&buf)
        .map_err(|e| invalid(format!("not a snapshot of the Qdrant cluster double: {e}")))?;
    if header.format != FORMAT {
        return Err(invalid(format!(
            "unknown archive format {:?}",
            header.format
        )));
    }
    if header.kind != kind {
        return Err(invalid(format!(
            "a {:?} snapshot where a {kind:?} snapshot is expected",
            header.kind
        )));
    }
    let mut shards: BTreeMap<u32, Points> =
        header.shards.iter().map(|s| (*s, Points::new())).collect();
    let mut count = 0usize;
    while read_line(&mut reader, &mut buf)? {
        let line: Line = serde_json::from_slice(&buf).map_err(invalid)?;
        if line.vector.len() as u64 != header.params.vector_size {
            return Err(invalid(format!(
                "point {} has {} dimensions, the archive's collection {}",
                line.id,
                line.vector.len(),
                header.params.vector_size
            )));
        }
        count += 1;
        if count > MAX_POINTS {
            return Err(invalid(format!("more than {MAX_POINTS} points")));
        }
        let points = shards.get_mut(&line.shard).ok_or_else(|| {
            invalid(format!(
                "point of shard {} the header does not list",
                line.shard
            ))
        })?;
        points.insert(
            line.id,
            Point {
                vector: line.vector,
                payload: line.payload,
            },
        );
    }
    Ok((header, shards))
}
