//! A simulated driver for every service: configurable latency and failure rates,
//! plausible status documents, and the idempotency a real driver must have.
//!
//! Rules useful in tests and demos, keyed on the resource's name:
//!
//! - a name starting with `fail-` always fails permanently with code `simulated_failure`,
//!   whatever the failure rate;
//! - a name starting with `slow-` takes three times the maximum latency.
//!
//! An attached volume's status names the host of its VM (`attached_host`), taken from
//! the `input.attach_target` the consume loop adds after asking the gateway about the VM
//! (see [`crate::peers`]).

use super::{Driver, DriverError};
use crate::peers::ATTACH_TARGET_KEY;
use gateway_proto::Dispatch;
use rand::Rng;
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;
use uuid::Uuid;

/// How many finished operations a [`SimDriver`] remembers. Beyond that it forgets the
/// oldest, so a long demo does not grow without bound; a redelivery that old is not
/// going to happen.
const REMEMBERED_OPERATIONS: usize = 100_000;

/// Behaviour of a [`SimDriver`].
#[derive(Debug, Clone, PartialEq)]
pub struct SimConfig {
    /// Shortest time an operation takes.
    pub min_latency: Duration,
    /// Longest time an operation takes (`slow-` resources take three times this).
    pub max_latency: Duration,
    /// Probability, 0 to 1, that an operation fails permanently (`simulated_failure`).
    pub failure_rate: f64,
    /// Probability, 0 to 1, that an execution fails transiently (retried by the loop).
    pub transient_failure_rate: f64,
}

impl Default for SimConfig {
    /// The worker binary's defaults: 200 ms to 1.5 s, never failing.
    fn default() -> Self {
        Self {
            min_latency: Duration::from_millis(200),
            max_latency: Duration::from_millis(1500),
            failure_rate: 0.0,
            transient_failure_rate: 0.0,
        }
    }
}

/// A simulated backend for any service, idempotent per operation ID.
///
/// It remembers the outcome of every finished operation (success or permanent failure),
/// so a redelivered operation gets the same answer without a second effect; see
/// [`SimDriver::executions`] and [`SimDriver::effects`]. Transient failures are not
/// remembered: the next execution tries again. Cloning shares the memory.
#[derive(Debug, Clone)]
pub struct SimDriver {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: SimConfig,
    /// Live resources a zone can hold; `None` for unlimited.
    capacity_per_zone: Option<u32>,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    ops: HashMap<Uuid, OpRecord>,
    /// Finished operations, oldest first, for forgetting.
    finished: VecDeque<Uuid>,
    /// Resources created and not deleted, per zone: what capacity counts.
    live: HashMap<String, HashSet<Uuid>>,
}

#[derive(Debug, Default)]
struct OpRecord {
    executions: u32,
    effects: u32,
    outcome: Option<Result<Value, DriverError>>,
}

impl SimDriver {
    /// A driver with unlimited capacity.
    pub fn new(config: SimConfig) -> Self {
        Self::build(config, None)
    }

    /// A driver whose every zone holds at most `per_zone` live resources: a `create`
    /// beyond that fails permanently with `capacity_exhausted`; a `delete` frees a slot.
    /// Only resources created through this driver count.
    pub fn with_capacity(config: SimConfig, per_zone: u32) -> Self {
        Self::build(config, Some(per_zone))
    }

    fn build(config: SimConfig, capacity_per_zone: Option<u32>) -> Self {
        Self {
            inner: Arc::new(Inner {
                config,
                capacity_per_zone,
                state: Mutex::new(State::default()),
            }),
        }
    }

    /// How many times [`Driver::execute`] ran for operation `op`.
    pub fn executions(&self, op: Uuid) -> u32 {
        self.state().ops.get(&op).map_or(0, |r| r.executions)
    }

    /// How many times operation `op` had a real effect: at most 1.
    pub fn effects(&self, op: Uuid) -> u32 {
        self.state().ops.get(&op).map_or(0, |r| r.effects)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding the lock; if something did, the counters are
        // still consistent enough for a simulator.
        self.inner
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn latency(&self, name: &str) -> Duration {
        let SimConfig {
            min_latency,
            max_latency,
            ..
        } = self.inner.config;
        if name.starts_with("slow-") {
            return max_latency.saturating_mul(3);
        }
        if max_latency <= min_latency {
            return min_latency;
        }
        rand::rng().random_range(min_latency..=max_latency)
    }
}

impl Driver for SimDriver {
    async fn execute(&self, op: &Dispatch) -> Result<Value, DriverError> {
        {
            let mut state = self.state();
            let record = state.ops.entry(op.operation_id).or_default();
            record.executions += 1;
            if let Some(outcome) = &record.outcome {
                return outcome.clone();
            }
        }

        tokio::time::sleep(self.latency(&op.name)).await;

        let (fail, transient) = {
            let mut rng = rand::rng();
            (
                rng.random::<f64>() < self.inner.config.failure_rate,
                rng.random::<f64>() < self.inner.config.transient_failure_rate,
            )
        };
        if op.name.starts_with("fail-") || fail {
            let outcome = Err(DriverError::permanent(
                "simulated_failure",
                format!("simulated failure of {} {} {}", op.action, op.kind, op.name),
            ));
            return self.finish(op, outcome);
        }
        if transient {
            return Err(DriverError::Transient(format!(
                "simulated transient failure of {} {} {}",
                op.action, op.kind, op.name
            )));
        }
        self.finish(op, Ok(status(op)))
    }
}

impl SimDriver {
    /// Records the outcome of `op` unless a concurrent execution of the same operation
    /// got there first, in which case its outcome wins and this one has no effect.
    fn finish(
        &self,
        op: &Dispatch,
        outcome: Result<Value, DriverError>,
    ) -> Result<Value, DriverError> {
        let mut guard = self.state();
        let state = &mut *guard;
        if let Some(done) = state
            .ops
            .get(&op.operation_id)
            .and_then(|r| r.outcome.clone())
        {
            return done;
        }
        let outcome = outcome.and_then(|status| {
            let live = state.live.entry(op.zone.clone()).or_default();
            match op.action.as_str() {
                "create" if !live.contains(&op.resource_id) => {
                    if let Some(cap) = self.inner.capacity_per_zone {
                        if live.len() >= cap as usize {
                            return Err(DriverError::permanent(
                                "capacity_exhausted",
                                format!("zone {} has no capacity left for a {}", op.zone, op.kind),
                            ));
                        }
                    }
                    live.insert(op.resource_id);
                }
                "delete" => {
                    live.remove(&op.resource_id);
                }
                _ => {}
            }
            Ok(status)
        });
        let record = state.ops.entry(op.operation_id).or_default();
        if outcome.is_ok() {
            record.effects += 1;
        }
        record.outcome = Some(outcome.clone());
        state.finished.push_back(op.operation_id);
        while state.finished.len() > REMEMBERED_OPERATIONS {
            if let Some(old) = state.finished.pop_front() {
                state.ops.remove(&old);
            }
        }
        outcome
    }
}

/// The observed status after `op` succeeded, derived deterministically from it.
fn status(op: &Dispatch) -> Value {
    if op.action.is_delete() {
        return json!({});
    }
    let spec = |key: &str| op.spec.get(key).cloned().unwrap_or(Value::Null);
    // Bytes 10..16 are random in both v4 and v7 UUIDs (the start of a v7 is a timestamp).
    let b = op.resource_id.as_bytes();
    let mut status = match op.kind.as_str() {
        "vm" => json!({
            "power_state": op.spec.get("power_state").cloned().unwrap_or_else(|| {
                json!(if op.action == "stop" { "stopped" } else { "running" })
            }),
            "flavor": spec("flavor"),
            "image": spec("image"),
            "ip": format!("10.{}.{}.{}", b[13], b[14], b[15] % 254 + 1),
            "host": format!("{}-host-{}", op.zone, b[12] % 16 + 1),
        }),
        "bm" => json!({
            "power_state": op.spec.get("power_state").cloned().unwrap_or_else(|| {
                json!(if op.action == "power_off" { "off" } else { "on" })
            }),
            "machine_class": spec("machine_class"),
            "image": spec("image"),
            "bmc_address": format!("10.254.{}.{}", b[14], b[15] % 254 + 1),
        }),
        "cluster" => json!({
            "version": spec("version"),
            "node_count": spec("node_count"),
            "nodes_ready": spec("node_count"),
            "api_endpoint": format!("https://{}.{}.k8s.internal:6443", op.name, op.zone),
        }),
        "volume" => {
            let attached_to = spec("attached_to");
            let (device, host) = if attached_to.is_null() {
                (Value::Null, Value::Null)
            } else {
                // What the consume loop read about the VM (`crate::peers`); the host is
                // null while the VM has none, or when nobody looked it up.
                let host = op
                    .input
                    .pointer(&format!("/{ATTACH_TARGET_KEY}/host"))
                    .cloned()
                    .unwrap_or(Value::Null);
                (json!("/dev/vdb"), host)
            };
            json!({
                "size_gb": spec("size_gb"),
                "class": spec("class"),
                "attached_to": attached_to,
                "attached_host": host,
                "device": device,
            })
        }
        // A kind this simulator has no model of: it reports the spec as observed, so a
        // newly registered kind works end to end before its real driver exists.
        _ => json!({"observed": op.spec}),
    };
    if let Some(map) = status.as_object_mut() {
        map.insert("generation".into(), json!(op.generation));
    }
    status
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use chrono::Utc;
    use gateway_proto::{Action, Kind, Service};

    pub(crate) fn instant() -> SimConfig {
        SimConfig {
            min_latency: Duration::ZERO,
            max_latency: Duration::ZERO,
            failure_rate: 0.0,
            transient_failure_rate: 0.0,
        }
    }

    /// The service of a built-in kind, as the gateway's registry has it.
    pub(crate) fn service_of(kind: &Kind) -> Service {
        Service::named(match kind.as_str() {
            "cluster" => "k8s",
            "volume" => "storage",
            other => other,
        })
    }

    pub(crate) fn dispatch(kind: Kind, action: Action, name: &str, spec: Value) -> Dispatch {
        Dispatch {
            operation_id: Uuid::now_v7(),
            tenant: "acme".into(),
            resource_id: Uuid::now_v7(),
            kind,
            zone: "zone-a".into(),
            name: name.into(),
            action,
            generation: 3,
            spec,
            input: json!({}),
            deadline: Utc::now() + chrono::Duration::minutes(5),
        }
    }

    /// A `create` of the VM `name` (`m1.small`, `debian-12`, running).
    pub(crate) fn vm(name: &str) -> Dispatch {
        dispatch(
            Kind::named("vm"),
            Action::create(),
            name,
            json!({"flavor": "m1.small", "image": "debian-12", "power_state": "running"}),
        )
    }

    #[tokio::test]
    async fn a_redelivered_operation_executes_twice_but_creates_once() {
        let driver = SimDriver::new(instant());
        let op = vm("web-1");
        let first = driver.execute(&op).await.unwrap();
        let second = driver.clone().execute(&op).await.unwrap();
        assert_eq!(first, second);
        assert_eq!(driver.executions(op.operation_id), 2);
        assert_eq!(driver.effects(op.operation_id), 1);
        assert_eq!(driver.executions(Uuid::now_v7()), 0);
    }

    #[tokio::test]
    async fn concurrent_duplicates_have_one_effect() {
        let driver = SimDriver::new(SimConfig {
            max_latency: Duration::from_millis(3),
            ..instant()
        });
        let op = vm("web-1");
        let (a, b) = tokio::join!(driver.execute(&op), driver.execute(&op));
        assert_eq!(a.unwrap(), b.unwrap());
        assert_eq!(driver.executions(op.operation_id), 2);
        assert_eq!(driver.effects(op.operation_id), 1);
    }

    #[tokio::test]
    async fn fail_names_fail_permanently_whatever_the_rate() {
        let driver = SimDriver::new(instant());
        let op = vm("fail-web");
        let err = driver.execute(&op).await.unwrap_err();
        assert!(matches!(&err, DriverError::Permanent { code, .. } if code == "simulated_failure"));
        assert_eq!(driver.execute(&op).await.unwrap_err(), err);
        assert_eq!(driver.effects(op.operation_id), 0);
    }

    #[tokio::test]
    async fn failure_rates_of_one_always_fail() {
        let permanent = SimDriver::new(SimConfig {
            failure_rate: 1.0,
            ..instant()
        });
        assert!(!permanent
            .execute(&vm("a"))
            .await
            .unwrap_err()
            .is_transient());

        let transient = SimDriver::new(SimConfig {
            transient_failure_rate: 1.0,
            ..instant()
        });
        let op = vm("b");
        assert!(transient.execute(&op).await.unwrap_err().is_transient());
        assert!(transient.execute(&op).await.unwrap_err().is_transient());
        assert_eq!(transient.executions(op.operation_id), 2);
        assert_eq!(transient.effects(op.operation_id), 0);
    }

    #[test]
    fn slow_names_take_three_times_the_maximum_latency() {
        let driver = SimDriver::new(SimConfig {
            min_latency: Duration::from_millis(1),
            max_latency: Duration::from_millis(2),
            ..instant()
        });
        assert_eq!(driver.latency("slow-db"), Duration::from_millis(6));
        let normal = driver.latency("db");
        assert!(normal >= Duration::from_millis(1) && normal <= Duration::from_millis(2));
    }

    #[test]
    fn statuses_have_a_plausible_shape_per_kind() {
        let op = vm("web-1");
        let s = status(&op);
        assert_eq!(s["power_state"], "running");
        assert_eq!(s["flavor"], "m1.small");
        assert_eq!(s["image"], "debian-12");
        assert_eq!(s["generation"], 3);
        assert!(s["ip"].as_str().unwrap().starts_with("10."));
        assert!(s["host"].as_str().unwrap().starts_with("zone-a-host-"));
        assert_eq!(status(&op), s, "derived deterministically");

        let stopped = dispatch(
            Kind::named("vm"),
            Action::named("stop"),
            "web-2",
            json!({"flavor": "m1.small"}),
        );
        assert_eq!(status(&stopped)["power_state"], "stopped");

        let bm = dispatch(
            Kind::named("bm"),
            Action::create(),
            "metal-1",
            json!({"machine_class": "bm.standard", "image": "debian-12", "power_state": "on"}),
        );
        let s = status(&bm);
        assert_eq!(s["power_state"], "on");
        assert_eq!(s["machine_class"], "bm.standard");
        assert!(s["bmc_address"].is_string());
        assert_eq!(s["generation"], 3);

        let cluster = dispatch(
            Kind::named("cluster"),
            Action::named("scale"),
            "prod",
            json!({"version": "1.31", "node_count": 5, "node_flavor": "m1.large"}),
        );
        let s = status(&cluster);
        assert_eq!(s["version"], "1.31");
        assert_eq!(s["node_count"], 5);
        assert_eq!(s["nodes_ready"], 5);
        assert_eq!(s["api_endpoint"], "https://prod.zone-a.k8s.internal:6443");

        let vm_id = Uuid::now_v7();
        let attached = dispatch(
            Kind::named("volume"),
            Action::named("attach"),
            "data",
            json!({"size_gb": 20, "class": "ssd", "attached_to": vm_id}),
        );
        let s = status(&attached);
        assert_eq!(s["size_gb"], 20);
        assert_eq!(s["class"], "ssd");
        assert_eq!(s["attached_to"], vm_id.to_string());
        assert_eq!(s["device"], "/dev/vdb");
        assert_eq!(s["attached_host"], Value::Null, "nobody looked the VM up");
        let mut looked_up = attached.clone();
        looked_up.input = json!({"vm_id": vm_id, "attach_target": {
            "id": vm_id, "zone": "zone-a", "host": "zone-a-host-3", "phase": "ready"
        }});
        let s = status(&looked_up);
        assert_eq!(s["attached_host"], "zone-a-host-3");
        assert_eq!(s["attached_to"], vm_id.to_string());
        let detached = dispatch(
            Kind::named("volume"),
            Action::create(),
            "d",
            json!({"size_gb": 1, "class": "ssd"}),
        );
        assert_eq!(status(&detached)["attached_to"], Value::Null);
        assert_eq!(status(&detached)["device"], Value::Null);
        assert_eq!(status(&detached)["attached_host"], Value::Null);

        let delete = dispatch(
            Kind::named("vm"),
            Action::delete(),
            "web-1",
            json!({"flavor": "m1.small"}),
        );
        assert_eq!(status(&delete), json!({}));
    }

    #[tokio::test]
    async fn a_zone_out_of_capacity_refuses_creates_until_a_delete() {
        let driver = SimDriver::with_capacity(instant(), 1);
        let first = vm("a");
        driver.execute(&first).await.unwrap();
        let err = driver.execute(&vm("b")).await.unwrap_err();
        assert!(matches!(err, DriverError::Permanent { code, .. } if code == "capacity_exhausted"));

        let mut delete = vm("a");
        delete.action = Action::delete();
        delete.resource_id = first.resource_id;
        driver.execute(&delete).await.unwrap();
        driver.execute(&vm("c")).await.unwrap();
    }
}
