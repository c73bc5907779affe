//! S3 errors as the rest of the agent sees them: each names the key, says whether retrying may
//! help and, through its [`Remedy`], what to do.

use aws_sdk_s3::{
    config::http::HttpResponse,
    error::{ProvideErrorMetadata, SdkError},
};

use super::{ObjectMeta, Result, StoreError};
use crate::error::Remedy;
use crate::store::Cause;

/// Converts any SDK error into a [`StoreError`] that names the key; what to do is its
/// [`Remedy`], and the SDK's own error stays its `source` where the agent has no better words.
pub(super) fn map_err<E>(key: &str, bucket: &str, err: SdkError<E, HttpResponse>) -> StoreError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let (message, retryable, remedy) = match &err {
        SdkError::ServiceError(svc) => {
            let e = svc.err();
            let answer = Answer {
                code: e.code().unwrap_or(""),
                message: e.message().unwrap_or(""),
                status: svc.raw().status().as_u16(),
            };
            return answer.into_error(key, bucket, || err.to_string());
        }
        SdkError::DispatchFailure(_) => (
            "could not reach the S3 endpoint",
            true,
            Some(Remedy::StoreEndpoint),
        ),
        SdkError::TimeoutError(_) => ("timed out talking to the S3 endpoint", true, None),
        // An answer that could not be read (a connection cut in the middle of it): like a
        // dispatch failure, the next attempt may get a whole one.
        SdkError::ResponseError(_) => ("the store's answer could not be read", true, None),
        SdkError::ConstructionFailure(_) => ("the request could not be built", false, None),
        _ => ("the request failed", false, None),
    };
    StoreError::Request {
        key: key.to_string(),
        message: message.into(),
        retryable,
        remedy,
        source: Some(Cause::new(err)),
    }
}

/// What an S3 server answered to a failed request: its error code and message (both possibly
/// empty: a body cut off, or not S3's XML) and the HTTP status. The answer is the cause, kept
/// as the server's words in the error.
struct Answer<'a> {
    code: &'a str,
    message: &'a str,
    status: u16,
}

impl Answer<'_> {
    /// `code: message`, or what there is of them.
    fn detail(&self) -> String {
        if self.message.is_empty() {
            self.code.to_string()
        } else {
            format!("{}: {}", self.code, self.message)
        }
    }

    /// The error this answer means for `key`; `whole` describes the SDK's error for an answer
    /// that says nothing of its own.
    fn into_error(self, key: &str, bucket: &str, whole: impl FnOnce() -> String) -> StoreError {
        let key = key.to_string();
        let request = |message: String, retryable: bool| StoreError::Request {
            key: key.clone(),
            message,
            retryable,
            remedy: None,
            source: None,
        };
        match self.code {
            "NoSuchKey" | "NotFound" | "NoSuchUpload" => StoreError::NotFound { key },
            "NoSuchBucket" => StoreError::NoSuchBucket {
                bucket: bucket.to_string(),
            },
            "AccessDenied"
            | "InvalidAccessKeyId"
            | "SignatureDoesNotMatch"
            | "InvalidToken"
            | "ExpiredToken"
            | "Forbidden" => StoreError::AccessDenied {
                message: self.detail(),
                key,
            },
            "InvalidDigest" | "BadDigest" | "XAmzContentSHA256Mismatch" | "InvalidPart" => {
                StoreError::ChecksumRejected {
                    message: self.detail(),
                    key,
                }
            }
            "PreconditionFailed" => request(
                format!(
                    "the object changed while it was being read ({}); read it again",
                    self.detail()
                ),
                false,
            ),
            "SlowDown"
            | "InternalError"
            | "ServiceUnavailable"
            | "RequestTimeout"
            | "RequestTimeTooSkewed" => request(self.detail(), true),
            // Any other answer is judged by its status: a 5xx, 408 or 429 whose body named no
            // code we know (or was cut off before it could) is the server or the path to it
            // failing, which a retry may get past, as S3's own guidance says.
            _ => {
                let status = self.status;
                let detail = self.detail();
                request(
                    if detail.is_empty() {
                        format!("{} (HTTP {status})", whole())
                    } else {
                        detail
                    },
                    status >= 500 || status == 408 || status == 429,
                )
            }
        }
    }
}

/// HEAD responses have no body, so S3 cannot say *why* a HEAD failed; map by status code.
pub(super) fn map_head_err(
    key: &str,
    bucket: &str,
    err: SdkError<aws_sdk_s3::operation::head_object::HeadObjectError, HttpResponse>,
) -> Result<Option<ObjectMeta>> {
    if let SdkError::ServiceError(svc) = &err {
        if svc.err().is_not_found() {
            return Ok(None);
        }
        match svc.raw().status().as_u16() {
            404 => return Ok(None),
            403 => {
                return Err(StoreError::AccessDenied {
                    key: key.to_string(),
                    message: "403 Forbidden".into(),
                });
            }
            _ => {}
        }
    }
    Err(map_err(key, bucket, err))
}

#[cfg(test)]
mod tests {
    use aws_sdk_s3::{error::ErrorMetadata, operation::upload_part::UploadPartError};
    use aws_smithy_types::body::SdkBody;

    use super::*;

    /// An error answer whose body names no code (cut off, or not S3's XML), with `status`.
    fn bare_answer(status: u16) -> StoreError {
        let raw = HttpResponse::new(status.try_into().unwrap(), SdkBody::empty());
        let err = SdkError::service_error(
            UploadPartError::generic(ErrorMetadata::builder().build()),
            raw,
        );
        map_err("k", "b", err)
    }

    #[test]
    fn an_answer_without_a_code_is_retried_when_its_status_says_the_server_failed() {
        for status in [500, 502, 503, 504, 408, 429] {
            let e = bare_answer(status);
            assert!(e.is_retryable(), "{status}: {e}");
            assert!(e.to_string().contains(&format!("HTTP {status}")), "{e}");
        }
        for status in [400, 405, 409, 411] {
            assert!(!bare_answer(status).is_retryable(), "{status}");
        }
    }

    #[test]
    fn an_unreachable_endpoint_keeps_the_clients_error_and_the_edge_says_what_to_do() {
        let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "port 9 refused");
        let err = SdkError::<UploadPartError, HttpResponse>::dispatch_failure(
            aws_sdk_s3::error::ConnectorError::io(Box::new(refused)),
        );
        let e = map_err("k", "b", err);
        assert!(e.is_retryable(), "{e}");
        assert_eq!(e.remedy(), Some(Remedy::StoreEndpoint));
        // The store's own message names no configuration; the cause is reachable, not flattened.
        let own = e.to_string();
        assert!(
            !own.contains("AWS_ENDPOINT_URL") && !own.contains("port 9"),
            "{own}"
        );
        let mut cause = std::error::Error::source(&e);
        let mut io = None;
        while let Some(c) = cause {
            io = io.or(c.downcast_ref::<std::io::Error>());
            cause = c.source();
        }
        assert_eq!(
            io.map(|e| e.kind()),
            Some(std::io::ErrorKind::ConnectionRefused)
        );
        // Rendered for a user: what failed, the client's reason, then the advice.
        let shown = crate::error::render(&e);
        assert!(shown.starts_with(&own), "{shown}");
        assert!(shown.contains("port 9 refused"), "{shown}");
        assert!(
            shown.ends_with("; check AWS_ENDPOINT_URL and the network"),
            "{shown}"
        );
    }
}
