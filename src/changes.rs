//! After-commit notifications: operation changes, for long-polls
//! (`GET /v1/operations/{id}?wait=30s`), and the relay's doorbell ([`Wake`]).
//!
//! Whoever commits a change to an operation publishes its ID: to waiters in this
//! process directly, and to other replicas over a core NATS subject (a report may land
//! on any replica while the client waits on another). A notification only says "look
//! again": waiters re-read the database, so a duplicate costs one read and a lost one
//! costs at most the waiter's safety re-check. Only the waiters of the changed
//! operation are woken.

use bytes::Bytes;
use futures::StreamExt;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// The first line of an announcement on NATS: `from <process>`, so a process skips its
/// own (its waiters were told directly). Other lines are operation IDs; a receiver that
/// does not know this line ignores it as it ignores anything that is not an ID.
const FROM: &str = "from ";

/// The notifier. Cheap to clone.
///
/// Waiters register their interest in one operation ([`Changes::interest`]); an
/// announcement wakes the waiters of that operation only, so its cost does not grow with
/// the number of long-polls open on other operations.
#[derive(Clone)]
pub struct Changes {
    waiters: Arc<Mutex<HashMap<Uuid, Waiting>>>,
    remote: Option<(async_nats::Client, String)>,
    /// This process, in its announcements on NATS.
    origin: Arc<str>,
}

/// The waiters of one operation.
struct Waiting {
    notify: Arc<Notify>,
    count: usize,
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
            waiters: Arc::default(),
            remote,
            origin: Uuid::new_v4().simple().to_string().into(),
        }
    }

    /// Registers interest in operation `id` until the returned [`Interest`] is dropped.
    pub fn interest(&self, id: Uuid) -> Interest {
        let mut waiters = self.waiters.lock().expect("change waiters");
        let entry = waiters.entry(id).or_insert_with(|| Waiting {
            notify: Arc::new(Notify::new()),
            count: 0,
        });
        entry.count += 1;
        Interest {
            id,
            notify: entry.notify.clone(),
            waiters: self.waiters.clone(),
        }
    }

    /// Wakes this process's waiters of `ids`.
    fn wake(&self, ids: impl IntoIterator<Item = Uuid>) {
        let waiters = self.waiters.lock().expect("change waiters");
        if waiters.is_empty() {
            return;
        }
        for id in ids {
            if let Some(w) = waiters.get(&id) {
                w.notify.notify_waiters();
            }
        }
    }

    /// Announces that `ids` changed. Best effort; never blocks the caller for long.
    pub async fn publish(&self, ids: &[Uuid]) {
        self.wake(ids.iter().copied());
        if let Some((client, subject)) = &self.remote {
            if client.connection_state() != async_nats::connection::State::Connected {
                return;
            }
            if ids.is_empty() {
                return;
            }
            let mut body = format!("{FROM}{}", self.origin);
            for id in ids {
                body.push('\n');
                body.push_str(&id.to_string());
            }
            let publish = client.publish(subject.clone(), Bytes::from(body));
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
                        let mut lines = text.lines().peekable();
                        if lines.peek().and_then(|l| l.strip_prefix(FROM)) == Some(&*self.origin) {
                            continue;
                        }
                        self.wake(lines.filter_map(|l| l.parse().ok()));
                    }
                    None => return,
                },
            }
        }
    }
}

/// A waiter's interest in one operation's changes (see [`Changes::interest`]).
pub struct Interest {
    id: Uuid,
    notify: Arc<Notify>,
    waiters: Arc<Mutex<HashMap<Uuid, Waiting>>>,
}

impl Interest {
    /// A future that resolves at the next announcement of the operation. Enable it
    /// (`Notified::enable`) before reading the operation, so that a change announced
    /// between the read and the wait is not missed.
    pub fn notified(&self) -> tokio::sync::futures::Notified<'_> {
        self.notify.notified()
    }
}

impl Drop for Interest {
    fn drop(&mut self) {
        let mut waiters = self.waiters.lock().expect("change waiters");
        if let Some(w) = waiters.get_mut(&self.id) {
            w.count -= 1;
            if w.count == 0 {
                waiters.remove(&self.id);
            }
        }
    }
}

/// The relay's doorbell. Writers ring it after commit, so the relay publishes at once
/// instead of on its next poll: in-process by a `watch` channel, across processes by a
/// core NATS message. Ringing never blocks or fails the write path.
///
/// Every listener ([`Wake::listen`]) hears every ring, including one that came while
/// it was busy, so the relay's loops (operations and events) each wake on their own.
#[derive(Clone)]
pub struct Wake {
    local: Arc<watch::Sender<()>>,
    remote: Option<(async_nats::Client, String)>,
}

impl Default for Wake {
    fn default() -> Self {
        Self {
            local: Arc::new(watch::channel(()).0),
            remote: None,
        }
    }
}

impl Wake {
    /// A doorbell that also rings relays in other processes through `subject`.
    pub fn with_nats(client: async_nats::Client, subject: String) -> Self {
        Self {
            remote: Some((client, subject)),
            ..Self::default()
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

    /// A listener that hears the rings from now on, in this process and (if the
    /// subscription succeeds) from others.
    pub async fn listen(&self) -> Doorbell {
        let remote = match &self.remote {
            Some((client, subject)) => client.subscribe(subject.clone()).await.ok(),
            None => None,
        };
        Doorbell {
            local: self.local.subscribe(),
            remote,
        }
    }

    /// Rings. Best effort: the relay's polling covers a lost ring.
    pub async fn signal(&self) {
        self.local.send_replace(());
        if let Some((client, subject)) = &self.remote {
            if client.connection_state() == async_nats::connection::State::Connected {
                let publish = client.publish(subject.clone(), bytes::Bytes::new());
                let _ = tokio::time::timeout(Duration::from_millis(50), publish).await;
            }
        }
    }
}

/// One listener of a [`Wake`].
pub struct Doorbell {
    local: watch::Receiver<()>,
    remote: Option<async_nats::Subscriber>,
}

impl Doorbell {
    /// Resolves at the next ring, or at once if one came since the last call returned.
    pub async fn rung(&mut self) {
        let (local, remote) = (&mut self.local, &mut self.remote);
        let heard = async {
            match remote.as_mut() {
                Some(sub) => sub.next().await.is_some(),
                None => std::future::pending().await,
            }
        };
        let closed = tokio::select! {
            // The sender lives as long as the `Wake` the listener came from.
            Ok(()) = local.changed() => false,
            alive = heard => !alive,
        };
        if closed {
            // The subscription ended: polling and local rings remain.
            self.remote = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_announcement_wakes_the_waiters_of_its_operation_only() {
        let changes = Changes::default();
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let (on_a, on_b) = (changes.interest(a), changes.interest(b));
        let (woken_a, woken_b) = (on_a.notified(), on_b.notified());
        tokio::pin!(woken_a, woken_b);
        woken_a.as_mut().enable();
        woken_b.as_mut().enable();
        changes.publish(&[a]).await;
        let quick = Duration::from_millis(50);
        assert!(tokio::time::timeout(quick, woken_a).await.is_ok());
        assert!(tokio::time::timeout(quick, woken_b).await.is_err());
    }

    #[tokio::test]
    async fn an_announcement_between_the_read_and_the_wait_is_not_lost() {
        let changes = Changes::default();
        let id = Uuid::new_v4();
        let interest = changes.interest(id);
        let woken = interest.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        // (the waiter reads the operation here; the change lands meanwhile)
        changes.publish(&[id]).await;
        let quick = Duration::from_millis(50);
        assert!(tokio::time::timeout(quick, woken).await.is_ok());
    }

    #[test]
    fn the_last_waiter_to_leave_removes_its_operation() {
        let changes = Changes::default();
        let id = Uuid::new_v4();
        let (first, second) = (changes.interest(id), changes.interest(id));
        drop(first);
        assert_eq!(changes.waiters.lock().unwrap().len(), 1);
        drop(second);
        assert!(changes.waiters.lock().unwrap().is_empty());
    }
}
