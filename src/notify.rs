//! Following a PostgreSQL notification channel: the way a change committed by one
//! process (a registered resource type, a revoked key) reaches every other at once.
//!
//! [`follow`] calls its callback on every notification, after it (re)connects (whatever
//! changed while nobody listened), and every `every` in any case, so a notification lost
//! with a connection costs at most that long.

use sqlx::postgres::PgListener;
use sqlx::PgPool;
use std::future::Future;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Runs `changed` on each notification on `channel`, after each (re)connection, and
/// every `every`, until `shutdown`.
pub async fn follow<F, Fut>(
    pool: PgPool,
    channel: &'static str,
    every: Duration,
    shutdown: CancellationToken,
    mut changed: F,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    let mut listener: Option<PgListener> = None;
    loop {
        if listener.is_none() {
            listener = subscribe(&pool, channel).await;
            // Whatever changed while nobody listened.
            changed().await;
        }
        let Some(l) = listener.as_mut() else {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => changed().await,
            n = l.try_recv() => match n {
                Ok(Some(_)) => changed().await,
                // Lost: reconnects on the next call; catch up on what it missed.
                Ok(None) => changed().await,
                Err(e) => {
                    tracing::warn!(channel, error = %e, "notification listener failed; reconnecting");
                    listener = None;
                }
            },
        }
    }
}

async fn subscribe(pool: &PgPool, channel: &str) -> Option<PgListener> {
    let mut l = match PgListener::connect_with(pool).await {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(channel, error = %e, "cannot listen for notifications; retrying");
            return None;
        }
    };
    match l.listen(channel).await {
        Ok(()) => Some(l),
        Err(e) => {
            tracing::warn!(channel, error = %e, "cannot listen for notifications; retrying");
            None
        }
    }
}
