//! S3 errors as the rest of the agent sees them: each names the key and says what to do, and
//! says whether retrying may help.

use aws_sdk_s3::{
    config::http::HttpResponse,
    error::{ProvideErrorMetadata, SdkError},
};

use super::{ObjectMeta, Result, StoreError};

/// Converts any SDK error into a [`StoreError`] that names the key and says what to do.
pub(super) fn map_err<E>(key: &str, bucket: &str, err: SdkError<E, HttpResponse>) -> StoreError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let key = key.to_string();
    match &err {
        SdkError::DispatchFailure(_) => StoreError::Request {
            key,
            message: format!(
                "could not reach the S3 endpoint ({}); check AWS_ENDPOINT_URL and the network",
                describe_chain(&err)
            ),
            retryable: true,
        },
        SdkError::TimeoutError(_) => StoreError::Request {
            key,
            message: "timed out talking to the S3 endpoint".into(),
            retryable: true,
        },
        SdkError::ServiceError(svc) => {
            let e = svc.err();
            let code = e.code().unwrap_or("").to_string();
            let message = e.message().unwrap_or("").to_string();
            let detail = if message.is_empty() {
                code.clone()
            } else {
                format!("{code}: {message}")
            };
            match code.as_str() {
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
                    key,
                    message: detail,
                },
                "InvalidDigest" | "BadDigest" | "XAmzContentSHA256Mismatch" | "InvalidPart" => {
                    StoreError::ChecksumRejected {
                        key,
                        message: detail,
                    }
                }
                "PreconditionFailed" => StoreError::Request {
                    key,
                    message: format!(
                        "the object changed while it was being read ({detail}); read it again"
                    ),
                    retryable: false,
                },
                "SlowDown"
                | "InternalError"
                | "ServiceUnavailable"
                | "RequestTimeout"
                | "RequestTimeTooSkewed" => StoreError::Request {
                    key,
                    message: detail,
                    retryable: true,
                },
                // Any other answer is judged by its status: a 5xx, 408 or 429 whose body named
                // no code we know (or was cut off before it could) is the server or the path to
                // it failing, which a retry may get past, as S3's own guidance says.
                _ => {
                    let status = svc.raw().status().as_u16();
                    StoreError::Request {
                        key,
                        message: if detail.is_empty() {
                            format!("{err} (HTTP {status})")
                        } else {
                            detail
                        },
                        retryable: status >= 500 || status == 408 || status == 429,
                    }
                }
            }
        }
        // An answer that could not be read (a connection cut in the middle of it): like a
        // dispatch failure, the next attempt may get a whole one.
        SdkError::ResponseError(_) => StoreError::Request {
            key,
            message: describe_chain(&err),
            retryable: true,
        },
        SdkError::ConstructionFailure(_) => StoreError::Request {
            key,
            message: describe_chain(&err),
            retryable: false,
        },
        _ => StoreError::Request {
            key,
            message: describe_chain(&err),
            retryable: false,
        },
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

pub(super) fn describe_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
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
}
