//! A streaming `multipart/form-data` reader (RFC 7578) over a hyper request body.
//!
//! Hand-written rather than a crate so that debug builds (tests are not optimised) still parse
//! at disk speed: the boundary search jumps between candidate bytes with
//! `BufRead::skip_until`, whose scan is std's precompiled `memchr`, and compares candidates
//! with slice equality (`memcmp`). Memory stays bounded: at most one body frame plus the
//! delimiter length is buffered.

use std::io::BufRead;

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::body::Incoming;

/// Part headers larger than this are refused.
const MAX_HEADERS: usize = 64 << 10;

/// The `Content-Disposition` of one part.
#[derive(Debug, Default)]
pub(crate) struct PartHeaders {
    pub name: Option<String>,
    pub file_name: Option<String>,
}

/// Why a multipart body could not be read.
#[derive(Debug)]
pub(crate) enum MultipartError {
    /// The body ended before the closing delimiter.
    Incomplete,
    /// Reading the body failed (e.g. the client disconnected).
    Body(hyper::Error),
    /// Something that is not multipart/form-data.
    Malformed(&'static str),
}

impl std::fmt::Display for MultipartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MultipartError::Incomplete => write!(f, "multipart stream is incomplete"),
            MultipartError::Body(e) => write!(f, "error reading the request body: {e}"),
            MultipartError::Malformed(what) => write!(f, "malformed multipart body: {what}"),
        }
    }
}

/// The boundary of a `multipart/form-data` content type.
pub(crate) fn boundary(content_type: &str) -> Option<String> {
    let (kind, params) = content_type.split_once(';')?;
    if !kind.trim().eq_ignore_ascii_case("multipart/form-data") {
        return None;
    }
    params.split(';').find_map(|param| {
        let (key, value) = param.split_once('=')?;
        key.trim()
            .eq_ignore_ascii_case("boundary")
            .then(|| value.trim().trim_matches('"').to_string())
            .filter(|b| !b.is_empty())
    })
}

/// Reads parts one after the other: [`next_part`](Self::next_part), then
/// [`chunk`](Self::chunk) until `None`.
pub(crate) struct Multipart {
    body: Incoming,
    buf: BytesMut,
    /// `\r\n--<boundary>`.
    delimiter: Vec<u8>,
    in_body: bool,
    done: bool,
}

impl Multipart {
    pub(crate) fn new(body: Incoming, boundary: &str) -> Multipart {
        // The first delimiter may start the body without a CRLF before it: pretend one.
        let mut buf = BytesMut::with_capacity(64 << 10);
        buf.extend_from_slice(b"\r\n");
        Multipart {
            body,
            buf,
            delimiter: format!("\r\n--{boundary}").into_bytes(),
            in_body: false,
            done: false,
        }
    }

    /// Appends the next data frame; false at the end of the body.
    async fn fill(&mut self) -> Result<bool, MultipartError> {
        loop {
            match self.body.frame().await {
                None => return Ok(false),
                Some(Err(e)) => return Err(MultipartError::Body(e)),
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buf.extend_from_slice(&data);
                        return Ok(true);
                    }
                }
            }
        }
    }

    async fn fill_or_incomplete(&mut self) -> Result<(), MultipartError> {
        if self.fill().await? {
            Ok(())
        } else {
            Err(MultipartError::Incomplete)
        }
    }

    /// Moves to the next part and returns its headers; `None` after the closing delimiter.
    pub(crate) async fn next_part(&mut self) -> Result<Option<PartHeaders>, MultipartError> {
        while self.chunk().await?.is_some() {}
        if self.done {
            return Ok(None);
        }
        // Skip to the delimiter (the preamble, before the first part, is discarded).
        loop {
            if let Some(at) = find(&self.buf, &self.delimiter) {
                let _ = self.buf.split_to(at + self.delimiter.len());
                break;
            }
            let keep = self.delimiter.len() - 1;
            if self.buf.len() > keep {
                let _ = self.buf.split_to(self.buf.len() - keep);
            }
            self.fill_or_incomplete().await?;
        }
        while self.buf.len() < 2 {
            self.fill_or_incomplete().await?;
        }
        if &self.buf[..2] == b"--" {
            self.done = true;
            return Ok(None);
        }
        // Transport padding, then CRLF.
        loop {
            while !self.buf.is_empty() && matches!(self.buf[0], b' ' | b'\t') {
                let _ = self.buf.split_to(1);
            }
            if self.buf.len() >= 2 {
                break;
            }
            self.fill_or_incomplete().await?;
        }
        if &self.buf[..2] != b"\r\n" {
            return Err(MultipartError::Malformed("no CRLF after a boundary"));
        }
        let _ = self.buf.split_to(2);
        let headers = loop {
            if let Some(at) = find(&self.buf, b"\r\n\r\n") {
                let raw = self.buf.split_to(at + 4);
                break parse_headers(&raw[..at]);
            }
            if self.buf.len() > MAX_HEADERS {
                return Err(MultipartError::Malformed("part headers too large"));
            }
            self.fill_or_incomplete().await?;
        };
        self.in_body = true;
        Ok(Some(headers))
    }

    /// The next piece of the current part's content; `None` at its end.
    pub(crate) async fn chunk(&mut self) -> Result<Option<Bytes>, MultipartError> {
        if !self.in_body {
            return Ok(None);
        }
        loop {
            match find(&self.buf, &self.delimiter) {
                Some(0) => {
                    self.in_body = false;
                    return Ok(None);
                }
                Some(at) => return Ok(Some(self.buf.split_to(at).freeze())),
                None => {
                    let keep = self.delimiter.len() - 1;
                    if self.buf.len() > keep {
                        let n = self.buf.len() - keep;
                        return Ok(Some(self.buf.split_to(n).freeze()));
                    }
                    self.fill_or_incomplete().await?;
                }
            }
        }
    }
}

/// First occurrence of `needle` (non-empty) in `haystack`.
fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    let first = needle[0];
    let mut rest = haystack;
    let mut offset = 0;
    loop {
        let mut cursor = rest;
        let skipped = cursor.skip_until(first).unwrap_or(rest.len());
        if skipped == 0 || rest[skipped - 1] != first {
            return None;
        }
        let at = offset + skipped - 1;
        let candidate = &haystack[at..];
        if candidate.len() < needle.len() {
            return None;
        }
        if &candidate[..needle.len()] == needle {
            return Some(at);
        }
        rest = &rest[skipped..];
        offset += skipped;
    }
}

fn parse_headers(raw: &[u8]) -> PartHeaders {
    let text = String::from_utf8_lossy(raw);
    let mut headers = PartHeaders::default();
    for line in text.split("\r\n") {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        if !key.trim().eq_ignore_ascii_case("content-disposition") {
            continue;
        }
        for param in value.split(';').skip(1) {
            let Some((k, v)) = param.split_once('=') else {
                continue;
            };
            let v = v.trim().trim_matches('"').to_string();
            match k.trim().to_ascii_lowercase().as_str() {
                "name" => headers.name = Some(v),
                "filename" => headers.file_name = Some(v),
                _ => {}
            }
        }
    }
    headers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_needles() {
        assert_eq!(find(b"abc\r\n--b", b"\r\n--b"), Some(3));
        assert_eq!(find(b"\r\r\n--b", b"\r\n--b"), Some(1));
        assert_eq!(find(b"abc\r\n--", b"\r\n--b"), None);
        assert_eq!(find(b"", b"\r\n--b"), None);
        assert_eq!(find(b"xx\r\n--a\r\n--b", b"\r\n--b"), Some(7));
    }

    #[test]
    fn boundaries() {
        assert_eq!(
            boundary("multipart/form-data; boundary=abc").as_deref(),
            Some("abc")
        );
        assert_eq!(
            boundary("Multipart/Form-Data; charset=x; boundary=\"q q\"").as_deref(),
            Some("q q")
        );
        assert_eq!(boundary("application/json"), None);
    }

    #[test]
    fn content_disposition() {
        let h = parse_headers(
            b"Content-Disposition: form-data; name=\"snapshot\"; filename=\"a.snapshot\"\r\n\
              Content-Type: application/octet-stream",
        );
        assert_eq!(h.name.as_deref(), Some("snapshot"));
        assert_eq!(h.file_name.as_deref(), Some("a.snapshot"));
    }
}
