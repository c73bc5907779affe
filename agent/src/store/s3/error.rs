//! S3 errors as the rest of the agent sees them: each names the key and says what to do, and
//! says whether retrying may help.

use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};

use super::{ObjectMeta, Result, StoreError};

/// Converts any SDK error into a [`StoreError`] that names the key and says what to do.
pub(super) fn map_err<E, R>(key: &str, bucket: &str, err: SdkError<E, R>) -> StoreError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug,
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
                _ => StoreError::Request {
                    key,
                    message: if detail.is_empty() {
                        format!("{err}")
                    } else {
                        detail
                    },
                    retryable: false,
                },
            }
        }
        SdkError::ResponseError(_) | SdkError::ConstructionFailure(_) => StoreError::Request {
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
    err: SdkError<
        aws_sdk_s3::operation::head_object::HeadObjectError,
        aws_sdk_s3::config::http::HttpResponse,
    >,
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
