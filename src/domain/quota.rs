//! Tenant quotas: limits on what a tenant's live resources consume, and the rule that
//! checks a write against them.
//!
//! A quota is a set of [`Limit`]s. Each limit caps one [`Dimension`] for resources of
//! one kind (or all kinds) in one zone (or all zones); what no limit caps is unlimited.
//! A resource consumes its footprint (`ResourceType::footprint`, from its type's
//! `x-quota` keywords), computed from its desired spec and the catalog attributes it
//! names; a tenant's usage is the sum over its live resources.
//! A write is refused when, for a limit it grows, usage plus the growth would pass the
//! limit ([`check`]). A write that grows nothing is never refused, even where usage
//! already passes a limit (limits may be lowered below usage).

use super::{Kind, ValidationError};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use utoipa::ToSchema;

/// What a limit counts.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Dimension {
    /// Resources (every kind).
    Count,
    /// Virtual CPUs of VMs and of cluster nodes, from their flavor's `vcpus`.
    Vcpus,
    /// Memory of VMs and of cluster nodes, in MiB, from their flavor's `memory_mb`.
    MemoryMb,
    /// Cluster nodes (`node_count`).
    Nodes,
    /// Volume capacity (`size_gb`).
    StorageGb,
}

impl Dimension {
    /// Every dimension.
    pub const ALL: [Dimension; 5] = [
        Dimension::Count,
        Dimension::Vcpus,
        Dimension::MemoryMb,
        Dimension::Nodes,
        Dimension::StorageGb,
    ];

    /// The name used in the API and in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Dimension::Count => "count",
            Dimension::Vcpus => "vcpus",
            Dimension::MemoryMb => "memory_mb",
            Dimension::Nodes => "nodes",
            Dimension::StorageGb => "storage_gb",
        }
    }

    /// Parses [`Dimension::as_str`] back.
    pub fn parse(s: &str) -> Option<Dimension> {
        Dimension::ALL.into_iter().find(|d| d.as_str() == s)
    }
}

/// An amount in every dimension: what one resource consumes, what a group of
/// resources consumes, or the change a write makes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Amounts {
    /// Resources.
    pub count: i64,
    /// Virtual CPUs.
    pub vcpus: i64,
    /// Memory, MiB.
    pub memory_mb: i64,
    /// Cluster nodes.
    pub nodes: i64,
    /// Volume capacity, GB.
    pub storage_gb: i64,
}

impl Amounts {
    /// The amount in dimension `d`.
    pub fn get(&self, d: Dimension) -> i64 {
        match d {
            Dimension::Count => self.count,
            Dimension::Vcpus => self.vcpus,
            Dimension::MemoryMb => self.memory_mb,
            Dimension::Nodes => self.nodes,
            Dimension::StorageGb => self.storage_gb,
        }
    }

    /// Adds `n` in dimension `d`, saturating.
    pub fn add(&mut self, d: Dimension, n: i64) {
        let slot = match d {
            Dimension::Count => &mut self.count,
            Dimension::Vcpus => &mut self.vcpus,
            Dimension::MemoryMb => &mut self.memory_mb,
            Dimension::Nodes => &mut self.nodes,
            Dimension::StorageGb => &mut self.storage_gb,
        };
        *slot = slot.saturating_add(n);
    }

    /// `self - other`, dimension by dimension: the change from `other` to `self`.
    pub fn minus(&self, other: &Amounts) -> Amounts {
        Amounts {
            count: self.count - other.count,
            vcpus: self.vcpus - other.vcpus,
            memory_mb: self.memory_mb - other.memory_mb,
            nodes: self.nodes - other.nodes,
            storage_gb: self.storage_gb - other.storage_gb,
        }
    }
}

/// One limit: at most `limit` of `dimension` for the live resources of `kind` (every
/// kind when `None`) in `zone` (every zone when `None`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Limit {
    /// What it counts.
    pub dimension: Dimension,
    /// The kind it is about; `null`: every kind.
    pub kind: Option<Kind>,
    /// The zone it is about; `null`: every zone.
    pub zone: Option<String>,
    /// The most that may be used.
    pub limit: i64,
}

impl Limit {
    /// Whether it covers resources of `kind` in `zone`.
    pub fn covers(&self, kind: &Kind, zone: &str) -> bool {
        self.kind.as_ref().is_none_or(|k| k == kind)
            && self.zone.as_deref().is_none_or(|z| z == zone)
    }

    /// How much of its dimension the resources it covers use.
    pub fn used(&self, usage: &[Usage]) -> i64 {
        usage
            .iter()
            .filter(|u| self.covers(&u.kind, &u.zone))
            .map(|u| u.amounts.get(self.dimension))
            .fold(0, i64::saturating_add)
    }

    fn scope(&self) -> String {
        let kind = self.kind.as_ref().map_or("every kind", |k| k.as_str());
        let zone = self.zone.as_deref().unwrap_or("every zone");
        format!("{kind} in {zone}")
    }
}

/// A limit as a client sends it, checked by [`validate`].
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LimitIn {
    /// `count`, `vcpus`, `memory_mb`, `nodes` or `storage_gb`.
    #[schema(example = "vcpus")]
    pub dimension: String,
    /// `vm`, `bm`, `cluster` or `volume`; every kind when absent or null.
    #[serde(default)]
    #[schema(example = "vm")]
    pub kind: Option<String>,
    /// A zone; every zone when absent or null.
    #[serde(default)]
    #[schema(example = "zone-a")]
    pub zone: Option<String>,
    /// The most that may be used, 0 or more.
    #[schema(example = 64)]
    pub limit: i64,
}

fn invalid(i: usize, field: &str, message: impl Into<String>) -> ValidationError {
    ValidationError::new("invalid_quota", format!("limits[{i}].{field}"), message)
}

/// Checks a client's limits: known dimensions and kinds, limits of 0 or more, a
/// dimension the kind consumes, and each (dimension, kind, zone) once. `dimensions_of`
/// gives the dimensions a registered kind consumes (`None`: no such kind). Zones are
/// checked against the database by the caller. Keeps the client's order.
pub fn validate(
    limits: &[LimitIn],
    dimensions_of: &dyn Fn(&Kind) -> Option<Vec<Dimension>>,
) -> Result<Vec<Limit>, ValidationError> {
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(limits.len());
    for (i, l) in limits.iter().enumerate() {
        let dimension = Dimension::parse(&l.dimension).ok_or_else(|| {
            let known: Vec<_> = Dimension::ALL.iter().map(|d| d.as_str()).collect();
            let known = known.join(", ");
            invalid(
                i,
                "dimension",
                format!("{:?} is not one of {known}", l.dimension),
            )
        })?;
        let kind = match &l.kind {
            None => None,
            Some(k) => {
                let unknown = || invalid(i, "kind", format!("{k:?} is not a registered kind"));
                let kind = k.parse::<Kind>().map_err(|_| unknown())?;
                let consumed = dimensions_of(&kind).ok_or_else(unknown)?;
                if !consumed.contains(&dimension) {
                    let why = format!("a {kind} consumes no {}", dimension.as_str());
                    return Err(invalid(i, "dimension", why));
                }
                Some(kind)
            }
        };
        if l.limit < 0 {
            return Err(invalid(
                i,
                "limit",
                format!("must be 0 or more, got {}", l.limit),
            ));
        }
        let limit = Limit {
            dimension,
            kind,
            zone: l.zone.clone(),
            limit: l.limit,
        };
        if !seen.insert((dimension, limit.kind.clone(), l.zone.clone())) {
            let why = format!(
                "a second {} limit for {}",
                dimension.as_str(),
                limit.scope()
            );
            return Err(ValidationError::new(
                "invalid_quota",
                format!("limits[{i}]"),
                why,
            ));
        }
        out.push(limit);
    }
    Ok(out)
}

/// Sorts limits the one way they are stored and shown: every kind before each kind,
/// every zone before each zone, then by dimension.
pub fn sort(limits: &mut [Limit]) {
    limits.sort_by(|a, b| {
        let key = |l: &Limit| (l.kind.clone(), l.zone.clone(), l.dimension);
        key(a).cmp(&key(b))
    });
}

/// What a tenant's live resources of one kind in one zone consume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Usage {
    /// The kind.
    pub kind: Kind,
    /// The zone.
    pub zone: String,
    /// Their sum.
    pub amounts: Amounts,
}

/// Adds what a write of a resource of `kind` in `zone` adds (`delta`) to `usage`: the
/// usage the next write checked in the same transaction sees.
pub fn add_usage(usage: &mut Vec<Usage>, kind: &Kind, zone: &str, delta: &Amounts) {
    let at = match usage.iter().position(|u| u.kind == *kind && u.zone == zone) {
        Some(at) => at,
        None => {
            usage.push(Usage {
                kind: kind.clone(),
                zone: zone.to_owned(),
                amounts: Amounts::default(),
            });
            usage.len() - 1
        }
    };
    for d in Dimension::ALL {
        usage[at].amounts.add(d, delta.get(d));
    }
}

/// A write that would take more than a limit allows. Serializes as the error's details.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
pub struct Exceeded {
    /// The dimension.
    pub dimension: Dimension,
    /// The limit's kind (`null`: every kind).
    pub kind: Option<Kind>,
    /// The limit's zone (`null`: every zone).
    pub zone: Option<String>,
    /// The limit.
    pub limit: i64,
    /// What the resources it covers use now.
    pub used: i64,
    /// What the write adds.
    pub requested: i64,
}

impl std::fmt::Display for Exceeded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let limit = Limit {
            dimension: self.dimension,
            kind: self.kind.clone(),
            zone: self.zone.clone(),
            limit: self.limit,
        };
        write!(
            f,
            "quota exceeded: {} of {} is limited to {}; {} used, this asks for {} more",
            self.dimension.as_str(),
            limit.scope(),
            self.limit,
            self.used,
            self.requested
        )
    }
}

/// The limits a write adding `delta` to a resource of `kind` in `zone` grows: those
/// that cover it, in a dimension where `delta` is positive. Only these need checking.
pub fn grown<'a>(limits: &'a [Limit], kind: &Kind, zone: &str, delta: &Amounts) -> Vec<&'a Limit> {
    limits
        .iter()
        .filter(|l| l.covers(kind, zone) && delta.get(l.dimension) > 0)
        .collect()
}

/// Checks a write that adds `delta` (see [`grown`]) against `usage`, the tenant's
/// usage before the write. `Ok` holds, for each grown limit, its dimension and how full
/// it is after the write (used / limit); `Err` names the first limit it would pass.
pub fn check(
    grown: &[&Limit],
    usage: &[Usage],
    delta: &Amounts,
) -> Result<Vec<(Dimension, f64)>, Exceeded> {
    let mut fill = Vec::with_capacity(grown.len());
    for l in grown {
        let used = l.used(usage);
        let requested = delta.get(l.dimension);
        let after = used.saturating_add(requested);
        if after > l.limit {
            return Err(Exceeded {
                dimension: l.dimension,
                kind: l.kind.clone(),
                zone: l.zone.clone(),
                limit: l.limit,
                used,
                requested,
            });
        }
        fill.push((l.dimension, after as f64 / l.limit as f64));
    }
    Ok(fill)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    /// What the built-in kinds consume, as their types' `x-quota` say.
    fn dimensions_of(kind: &Kind) -> Option<Vec<Dimension>> {
        use Dimension::*;
        Some(match kind.as_str() {
            "vm" => vec![Count, Vcpus, MemoryMb],
            "cluster" => vec![Count, Vcpus, MemoryMb, Nodes],
            "volume" => vec![Count, StorageGb],
            "bm" => vec![Count],
            _ => return None,
        })
    }

    fn limit(dimension: Dimension, kind: Option<Kind>, zone: Option<&str>, limit: i64) -> Limit {
        Limit {
            dimension,
            kind,
            zone: zone.map(str::to_owned),
            limit,
        }
    }

    fn validate_all(limits: &[LimitIn]) -> Result<Vec<Limit>, ValidationError> {
        validate(limits, &dimensions_of)
    }

    fn raw(value: Value) -> Vec<LimitIn> {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn limits_cover_their_kind_and_zone_only() {
        let usage = vec![
            Usage {
                kind: Kind::named("vm"),
                zone: "zone-a".into(),
                amounts: Amounts {
                    count: 2,
                    vcpus: 3,
                    ..Amounts::default()
                },
            },
            Usage {
                kind: Kind::named("cluster"),
                zone: "zone-b".into(),
                amounts: Amounts {
                    count: 1,
                    vcpus: 12,
                    nodes: 3,
                    ..Amounts::default()
                },
            },
        ];
        assert_eq!(limit(Dimension::Vcpus, None, None, 0).used(&usage), 15);
        assert_eq!(
            limit(Dimension::Vcpus, Some(Kind::named("vm")), None, 0).used(&usage),
            3
        );
        assert_eq!(
            limit(Dimension::Count, None, Some("zone-b"), 0).used(&usage),
            1
        );
        assert_eq!(
            limit(Dimension::Count, Some(Kind::named("vm")), Some("zone-b"), 0).used(&usage),
            0
        );
    }

    #[test]
    fn a_write_is_refused_only_where_it_grows_past_a_limit() {
        let limits = vec![
            limit(Dimension::Count, Some(Kind::named("vm")), Some("zone-a"), 2),
            limit(Dimension::Vcpus, None, None, 8),
        ];
        let usage = vec![Usage {
            kind: Kind::named("vm"),
            zone: "zone-a".into(),
            amounts: Amounts {
                count: 2,
                vcpus: 6,
                ..Amounts::default()
            },
        }];
        let new_vm = Amounts {
            count: 1,
            vcpus: 1,
            ..Amounts::default()
        };
        let grown_a = grown(&limits, &Kind::named("vm"), "zone-a", &new_vm);
        let err = check(&grown_a, &usage, &new_vm).unwrap_err();
        assert_eq!(
            (err.dimension, err.limit, err.used, err.requested),
            (Dimension::Count, 2, 2, 1)
        );
        assert_eq!(
            serde_json::to_value(&err).unwrap(),
            json!({"dimension": "count", "kind": "vm", "zone": "zone-a", "limit": 2, "used": 2, "requested": 1})
        );
        // Another zone: only the all-zones vCPU limit applies, and there is room.
        let grown_b = grown(&limits, &Kind::named("vm"), "zone-b", &new_vm);
        assert_eq!(
            check(&grown_b, &usage, &new_vm).unwrap(),
            vec![(Dimension::Vcpus, 7.0 / 8.0)]
        );
        // A resize to 3 more vCPUs passes the vCPU limit; a shrink never is refused,
        // even with usage over a limit.
        let bigger = Amounts {
            vcpus: 3,
            ..Amounts::default()
        };
        let grown_resize = grown(&limits, &Kind::named("vm"), "zone-a", &bigger);
        assert_eq!(
            check(&grown_resize, &usage, &bigger).unwrap_err().dimension,
            Dimension::Vcpus
        );
        let smaller = Amounts {
            vcpus: -3,
            ..Amounts::default()
        };
        assert!(grown(&limits, &Kind::named("vm"), "zone-a", &smaller).is_empty());
        assert!(check(&[], &usage, &smaller).unwrap().is_empty());
    }

    #[test]
    fn limits_are_validated_strictly() {
        let cases = [
            (
                json!([{"dimension": "cpus", "limit": 1}]),
                "limits[0].dimension",
            ),
            (
                json!([{"dimension": "count", "kind": "vms", "limit": 1}]),
                "limits[0].kind",
            ),
            (
                json!([{"dimension": "count", "limit": -1}]),
                "limits[0].limit",
            ),
            (
                json!([{"dimension": "count", "limit": 1}, {"dimension": "vcpus", "kind": "bm", "limit": 1}]),
                "limits[1].dimension",
            ),
            (
                json!([{"dimension": "storage_gb", "kind": "vm", "limit": 1}]),
                "limits[0].dimension",
            ),
            (
                json!([{"dimension": "count", "zone": "zone-a", "limit": 1}, {"dimension": "count", "zone": "zone-a", "limit": 2}]),
                "limits[1]",
            ),
        ];
        for (body, field) in cases {
            let err = validate_all(&raw(body.clone())).unwrap_err();
            assert_eq!(
                (err.code.as_ref(), err.field.as_str()),
                ("invalid_quota", field),
                "{body}"
            );
        }
        let ok = validate_all(&raw(json!([
            {"dimension": "count", "kind": "vm", "zone": "zone-a", "limit": 0},
            {"dimension": "count", "kind": "vm", "zone": null, "limit": 10},
            {"dimension": "nodes", "limit": 30},
        ])))
        .unwrap();
        assert_eq!(ok.len(), 3);
        assert_eq!(ok[1].zone, None);
    }

    #[test]
    fn limits_sort_from_broad_to_narrow() {
        let mut limits = vec![
            limit(Dimension::Count, Some(Kind::named("vm")), Some("zone-a"), 1),
            limit(Dimension::Vcpus, None, None, 1),
            limit(Dimension::Count, None, None, 1),
            limit(Dimension::Count, Some(Kind::named("vm")), None, 1),
        ];
        sort(&mut limits);
        let order: Vec<_> = limits
            .iter()
            .map(|l| (l.dimension, l.kind.clone(), l.zone.as_deref()))
            .collect();
        assert_eq!(
            order,
            [
                (Dimension::Count, None, None),
                (Dimension::Vcpus, None, None),
                (Dimension::Count, Some(Kind::named("vm")), None),
                (Dimension::Count, Some(Kind::named("vm")), Some("zone-a")),
            ]
        );
    }

    #[test]
    fn dimensions_round_trip() {
        for d in Dimension::ALL {
            assert_eq!(Dimension::parse(d.as_str()), Some(d));
            assert_eq!(serde_json::to_value(d).unwrap(), json!(d.as_str()));
        }
    }
}
