//! Seams for tests, compiled into debug builds only: a test holds a named point of the
//! code, for one database, to act while the code waits there (commit a transaction
//! just then, create another operation while a relay pass hangs).
//!
//! Keyed by the database as well as the point, since the integration tests run in
//! parallel in one process, each on a database of its own: a pause is only ever taken
//! by the code working on the test's own database, and only once.

use sqlx::PgPool;
use std::collections::HashMap;
use std::sync::Mutex;
use tokio::sync::oneshot;

/// Where the code may be held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Point {
    /// `audit::seal_all`, right after a pass that sealed nothing.
    AfterAnEmptySealingPass,
    /// A relay pass over the operations outbox, right after it claimed rows and before
    /// it publishes them.
    RelayPassClaimed,
}

type Held = (oneshot::Sender<()>, oneshot::Receiver<()>);

static PAUSES: Mutex<Option<HashMap<(Point, String), Held>>> = Mutex::new(None);

/// Holds the next code to reach `point` on database `database`: the first channel says
/// it got there, and it goes on once the second is sent to (or dropped).
pub fn at(point: Point, database: &str) -> (oneshot::Receiver<()>, oneshot::Sender<()>) {
    let (reached, got_there) = oneshot::channel();
    let (go_on, resume) = oneshot::channel();
    PAUSES
        .lock()
        .expect("pauses")
        .get_or_insert_with(HashMap::new)
        .insert((point, database.to_owned()), (reached, resume));
    (got_there, go_on)
}

/// Called by the code at `point`, working on `pool`'s database: waits there if a test
/// asked to hold it.
pub(crate) async fn here(point: Point, pool: &PgPool) {
    let Some(database) = pool.connect_options().get_database().map(str::to_owned) else {
        return;
    };
    let held = PAUSES
        .lock()
        .expect("pauses")
        .as_mut()
        .and_then(|p| p.remove(&(point, database)));
    if let Some((reached, resume)) = held {
        let _ = reached.send(());
        let _ = resume.await;
    }
}
