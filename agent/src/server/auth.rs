//! Who may call the agent. Anyone who reaches its port — every container of the pod, anyone
//! allowed `pods/portforward` in the namespace — could otherwise delete every backup or restore
//! an old dump over the live database. With `--token-file`, every RPC but health (which the
//! kubelet's probes call) must carry `authorization: Bearer <token>`; the token is compared in
//! constant time, as a digest, so neither its bytes nor its length leak through timing.

use std::path::{Path, PathBuf};

use subtle::ConstantTimeEq;
use tonic::{Request, Status, service::Interceptor};

use crate::digest::Sha256Digest;

/// Largest token file read.
const MAX_TOKEN_FILE_BYTES: u64 = 4096;
/// Shortest token accepted: anything shorter is guessable.
pub(crate) const MIN_TOKEN_LEN: usize = 16;

/// Why the token file cannot be used.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TokenError {
    /// Unreadable.
    #[error("--token-file {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Not a usable token.
    #[error("--token-file {}: {why}; write at least {MIN_TOKEN_LEN} printable ASCII characters without spaces, e.g. `head -c 32 /dev/urandom | base64`", path.display())]
    Unusable {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
}

/// Reads the token: the file's text without surrounding whitespace (a trailing newline is
/// usual), at least [`MIN_TOKEN_LEN`] visible ASCII characters. The token itself never appears
/// in an error.
pub(crate) fn load_token(path: &Path) -> Result<String, TokenError> {
    use std::io::Read;
    let read = |source| TokenError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut raw = Vec::new();
    std::fs::File::open(path)
        .map_err(read)?
        .take(MAX_TOKEN_FILE_BYTES + 1)
        .read_to_end(&mut raw)
        .map_err(read)?;
    let unusable = |why: String| TokenError::Unusable {
        path: path.to_path_buf(),
        why,
    };
    if raw.len() as u64 > MAX_TOKEN_FILE_BYTES {
        return Err(unusable(format!(
            "it is larger than {MAX_TOKEN_FILE_BYTES} bytes"
        )));
    }
    let token = std::str::from_utf8(&raw)
        .map_err(|_| unusable("it is not text".into()))?
        .trim();
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(unusable(
            "it holds spaces or characters outside printable ASCII".into(),
        ));
    }
    if token.len() < MIN_TOKEN_LEN {
        return Err(unusable(format!(
            "it holds {} characters, fewer than {MIN_TOKEN_LEN}",
            token.len()
        )));
    }
    Ok(token.to_string())
}

/// The check every authenticated service runs on each call.
#[derive(Clone)]
pub(crate) struct TokenCheck {
    /// The token's SHA-256; `None` when the agent runs without a token (loopback only).
    digest: Option<Sha256Digest>,
}

impl std::fmt::Debug for TokenCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenCheck")
            .field("required", &self.digest.is_some())
            .finish()
    }
}

impl TokenCheck {
    /// Requires `token` on every call, or nothing when there is none.
    pub(crate) fn new(token: Option<&str>) -> Self {
        Self {
            digest: token.map(|t| Sha256Digest::of(t.as_bytes())),
        }
    }
}

impl Interceptor for TokenCheck {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let Some(expected) = &self.digest else {
            return Ok(request);
        };
        let given = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let Some(given) = given else {
            return Err(Status::unauthenticated(
                "this agent requires a bearer token (it runs with --token-file): give kubectl soma --token-file PATH or SOMA_AGENT_TOKEN, or annotate the agent's pod with soma.dev/token-secret naming the Secret that holds it",
            ));
        };
        // In constant time, not with the digest's `==`: how long a comparison takes must not
        // tell a caller how much of a guessed token's digest is right.
        let digest = Sha256Digest::of(given.as_bytes());
        if bool::from(digest.as_bytes().ct_eq(expected.as_bytes())) {
            Ok(request)
        } else {
            Err(Status::unauthenticated(
                "the bearer token is not this agent's: check the token kubectl soma was given (--token-file, SOMA_AGENT_TOKEN, or the Secret named by the pod's soma.dev/token-secret annotation) against the agent's --token-file",
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(check: &mut TokenCheck, header: Option<&str>) -> Result<(), tonic::Code> {
        let mut request = Request::new(());
        if let Some(h) = header {
            request
                .metadata_mut()
                .insert("authorization", h.parse().unwrap());
        }
        check.call(request).map(drop).map_err(|s| s.code())
    }

    #[test]
    fn only_the_right_bearer_token_passes() {
        let mut check = TokenCheck::new(Some("0123456789abcdefXYZ"));
        assert_eq!(call(&mut check, Some("Bearer 0123456789abcdefXYZ")), Ok(()));
        for wrong in [
            None,
            Some("Bearer 0123456789abcdefXY"),
            Some("0123456789abcdefXYZ"),
            Some("Basic 0123456789abcdefXYZ"),
        ] {
            assert_eq!(
                call(&mut check, wrong),
                Err(tonic::Code::Unauthenticated),
                "{wrong:?}"
            );
        }
        assert_eq!(call(&mut TokenCheck::new(None), None), Ok(()));
    }

    #[test]
    fn token_files_are_checked_and_never_echoed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "s3cr3t-but-short\n").unwrap();
        assert_eq!(load_token(&path).unwrap(), "s3cr3t-but-short");
        std::fs::write(&path, "short\n").unwrap();
        let err = load_token(&path).unwrap_err().to_string();
        assert!(
            err.contains("fewer than 16") && !err.contains("short\n"),
            "{err}"
        );
        std::fs::write(&path, "has a space in the middle").unwrap();
        let err = load_token(&path).unwrap_err().to_string();
        assert!(err.contains("spaces") && !err.contains("middle"), "{err}");
    }
}
