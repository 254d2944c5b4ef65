//! Seams for tests, compiled into debug builds only: a test holds a named point of the
//! code, for one database, to act while the code waits there (commit a transaction
//! just then, create another operation while a relay pass hangs).
//!
//! Keyed by the database as well as the point, since the integration tests run in
//! parallel in one process, each on a database of its own: a pause is only ever taken
//! by the code working on the test's own database, and only once.

use sqlx::PgPool;
use std::sync::Mutex;
use tokio::sync::oneshot;

/// Where the code may be held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Point {
    /// `audit::seal_all`, right after a pass that sealed nothing.
    AfterAnEmptySealingPass,
    /// A relay pass over the operations outbox, right after it claimed rows and before
    /// it publishes them.
    RelayPassClaimed,
}

/// A pause asked for: where, on which database, and its two channels.
type Held = (Point, String, oneshot::Sender<()>, oneshot::Receiver<()>);

static PAUSES: Mutex<Vec<Held>> = Mutex::new(Vec::new());

/// Holds the next code to reach `point` on database `database`: the first channel says
/// it got there, and it goes on once the second is sent to (or dropped).
pub fn at(point: Point, database: &str) -> (oneshot::Receiver<()>, oneshot::Sender<()>) {
    let (reached, got_there) = oneshot::channel();
    let (go_on, resume) = oneshot::channel();
    let mut pauses = PAUSES.lock().expect("pauses");
    pauses.retain(|(p, d, ..)| (*p, d.as_str()) != (point, database));
    pauses.push((point, database.to_owned(), reached, resume));
    (got_there, go_on)
}

/// Called by the code at `point`, working on `pool`'s database: waits there if a test
/// asked to hold it.
pub(crate) async fn here(point: Point, pool: &PgPool) {
    let Some(database) = pool.connect_options().get_database().map(str::to_owned) else {
        return;
    };
    let held = {
        let mut pauses = PAUSES.lock().expect("pauses");
        let at = pauses
            .iter()
            .position(|(p, d, ..)| *p == point && *d == database);
        at.map(|i| pauses.swap_remove(i))
    };
    if let Some((_, _, reached, resume)) = held {
        let _ = reached.send(());
        let _ = resume.await;
    }
}
