//! Regions: names, the region tag in resource and operation IDs, the hybrid logical
//! clock's layout, and the messages regions exchange to replicate global data.
//!
//! **Where a thing lives.** Every zone belongs to one region; a resource and its
//! operations live in their zone's region. Their IDs are UUIDv7s whose 12 `rand_a` bits
//! carry the region's tag ([`tag_of`]), so a gateway asked about an ID it does not have
//! knows which region to send the client to, with no lookup table to keep in sync.
//!
//! **Clock.** Global rows are stamped with a hybrid logical clock packed into an `i64`:
//! milliseconds since the epoch shifted left 16 bits, plus a 16-bit counter (made by
//! `replication_tick` in the database, migration 0015). Conflicts resolve by last writer
//! wins on `(hlc, origin)`; a key's `revoked_at` merges to the earliest value instead.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use uuid::Uuid;

/// Checks a region name: `[a-z][a-z0-9-]{0,31}` (it is also the NATS JetStream domain of
/// the region's servers and a subject token).
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = name.len() <= 32
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a region name ([a-z][a-z0-9-]{{0,31}})"
        ))
    }
}

/// Why a process configured as region `mine` (`None`: no region) may not run on a
/// database that is region `stored`'s (`None`: no region's yet), if it may not. A
/// database takes its region's name once (`migrate`); a process without a region on it
/// would take writes for other regions' zones and store them there.
pub fn mismatch(stored: Option<&str>, mine: Option<&str>) -> Option<String> {
    match (stored, mine) {
        (Some(r), None) => Some(format!(
            "GATEWAY_REGION: unset, but this database is region {r:?}'s; set GATEWAY_REGION={r}"
        )),
        (Some(r), Some(mine)) if r != mine => Some(format!(
            "GATEWAY_REGION: this database belongs to region {r:?}, not {mine:?}"
        )),
        _ => None,
    }
}

/// The 12-bit tag of a region in the IDs it makes: FNV-1a of its name, in `1..=4095`
/// (0 is never a tag). Two regions of one installation must not share a tag; `migrate`
/// warns when a region it knows of does.
pub fn tag_of(region: &str) -> u16 {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in region.bytes() {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    (hash % 4095) as u16 + 1
}

/// Makes the IDs of resources and operations: UUIDv7, tagged with the region's tag when
/// the installation is one of several regions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IdMaker {
    tag: Option<u16>,
}

impl IdMaker {
    /// IDs of `region` (untagged without one).
    pub fn for_region(region: Option<&str>) -> Self {
        Self {
            tag: region.map(tag_of),
        }
    }

    /// A new ID.
    pub fn make(&self) -> Uuid {
        let id = Uuid::now_v7();
        let Some(tag) = self.tag else {
            return id;
        };
        let mut bytes = *id.as_bytes();
        bytes[6] = 0x70 | (tag >> 8) as u8;
        bytes[7] = (tag & 0xff) as u8;
        Uuid::from_bytes(bytes)
    }
}

/// The region tag an ID carries, if it is a UUIDv7 (untagged IDs carry random bits:
/// a tag is only a hint, used for IDs this region does not have).
pub fn tag_in(id: &Uuid) -> Option<u16> {
    (id.get_version_num() == 7).then(|| {
        let b = id.as_bytes();
        (u16::from(b[6] & 0x0f) << 8) | u16::from(b[7])
    })
}

/// The wall-clock milliseconds of a hybrid logical clock value.
pub fn hlc_millis(hlc: i64) -> i64 {
    hlc >> 16
}

/// The pseudo-table of heartbeats in the replication log.
pub const HEARTBEAT: &str = "_heartbeat";

/// One replicated change, as published on the region's replication stream: a row of a
/// global table as its origin region wrote it, or its deletion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Change {
    /// The table (`tenants`, `principals`, …), or [`HEARTBEAT`].
    pub table: String,
    /// The row's key columns.
    pub key: serde_json::Value,
    /// The replicated columns; `None`: the row was deleted. For a heartbeat, what the
    /// origin has applied from each region ([`Heartbeat`]).
    pub row: Option<serde_json::Value>,
    /// When, by the origin's hybrid logical clock.
    pub hlc: i64,
    /// The region that made the change.
    pub origin: String,
}

/// A heartbeat's body: the newest clock value its origin has applied from each region.
/// Sent every second so that lag is measurable while nothing changes, and so that
/// tombstones can be removed once every region has seen them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// Region → newest clock value applied from it.
    pub applied: BTreeMap<String, i64>,
}

impl Change {
    /// The subject token of the row: a digest of table and key, so the stream keeps only
    /// the newest version of each row (one message per subject).
    pub fn row_token(&self) -> String {
        use sha2::{Digest, Sha256};
        let digest = Sha256::digest(format!("{}\n{}", self.table, self.key).as_bytes());
        hex::encode(&digest[..12])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_database_runs_only_processes_of_its_region() {
        assert_eq!(mismatch(None, None), None);
        assert_eq!(mismatch(None, Some("r1")), None, "migrate names it");
        assert_eq!(mismatch(Some("r1"), Some("r1")), None);
        assert!(mismatch(Some("r1"), None)
            .unwrap()
            .contains("GATEWAY_REGION=r1"));
        assert!(mismatch(Some("r1"), Some("r2"))
            .unwrap()
            .contains("not \"r2\""));
    }

    #[test]
    fn ids_carry_their_region_tag_and_stay_time_ordered() {
        let ids = IdMaker::for_region(Some("eu-west"));
        let a = ids.make();
        let b = ids.make();
        assert_eq!(a.get_version_num(), 7);
        assert_eq!(tag_in(&a), Some(tag_of("eu-west")));
        assert!(a.as_bytes()[..6] <= b.as_bytes()[..6]);
        assert_ne!(a, b);
        let plain = IdMaker::default().make();
        assert_eq!(plain.get_version_num(), 7);
        assert_eq!(tag_in(&Uuid::new_v4()), None);
    }

    #[test]
    fn tags_are_never_zero_and_differ_for_the_usual_names() {
        let names = [
            "r1", "r2", "r3", "eu-west", "us-east", "ap-south", "region-1",
        ];
        let tags: std::collections::BTreeSet<u16> = names.iter().map(|n| tag_of(n)).collect();
        assert_eq!(tags.len(), names.len());
        assert!(tags.iter().all(|t| (1..=4095).contains(t)));
    }

    #[test]
    fn region_names_are_checked() {
        assert!(check_name("r1").is_ok());
        assert!(check_name("eu-west-1").is_ok());
        for bad in ["", "1r", "R1", "r_1", "r.1", &"r".repeat(33)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_row_token_is_stable_per_row_and_a_subject_token() {
        let change = |key: serde_json::Value| Change {
            table: "tenants".into(),
            key,
            row: None,
            hlc: 1,
            origin: "r1".into(),
        };
        let a = change(serde_json::json!({"id": "acme"}));
        assert_eq!(
            a.row_token(),
            change(serde_json::json!({"id": "acme"})).row_token()
        );
        assert_ne!(
            a.row_token(),
            change(serde_json::json!({"id": "other"})).row_token()
        );
        assert!(a.row_token().chars().all(|c| c.is_ascii_hexdigit()));
    }
}
