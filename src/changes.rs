//! After-commit notifications: operation changes, for long-polls
//! (`GET /v1/operations/{id}?wait=30s`), and the relay's doorbell ([`Wake`]).
//!
//! Whoever commits a change to an operation or a resource publishes its ID: to this
//! process directly, and to other replicas over a core NATS subject (a report may land
//! on any replica while the client waits on another). Each process first drops the
//! changed rows from its read cache ([`crate::readcache`]), then wakes the waiters of
//! those operations. A notification only says "look again": waiters re-read, so a
//! duplicate costs one read and a lost one costs at most the waiter's safety re-check
//! (and, for the cache, an entry kept to the end of its short life). Only the waiters
//! of the changed operation are woken.
//!
//! An announcement also names the operations that **ended** in it, so a long-poll
//! waiting for its operation to end (`until=done`) re-reads only when it may have: an
//! operation's life announces three or four changes (`dispatched`, `running`, its end),
//! and one read at the end replaces three. A process that names the ends says so
//! ([`ENDS_NAMED`]); an announcement without that line (from an older replica, during a
//! rolling upgrade) may have ended any of its operations, and is re-read as before.

use crate::readcache::ReadCache;
use bytes::Bytes;
use futures::StreamExt;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// The first line of an announcement on NATS: `from <process>`, so a process skips its
/// own (its waiters were told directly). Other lines are operation IDs; a receiver that
/// does not know this line ignores it as it ignores anything that is not an ID.
const FROM: &str = "from ";

/// A line of an announcement saying that it names every operation that ended in it
/// with an [`ENDED`] line (older receivers ignore both, as any line that is not an ID).
const ENDS_NAMED: &str = "ends named";

/// `ended <id>`: operation `id`, also on a line of its own, reached a final state.
const ENDED: &str = "ended ";

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
    /// Rows read by ID, dropped here when they change.
    cache: ReadCache,
    /// The NATS client's connection count the cache's entries were heard under: after a
    /// reconnection (announcements may have been missed meanwhile) it starts afresh.
    cache_connects: Arc<AtomicU64>,
}

/// The waiters of one operation.
struct Waiting {
    notify: Arc<Notify>,
    /// Announcements that may have ended the operation, so far.
    ends: Arc<AtomicU64>,
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
            cache: ReadCache::default(),
            cache_connects: Arc::default(),
        }
    }

    /// The same notifier, dropping the changed rows' entries from `cache` (before it
    /// wakes anyone) on every change it announces or hears.
    pub fn with_cache(mut self, cache: ReadCache) -> Self {
        self.cache = cache;
        self
    }

    /// The read cache, while this process hears other replicas' changes (its NATS
    /// connection is up); an uncached one otherwise. After the connection was lost and
    /// made again, whatever changed meanwhile was not heard: the cache is emptied first.
    pub fn reads(&self) -> ReadCache {
        let Some((client, _)) = &self.remote else {
            return self.cache.clone();
        };
        if client.connection_state() != async_nats::connection::State::Connected {
            return ReadCache::default();
        }
        let connects = client.statistics().connects.load(Ordering::Acquire);
        if self.cache_connects.load(Ordering::Acquire) != connects {
            // Emptied before the new count is kept: a read that sees the new count
            // comes after an emptying.
            self.cache.invalidate_all();
            self.cache_connects.store(connects, Ordering::Release);
        }
        self.cache.clone()
    }

    /// Registers interest in operation `id` until the returned [`Interest`] is dropped.
    pub fn interest(&self, id: Uuid) -> Interest {
        let mut waiters = self.waiters.lock().expect("change waiters");
        let entry = waiters.entry(id).or_insert_with(|| Waiting {
            notify: Arc::new(Notify::new()),
            ends: Arc::default(),
            count: 0,
        });
        entry.count += 1;
        Interest {
            id,
            notify: entry.notify.clone(),
            seen_ends: AtomicU64::new(entry.ends.load(Ordering::Acquire)),
            ends: entry.ends.clone(),
            waiters: self.waiters.clone(),
        }
    }

    /// Drops the cached rows of `ids`, then wakes this process's waiters of them. Of
    /// those, `ended` (when known: `None` if the announcement did not say) reached a
    /// final state.
    fn wake(&self, ids: &[Uuid], ended: Option<&[Uuid]>) {
        self.cache.invalidate(ids.iter().copied());
        let waiters = self.waiters.lock().expect("change waiters");
        if waiters.is_empty() {
            return;
        }
        for id in ids {
            if let Some(w) = waiters.get(id) {
                if ended.is_none_or(|ended| ended.contains(id)) {
                    // Counted before the wake-up, which the waiter reads it after.
                    w.ends.fetch_add(1, Ordering::Release);
                }
                w.notify.notify_waiters();
            }
        }
    }

    /// Announces that `ids` changed and that, of them, `ended` reached a final state.
    /// Best effort; never blocks the caller for long.
    pub async fn publish(&self, ids: &[Uuid], ended: &[Uuid]) {
        self.wake(ids, Some(ended));
        if let Some((client, subject)) = &self.remote {
            if client.connection_state() != async_nats::connection::State::Connected {
                return;
            }
            if ids.is_empty() {
                return;
            }
            let lines = std::iter::once(ENDS_NAMED.to_owned())
                .chain(ids.iter().map(Uuid::to_string))
                .chain(ended.iter().map(|id| format!("{ENDED}{id}")));
            announce(client, subject, &self.origin, lines).await;
        }
    }

    /// Forwards other processes' announcements to this process's waiters until
    /// `shutdown`.
    pub async fn listen(self, shutdown: CancellationToken) {
        let Some((client, subject)) = self.remote.clone() else {
            return;
        };
        let what = "operation changes; long-polls fall back to re-checks";
        let Some(sub) = subscribe(&client, subject, what).await else {
            return;
        };
        hear(sub, &self.origin, shutdown, |lines| {
            let heard = Heard::read(lines);
            self.wake(&heard.ids, heard.ends_named.then_some(&heard.ended));
        })
        .await;
    }
}

/// What an announcement from another process said.
#[derive(Debug, Default)]
struct Heard {
    ids: Vec<Uuid>,
    ended: Vec<Uuid>,
    /// It names every operation that ended in it.
    ends_named: bool,
}

impl Heard {
    fn read(lines: &mut dyn Iterator<Item = &str>) -> Self {
        let mut heard = Self::default();
        for line in lines {
            if line == ENDS_NAMED {
                heard.ends_named = true;
            } else if let Some(id) = line.strip_prefix(ENDED) {
                heard.ended.extend(id.parse::<Uuid>().ok());
            } else if let Ok(id) = line.parse() {
                heard.ids.push(id);
            }
        }
        heard
    }
}

/// A waiter's interest in one operation's changes (see [`Changes::interest`]).
pub struct Interest {
    id: Uuid,
    notify: Arc<Notify>,
    /// The operation's count of announcements that may have ended it, and the count
    /// this waiter has seen.
    ends: Arc<AtomicU64>,
    seen_ends: AtomicU64,
    waiters: Arc<Mutex<HashMap<Uuid, Waiting>>>,
}

impl Interest {
    /// A future that resolves at the next announcement of the operation. Enable it
    /// (`Notified::enable`) before reading the operation, so that a change announced
    /// between the read and the wait is not missed.
    pub fn notified(&self) -> tokio::sync::futures::Notified<'_> {
        self.notify.notified()
    }

    /// Whether an announcement since this waiter registered, or since it last asked,
    /// may have ended the operation: one that named it as ended, or one that did not
    /// say which ended. Each waiter keeps its own count, so several long-polls on one
    /// operation all learn of its end.
    pub fn may_have_ended(&self) -> bool {
        let now = self.ends.load(Ordering::Acquire);
        self.seen_ends.swap(now, Ordering::Relaxed) != now
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

/// What a ring of the relay's doorbell is for: which of the relay's loops have work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bell {
    /// Outbox rows were committed: the operations loops have dispatches to publish.
    Dispatches,
    /// State changed (events are recorded by trigger): the events loop has events.
    Events,
}

impl Bell {
    /// Every bell.
    const ALL: [Bell; 2] = [Bell::Dispatches, Bell::Events];

    /// Its name on NATS.
    fn name(self) -> &'static str {
        match self {
            Self::Dispatches => "dispatches",
            Self::Events => "events",
        }
    }

    /// The bell named `name` on NATS.
    fn named(name: &str) -> Option<Bell> {
        Self::ALL.into_iter().find(|b| b.name() == name)
    }
}

/// The relay's doorbell. Writers ring it after commit, so the relay publishes at once
/// instead of on its next poll: in-process directly, across processes by a core NATS
/// message (which the ringing process itself ignores: it was rung directly).
///
/// Listeners come in groups ([`Wake::doorbell`]): the relay's leading operations loop is
/// one group, its events loop another. A ring wakes **one** idle member of each group it is
/// for, or, if all are busy, the next to wait: a ring is never lost, and a commit costs
/// one pass, not one pass per loop (a loop that finds a full batch rings the relay's
/// helper loops, [`Doorbell::unrung`] and [`Doorbell::pass_on`], so a burst still
/// recruits every loop).
#[derive(Clone)]
pub struct Wake {
    groups: Arc<Mutex<Groups>>,
    remote: Option<(async_nats::Client, String)>,
    /// This process, in its rings on NATS.
    origin: Arc<str>,
}

impl Default for Wake {
    fn default() -> Self {
        Self {
            groups: Arc::default(),
            remote: None,
            origin: Uuid::new_v4().simple().to_string().into(),
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
            groups: self.groups.clone(),
            remote: self
                .remote
                .as_ref()
                .map(|(_, subject)| (client, subject.clone())),
            origin: self.origin.clone(),
        }
    }

    /// A new group of listeners of `bell`: clone the returned doorbell for each member.
    /// The group hears the rings from now on, for as long as a member lives.
    pub fn doorbell(&self, bell: Bell) -> Doorbell {
        let notify = Arc::new(Notify::new());
        self.lock().push((bell, Arc::downgrade(&notify)));
        Doorbell(notify)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Groups> {
        self.groups.lock().expect("doorbell groups")
    }

    /// Rings `bells` in this process only.
    pub fn ring_here(&self, bells: &[Bell]) {
        self.lock().retain(|(bell, group)| match group.upgrade() {
            Some(notify) => {
                if bells.contains(bell) {
                    notify.notify_one();
                }
                true
            }
            None => false,
        });
    }

    /// Rings `bells`, here and in other processes. Best effort: the relay's polling
    /// covers a lost ring.
    pub async fn signal(&self, bells: &[Bell]) {
        self.ring_here(bells);
        if let Some((client, subject)) = &self.remote {
            if client.connection_state() == async_nats::connection::State::Connected {
                announce(
                    client,
                    subject,
                    &self.origin,
                    bells.iter().map(|b| b.name()),
                )
                .await;
            }
        }
    }

    /// Subscribes to other processes' rings, so that none rung after this returns is
    /// missed, and returns the task that forwards them to this process's doorbells until
    /// `shutdown` (nothing to do without NATS, or if the subscription failed). A ring
    /// that names no bell (from an older gateway) rings them all.
    pub async fn listen(
        self,
        shutdown: CancellationToken,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let sub = match &self.remote {
            Some((client, subject)) => {
                let what = "the relay's doorbell; the relay polls";
                subscribe(client, subject.clone(), what).await
            }
            None => None,
        };
        async move {
            let Some(sub) = sub else {
                return;
            };
            hear(sub, &self.origin, shutdown, |lines| {
                let bells: Vec<Bell> = lines.filter_map(Bell::named).collect();
                self.ring_here(if bells.is_empty() { &Bell::ALL } else { &bells });
            })
            .await;
        }
    }
}

/// Publishes `from <origin>`, then `lines`, one per line, on `subject`. Best effort: a
/// publish that does not go out within 50 ms is given up.
async fn announce<L: AsRef<str>>(
    client: &async_nats::Client,
    subject: &str,
    origin: &str,
    lines: impl IntoIterator<Item = L>,
) {
    let mut body = format!("{FROM}{origin}");
    for line in lines {
        body.push('\n');
        body.push_str(line.as_ref());
    }
    let publish = client.publish(subject.to_owned(), Bytes::from(body));
    let _ = tokio::time::timeout(Duration::from_millis(50), publish).await;
}

/// A subscription to `subject`, or `None` (with a warning that `what` is lost) if it
/// cannot be made.
async fn subscribe(
    client: &async_nats::Client,
    subject: String,
    what: &str,
) -> Option<async_nats::Subscriber> {
    match client.subscribe(subject).await {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot subscribe to {what}");
            None
        }
    }
}

/// Hands `heard` the lines after the first of every message on `sub` that another
/// process announced ([`announce`]; this process's own, from `origin`, are skipped),
/// until `shutdown` or the subscription's end.
async fn hear(
    mut sub: async_nats::Subscriber,
    origin: &str,
    shutdown: CancellationToken,
    mut heard: impl FnMut(&mut dyn Iterator<Item = &str>),
) {
    loop {
        let msg = tokio::select! {
            _ = shutdown.cancelled() => return,
            msg = sub.next() => match msg {
                Some(m) => m,
                None => return,
            },
        };
        let text = std::str::from_utf8(&msg.payload).unwrap_or_default();
        let mut lines = text.lines().peekable();
        match lines.peek().and_then(|l| l.strip_prefix(FROM)) {
            Some(from) if from == origin => continue,
            Some(_) => {
                lines.next();
            }
            None => {}
        }
        heard(&mut lines);
    }
}

/// The groups listening to a [`Wake`]: what each listens for, and its members' shared
/// `Notify` (gone when the last member is).
type Groups = Vec<(Bell, Weak<Notify>)>;

/// The members of one group of listeners of a [`Wake`] (clones share the group).
#[derive(Clone)]
pub struct Doorbell(Arc<Notify>);

impl Doorbell {
    /// A group of listeners no [`Wake`] rings: only its members' [`Doorbell::pass_on`]
    /// (the relay's helper loops, recruited by a full batch, never by a commit).
    pub fn unrung() -> Self {
        Self(Arc::new(Notify::new()))
    }

    /// Resolves at the next ring this member is woken by, or at once if a ring came
    /// while every member was busy and no other member has taken it since.
    pub async fn rung(&self) {
        self.0.notified().await;
    }

    /// Passes a ring on to another member of the group (an idle one, or the next to
    /// wait).
    pub fn pass_on(&self) {
        self.0.notify_one();
    }

    /// Whether `other` is a member of the same group.
    pub fn is(&self, other: &Doorbell) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
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
        changes.publish(&[a], &[]).await;
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
        changes.publish(&[id], &[]).await;
        let quick = Duration::from_millis(50);
        assert!(tokio::time::timeout(quick, woken).await.is_ok());
    }

    #[tokio::test]
    async fn every_waiter_learns_of_an_end_and_of_nothing_else() {
        let changes = Changes::default();
        let id = Uuid::new_v4();
        let (first, second) = (changes.interest(id), changes.interest(id));
        changes.publish(&[id], &[]).await;
        assert!(!first.may_have_ended() && !second.may_have_ended());
        changes.publish(&[id], &[id]).await;
        assert!(first.may_have_ended() && second.may_have_ended());
        // Each heard it once.
        assert!(!first.may_have_ended() && !second.may_have_ended());
        // A waiter that comes later does not hear an end announced before it came.
        assert!(!changes.interest(id).may_have_ended());
    }

    #[test]
    fn an_announcement_says_whether_it_names_its_ends() {
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let new = format!("{ENDS_NAMED}\n{a}\n{b}\n{ENDED}{b}\nsomething else");
        let heard = Heard::read(&mut new.lines());
        assert!(heard.ends_named);
        assert_eq!((heard.ids, heard.ended), (vec![a, b], vec![b]));
        let old = format!("{a}\n{b}");
        let heard = Heard::read(&mut old.lines());
        assert!(!heard.ends_named);
        assert_eq!(heard.ids, vec![a, b]);
    }

    #[tokio::test]
    async fn an_announcement_that_does_not_name_its_ends_may_have_ended_each_operation() {
        let changes = Changes::default();
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let (on_a, on_b) = (changes.interest(a), changes.interest(b));
        changes.wake(&[a], None);
        assert!(on_a.may_have_ended());
        assert!(!on_b.may_have_ended(), "only the operations it names");
    }

    #[tokio::test]
    async fn a_ring_wakes_one_idle_member_of_each_group_it_is_for() {
        let wake = Wake::default();
        let dispatches = wake.doorbell(Bell::Dispatches);
        let events = wake.doorbell(Bell::Events);
        let quick = Duration::from_millis(50);
        let (a, b) = (dispatches.clone(), dispatches.clone());
        let (first, second) = (a.rung(), b.rung());
        tokio::pin!(first, second);
        assert!(futures::poll!(first.as_mut()).is_pending());
        assert!(futures::poll!(second.as_mut()).is_pending());
        wake.signal(&[Bell::Dispatches]).await;
        assert!(tokio::time::timeout(quick, first).await.is_ok());
        assert!(tokio::time::timeout(quick, second.as_mut()).await.is_err());
        assert!(tokio::time::timeout(quick, events.rung()).await.is_err());
        wake.signal(&[Bell::Events]).await;
        assert!(tokio::time::timeout(quick, events.rung()).await.is_ok());
        assert!(tokio::time::timeout(quick, second).await.is_err());
    }

    #[tokio::test]
    async fn a_ring_while_every_member_is_busy_wakes_the_next_to_wait() {
        let wake = Wake::default();
        let bell = wake.doorbell(Bell::Dispatches);
        // (every member is in a pass: none waits)
        wake.signal(&[Bell::Dispatches, Bell::Events]).await;
        wake.signal(&[Bell::Dispatches]).await;
        let quick = Duration::from_millis(50);
        assert!(tokio::time::timeout(quick, bell.rung()).await.is_ok());
        // Rings that came together are one pass's work.
        assert!(tokio::time::timeout(quick, bell.rung()).await.is_err());
        bell.pass_on();
        assert!(tokio::time::timeout(quick, bell.rung()).await.is_ok());
    }

    #[test]
    fn a_group_whose_members_are_gone_is_forgotten() {
        let wake = Wake::default();
        drop(wake.doorbell(Bell::Events));
        let _kept = wake.doorbell(Bell::Dispatches);
        wake.ring_here(&[Bell::Events]);
        assert_eq!(wake.lock().len(), 1);
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
