//! Flags of the data path: compression and multipart uploads.

use crate::pipeline::Settings;

/// How bytes are compressed and uploaded.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Compression and uploads")]
pub struct PipelineArgs {
    /// zstd compression level (1-22).
    #[arg(long, env = "SOMA_COMPRESSION_LEVEL", default_value_t = 3,
          value_parser = clap::value_parser!(i32).range(1..=22))]
    pub compression_level: i32,

    /// zstd worker threads; 0 compresses on the pipeline thread. Default: half the CPUs, at most 4.
    #[arg(long, env = "SOMA_COMPRESSION_THREADS", default_value_t = default_threads())]
    pub compression_threads: u32,

    /// Size of multipart upload parts (at least 5MiB). It doubles every 1000 parts, so any stream
    /// up to 5 TiB fits in S3's 10 000 parts. 8MiB (the AWS CLI's default) keeps the part buffers
    /// at 24 MiB with the default parts in flight: measured, every data path then peaks ≤ 64 MiB
    /// (bench/RESULTS.md) at the same speed as 16MiB parts.
    #[arg(long, env = "SOMA_PART_SIZE", default_value = "8MiB", value_parser = parse_size)]
    pub part_size: u64,

    /// Parts uploaded concurrently. Part buffers on the data path: at most (this + 1) × part size.
    #[arg(long, env = "SOMA_PARTS_IN_FLIGHT", default_value_t = 2,
          value_parser = clap::value_parser!(u16).range(1..=64))]
    pub parts_in_flight: u16,
}

impl PipelineArgs {
    /// The pipeline's settings.
    pub fn settings(&self) -> Settings {
        Settings {
            compression_level: self.compression_level,
            compression_threads: self.compression_threads,
            // Whole encryption chunks, so a sealed part is never shorter than the part it seals
            // (S3 refuses a short part that is not the last).
            part_size: (self.part_size as usize).next_multiple_of(crate::store::crypt::CHUNK),
            parts_in_flight: self.parts_in_flight as usize,
        }
    }
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
