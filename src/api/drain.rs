//! Keeps kept-alive connections usable after early answers.
//!
//! Many answers go out before the request body was read: `401` (no key), `415` (not
//! JSON), `429` (rate limited), `503` (database unavailable), `413` (read up to the
//! limit). hyper then reads whatever of the body is already buffered and, if the rest
//! has not arrived yet, closes the connection after the answer — without saying
//! `Connection: close`, so a client sending its next request on that connection gets a
//! broken pipe. This layer, outermost, watches the body: when the answer is ready and
//! the body was neither read to its end nor is still held, it reads what is left (at
//! most [`MAX_BODY_BYTES`] more, for at most [`DRAIN_TIMEOUT`]) before the answer goes
//! out, and if that does not finish the body, it tells the client `Connection: close`.
//! Either way the client knows whether the connection can be reused.

use super::MAX_BODY_BYTES;
use axum::body::{Body, Bytes, HttpBody};
use axum::extract::Request;
use axum::http::{header, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;
use futures::StreamExt;
use hyper::body::{Frame, SizeHint};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

/// The longest an answer waits for the rest of a body it did not need.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(1);

/// The middleware.
pub async fn keep_alive(req: Request, next: Next) -> Response {
    if req.body().is_end_stream() {
        return next.run(req).await;
    }
    let watch = Arc::new(Mutex::new(Watch::default()));
    let req = req.map(|body| {
        Body::new(Watched {
            body: Some(body),
            watch: watch.clone(),
        })
    });
    let mut response = next.run(req).await;
    let left = {
        let mut w = lock(&watch);
        if w.finished {
            return response;
        }
        w.left.take()
    };
    // `None`: something still holds the body; it cannot be drained from here.
    let drained = match left {
        Some(body) => drain(body).await,
        None => false,
    };
    if !drained {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// What became of a request body.
#[derive(Default)]
struct Watch {
    /// It was read to its end.
    finished: bool,
    /// Dropped before its end: the rest, to drain.
    left: Option<Body>,
}

fn lock(watch: &Mutex<Watch>) -> MutexGuard<'_, Watch> {
    watch
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Reads and discards what is left of `body`; whether it ended within the limits.
async fn drain(body: Body) -> bool {
    if body.size_hint().lower() > MAX_BODY_BYTES as u64 {
        return false;
    }
    let read = async {
        let mut data = body.into_data_stream();
        let mut total = 0;
        while let Some(chunk) = data.next().await {
            match chunk {
                Ok(bytes) if total + bytes.len() <= MAX_BODY_BYTES => total += bytes.len(),
                _ => return false,
            }
        }
        true
    };
    tokio::time::timeout(DRAIN_TIMEOUT, read)
        .await
        .unwrap_or(false)
}

/// A request body that reports to its [`Watch`] whether it was read to its end, and
/// hands the rest back when dropped before that.
struct Watched {
    body: Option<Body>,
    watch: Arc<Mutex<Watch>>,
}

impl HttpBody for Watched {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let Some(body) = self.body.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(body).poll_frame(cx);
        if let Poll::Ready(None) = polled {
            lock(&self.watch).finished = true;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.as_ref().is_none_or(HttpBody::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.body
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), HttpBody::size_hint)
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        if let Some(body) = self.body.take() {
            let mut w = lock(&self.watch);
            if body.is_end_stream() {
                w.finished = true;
            } else if !w.finished {
                w.left = Some(body);
            }
        }
    }
}
