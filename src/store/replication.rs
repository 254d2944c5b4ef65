//! Replication of global data between regions (migration 0015): this region's
//! configuration, the log of its own changes, applying the others' changes, and what
//! each side has seen.

use crate::domain::region::{Change, Heartbeat, HEARTBEAT};
use sqlx::{Acquire, PgConnection, PgExecutor};

/// One of this region's changes, waiting to be published.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct LogRow {
    /// Log order (= clock order: every logged change holds the clock until it commits).
    pub seq: i64,
    /// The table, or `_heartbeat`.
    pub tbl: String,
    /// Key columns.
    pub key: serde_json::Value,
    /// Replicated columns; `None`: deleted.
    pub row: Option<serde_json::Value>,
    /// Clock value.
    pub hlc: i64,
    /// This region.
    pub origin: String,
}

impl From<LogRow> for Change {
    fn from(r: LogRow) -> Self {
        Change {
            table: r.tbl,
            key: r.key,
            row: r.row,
            hlc: r.hlc,
            origin: r.origin,
        }
    }
}

/// Makes this database region `region`, served at `url`, owner of `zones`, with
/// `peers` as the other regions. The first time, every row it already has is logged
/// for the others. Fails if the database already belongs to another region.
pub async fn configure(
    conn: &mut PgConnection,
    region: &str,
    url: &str,
    zones: &[String],
    peers: &[String],
) -> anyhow::Result<()> {
    let mut tx = conn.begin().await?;
    let current: Option<String> =
        sqlx::query_scalar("SELECT region FROM replication_clock FOR UPDATE")
            .fetch_one(&mut *tx)
            .await?;
    if let Some(why) = crate::domain::region::mismatch(current.as_deref(), Some(region)) {
        anyhow::bail!(why);
    }
    if current.is_none() {
        sqlx::query("UPDATE replication_clock SET region = $1")
            .bind(region)
            .execute(&mut *tx)
            .await?;
        sqlx::query("SELECT replication_snapshot()")
            .execute(&mut *tx)
            .await?;
    }
    sqlx::query(
        "INSERT INTO regions (name, url) VALUES ($1, $2)
         ON CONFLICT (name) DO UPDATE SET url = EXCLUDED.url WHERE regions.url <> EXCLUDED.url",
    )
    .bind(region)
    .bind(url)
    .execute(&mut *tx)
    .await?;
    // A zone belongs to one region: one another region already claimed (as replicated
    // here) is not taken over, which would leave its resources in two databases.
    let taken: Vec<(String, String)> = sqlx::query_as(
        "SELECT name, region FROM zones
         WHERE name = ANY ($1::text[]) AND region IS NOT NULL AND region <> $2 ORDER BY name",
    )
    .bind(zones)
    .bind(region)
    .fetch_all(&mut *tx)
    .await?;
    if let Some((zone, other)) = taken.first() {
        anyhow::bail!(
            "GATEWAY_REGION_ZONES: zone {zone:?} belongs to region {other:?}; a zone belongs to one region"
        );
    }
    sqlx::query(
        "INSERT INTO zones (name, description, region)
         SELECT z, '', $2 FROM unnest($1::text[]) AS z
         ON CONFLICT (name) DO UPDATE SET region = EXCLUDED.region
             WHERE zones.region IS DISTINCT FROM EXCLUDED.region",
    )
    .bind(zones)
    .bind(region)
    .execute(&mut *tx)
    .await?;
    // The peers are exactly those configured: a region removed from the list no longer
    // holds tombstones back or shows a lag.
    sqlx::query(
        "WITH gone AS (DELETE FROM replication_peers WHERE region <> ALL ($1::text[]))
         INSERT INTO replication_peers (region) SELECT unnest($1::text[]) ON CONFLICT DO NOTHING",
    )
    .bind(peers)
    .execute(&mut *tx)
    .await?;
    sqlx::query("DELETE FROM replication_acks WHERE peer <> ALL ($1::text[])")
        .bind(peers)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(())
}

/// This database's region, if it is one of several.
pub async fn region(db: impl PgExecutor<'_>) -> sqlx::Result<Option<String>> {
    sqlx::query_scalar("SELECT region FROM replication_clock")
        .fetch_one(db)
        .await
}

/// Claims up to `limit` of the oldest logged changes, in order, if no other relay is
/// publishing (one publisher at a time keeps the clock order on the stream).
pub async fn claim(conn: &mut PgConnection, limit: i64) -> sqlx::Result<Option<Vec<LogRow>>> {
    if !lock_publisher(conn).await? {
        return Ok(None);
    }
    sqlx::query_as(
        "SELECT seq, tbl, key, row, hlc, origin FROM replication_log ORDER BY seq LIMIT $1",
    )
    .bind(limit)
    .fetch_all(conn)
    .await
    .map(Some)
}

/// Takes the publisher's lock for the transaction, if no other relay holds it.
async fn lock_publisher(conn: &mut PgConnection) -> sqlx::Result<bool> {
    sqlx::query_scalar("SELECT pg_try_advisory_xact_lock(hashtext('gateway.replication'))")
        .fetch_one(conn)
        .await
}

/// What the database knows of this region's outbound stream: the highest sequence it
/// acknowledged, and when the stream was made (nanoseconds since the epoch; `None`
/// before a relay first looked). `None` altogether while another relay publishes.
pub async fn outbound_mark(conn: &mut PgConnection) -> sqlx::Result<Option<(u64, Option<i64>)>> {
    if !lock_publisher(conn).await? {
        return Ok(None);
    }
    let (seq, created): (i64, Option<i64>) =
        sqlx::query_as("SELECT published_seq, outbound_created FROM replication_clock")
            .fetch_one(conn)
            .await?;
    Ok(Some((seq as u64, created)))
}

/// Records when the outbound stream the relay publishes to was made.
pub async fn set_outbound_created(conn: &mut PgConnection, created: i64) -> sqlx::Result<()> {
    sqlx::query("UPDATE replication_clock SET outbound_created = $1")
        .bind(created)
        .execute(conn)
        .await?;
    Ok(())
}

/// Records, in the publishing transaction, that the outbound stream acknowledged up to
/// `seq`.
pub async fn record_published(conn: &mut PgConnection, seq: u64) -> sqlx::Result<()> {
    sqlx::query("UPDATE replication_clock SET published_seq = greatest(published_seq, $1)")
        .bind(seq as i64)
        .execute(conn)
        .await?;
    Ok(())
}

/// Logs every row this region made, and its own tombstones, again (migration 0025);
/// returns how many.
pub async fn relog(conn: &mut PgConnection) -> sqlx::Result<i64> {
    sqlx::query_scalar("SELECT replication_relog()")
        .fetch_one(conn)
        .await
}

/// Removes published changes: exactly those claimed, by `seq`. Not "everything up to
/// the last one": a transaction that took a lower `seq` can commit after the claim, and
/// its change would be deleted unpublished.
pub async fn delete(conn: &mut PgConnection, seqs: &[i64]) -> sqlx::Result<()> {
    sqlx::query("DELETE FROM replication_log WHERE seq = ANY($1)")
        .bind(seqs)
        .execute(conn)
        .await?;
    Ok(())
}

/// Logs a heartbeat (what this region has applied from each peer), unless one is
/// already waiting to be published.
pub async fn heartbeat(db: impl PgExecutor<'_>) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO replication_log (tbl, key, row, hlc, origin)
         SELECT $1, '{}', jsonb_build_object('applied',
                    coalesce((SELECT jsonb_object_agg(region, applied_hlc) FROM replication_peers), '{}')),
                replication_tick(), region
           FROM replication_clock
          WHERE region IS NOT NULL
            AND NOT EXISTS (SELECT 1 FROM replication_log WHERE tbl = $1)",
    )
    .bind(HEARTBEAT)
    .execute(db)
    .await?;
    Ok(())
}

/// What applying one change did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The change is now the row's value (or the row is gone).
    Applied,
    /// An equal or newer version was already here.
    Stale,
    /// It could not be applied yet (its parent row is missing, or another row holds
    /// one of its unique names); kept to be retried.
    Parked,
}

impl Applied {
    /// Its name in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Applied => "applied",
            Self::Stale => "stale",
            Self::Parked => "parked",
        }
    }
}

/// Applies one change from region `change.origin` in the caller's transaction (a
/// heartbeat records what its origin has seen). The caller records how far it got from
/// each peer ([`record_applied`]), once per batch. A change that breaks a constraint is
/// parked, not failed: the rest of the batch goes on.
pub async fn apply(conn: &mut PgConnection, change: &Change) -> sqlx::Result<Applied> {
    if change.table == HEARTBEAT {
        let beat: Heartbeat = change
            .row
            .clone()
            .and_then(|r| serde_json::from_value(r).ok())
            .unwrap_or_default();
        record_acks(conn, &change.origin, &beat).await?;
        return Ok(Applied::Applied);
    }
    apply_row(conn, change, None).await
}

async fn apply_row(
    conn: &mut PgConnection,
    change: &Change,
    parked: Option<i64>,
) -> sqlx::Result<Applied> {
    let mut savepoint = conn.begin().await?;
    let done: sqlx::Result<String> =
        sqlx::query_scalar("SELECT replication_apply($1, $2, $3, $4, $5)")
            .bind(&change.table)
            .bind(&change.key)
            .bind(&change.row)
            .bind(change.hlc)
            .bind(&change.origin)
            .fetch_one(&mut *savepoint)
            .await;
    match done {
        Ok(what) => {
            savepoint.commit().await?;
            if let Some(id) = parked {
                sqlx::query("DELETE FROM replication_parked WHERE id = $1")
                    .bind(id)
                    .execute(&mut *conn)
                    .await?;
            }
            Ok(if what == "stale" {
                Applied::Stale
            } else {
                Applied::Applied
            })
        }
        Err(e) if is_constraint(&e) => {
            savepoint.rollback().await?;
            if let Some(settled) = settle_name_clash(conn, change, &e).await? {
                return Box::pin(apply_row(conn, &settled, parked)).await;
            }
            if parked.is_none() {
                sqlx::query(
                    "INSERT INTO replication_parked (tbl, key, row, hlc, origin, error)
                     VALUES ($1, $2, $3, $4, $5, $6)",
                )
                .bind(&change.table)
                .bind(&change.key)
                .bind(&change.row)
                .bind(change.hlc)
                .bind(&change.origin)
                .bind(e.to_string())
                .execute(&mut *conn)
                .await?;
            }
            Ok(Applied::Parked)
        }
        Err(e) => Err(e),
    }
}

/// Two API keys made with one name in two regions while they were cut off: the one
/// made first (by clock, then region) keeps the name; the other is renamed
/// `{name}~{its ID's 32 hex digits}`, in every region the same. No other key can hold
/// that name (a key's own name is a DNS label, without `~`, and IDs are unique), so a
/// rename never clashes again: with 8 digits, the start of a UUIDv7 (its time, which
/// keys made within the same minute share), three keys of one name renamed two to the
/// same name, and renamed one of them twice (`ci~0192f3a4~0192f3a4`). Returns the change
/// to apply instead: the incoming key renamed, or (after this region's key was renamed,
/// a change of its own that the other regions receive) the incoming one as it came.
/// `None` when `e` is not such a clash.
async fn settle_name_clash(
    conn: &mut PgConnection,
    change: &Change,
    e: &sqlx::Error,
) -> sqlx::Result<Option<Change>> {
    let clash = e
        .as_database_error()
        .and_then(|d| d.constraint())
        .is_some_and(|c| c == "principals_name_per_tenant");
    let Some(row) = change.row.as_ref().filter(|_| clash) else {
        return Ok(None);
    };
    let (Some(id), Some(name)) = (row["id"].as_str(), row["name"].as_str()) else {
        return Ok(None);
    };
    let tenant = row["tenant"].as_str();
    let local: Option<(uuid::Uuid, i64, String)> = sqlx::query_as(
        "SELECT id, hlc, origin FROM principals
         WHERE COALESCE(tenant, '') = COALESCE($1, '') AND name = $2 AND id::text <> $3",
    )
    .bind(tenant)
    .bind(name)
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?;
    let Some((local_id, hlc, origin)) = local else {
        return Ok(None);
    };
    let renamed = |id: &str| format!("{name}~{}", id.replace('-', ""));
    if (change.hlc, change.origin.as_str()) > (hlc, origin.as_str()) {
        let mut row = row.clone();
        row["name"] = serde_json::json!(renamed(id));
        return Ok(Some(Change {
            row: Some(row),
            ..change.clone()
        }));
    }
    // This region's key came later: renamed here as a change of this region's own (the
    // applier's transaction says it is replicating; this one is not).
    sqlx::query("SELECT set_config('gateway.replicating', 'off', true)")
        .execute(&mut *conn)
        .await?;
    sqlx::query("UPDATE principals SET name = $2 WHERE id = $1")
        .bind(local_id)
        .bind(renamed(&local_id.to_string()))
        .execute(&mut *conn)
        .await?;
    Ok(Some(change.clone()))
}

/// Class 23 (integrity constraint violation).
fn is_constraint(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .and_then(|d| d.code())
        .is_some_and(|c| c.starts_with("23"))
}

/// Tries the parked changes again, oldest first; returns how many were applied.
pub async fn retry_parked(conn: &mut PgConnection) -> sqlx::Result<usize> {
    let rows: Vec<(
        i64,
        String,
        serde_json::Value,
        Option<serde_json::Value>,
        i64,
        String,
    )> = sqlx::query_as(
        "SELECT id, tbl, key, row, hlc, origin FROM replication_parked ORDER BY id LIMIT 1000",
    )
    .fetch_all(&mut *conn)
    .await?;
    let mut done = 0;
    for (id, table, key, row, hlc, origin) in rows {
        let change = Change {
            table,
            key,
            row,
            hlc,
            origin,
        };
        if apply_row(conn, &change, Some(id)).await? != Applied::Parked {
            done += 1;
        }
    }
    Ok(done)
}

/// Records that changes (or a heartbeat) of `peer` up to clock value `hlc` were applied:
/// what the lag metric and this region's heartbeats report.
pub async fn record_applied(conn: &mut PgConnection, peer: &str, hlc: i64) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO replication_peers (region, applied_hlc, applied_at) VALUES ($1, $2, now())
         ON CONFLICT (region) DO UPDATE
            SET applied_hlc = greatest(replication_peers.applied_hlc, EXCLUDED.applied_hlc),
                applied_at = now()",
    )
    .bind(peer)
    .bind(hlc)
    .execute(conn)
    .await?;
    Ok(())
}

async fn record_acks(conn: &mut PgConnection, peer: &str, beat: &Heartbeat) -> sqlx::Result<()> {
    let (origins, hlcs): (Vec<&str>, Vec<i64>) =
        beat.applied.iter().map(|(o, h)| (o.as_str(), *h)).unzip();
    sqlx::query(
        "INSERT INTO replication_acks (peer, origin, hlc)
         SELECT $1, o, h FROM unnest($2::text[], $3::bigint[]) AS a(o, h)
         ON CONFLICT (peer, origin) DO UPDATE SET hlc = greatest(replication_acks.hlc, EXCLUDED.hlc)",
    )
    .bind(peer)
    .bind(&origins)
    .bind(&hlcs)
    .execute(&mut *conn)
    .await?;
    // A tombstone goes once every other peer has applied its origin up to it; this
    // region's own stay. Its deletions are in no stream it reads, so if it ever reads a
    // peer's stream from the start again (its copy lost, or made anew), only its own
    // tombstone tells the peer's older version of the row from a row it never had.
    sqlx::query(
        "DELETE FROM replication_tombstones t
          WHERE t.origin IS DISTINCT FROM (SELECT region FROM replication_clock)
            AND NOT EXISTS (
                SELECT 1 FROM replication_peers p
                 WHERE p.region <> t.origin
                   AND coalesce((SELECT a.hlc FROM replication_acks a
                                  WHERE a.peer = p.region AND a.origin = t.origin), 0) < t.hlc)",
    )
    .execute(conn)
    .await?;
    Ok(())
}

/// What this region has applied from one peer.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct PeerState {
    /// The peer region.
    pub region: String,
    /// The newest clock value applied from it (0: nothing yet).
    pub applied_hlc: i64,
}

/// Replication state for metrics: each peer, the changes waiting to be published, the
/// parked changes and the tombstones.
pub async fn state(db: &sqlx::PgPool) -> sqlx::Result<(Vec<PeerState>, i64, i64, i64)> {
    let peers = sqlx::query_as("SELECT region, applied_hlc FROM replication_peers ORDER BY region")
        .fetch_all(db)
        .await?;
    let (log, parked, tombstones): (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM replication_log), (SELECT count(*) FROM replication_parked),
                (SELECT count(*) FROM replication_tombstones)",
    )
    .fetch_one(db)
    .await?;
    Ok((peers, log, parked, tombstones))
}

/// The regions known here and their gateways' URLs.
pub async fn regions(db: impl PgExecutor<'_>) -> sqlx::Result<Vec<(String, String)>> {
    sqlx::query_as("SELECT name, url FROM regions ORDER BY name")
        .fetch_all(db)
        .await
}

/// Takes the applier's lock for this session, if no other session holds it.
pub async fn try_lock_applier(conn: &mut PgConnection) -> sqlx::Result<bool> {
    sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtext('gateway.replication.apply'))")
        .fetch_one(conn)
        .await
}

/// How far this region has applied `REPLICATION-IN` (its stream sequence), and when
/// the stream that sequence counts in was made (nanoseconds since the epoch; `None`
/// before an applier of this version recorded it).
pub async fn applied_seq(db: impl PgExecutor<'_>) -> sqlx::Result<(u64, Option<i64>)> {
    let (seq, created): (i64, Option<i64>) =
        sqlx::query_as("SELECT applied_seq, inbound_created FROM replication_clock")
            .fetch_one(db)
            .await?;
    Ok((seq as u64, created))
}

/// Records, in the applying transaction, how far `REPLICATION-IN` (made at `created`)
/// has been applied.
pub async fn set_applied_seq(conn: &mut PgConnection, seq: u64, created: i64) -> sqlx::Result<()> {
    sqlx::query("UPDATE replication_clock SET applied_seq = $1, inbound_created = $2")
        .bind(seq as i64)
        .bind(created)
        .execute(conn)
        .await?;
    Ok(())
}
