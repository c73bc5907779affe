//! What an S3 attempt's bytes do, for the stall watchdog of the retry policy: every request
//! body is handed to the connection in small pieces and every response body read through, each
//! piece recorded in the attempt's [`Progress`].
//!
//! Recorded here rather than left to the SDK's stalled-stream protection, which is turned off
//! (`mod.rs`): it sees neither a request whose body went out whole and whose answer never
//! comes, nor a part held in one piece, and its grace period is fixed apart from our retries.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use aws_sdk_s3::config::{
    ConfigBag, Intercept, RuntimeComponents,
    interceptors::{
        BeforeDeserializationInterceptorContextMut, BeforeTransmitInterceptorContextMut,
    },
};
use aws_smithy_types::body::SdkBody;
use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};

use super::super::retry::Progress;

/// Largest piece of a request body handed to the connection at once. The connection takes a
/// piece only when it has room, so pieces taken are bytes going out; a part in one 16 MiB
/// piece would show no progress until all of it was buffered.
const PIECE: usize = 64 * 1024;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Wraps one attempt's request and response bodies so that they record its progress.
#[derive(Debug, Clone)]
pub(super) struct Watch(pub(super) Progress);

impl Intercept for Watch {
    fn name(&self) -> &'static str {
        "soma::Watch"
    }

    fn modify_before_transmit(
        &self,
        context: &mut BeforeTransmitInterceptorContextMut<'_>,
        _: &RuntimeComponents,
        _: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let progress = self.0.clone();
        let body = std::mem::replace(context.request_mut().body_mut(), SdkBody::taken());
        let body = body.map_preserve_contents(move |inner| {
            SdkBody::from_body_1_x(Watched::request(inner, progress.clone()))
        });
        *context.request_mut().body_mut() = body;
        Ok(())
    }

    fn modify_before_deserialization(
        &self,
        context: &mut BeforeDeserializationInterceptorContextMut<'_>,
        _: &RuntimeComponents,
        _: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        // The answer's head arrived.
        self.0.touch();
        let progress = self.0.clone();
        let body = std::mem::replace(context.response_mut().body_mut(), SdkBody::taken());
        let body = body.map_preserve_contents(move |inner| {
            SdkBody::from_body_1_x(Watched::response(inner, progress.clone()))
        });
        *context.response_mut().body_mut() = body;
        Ok(())
    }
}

/// A body whose frames are recorded as progress; a request body is also cut into [`PIECE`]s.
struct Watched {
    inner: SdkBody,
    progress: Progress,
    /// What is left of the last data frame, for a request body.
    rest: Bytes,
    request: bool,
    ended: bool,
}

impl Watched {
    fn request(inner: SdkBody, progress: Progress) -> Self {
        Self {
            inner,
            progress,
            rest: Bytes::new(),
            request: true,
            ended: false,
        }
    }

    fn response(inner: SdkBody, progress: Progress) -> Self {
        Self {
            request: false,
            ..Self::request(inner, progress)
        }
    }

    fn piece(&mut self) -> Bytes {
        let n = self.rest.len().min(PIECE);
        let piece = self.rest.split_to(n);
        self.progress.body_taken(n as u64);
        // The connection stops asking once a body says it has ended.
        if self.rest.is_empty() && self.inner.is_end_stream() {
            self.end();
        }
        piece
    }

    fn end(&mut self) {
        if self.request && !self.ended {
            self.progress.body_ended();
        }
        self.ended = true;
    }
}

impl Body for Watched {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if !this.rest.is_empty() {
            return Poll::Ready(Some(Ok(Frame::data(this.piece()))));
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                Ok(data) if this.request => {
                    this.rest = data;
                    Poll::Ready(Some(Ok(Frame::data(this.piece()))))
                }
                Ok(data) => {
                    this.progress.touch();
                    Poll::Ready(Some(Ok(Frame::data(data))))
                }
                Err(frame) => {
                    this.progress.touch();
                    Poll::Ready(Some(Ok(frame)))
                }
            },
            Poll::Ready(None) => {
                this.end();
                Poll::Ready(None)
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let inner = self.inner.size_hint();
        let rest = self.rest.len() as u64;
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower().saturating_add(rest));
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper.saturating_add(rest));
        }
        hint
    }
}
