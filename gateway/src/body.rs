//! The request body handed to an exit's HTTP client: empty, or streamed from the client
//! connection through a small bounded channel (backpressure: at most two frames wait).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::sync::mpsc;

/// A body error: the client's body was malformed or the client went away.
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

/// Request body sent upstream.
#[derive(Debug)]
pub enum ProxyBody {
    /// No body.
    Empty,
    /// Frames pumped from the client connection; `length` is set for Content-Length bodies.
    Stream {
        /// Frames as they arrive.
        rx: mpsc::Receiver<Result<Bytes, BodyError>>,
        /// Exact length, if known.
        length: Option<u64>,
    },
}

impl ProxyBody {
    /// A streamed body and the sender that feeds it.
    pub fn channel(length: Option<u64>) -> (mpsc::Sender<Result<Bytes, BodyError>>, Self) {
        let (tx, rx) = mpsc::channel(2);
        (tx, Self::Stream { rx, length })
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            Self::Empty => Poll::Ready(None),
            Self::Stream { rx, .. } => rx.poll_recv(cx).map(|o| o.map(|r| r.map(Frame::data))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, Self::Empty)
            || matches!(
                self,
                Self::Stream {
                    length: Some(0),
                    ..
                }
            )
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Empty => SizeHint::with_exact(0),
            Self::Stream {
                length: Some(n), ..
            } => SizeHint::with_exact(*n),
            Self::Stream { length: None, .. } => SizeHint::default(),
        }
    }
}
