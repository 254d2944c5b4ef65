//! A typed client for the gateway's HTTP API (`/v1`).
//!
//! Every route is a method of [`Client`] with typed inputs and outputs ([`types`]).
//! Failures are an [`Error`]; the API's own carry its `code`. Answers `429` and `503`
//! (where the gateway wrote nothing) are retried a bounded number of times, after the
//! delay `Retry-After` asks for (capped), else with exponential backoff. Resource writes
//! send a fresh `Idempotency-Key` (a UUID v4) that stays the same across that call's
//! retries, so a retried create never makes a second resource. [`Client::wait`] follows
//! an operation with the long-poll `GET /v1/operations/{id}?wait=30s` until it ends.
//!
//! ```no_run
//! # async fn demo() -> Result<(), gateway_client::Error> {
//! use gateway_client::{Client, NewResource};
//! let gw = Client::new("http://127.0.0.1:8080", "gw_…");
//! let op = gw
//!     .create_resource("acme", "vms", &NewResource {
//!         name: "web-1".into(),
//!         zone: "zone-a".into(),
//!         spec: serde_json::json!({"flavor": "m1.small", "image": "debian-12"}),
//!         labels: Default::default(),
//!     })
//!     .await?;
//! let done = gw.wait(op.id, std::time::Duration::from_secs(300)).await?;
//! println!("{}", done.state);
//! # Ok(()) }
//! ```

pub mod error;
pub mod types;

#[cfg(test)]
mod contract;

pub use error::{parse_retry_after, Error};
pub use gateway_proto::events::{CloudEvent, EventType};
pub use gateway_proto::{
    Action, Kind, OperationError, OperationState, Phase, Report, ReportAck, Service,
};
pub use types::*;

use backon::{ExponentialBuilder, Retryable};
use reqwest::header::{HeaderMap, HeaderValue, ETAG, IF_MATCH, LOCATION, RETRY_AFTER};
use reqwest::Method;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use std::time::Duration;
use uuid::Uuid;

/// Region redirects followed for one request at most (one is enough: the region that
/// answers holds the thing).
const MAX_REGION_REDIRECTS: usize = 3;

/// A call's result.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// How long one long-poll asks the gateway to hold the request.
pub const LONG_POLL: Duration = Duration::from_secs(30);

/// A client of one gateway with one key. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    key: String,
    retries: usize,
    max_retry_wait: Duration,
    fresh_reads: bool,
}

/// One request, as sent (again, on a retry).
struct Call<'a> {
    method: Method,
    path: String,
    query: Vec<(&'static str, String)>,
    body: Option<Value>,
    idempotency_key: Option<String>,
    if_match: Option<&'a str>,
    /// Asks for a read from the database (`Cache-Control: no-cache`).
    fresh: bool,
    /// The ETag the caller holds (`If-None-Match`): `304` if it is still current.
    if_none_match: Option<&'a str>,
}

impl<'a> Call<'a> {
    fn new(method: Method, path: String) -> Self {
        Self {
            method,
            path,
            query: Vec::new(),
            body: None,
            idempotency_key: None,
            if_match: None,
            fresh: false,
            if_none_match: None,
        }
    }

    fn body(mut self, body: impl Serialize) -> Result<Self> {
        self.body = Some(serde_json::to_value(body).map_err(|e| Error::Decode(e.to_string()))?);
        Ok(self)
    }

    fn query(mut self, query: Vec<(&'static str, String)>) -> Self {
        self.query = query;
        self
    }

    /// A read by ID: from the database itself if `fresh` (else the gateway may answer
    /// from its read cache).
    fn read(mut self, fresh: bool) -> Self {
        self.fresh = fresh;
        self
    }

    /// A resource write: a fresh idempotency key, and `If-Match` if given.
    fn write(mut self, if_match: Option<&'a str>) -> Self {
        self.idempotency_key = Some(Uuid::new_v4().to_string());
        self.if_match = if_match;
        self
    }
}

/// A successful answer (or `304 Not Modified`, to a read that sent `If-None-Match`).
struct Answer {
    status: reqwest::StatusCode,
    headers: HeaderMap,
    body: Vec<u8>,
}

impl Answer {
    fn json<T: DeserializeOwned>(&self) -> Result<T> {
        serde_json::from_slice(&self.body).map_err(|e| Error::Decode(e.to_string()))
    }
}

impl Client {
    /// A client of the gateway at `base_url` (for example `http://127.0.0.1:8080`),
    /// authenticating with `key`.
    pub fn new(base_url: impl Into<String>, key: impl Into<String>) -> Self {
        let http = reqwest::Client::builder()
            // Long-polls hold a request for up to 60 s.
            .timeout(Duration::from_secs(90))
            .connect_timeout(Duration::from_secs(10))
            // The gateway closes a kept-alive connection idle past its header timeout
            // (10 s by default); a request sent on it just then would be reset.
            .pool_idle_timeout(Duration::from_secs(5))
            // Region redirects are followed by `once`, with the key.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("a client without TLS options builds");
        Self::with_http(http, base_url, key)
    }

    /// A client on a `reqwest::Client` of your own (timeouts, proxies); its timeout must
    /// exceed [`LONG_POLL`] for [`Client::wait`], and it should not follow redirects
    /// (`reqwest::redirect::Policy::none()`): this client follows the gateway's region
    /// redirects itself, keeping the key that `reqwest` would drop.
    pub fn with_http(
        http: reqwest::Client,
        base_url: impl Into<String>,
        key: impl Into<String>,
    ) -> Self {
        Self {
            http,
            base: base_url.into().trim_end_matches('/').to_owned(),
            key: key.into(),
            retries: 4,
            max_retry_wait: Duration::from_secs(30),
            fresh_reads: false,
        }
    }

    /// Whether reads of one resource or operation ask the gateway for its database's
    /// answer (`Cache-Control: no-cache`) rather than its read cache (default: no). A
    /// gateway sees its own writes at once and other gateways' within about a
    /// millisecond; ask for fresh reads when you write through one gateway and must read
    /// the result through another at once (behind a load balancer, say).
    pub fn with_fresh_reads(mut self, fresh: bool) -> Self {
        self.fresh_reads = fresh;
        self
    }

    /// How many times `429` and `503` are retried (default 4; 0 turns retries off), and
    /// the longest a single `Retry-After` is honoured (default 30 s).
    pub fn with_retries(mut self, retries: usize, max_wait: Duration) -> Self {
        self.retries = retries;
        self.max_retry_wait = max_wait;
        self
    }

    /// The gateway's base URL.
    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// Sends `call` once, following the gateway's `307 other_region` redirects (to the
    /// region that holds the zone, resource or operation) with the same method, body and
    /// key. The redirects are followed here rather than by `reqwest`, which drops the
    /// `Authorization` header when a redirect leaves the origin: every region of one
    /// installation accepts the same keys.
    async fn once(&self, call: &Call<'_>) -> Result<Answer> {
        let mut url = format!("{}{}", self.base, call.path);
        let mut query = Some(&call.query);
        for _ in 0..=MAX_REGION_REDIRECTS {
            let res = self.attempt(call, &url, query).await?;
            let status = res.status();
            let headers = res.headers().clone();
            let location = headers
                .get(LOCATION)
                .and_then(|v| v.to_str().ok())
                .filter(|l| l.starts_with("http://") || l.starts_with("https://"));
            if status == reqwest::StatusCode::TEMPORARY_REDIRECT {
                if let Some(next) = location {
                    // The Location already carries the query string.
                    url = next.to_owned();
                    query = None;
                    continue;
                }
            }
            let body = res.bytes().await?.to_vec();
            let unchanged =
                status == reqwest::StatusCode::NOT_MODIFIED && call.if_none_match.is_some();
            if status.is_success() || unchanged {
                return Ok(Answer {
                    status,
                    headers,
                    body,
                });
            }
            let retry_after = headers
                .get(RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| parse_retry_after(v, chrono::Utc::now()));
            return Err(Error::from_answer(status.as_u16(), retry_after, &body));
        }
        Err(Error::Decode(format!(
            "more than {MAX_REGION_REDIRECTS} region redirects, last to {url}"
        )))
    }

    async fn attempt(
        &self,
        call: &Call<'_>,
        url: &str,
        query: Option<&Vec<(&'static str, String)>>,
    ) -> Result<reqwest::Response> {
        let mut req = self
            .http
            .request(call.method.clone(), url)
            .bearer_auth(&self.key);
        if let Some(query) = query.filter(|q| !q.is_empty()) {
            req = req.query(query);
        }
        if let Some(body) = &call.body {
            req = req.json(body);
        }
        if let Some(key) = &call.idempotency_key {
            req = req.header("Idempotency-Key", key);
        }
        if call.fresh {
            req = req.header(reqwest::header::CACHE_CONTROL, "no-cache");
        }
        if let Some(tag) = call.if_none_match {
            req = req.header(reqwest::header::IF_NONE_MATCH, tag);
        }
        if let Some(tag) = call.if_match {
            req = req.header(IF_MATCH, tag);
        }
        Ok(req.send().await?)
    }

    async fn send(&self, call: Call<'_>) -> Result<Answer> {
        let backoff = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(200))
            .with_max_delay(Duration::from_secs(5))
            .with_max_times(self.retries)
            .with_jitter();
        let cap = self.max_retry_wait;
        (|| self.once(&call))
            .retry(backoff)
            .when(Error::is_retryable)
            // Retry-After replaces the backoff's delay, but never extends the number of
            // tries: `None` (backoff exhausted) stays `None`.
            .adjust(move |e, delay| delay.map(|d| e.retry_after().map_or(d, |r| r.min(cap))))
            .await
    }

    async fn json<T: DeserializeOwned>(&self, call: Call<'_>) -> Result<T> {
        self.send(call).await?.json()
    }

    // --- Tenants -----------------------------------------------------------------

    /// `POST /v1/tenants` (admins).
    pub async fn create_tenant(&self, id: &str, display_name: &str) -> Result<Tenant> {
        let body = NewTenant {
            id: id.to_owned(),
            display_name: display_name.to_owned(),
        };
        self.json(Call::new(Method::POST, "/v1/tenants".into()).body(body)?)
            .await
    }

    /// `GET /v1/tenants`: the tenants this key may read.
    pub async fn list_tenants(&self) -> Result<Vec<Tenant>> {
        self.json(Call::new(Method::GET, "/v1/tenants".into()))
            .await
    }

    /// `GET /v1/tenants/{tenant}`.
    pub async fn get_tenant(&self, tenant: &str) -> Result<Tenant> {
        self.json(Call::new(Method::GET, format!("/v1/tenants/{tenant}")))
            .await
    }

    // --- Keys ----------------------------------------------------------------------

    /// `POST /v1/tenants/{tenant}/keys`: the secret is in the answer only.
    pub async fn create_key(&self, tenant: &str, key: &NewKeyRequest) -> Result<NewKey> {
        let call = Call::new(Method::POST, format!("/v1/tenants/{tenant}/keys")).body(key)?;
        self.json(call).await
    }

    /// `GET /v1/tenants/{tenant}/keys`.
    pub async fn list_keys(&self, tenant: &str) -> Result<Vec<KeyInfo>> {
        self.json(Call::new(Method::GET, format!("/v1/tenants/{tenant}/keys")))
            .await
    }

    /// `DELETE /v1/tenants/{tenant}/keys/{id}`.
    pub async fn revoke_key(&self, tenant: &str, id: Uuid) -> Result<()> {
        let path = format!("/v1/tenants/{tenant}/keys/{id}");
        self.send(Call::new(Method::DELETE, path)).await.map(drop)
    }

    /// `GET /v1/keys`: platform keys (admin and worker keys; admins).
    pub async fn list_platform_keys(&self) -> Result<Vec<KeyInfo>> {
        self.json(Call::new(Method::GET, "/v1/keys".into())).await
    }

    /// `DELETE /v1/keys/{id}`: revokes any key (admins).
    pub async fn revoke_any_key(&self, id: Uuid) -> Result<()> {
        let call = Call::new(Method::DELETE, format!("/v1/keys/{id}"));
        self.send(call).await.map(drop)
    }

    // --- Resources -----------------------------------------------------------------

    fn resources(tenant: &str, plural: &str) -> String {
        format!("/v1/tenants/{tenant}/{plural}")
    }

    fn resource(tenant: &str, plural: &str, id: Uuid) -> String {
        format!("{}/{id}", Self::resources(tenant, plural))
    }

    /// `POST /v1/tenants/{tenant}/{plural}`: the create operation.
    pub async fn create_resource(
        &self,
        tenant: &str,
        plural: &str,
        resource: &NewResource,
    ) -> Result<Operation> {
        let call = Call::new(Method::POST, Self::resources(tenant, plural))
            .body(resource)?
            .write(None);
        self.json(call).await
    }

    /// `GET /v1/tenants/{tenant}/{plural}/{id}`, with its `ETag` in `etag`.
    pub async fn get_resource(&self, tenant: &str, plural: &str, id: Uuid) -> Result<Resource> {
        let call =
            Call::new(Method::GET, Self::resource(tenant, plural, id)).read(self.fresh_reads);
        Self::resource_of(self.send(call).await?)
    }

    /// [`Client::get_resource`] unless `etag` (one it returned) is still the resource's
    /// version: then `None`, the gateway having answered `304 Not Modified` without the
    /// body. For polling a resource.
    pub async fn get_resource_if_changed(
        &self,
        tenant: &str,
        plural: &str,
        id: Uuid,
        etag: &str,
    ) -> Result<Option<Resource>> {
        let mut call =
            Call::new(Method::GET, Self::resource(tenant, plural, id)).read(self.fresh_reads);
        call.if_none_match = Some(etag);
        let answer = self.send(call).await?;
        if answer.status == reqwest::StatusCode::NOT_MODIFIED {
            return Ok(None);
        }
        Self::resource_of(answer).map(Some)
    }

    /// The resource in `answer`, with its `ETag`.
    fn resource_of(answer: Answer) -> Result<Resource> {
        let mut resource: Resource = answer.json()?;
        resource.etag = answer
            .headers
            .get(ETAG)
            .and_then(|v: &HeaderValue| v.to_str().ok())
            .map(str::to_owned);
        Ok(resource)
    }

    /// `GET /v1/tenants/{tenant}/{plural}`: one page.
    pub async fn list_resources(
        &self,
        tenant: &str,
        plural: &str,
        query: &ResourceQuery,
    ) -> Result<Page<Resource>> {
        let call = Call::new(Method::GET, Self::resources(tenant, plural)).query(query.pairs());
        self.json(call).await
    }

    /// `PATCH /v1/tenants/{tenant}/{plural}/{id}`: spec merge patch and/or labels;
    /// conditional on `if_match` (an ETag) if given.
    pub async fn patch_resource(
        &self,
        tenant: &str,
        plural: &str,
        id: Uuid,
        patch: &ResourcePatch,
        if_match: Option<&str>,
    ) -> Result<Operation> {
        let call = Call::new(Method::PATCH, Self::resource(tenant, plural, id))
            .body(patch)?
            .write(if_match);
        self.json(call).await
    }

    /// `DELETE /v1/tenants/{tenant}/{plural}/{id}`: the delete operation.
    pub async fn delete_resource(
        &self,
        tenant: &str,
        plural: &str,
        id: Uuid,
        if_match: Option<&str>,
    ) -> Result<Operation> {
        let call = Call::new(Method::DELETE, Self::resource(tenant, plural, id)).write(if_match);
        self.json(call).await
    }

    /// `POST /v1/tenants/{tenant}/{plural}/{id}/actions/{action}` with its input (`{}` for
    /// actions without one).
    pub async fn action(
        &self,
        tenant: &str,
        plural: &str,
        id: Uuid,
        action: Action,
        input: &Value,
        if_match: Option<&str>,
    ) -> Result<Operation> {
        let path = format!("{}/actions/{action}", Self::resource(tenant, plural, id));
        let call = Call::new(Method::POST, path).body(input)?.write(if_match);
        self.json(call).await
    }

    // --- Operations ----------------------------------------------------------------

    /// `GET /v1/operations/{id}`.
    pub async fn get_operation(&self, id: Uuid) -> Result<Operation> {
        let call = Call::new(Method::GET, format!("/v1/operations/{id}")).read(self.fresh_reads);
        self.json(call).await
    }

    /// `GET /v1/operations/{id}?wait=…`: answers when the state changes, or after
    /// `wait` (the gateway caps it at 60 s).
    pub async fn poll_operation(&self, id: Uuid, wait: Duration) -> Result<Operation> {
        let wait = format!("{}ms", wait.as_millis().max(1));
        let call =
            Call::new(Method::GET, format!("/v1/operations/{id}")).query(vec![("wait", wait)]);
        self.json(call).await
    }

    /// `GET /v1/operations/{id}?wait=…&until=done`: answers when the operation has
    /// ended, or after `wait` (the gateway caps it at 60 s) with the operation as it is.
    pub async fn poll_until_done(&self, id: Uuid, wait: Duration) -> Result<Operation> {
        let wait = format!("{}ms", wait.as_millis().max(1));
        let call = Call::new(Method::GET, format!("/v1/operations/{id}"))
            .query(vec![("wait", wait), ("until", "done".to_owned())]);
        self.json(call).await
    }

    /// Follows an operation with long-polls (`until=done`: one request per
    /// [`LONG_POLL`], not one per state) until it ends (any final state: check `state`),
    /// or fails with [`Error::TimedOut`] once `timeout` has passed, even if the gateway
    /// holds a request without answering. Any timeout will do, `Duration::MAX` too
    /// (waiting as long as it takes). Against a gateway that does not know `until`
    /// (older than this client), it follows every change instead.
    pub async fn wait(&self, id: Uuid, timeout: Duration) -> Result<Operation> {
        within(timeout, self.wait_until_done(id, deadline(timeout))).await
    }

    /// Like [`Client::wait`], calling `seen` with every answer (a state change, or the
    /// same state again after a long-poll ran out), for progress displays.
    pub async fn wait_with(
        &self,
        id: Uuid,
        timeout: Duration,
        seen: impl FnMut(&Operation),
    ) -> Result<Operation> {
        within(timeout, self.wait_for_changes(id, deadline(timeout), seen)).await
    }

    /// [`Client::wait`]'s loop, until `deadline` (`None`: none).
    async fn wait_until_done(&self, id: Uuid, deadline: Deadline) -> Result<Operation> {
        loop {
            let op = match self
                .poll_until_done(id, time_left(deadline).min(LONG_POLL))
                .await
            {
                Err(e) if e.code() == Some("invalid_query") => {
                    return self.wait_for_changes(id, deadline, |_| {}).await;
                }
                answer => answer?,
            };
            if op.done {
                return Ok(op);
            }
            if time_left(deadline).is_zero() {
                return Err(Error::TimedOut);
            }
        }
    }

    /// [`Client::wait_with`]'s loop, until `deadline` (`None`: none).
    async fn wait_for_changes(
        &self,
        id: Uuid,
        deadline: Deadline,
        mut seen: impl FnMut(&Operation),
    ) -> Result<Operation> {
        let mut op = self.get_operation(id).await?;
        loop {
            seen(&op);
            if op.done {
                return Ok(op);
            }
            let left = time_left(deadline);
            if left.is_zero() {
                return Err(Error::TimedOut);
            }
            op = self.poll_operation(id, left.min(LONG_POLL)).await?;
        }
    }

    /// `GET /v1/tenants/{tenant}/operations`: one page, newest first.
    pub async fn list_operations(
        &self,
        tenant: &str,
        query: &OperationQuery,
    ) -> Result<Page<Operation>> {
        let call =
            Call::new(Method::GET, format!("/v1/tenants/{tenant}/operations")).query(query.pairs());
        self.json(call).await
    }

    /// `POST /v1/operations/{id}/cancel`: cancelled at once if no worker started it,
    /// else `cancel_requested`.
    pub async fn cancel_operation(&self, id: Uuid) -> Result<Operation> {
        self.json(Call::new(
            Method::POST,
            format!("/v1/operations/{id}/cancel"),
        ))
        .await
    }

    /// `POST /v1/operations/{id}/reports`: a worker's report (worker keys). The gateway's
    /// own workers report through `workers::report`, which ties retries to the JetStream
    /// message and forwards the dispatch's request ID and trace context.
    pub async fn report(&self, id: Uuid, report: &Report) -> Result<ReportAck> {
        let call = Call::new(Method::POST, format!("/v1/operations/{id}/reports")).body(report)?;
        self.json(call).await
    }

    // --- Quotas, catalog, audit ----------------------------------------------------

    /// `GET /v1/tenants/{tenant}/quotas`: limits and usage.
    pub async fn get_quotas(&self, tenant: &str) -> Result<Quotas> {
        self.json(Call::new(
            Method::GET,
            format!("/v1/tenants/{tenant}/quotas"),
        ))
        .await
    }

    /// `PUT /v1/tenants/{tenant}/quotas`: replaces the limits (admins).
    pub async fn set_quotas(&self, tenant: &str, limits: &[QuotaLimit]) -> Result<Quotas> {
        let body = QuotaLimits {
            limits: limits.to_vec(),
        };
        let call = Call::new(Method::PUT, format!("/v1/tenants/{tenant}/quotas")).body(body)?;
        self.json(call).await
    }

    /// `GET /v1/resource-types`: every registered kind.
    pub async fn resource_types(&self) -> Result<Vec<ResourceType>> {
        self.json(Call::new(Method::GET, "/v1/resource-types".into()))
            .await
    }

    /// `GET /v1/resource-types/{kind}`.
    pub async fn resource_type(&self, kind: &str) -> Result<ResourceType> {
        self.json(Call::new(Method::GET, format!("/v1/resource-types/{kind}")))
            .await
    }

    /// `PUT /v1/resource-types/{kind}`: registers the type, or changes it (a change
    /// may only widen it; else `409 breaking_change`).
    pub async fn put_resource_type(&self, def: &Value) -> Result<ResourceType> {
        let kind = def["kind"].as_str().unwrap_or_default();
        let call = Call::new(Method::PUT, format!("/v1/resource-types/{kind}")).body(def)?;
        self.json(call).await
    }

    /// `DELETE /v1/resource-types/{kind}`.
    pub async fn delete_resource_type(&self, kind: &str) -> Result<()> {
        let path = format!("/v1/resource-types/{kind}");
        self.send(Call::new(Method::DELETE, path)).await.map(drop)
    }

    /// `GET /v1/zones`.
    pub async fn zones(&self) -> Result<Vec<Zone>> {
        self.json(Call::new(Method::GET, "/v1/zones".into())).await
    }

    /// `GET /v1/catalog/{category}`: `flavor`, `image`, `machine_class`, `k8s_version`
    /// or `storage_class`.
    pub async fn catalog(&self, category: &str) -> Result<Vec<CatalogEntry>> {
        self.json(Call::new(Method::GET, format!("/v1/catalog/{category}")))
            .await
    }

    /// `GET /v1/openapi.json`: the OpenAPI 3.1 document.
    pub async fn openapi(&self) -> Result<Value> {
        self.json(Call::new(Method::GET, "/v1/openapi.json".into()))
            .await
    }

    /// `GET /readyz`: `Ok` when the gateway is ready (its database and NATS answer), else
    /// the `503` as an [`Error::Api`] (code `http_503`, the body in `message`).
    pub async fn ready(&self) -> Result<Value> {
        let call = Call::new(Method::GET, "/readyz".into());
        self.once(&call).await?.json()
    }

    /// `GET /v1/audit`: one page, newest first (admins; owners see their tenant).
    pub async fn audit(&self, query: &AuditQuery) -> Result<Page<AuditEntry>> {
        let call = Call::new(Method::GET, "/v1/audit".into()).query(query.pairs());
        self.json(call).await
    }

    // --- Events and webhooks -------------------------------------------------------

    /// `GET /v1/tenants/{tenant}/events` (as JSON): the events after `query.after`, at
    /// once. Poll with `next_cursor` to follow them.
    pub async fn events(&self, tenant: &str, query: &EventQuery) -> Result<EventPage> {
        let call =
            Call::new(Method::GET, format!("/v1/tenants/{tenant}/events")).query(query.pairs());
        self.json(call).await
    }

    fn webhooks(tenant: &str) -> String {
        format!("/v1/tenants/{tenant}/webhooks")
    }

    /// `POST /v1/tenants/{tenant}/webhooks`: the secret is in the answer only.
    pub async fn create_webhook(
        &self,
        tenant: &str,
        hook: &NewWebhook,
    ) -> Result<WebhookWithSecret> {
        self.json(Call::new(Method::POST, Self::webhooks(tenant)).body(hook)?)
            .await
    }

    /// `GET /v1/tenants/{tenant}/webhooks`.
    pub async fn list_webhooks(&self, tenant: &str) -> Result<Vec<Webhook>> {
        #[derive(serde::Deserialize)]
        struct List {
            items: Vec<Webhook>,
        }
        let list: List = self
            .json(Call::new(Method::GET, Self::webhooks(tenant)))
            .await?;
        Ok(list.items)
    }

    /// `GET /v1/tenants/{tenant}/webhooks/{id}`.
    pub async fn get_webhook(&self, tenant: &str, id: Uuid) -> Result<Webhook> {
        let path = format!("{}/{id}", Self::webhooks(tenant));
        self.json(Call::new(Method::GET, path)).await
    }

    /// `PATCH /v1/tenants/{tenant}/webhooks/{id}`.
    pub async fn update_webhook(
        &self,
        tenant: &str,
        id: Uuid,
        patch: &WebhookPatch,
    ) -> Result<Webhook> {
        let path = format!("{}/{id}", Self::webhooks(tenant));
        self.json(Call::new(Method::PATCH, path).body(patch)?).await
    }

    /// `DELETE /v1/tenants/{tenant}/webhooks/{id}`.
    pub async fn delete_webhook(&self, tenant: &str, id: Uuid) -> Result<()> {
        let path = format!("{}/{id}", Self::webhooks(tenant));
        self.send(Call::new(Method::DELETE, path)).await.map(drop)
    }

    /// `POST /v1/tenants/{tenant}/webhooks/{id}/rotate-secret`: a new secret; the old one
    /// keeps signing for the grace period.
    pub async fn rotate_webhook_secret(&self, tenant: &str, id: Uuid) -> Result<WebhookWithSecret> {
        let path = format!("{}/{id}/rotate-secret", Self::webhooks(tenant));
        self.json(Call::new(Method::POST, path)).await
    }

    /// `GET /v1/tenants/{tenant}/webhooks/{id}/deliveries`: one page, newest first.
    pub async fn list_deliveries(
        &self,
        tenant: &str,
        id: Uuid,
        limit: Option<u32>,
        cursor: Option<&str>,
    ) -> Result<Page<Delivery>> {
        let mut q = Vec::new();
        if let Some(l) = limit {
            q.push(("limit", l.to_string()));
        }
        if let Some(c) = cursor {
            q.push(("cursor", c.to_owned()));
        }
        let path = format!("{}/{id}/deliveries", Self::webhooks(tenant));
        self.json(Call::new(Method::GET, path).query(q)).await
    }

    /// `GET /v1/tenants/{tenant}/webhooks/{id}/deliveries/{delivery}`.
    pub async fn get_delivery(&self, tenant: &str, id: Uuid, delivery: Uuid) -> Result<Delivery> {
        let path = format!("{}/{id}/deliveries/{delivery}", Self::webhooks(tenant));
        self.json(Call::new(Method::GET, path)).await
    }

    /// `POST /v1/tenants/{tenant}/webhooks/{id}/deliveries/{delivery}/retry`: sends the
    /// delivery again now.
    pub async fn retry_delivery(&self, tenant: &str, id: Uuid, delivery: Uuid) -> Result<Delivery> {
        let path = format!(
            "{}/{id}/deliveries/{delivery}/retry",
            Self::webhooks(tenant)
        );
        self.json(Call::new(Method::POST, path)).await
    }
}

/// When a wait ends; `None` when its timeout reaches past what the clock can name.
type Deadline = Option<tokio::time::Instant>;

/// The deadline `timeout` from now, without overflowing on a huge one.
fn deadline(timeout: Duration) -> Deadline {
    tokio::time::Instant::now().checked_add(timeout)
}

/// The time left until `deadline` (zero once it has passed; `Duration::MAX` with none).
fn time_left(deadline: Deadline) -> Duration {
    deadline.map_or(Duration::MAX, |d| {
        d.saturating_duration_since(tokio::time::Instant::now())
    })
}

/// `work`, or [`Error::TimedOut`] once `timeout` has passed, whatever a request of it
/// is waiting for (`tokio::time::timeout` takes any duration without overflowing).
async fn within<T>(
    timeout: Duration,
    work: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    tokio::time::timeout(timeout, work)
        .await
        .unwrap_or(Err(Error::TimedOut))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Each request a [`scripted`] server took: its `Idempotency-Key`, its request
    /// line's target (path and query), and its `Cache-Control`.
    type Seen = Arc<Mutex<Vec<(Option<String>, String, Option<String>)>>>;

    /// The `Idempotency-Key`s of `seen`.
    fn keys(seen: &Seen) -> Vec<Option<String>> {
        seen.lock().unwrap().iter().map(|s| s.0.clone()).collect()
    }

    /// An operation in `state`, as the gateway answers it.
    fn operation(state: &str, done: bool) -> String {
        let at = "2026-01-01T00:00:00Z";
        format!(
            r#"{{"id":"{id}","tenant":"acme","resource_id":"{id}","kind":"vm","zone":"zone-a","action":"create","state":"{state}","done":{done},"attempt":1,"target_generation":1,"cancel_requested":false,"request_id":"r","created_at":"{at}","updated_at":"{at}","deadline":"{at}"}}"#,
            id = Uuid::nil()
        )
    }

    /// A one-route HTTP server answering from `script` in turn (the last answer again
    /// once it runs out), recording each request's `Idempotency-Key` and target.
    async fn scripted(script: Vec<&'static str>) -> (String, Seen) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let seen = Seen::default();
        let log = seen.clone();
        tokio::spawn(async move {
            for n in 0.. {
                let (mut conn, _) = listener.accept().await.unwrap();
                let mut buf = vec![0; 64 * 1024];
                let mut len = 0;
                while !buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
                    len += conn.read(&mut buf[len..]).await.unwrap();
                }
                let head = String::from_utf8_lossy(&buf[..len]).to_lowercase();
                let key = head
                    .lines()
                    .find_map(|l| l.strip_prefix("idempotency-key: "))
                    .map(|k| k.trim().to_owned());
                let target = head.split(' ').nth(1).unwrap_or_default().to_owned();
                let cache = head
                    .lines()
                    .find_map(|l| l.strip_prefix("cache-control: "))
                    .map(|c| c.trim().to_owned());
                log.lock().unwrap().push((key, target, cache));
                let answer = script[n.min(script.len() - 1)];
                let (status, extra, body) = match answer {
                    "ok" => (
                        "200 OK",
                        "",
                        r#"{"id":"acme","display_name":"","created_at":"2026-01-01T00:00:00Z"}"#.to_owned(),
                    ),
                    "busy" => (
                        "503 Service Unavailable",
                        "Retry-After: 1\r\n",
                        r#"{"code":"database_unavailable","message":"retry","request_id":"r"}"#.to_owned(),
                    ),
                    // A gateway older than `until`.
                    "old" => (
                        "400 Bad Request",
                        "",
                        r#"{"code":"invalid_query","message":"unknown field `until`","request_id":"r"}"#.to_owned(),
                    ),
                    "running" => ("200 OK", "Retry-After: 1\r\n", operation("running", false)),
                    "succeeded" => ("200 OK", "", operation("succeeded", true)),
                    _ => (
                        "429 Too Many Requests",
                        "Retry-After: 0\r\n",
                        r#"{"code":"rate_limited","message":"slow down","request_id":"r"}"#.to_owned(),
                    ),
                };
                let res = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: application/json\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                conn.write_all(res.as_bytes()).await.unwrap();
            }
        });
        (url, seen)
    }

    #[tokio::test]
    async fn busy_answers_are_retried_after_retry_after_with_the_same_idempotency_key() {
        let (url, seen) = scripted(vec!["busy", "ok"]).await;
        let gw = Client::new(url, "k");
        let started = std::time::Instant::now();
        let new = NewResource {
            name: "web".into(),
            zone: "zone-a".into(),
            spec: serde_json::json!({}),
            labels: Default::default(),
        };
        // The answer is a tenant, not an operation: decoding fails, after the retry.
        let err = gw.create_resource("acme", "vms", &new).await.unwrap_err();
        assert!(matches!(err, Error::Decode(_)), "{err}");
        assert!(
            started.elapsed() >= Duration::from_secs(1),
            "Retry-After: 1 honoured"
        );
        let sent = keys(&seen);
        assert_eq!(sent.len(), 2);
        assert!(sent[0].is_some());
        assert_eq!(sent[0], sent[1], "one key across the call's retries");

        let (url, seen) = scripted(vec!["busy", "ok"]).await;
        let gw = Client::new(url, "k");
        assert_eq!(gw.get_tenant("acme").await.unwrap().id, "acme");
        assert_eq!(keys(&seen), vec![None, None], "reads send no key");
    }

    #[tokio::test]
    async fn retries_are_bounded() {
        let (url, seen) = scripted(vec!["limited"]).await;
        let gw = Client::new(url, "k").with_retries(2, Duration::from_secs(1));
        let err = gw.get_tenant("acme").await.unwrap_err();
        assert_eq!(err.code(), Some("rate_limited"));
        assert_eq!(err.status(), Some(429));
        assert_eq!(
            seen.lock().unwrap().len(),
            3,
            "the first try and two retries"
        );
    }

    #[tokio::test]
    async fn wait_long_polls_until_done_and_follows_every_change_on_an_older_gateway() {
        let (url, seen) = scripted(vec!["running", "succeeded"]).await;
        let gw = Client::new(url, "k");
        let done = gw.wait(Uuid::nil(), Duration::from_secs(5)).await.unwrap();
        assert!(done.done);
        let targets: Vec<String> = seen.lock().unwrap().iter().map(|s| s.1.clone()).collect();
        assert_eq!(targets.len(), 2, "{targets:?}");
        assert!(
            targets
                .iter()
                .all(|t| t.contains("until=done") && t.contains("wait=")),
            "{targets:?}"
        );

        // A gateway that refuses `until`: the same wait, one long-poll per change.
        let (url, seen) = scripted(vec!["old", "running", "running", "succeeded"]).await;
        let gw = Client::new(url, "k");
        let done = gw.wait(Uuid::nil(), Duration::from_secs(5)).await.unwrap();
        assert!(done.done);
        let targets: Vec<String> = seen.lock().unwrap().iter().map(|s| s.1.clone()).collect();
        assert_eq!(targets.len(), 4, "{targets:?}");
        assert!(
            targets[1..].iter().all(|t| !t.contains("until")),
            "{targets:?}"
        );
    }

    /// A server that takes connections and never answers them.
    async fn silent() -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((conn, _)) = listener.accept().await {
                held.push(conn);
            }
        });
        url
    }

    #[tokio::test]
    async fn a_wait_takes_any_timeout_even_duration_max() {
        let (url, _) = scripted(vec!["running", "succeeded"]).await;
        let gw = Client::new(url, "k");
        assert!(gw.wait(Uuid::nil(), Duration::MAX).await.unwrap().done);
        let (url, _) = scripted(vec!["running", "succeeded"]).await;
        let gw = Client::new(url, "k");
        let mut seen = 0;
        let done = gw
            .wait_with(Uuid::nil(), Duration::MAX, |_| seen += 1)
            .await
            .unwrap();
        assert!(done.done);
        assert_eq!(seen, 2, "running, then succeeded");
    }

    #[tokio::test]
    async fn a_wait_ends_at_its_timeout_when_the_gateway_never_answers() {
        let gw = Client::new(silent().await, "k");
        let timeout = Duration::from_millis(300);
        let started = std::time::Instant::now();
        let err = gw.wait(Uuid::nil(), timeout).await.unwrap_err();
        assert!(matches!(err, Error::TimedOut), "{err}");
        let err = gw
            .wait_with(Uuid::nil(), timeout, |_| {})
            .await
            .unwrap_err();
        assert!(matches!(err, Error::TimedOut), "{err}");
        let took = started.elapsed();
        assert!(
            took < Duration::from_secs(5),
            "not the request timeout: {took:?}"
        );
    }

    #[tokio::test]
    async fn fresh_reads_ask_for_the_database_and_other_reads_do_not() {
        let (url, seen) = scripted(vec!["succeeded"]).await;
        let cached = Client::new(url.clone(), "k");
        cached.get_operation(Uuid::nil()).await.unwrap();
        let fresh = Client::new(url, "k").with_fresh_reads(true);
        fresh.get_operation(Uuid::nil()).await.unwrap();
        fresh
            .poll_until_done(Uuid::nil(), Duration::from_secs(1))
            .await
            .unwrap();
        let asked: Vec<Option<String>> = seen.lock().unwrap().iter().map(|s| s.2.clone()).collect();
        assert_eq!(
            asked,
            vec![None, Some("no-cache".to_owned()), None],
            "long-polls re-read the database anyway"
        );
    }
}
