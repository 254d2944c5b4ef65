//! The audit chain's end, kept on the broker, where a rewrite of the database cannot
//! reach it.
//!
//! [`ChainWatch`](super::ChainWatch) remembers in memory the last link a sealer saw,
//! so it notices the newest rows and links removed only while an API process runs.
//! Every sealer therefore also saves the chain's end it reached (the last link's place
//! and hash) as the one message of a JetStream stream of its own
//! ([`NatsNames::audit_stream`], `OPS-AUDIT`), on a subject only the broker's `gateway`
//! user may publish to; messages cannot be deleted from it nor the stream purged
//! through the JetStream API. A sealer that starts reads that end and checks that its
//! link is still in the database, unchanged; if not, it trips the same alarm as the
//! watch (`gateway_audit_chain_rewritten_total`, an `ERROR` line), and saves the chain
//! as it is now, so that the alarm is raised once. Whoever rewrites the database must
//! now also hold the gateway's broker credentials to go unnoticed.
//!
//! **Writes never move the end backwards.** Each is conditional on the message the
//! writer last read or wrote (`Nats-Expected-Last-Subject-Sequence`): a sealer whose
//! write lost to another's reads (and checks) the end that one saved before it writes
//! again, and writes only an end past the saved one. The broker being down, or the
//! stream missing (a deployment whose `gateway migrate` has not run since this came),
//! never holds up sealing for long (a step gives up after 2 s): the sealer says so
//! once (`WARN`), counts `gateway_audit_anchor_errors_total`, and tries again every
//! [`RETRY`].

use super::Place;
use crate::config::NatsNames;
use crate::metrics::Metrics;
use async_nats::jetstream::{self, context::PublishErrorKind, message::PublishMessage};
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use std::time::Duration;
use tokio::time::Instant;

/// How long a sealer waits after a failed read or write of the saved end.
pub const RETRY: Duration = Duration::from_secs(10);
/// How long a read and write of the saved end may hold up the sealer (while the broker
/// is away, a request waits for its timeout).
const STEP_TIMEOUT: Duration = Duration::from_secs(2);

/// The saved end, as it travels: `{"chain_seq": 42, "hash": "<base64>"}`, or
/// `{"chain_seq": 0}` for a chain with no link yet.
#[derive(Debug, Serialize, Deserialize)]
struct Wire {
    chain_seq: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    hash: Option<String>,
}

/// The end the broker holds: the chain's end as a sealer saved it, and the stream
/// sequence of the message that says so (0 when none was saved yet).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Saved {
    /// The message's stream sequence, which the next write must name.
    pub message: u64,
    /// The last link's place and hash; `None` for an empty chain (or nothing saved).
    pub end: Option<Place>,
}

/// Why a write did not happen.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// Another sealer saved an end since the message named.
    #[error("another sealer saved the chain's end first")]
    Moved,
    /// The broker refused or could not be reached.
    #[error(transparent)]
    Broker(#[from] anyhow::Error),
}

/// The deployment's saved end: where it is and how to read and write it.
#[derive(Clone)]
pub struct Anchor {
    js: jetstream::Context,
    stream: String,
    subject: String,
}

impl Anchor {
    /// The saved end of the deployment named `names`, through `js` (logged in as the
    /// `gateway` user).
    pub fn new(js: jetstream::Context, names: &NatsNames) -> Self {
        Self {
            js,
            stream: names.audit_stream(),
            subject: names.audit_end_subject(),
        }
    }

    /// The end saved last (message 0 and no end when none was).
    pub async fn read(&self) -> anyhow::Result<Saved> {
        use async_nats::jetstream::stream::LastRawMessageErrorKind;
        let stream = self.js.get_stream_no_info(&self.stream).await?;
        let message = match stream.get_last_raw_message_by_subject(&self.subject).await {
            Ok(m) => m,
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => {
                return Ok(Saved {
                    message: 0,
                    end: None,
                })
            }
            Err(e) => return Err(anyhow::anyhow!("reading {}: {e}", self.stream)),
        };
        let wire: Wire = serde_json::from_slice(&message.payload)
            .map_err(|e| anyhow::anyhow!("{} message {}: {e}", self.stream, message.sequence))?;
        let end = match wire.hash {
            Some(h) if wire.chain_seq > 0 => Some((
                wire.chain_seq,
                base64::engine::general_purpose::STANDARD.decode(h)?,
            )),
            _ => None,
        };
        Ok(Saved {
            message: message.sequence,
            end,
        })
    }

    /// Saves `end` in place of the message `after` (0: none saved yet); answers the new
    /// message's sequence, or [`WriteError::Moved`] when `after` is no longer the last.
    pub async fn write(&self, after: u64, end: Option<&Place>) -> Result<u64, WriteError> {
        let wire = Wire {
            chain_seq: end.map_or(0, |e| e.0),
            hash: end.map(|e| base64::engine::general_purpose::STANDARD.encode(&e.1)),
        };
        let payload = serde_json::to_vec(&wire).map_err(anyhow::Error::from)?;
        let publish = PublishMessage::build()
            .payload(payload.into())
            .expected_last_subject_sequence(after);
        let refused = |e: async_nats::jetstream::context::PublishError| match e.kind() {
            PublishErrorKind::WrongLastSequence => WriteError::Moved,
            _ => WriteError::Broker(anyhow::anyhow!("saving the audit chain's end: {e}")),
        };
        let ack = self
            .js
            .send_publish(self.subject.clone(), publish)
            .await
            .map_err(refused)?
            .await
            .map_err(refused)?;
        Ok(ack.sequence)
    }
}

/// A sealer's side of the saved end: checks it when the sealer starts (and whenever
/// another sealer saved one since), then saves each end past it.
pub struct Anchoring {
    anchor: Anchor,
    /// The saved end as this sealer knows it; `None` until read (again).
    known: Option<Saved>,
    /// The known saved end is gone from the chain: save the chain's end in its place,
    /// even one before it.
    replace: bool,
    /// The chain's end was found rewritten and said so already: the next read of the
    /// saved end checks it without saying so again.
    told: bool,
    /// No read or write before this, after one failed.
    quiet_until: Option<Instant>,
    /// Whether the last failure was logged (once until one succeeds).
    warned: bool,
}

impl Anchoring {
    /// Nothing known yet: the first [`Self::step`] reads and checks the saved end.
    pub fn new(anchor: Anchor) -> Self {
        Self {
            anchor,
            known: None,
            replace: false,
            told: false,
            quiet_until: None,
            warned: false,
        }
    }

    /// The sealer's [`ChainWatch`](super::ChainWatch) found the chain rewritten (and
    /// said so): the saved end is read and checked again at the next step, and replaced
    /// if it is gone too, without a second alarm.
    pub fn chain_rewritten(&mut self) {
        self.known = None;
        self.told = true;
    }

    /// After a sealing pass that left the chain's end at `head`: reads and checks the
    /// saved end if it is not known, then saves `head` if it is past it (or in its
    /// place, once the saved end was found gone).
    pub async fn step(&mut self, pool: &PgPool, metrics: &Metrics, head: Option<&Place>) {
        if self.quiet_until.is_some_and(|t| Instant::now() < t) {
            return;
        }
        let stepped = tokio::time::timeout(STEP_TIMEOUT, self.try_step(pool, metrics, head))
            .await
            .unwrap_or_else(|_| {
                Err(anyhow::anyhow!(
                    "no answer from the broker within {STEP_TIMEOUT:?}"
                ))
            });
        match stepped {
            Ok(()) => {
                if std::mem::take(&mut self.warned) {
                    tracing::info!("audit: the chain's end is saved on the broker again");
                }
                self.quiet_until = None;
            }
            Err(e) => {
                // Whether a write landed is unknown: read the saved end again after the
                // pause (and, if it was found gone and said so, check it quietly).
                self.known = None;
                self.told |= self.replace;
                metrics.audit_anchor_errors.inc();
                if !std::mem::replace(&mut self.warned, true) {
                    tracing::warn!(
                        error = %e,
                        retry_in = ?RETRY,
                        "audit: could not read or save the chain's end on the broker; a \
                         rewrite of the chain's end made while no gateway runs would go \
                         unnoticed until it can (sealing goes on)"
                    );
                }
                self.quiet_until = Some(Instant::now() + RETRY);
            }
        }
    }

    async fn try_step(
        &mut self,
        pool: &PgPool,
        metrics: &Metrics,
        head: Option<&Place>,
    ) -> anyhow::Result<()> {
        let known = match self.known.take() {
            Some(known) => known,
            None => {
                let saved = self.anchor.read().await?;
                self.replace = false;
                if let Some(end) = saved.end.as_ref().filter(|&end| Some(end) != head) {
                    self.replace = if std::mem::take(&mut self.told) {
                        super::link_lost(pool, end).await?.is_some()
                    } else {
                        let whose = "the chain's end saved on the broker";
                        !super::still_linked(pool, metrics, end, head, whose).await?
                    };
                }
                self.told = false;
                saved
            }
        };
        let saved_seq = known.end.as_ref().map_or(0, |e| e.0);
        if !self.replace && head.map_or(0, |h| h.0) <= saved_seq {
            self.known = Some(known);
            return Ok(());
        }
        match self.anchor.write(known.message, head).await {
            Ok(message) => {
                self.known = Some(Saved {
                    message,
                    end: head.cloned(),
                });
                self.replace = false;
                Ok(())
            }
            // Another sealer saved an end: read and check it at the next step.
            Err(WriteError::Moved) => {
                self.replace = false;
                Ok(())
            }
            Err(WriteError::Broker(e)) => Err(e),
        }
    }
}

/// What [`compare`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Comparison {
    /// No end was saved yet (a deployment whose sealers have not run since it came).
    NothingSaved,
    /// The saved end's link is in the chain, unchanged; its place.
    Found(i64),
    /// The saved end's link is gone or changed: the chain's newest rows and links were
    /// removed or replaced since a sealer saved it.
    Missing {
        /// The saved end's place.
        chain_seq: i64,
        /// `gone` or `changed`.
        how: &'static str,
    },
}

/// Compares the end saved on the broker with the chain in `pool` (what
/// `gateway admin verify-audit` adds to its check of the chain).
pub async fn compare(anchor: &Anchor, pool: &PgPool) -> anyhow::Result<Comparison> {
    let Some(end) = anchor.read().await?.end else {
        return Ok(Comparison::NothingSaved);
    };
    Ok(match super::link_lost(pool, &end).await? {
        None => Comparison::Found(end.0),
        Some(how) => Comparison::Missing {
            chain_seq: end.0,
            how,
        },
    })
}
