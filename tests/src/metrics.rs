//! Scrapes the agent's metrics listener over plain HTTP/1.1, as Prometheus does, and parses the
//! OpenMetrics text into samples.

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::TcpStream,
    time::Duration,
};

/// One sample: metric name (with its `_total` etc. suffix), labels, value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The sample's name as exposed.
    pub name: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Its value.
    pub value: f64,
}

/// `GET path` on `addr`; returns the status code, the content type and the body.
pub fn http_get(addr: &str, path: &str) -> (u16, String, String) {
    let mut stream = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).unwrap();
    let raw = String::from_utf8(raw).expect("the metrics response is UTF-8");
    let (head, body) = raw.split_once("\r\n\r\n").expect("an HTTP response");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("an HTTP status line");
    let content_type = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-type:")
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_default();
    (status, content_type, body.to_string())
}

/// `GET path` on `addr` as a prober with a timeout does it (the kubelet's `timeoutSeconds`):
/// connecting, sending and reading the whole answer must fit in `limit`. Returns the status code
/// and the body, or what did not happen in time.
pub fn http_get_within(addr: &str, path: &str, limit: Duration) -> Result<(u16, String), String> {
    let started = std::time::Instant::now();
    let target: std::net::SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    let mut stream =
        TcpStream::connect_timeout(&target, limit).map_err(|e| format!("connect {addr}: {e}"))?;
    let left = |what: &str| {
        limit
            .checked_sub(started.elapsed())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| format!("GET {path}: no answer within {limit:?} ({what})"))
    };
    stream
        .set_write_timeout(Some(left("sending")?))
        .map_err(|e| e.to_string())?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("GET {path}: sending: {e}"))?;
    let mut raw = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        stream
            .set_read_timeout(Some(left("reading")?))
            .map_err(|e| e.to_string())?;
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&chunk[..n]),
            Err(e) => {
                return Err(format!(
                    "GET {path}: no whole answer within {limit:?} ({e}; {} bytes read)",
                    raw.len()
                ));
            }
        }
    }
    let raw = String::from_utf8_lossy(&raw);
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("GET {path}: not an HTTP answer: {raw:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("GET {path}: no status line in {head:?}"))?;
    Ok((status, body.to_string()))
}

/// Scrapes `/metrics` and parses every sample; panics unless it is OpenMetrics text ending in
/// `# EOF`.
pub fn scrape(addr: &str) -> Vec<Sample> {
    let (status, content_type, body) = http_get(addr, "/metrics");
    assert_eq!(status, 200, "{body}");
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    assert_eq!(body.lines().last(), Some("# EOF"), "{body}");
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| parse_sample(l).unwrap_or_else(|| panic!("not a sample line: {l:?}")))
        .collect()
}

fn parse_sample(line: &str) -> Option<Sample> {
    let (series, value) = line.rsplit_once(' ')?;
    let value = value.parse().ok()?;
    let (name, labels) = match series.split_once('{') {
        None => (series.to_string(), BTreeMap::new()),
        Some((name, rest)) => {
            let rest = rest.strip_suffix('}')?;
            let mut labels = BTreeMap::new();
            // Our label values never contain `",` (engine, target, kind, action, cron).
            for pair in rest.split("\",").filter(|p| !p.is_empty()) {
                let (k, v) = pair.split_once("=\"")?;
                labels.insert(k.to_string(), v.trim_end_matches('"').to_string());
            }
            (name.to_string(), labels)
        }
    };
    Some(Sample {
        name,
        labels,
        value,
    })
}

/// The value of the sample named `name` whose labels include every pair of `labels`, if any.
pub fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
}
