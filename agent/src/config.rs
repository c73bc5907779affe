//! Agent configuration: flags, each with a `SOMA_*` environment equivalent.
//!
//! S3 endpoint, region and credentials deliberately have no flags: they come from the AWS SDK's
//! standard environment and credential chain, so secrets never appear in process arguments.

use std::{net::SocketAddr, path::PathBuf};

use clap::{Parser, ValueEnum};

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// `soma-agent`: the Soma Backup sidecar.
#[derive(Debug, Clone, Parser)]
#[command(name = "soma-agent", version, about, long_about = None)]
pub struct Config {
    /// Address of the gRPC server. Inside a pod keep 127.0.0.1: `kubectl soma` reaches it through a
    /// port-forward.
    #[arg(long, env = "SOMA_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,

    /// Where backups live: `s3://bucket/prefix` or `file:///absolute/path` (the embedded default).
    /// Give each PostgreSQL cluster its own prefix.
    #[arg(
        long,
        env = "SOMA_STORE",
        default_value = "file:///var/lib/soma-backup"
    )]
    pub store: String,

    /// libpq URL of the PostgreSQL server, e.g. `postgresql://soma@127.0.0.1:5432/appdb`. No
    /// password here: use PGPASSWORD or a passfile.
    #[arg(long, env = "SOMA_POSTGRES_URL")]
    pub postgres_url: Option<String>,

    /// URL of the Qdrant REST API, e.g. `http://127.0.0.1:6333`. The API key comes from
    /// SOMA_QDRANT_API_KEY (never a flag).
    #[arg(long, env = "SOMA_QDRANT_URL")]
    pub qdrant_url: Option<String>,

    /// PEM file with the CA that signed Qdrant's TLS certificate (for https:// with a private CA).
    #[arg(long, env = "SOMA_QDRANT_CA_CERT")]
    pub qdrant_ca_cert: Option<PathBuf>,

    /// Default Qdrant snapshot mode: `collection` (snapshot on the node, stream, delete),
    /// `shard-stream` (no file on the node; Qdrant ≥ 1.12) or `full-storage` (single node).
    #[arg(long, env = "SOMA_QDRANT_MODE", default_value = "collection",
          value_parser = crate::ops::qdrant::parse_mode)]
    pub qdrant_mode: soma_proto::v1::QdrantMode,

    /// Directory holding pg_dump, pg_restore and psql (default: found on PATH).
    #[arg(long, env = "SOMA_PG_BIN_DIR")]
    pub pg_bin_dir: Option<PathBuf>,

    /// zstd compression level (1-22).
    #[arg(long, env = "SOMA_COMPRESSION_LEVEL", default_value_t = 3,
          value_parser = clap::value_parser!(i32).range(1..=22))]
    pub compression_level: i32,

    /// zstd worker threads; 0 compresses on the pipeline thread. Default: half the CPUs, at most 4.
    #[arg(long, env = "SOMA_COMPRESSION_THREADS", default_value_t = default_threads())]
    pub compression_threads: u32,

    /// Size of multipart upload parts (at least 5MiB). It doubles every 1000 parts, so any stream
    /// up to 5 TiB fits in S3's 10 000 parts.
    #[arg(long, env = "SOMA_PART_SIZE", default_value = "16MiB", value_parser = parse_size)]
    pub part_size: u64,

    /// Parts uploaded concurrently. Part buffers on the data path: at most (this + 1) × part size.
    #[arg(long, env = "SOMA_PARTS_IN_FLIGHT", default_value_t = 2,
          value_parser = clap::value_parser!(u16).range(1..=64))]
    pub parts_in_flight: u16,

    /// Log format.
    #[arg(long, env = "SOMA_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

fn default_threads() -> u32 {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
    (cpus / 2).clamp(1, 4)
}

/// Parses sizes such as `16MiB`, `5MB`, `1GiB` or plain bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size; use e.g. 16MiB"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1000,
        "kib" => 1 << 10,
        "m" | "mb" => 1_000_000,
        "mib" => 1 << 20,
        "g" | "gb" => 1_000_000_000,
        "gib" => 1 << 30,
        other => return Err(format!("unknown size unit {other:?}; use KiB, MiB or GiB")),
    };
    let bytes = n.checked_mul(mult).ok_or("size too large")?;
    if bytes < crate::store::MIN_PART_SIZE as u64 {
        return Err("parts must be at least 5MiB (the S3 minimum)".into());
    }
    if bytes > crate::store::MAX_PART_SIZE as u64 {
        return Err("parts must be at most 5GiB (the S3 maximum)".into());
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_valid() {
        Config::command().debug_assert();
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("16MiB"), Ok(16 << 20));
        assert_eq!(parse_size("5242880"), Ok(5 << 20));
        assert!(parse_size("1MiB").is_err());
        assert!(parse_size("lots").is_err());
    }
}
