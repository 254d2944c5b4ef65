//! Reading the events stream: where it begins and ends, and one tenant's events after a
//! cursor (the stream sequence of the last event a reader saw).
//!
//! Each reader gets an ephemeral pull consumer of its own (in memory, filtered to the
//! tenant's subjects and, when asked, one kind or zone), starting right after its
//! cursor; the server drops it a little after the reader goes away. Because the cursor
//! is the stream's own sequence, a reader resumes on any gateway replica with no gap
//! and no duplicate.

use async_nats::jetstream::{self, consumer};
use futures::StreamExt;
use gateway_proto::events::CloudEvent;
use gateway_proto::Kind;
use std::time::Duration;

/// How long the server keeps a reader's consumer after its last pull.
const INACTIVE: Duration = Duration::from_secs(30);

/// Why a read could not start.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// Events after the cursor were dropped by retention: the reader must re-list.
    #[error("events after cursor {after} are no longer kept (the oldest kept is {first})")]
    Expired {
        /// The reader's cursor.
        after: u64,
        /// The oldest event kept.
        first: u64,
    },
    /// The cursor is past the end of the stream: it names no event.
    #[error("cursor {after} is past the newest event ({last})")]
    Unknown {
        /// The reader's cursor.
        after: u64,
        /// The newest event.
        last: u64,
    },
    /// The broker did not answer.
    #[error("the events stream is unavailable: {0}")]
    Unavailable(String),
}

fn unavailable(e: impl std::fmt::Display) -> ReadError {
    ReadError::Unavailable(e.to_string())
}

/// Which subjects a reader wants: one tenant's, narrowed to a kind or a zone.
#[derive(Debug, Clone)]
pub struct Scope {
    /// The tenant.
    pub tenant: String,
    /// Only this kind.
    pub kind: Option<Kind>,
    /// Only this zone.
    pub zone: Option<String>,
}

/// The events stream of a deployment.
#[derive(Clone)]
pub struct EventLog {
    js: jetstream::Context,
    stream: String,
    prefix: String,
}

/// Where the stream begins and ends: the oldest and newest sequences kept (`first` is
/// `last + 1` when it keeps none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    /// Oldest kept.
    pub first: u64,
    /// Newest.
    pub last: u64,
}

impl EventLog {
    /// The events stream of `names`, read through `js`.
    pub fn new(js: jetstream::Context, names: &crate::config::NatsNames) -> Self {
        Self {
            js,
            stream: names.events_stream(),
            prefix: names.events_prefix.clone(),
        }
    }

    /// The stream's bounds now.
    pub async fn bounds(&self) -> Result<Bounds, ReadError> {
        let stream = self
            .js
            .get_stream(&self.stream)
            .await
            .map_err(unavailable)?;
        let state = &stream.cached_info().state;
        let first = if state.messages == 0 {
            state.last_sequence + 1
        } else {
            state.first_sequence
        };
        Ok(Bounds {
            first,
            last: state.last_sequence,
        })
    }

    /// Starts reading `scope`'s events after cursor `after` (`None`: after the newest
    /// event now). Returns the reader and the cursor it starts from.
    pub async fn read(&self, scope: &Scope, after: Option<u64>) -> Result<Reader, ReadError> {
        let bounds = self.bounds().await?;
        let after = match after {
            None => bounds.last,
            Some(a) if a > bounds.last => {
                return Err(ReadError::Unknown {
                    after: a,
                    last: bounds.last,
                })
            }
            Some(a) if a > 0 && a + 1 < bounds.first => {
                return Err(ReadError::Expired {
                    after: a,
                    first: bounds.first,
                })
            }
            Some(a) => a,
        };
        let stream = self
            .js
            .get_stream_no_info(&self.stream)
            .await
            .map_err(unavailable)?;
        let consumer = stream
            .create_consumer(consumer::pull::Config {
                filter_subject: self.subject(scope),
                deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: after + 1,
                },
                ack_policy: consumer::AckPolicy::None,
                inactive_threshold: INACTIVE,
                memory_storage: true,
                ..Default::default()
            })
            .await
            .map_err(unavailable)?;
        Ok(Reader {
            log: self.clone(),
            consumer,
            cursor: after,
            messages: None,
        })
    }

    fn subject(&self, scope: &Scope) -> String {
        match (&scope.kind, &scope.zone) {
            (None, None) => format!("{}.{}.>", self.prefix, scope.tenant),
            (kind, zone) => format!(
                "{}.{}.{}.{}",
                self.prefix,
                scope.tenant,
                kind.as_ref().map_or("*", |k| k.as_str()),
                zone.as_deref().unwrap_or("*")
            ),
        }
    }
}

/// One reader's position in the stream.
pub struct Reader {
    log: EventLog,
    consumer: consumer::PullConsumer,
    cursor: u64,
    messages: Option<consumer::pull::Stream>,
}

impl Reader {
    /// The cursor of the last event read (or where reading started).
    pub fn cursor(&self) -> u64 {
        self.cursor
    }

    /// Up to `limit` events available now, without waiting for more.
    pub async fn page(&mut self, limit: usize) -> Result<Vec<CloudEvent>, ReadError> {
        let pending = self.consumer.cached_info().num_pending as usize;
        if pending == 0 || limit == 0 {
            return Ok(Vec::new());
        }
        let mut batch = self
            .consumer
            .fetch()
            .max_messages(limit.min(pending))
            .messages()
            .await
            .map_err(unavailable)?;
        let mut out = Vec::new();
        while let Some(m) = batch.next().await {
            let m = m.map_err(unavailable)?;
            out.extend(self.take(&m));
        }
        Ok(out)
    }

    /// The next event, waiting for it; `None` once the stream ends (the consumer was
    /// lost: the reader should resume from its cursor).
    pub async fn next(&mut self) -> Option<Result<CloudEvent, ReadError>> {
        loop {
            if self.messages.is_none() {
                match self.consumer.messages().await {
                    Ok(m) => self.messages = Some(m),
                    Err(e) => return Some(Err(unavailable(e))),
                }
            }
            let m = match self.messages.as_mut()?.next().await? {
                Ok(m) => m,
                Err(e) => return Some(Err(unavailable(e))),
            };
            if let Some(event) = self.take(&m) {
                return Some(Ok(event));
            }
        }
    }

    /// Decodes `m` and moves the cursor past it (a message that is not an event is
    /// skipped, logged, but still passed).
    fn take(&mut self, m: &jetstream::Message) -> Option<CloudEvent> {
        let seq = m.info().map(|i| i.stream_sequence).unwrap_or(self.cursor);
        self.cursor = self.cursor.max(seq);
        match serde_json::from_slice::<CloudEvent>(&m.payload) {
            Ok(mut e) => {
                e.cursor = Some(seq.to_string());
                Some(e)
            }
            Err(e) => {
                tracing::warn!(seq, error = %e, "events: a message that is not an event");
                None
            }
        }
    }

    /// A cursor to hand a quiet reader: past everything in the stream, when nothing for
    /// this reader is waiting (so a reader of a quiet tenant does not fall behind the
    /// stream's retention); else its own cursor.
    pub async fn bookmark(&mut self) -> u64 {
        let Ok(bounds) = self.log.bounds().await else {
            return self.cursor;
        };
        match self.consumer.info().await {
            Ok(info) if info.num_pending == 0 && info.delivered.stream_sequence <= self.cursor => {
                self.cursor = self.cursor.max(bounds.last);
                self.cursor
            }
            _ => self.cursor,
        }
    }
}
