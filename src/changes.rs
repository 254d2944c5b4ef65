//! After-commit notifications: operation changes, for long-polls
//! (`GET /v1/operations/{id}?wait=30s`), and the relay's doorbell ([`Wake`]).
//!
//! Whoever commits a change to an operation publishes its ID: to waiters in this
//! process directly, and to other replicas over a core NATS subject (a report may land
//! on any replica while the client waits on another). A notification only says "look
//! again": waiters re-read the database, so a duplicate costs one read and a lost one
//! costs at most the waiter's safety re-check.

use bytes::Bytes;
use futures::StreamExt;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Capacity of the in-process channel; a waiter that falls this far behind re-reads.
const CAPACITY: usize = 4096;

/// The notifier. Cheap to clone.
#[derive(Clone)]
pub struct Changes {
    local: broadcast::Sender<Uuid>,
    remote: Option<(async_nats::Client, String)>,
}

impl Default for Changes {
    fn default() -> Self {
        Self::new(None)
    }
}

impl Changes {
    /// A notifier; with `remote`, also across processes through that NATS subject.
    pub fn new(remote: Option<(async_nats::Client, String)>) -> Self {
        Self {
            local: broadcast::channel(CAPACITY).0,
            remote,
        }
    }

    /// Receives the IDs of operations that changed from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Uuid> {
        self.local.subscribe()
    }

    /// Announces that `ids` changed. Best effort; never blocks the caller for long.
    pub async fn publish(&self, ids: &[Uuid]) {
        for id in ids {
            let _ = self.local.send(*id);
        }
        if let Some((client, subject)) = &self.remote {
            if client.connection_state() != async_nats::connection::State::Connected {
                return;
            }
            if ids.is_empty() {
                return;
            }
            let body: Vec<String> = ids.iter().map(Uuid::to_string).collect();
            let publish = client.publish(subject.clone(), Bytes::from(body.join("\n")));
            let _ = tokio::time::timeout(Duration::from_millis(50), publish).await;
        }
    }

    /// Forwards other processes' announcements to this process's waiters until
    /// `shutdown`.
    pub async fn listen(self, shutdown: CancellationToken) {
        let Some((client, subject)) = self.remote.clone() else {
            return;
        };
        let mut sub = match client.subscribe(subject).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot subscribe to operation changes; long-polls fall back to re-checks");
                return;
            }
        };
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                msg = sub.next() => match msg {
                    Some(m) => {
                        let text = std::str::from_utf8(&m.payload).unwrap_or_default();
                        for id in text.lines().filter_map(|l| l.parse().ok()) {
                            let _ = self.local.send(id);
                        }
                    }
                    None => return,
                },
            }
        }
    }
}

/// The relay's doorbell. Writers ring it after commit, so the relay publishes at once
/// instead of on its next poll: in-process by a `Notify`, across processes by a core
/// NATS message. Ringing never blocks or fails the write path.
#[derive(Clone, Default)]
pub struct Wake {
    local: Arc<Notify>,
    remote: Option<(async_nats::Client, String)>,
}

impl Wake {
    /// A doorbell that also rings relays in other processes through `subject`.
    pub fn with_nats(client: async_nats::Client, subject: String) -> Self {
        Self {
            local: Arc::new(Notify::new()),
            remote: Some((client, subject)),
        }
    }

    /// The same doorbell, listened to on NATS through `client` (the relay's own
    /// connection, which may subscribe to the subject when the writers' may not).
    pub fn heard_through(&self, client: async_nats::Client) -> Self {
        Self {
            local: self.local.clone(),
            remote: self
                .remote
                .as_ref()
                .map(|(_, subject)| (client, subject.clone())),
        }
    }

    /// Resolves when rung in this process.
    pub async fn rung(&self) {
        self.local.notified().await
    }

    /// The NATS client and subject on which other processes ring, if any.
    pub fn remote(&self) -> Option<&(async_nats::Client, String)> {
        self.remote.as_ref()
    }

    /// Rings. Best effort: the relay's polling covers a lost ring.
    pub async fn signal(&self) {
        self.local.notify_one();
        if let Some((client, subject)) = &self.remote {
            if client.connection_state() == async_nats::connection::State::Connected {
                let publish = client.publish(subject.clone(), bytes::Bytes::new());
                let _ = tokio::time::timeout(Duration::from_millis(50), publish).await;
            }
        }
    }
}
