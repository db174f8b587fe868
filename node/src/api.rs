//! The local HTTP API: what the `shoal` command talks to.
//!
//! | route | what it does |
//! |---|---|
//! | `POST /v1/blobs` `{"path": P}` | imports the file or directory at `P` (on the node's machine), pins and announces it; answers [`Added`] |
//! | `POST /v1/fetch/{hash}` | fetches a blob from the swarm; streams progress as JSON lines |
//! | `GET\|HEAD /v1/blobs/{hash}` | the blob over HTTP (see [`crate::gateway`]): fetched if needed, streamed as verified; with `?fetch=while-read` a fetch it starts stops when the answer ends |
//! | `GET /v1/providers/{hash}` | providers found through the DHT (and reached), with what the lookup cost |
//! | `GET /v1/peers` | connected peers |
//! | `GET /v1/status` | the node's state |
//!
//! | `GET /v1/blobs` | the blobs held here: hash, size, bytes held, pinned or cache |
//! | `POST\|DELETE /v1/pins/{hash}` | pins or unpins a blob held here (unpinning answers what the cache evicted) |
//! | `DELETE /v1/blobs/{hash}` | removes a blob from the store and withdraws it |
//!
//! Mutating routes (add, pin, unpin, delete) and the listing need `Authorization: Bearer <token>`
//! (a blob's hash is its link: the listing would hand out every one, and tell what the user
//! fetched); the node writes the
//! token to `<data-dir>/api-token` (owner-only), where the `shoal` command reads it. Every route
//! refuses a web page of another site (`local_only`). Errors are JSON
//! `{"error": "..."}` with a status code that says whose fault it was.

use std::net::SocketAddr;

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use shoal_cache::StoreError;
use shoal_protocol::Hash;
use tokio::sync::{mpsc, watch};
use tracing::{Instrument, info_span};

use crate::fetch::{FetchError, FetchProgress};
use crate::node::{NodeError, NodeHandle};

/// The body of `POST /v1/blobs`.
#[derive(Debug, Serialize, Deserialize)]
pub struct AddRequest {
    /// A path on the node's machine.
    pub path: std::path::PathBuf,
}

/// What `POST /v1/blobs` answers.
#[derive(Debug, Serialize, Deserialize)]
pub struct Added {
    /// The content id.
    pub hash: String,
    /// The size in bytes.
    pub size: u64,
    /// A directory's entries its collection does not list (symbolic links, pipes, sockets,
    /// devices, directories that hold nothing, the node's own data directory), relative to it, a
    /// directory's ending in `/`: the first 1,000. Absent when none were, as from a node that
    /// predates it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skipped: Vec<String>,
    /// How many entries were skipped in all (`skipped` names the first 1,000). Absent from a node
    /// that predates it, whose `skipped` named them all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skipped_count: Option<usize>,
}

/// One line of `POST /v1/fetch/{hash}`.
#[derive(Debug, Serialize, Deserialize)]
pub struct FetchLine {
    /// Progress so far.
    #[serde(flatten)]
    pub progress: FetchProgress,
    /// Set on the last line if the fetch failed.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error: Option<String>,
}

struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

impl From<NodeError> for ApiError {
    fn from(e: NodeError) -> Self {
        let status = match &e {
            NodeError::Store(StoreError::NotFound { .. }) | NodeError::Fetch(FetchError::NotFound { .. }) => {
                StatusCode::NOT_FOUND
            }
            NodeError::Store(
                StoreError::Io { .. } | StoreError::ChangedDuringImport { .. } | StoreError::NotAFile { .. },
            ) => StatusCode::BAD_REQUEST,
            NodeError::Store(StoreError::TooLarge { .. } | StoreError::BlobTooLarge(_)) => {
                StatusCode::INSUFFICIENT_STORAGE
            }
            NodeError::Fetch(_) => StatusCode::BAD_GATEWAY,
            NodeError::Invalid(_) => StatusCode::BAD_REQUEST,
            NodeError::Busy(_) | NodeError::Stopped => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(status, e.to_string())
    }
}

fn parse_hash(s: &str) -> Result<Hash, ApiError> {
    s.parse().map_err(|e: shoal_protocol::ParseHashError| ApiError(StatusCode::BAD_REQUEST, e.to_string()))
}

/// The name of the file in the data directory that holds the API token.
pub const TOKEN_FILE: &str = "api-token";

/// Connections the API holds open at once (see [`crate::http`]): its clients are the node's own
/// commands and its owner's tools.
const MAX_API_CONNECTIONS: usize = 256;

/// Connections the gateway holds open at once, at most [`crate::http::PER_IP`] from one address
/// (loopback aside), within the bounds on request heads and stalled writes of [`crate::http`].
const MAX_GATEWAY_CONNECTIONS: usize = 1024;

/// Creates the API token in the data directory, readable by the owner only, or reads the one there.
fn load_or_create_token(dir: &std::path::Path) -> anyhow::Result<String> {
    let path = dir.join(TOKEN_FILE);
    if let Ok(t) = std::fs::read_to_string(&path)
        && t.trim().len() >= 32
    {
        return Ok(t.trim().to_string());
    }
    let token = hex::encode(rand::random::<[u8; 32]>());
    let tmp = path.with_extension("tmp");
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let written = opts.open(&tmp).and_then(|mut f| std::io::Write::write_all(&mut f, token.as_bytes()));
    anyhow::Context::with_context(written.and_then(|()| std::fs::rename(&tmp, &path)), || {
        format!("cannot write the API token to {}", path.display())
    })?;
    Ok(token)
}

/// The API answers programs and a browser on the machines it serves, never a web page of another
/// site. Without a token, reading a blob fetches it from the swarm, and status and peers describe
/// the node: a page anywhere on the web could make a visitor's node fetch (and then serve) what
/// it names, or, resolving its own name to 127.0.0.1 (DNS rebinding), read what the API says.
/// So a request a browser marks as coming from another site (`Sec-Fetch-Site`) is refused, as is
/// one whose `Origin` is neither this machine (`localhost`, a loopback address) nor the `Host` it
/// was sent to (`null`, the origin of sandboxed pages, included). An API listening on loopback,
/// as it does unless told otherwise, also refuses a `Host` that is a name other than `localhost`:
/// no program on this machine needs one (the `shoal` command sends the address in
/// `<data-dir>/api`), and a rebinding page can only send its own. An API an operator binds to
/// another address is reached by whatever names the operator gives it.
async fn local_only(
    State(loopback): State<bool>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let headers = req.headers();
    let text = |name| headers.get(name).map(|v| v.to_str().unwrap_or(""));
    let host = text(header::HOST);
    let host_ok = !loopback || host.is_none_or(|h| is_localhost(h) || host_name(h).parse::<std::net::IpAddr>().is_ok());
    let site_ok = !matches!(text(header::HeaderName::from_static("sec-fetch-site")), Some("cross-site" | "same-site"));
    let origin_ok = text(header::ORIGIN).is_none_or(|o| {
        o.split_once("://")
            .is_some_and(|(_, rest)| is_localhost(rest) || host.is_some_and(|h| h.eq_ignore_ascii_case(rest)))
    });
    if !(host_ok && site_ok && origin_ok) {
        return ApiError(
            StatusCode::FORBIDDEN,
            "the node's API does not answer web pages of other sites; address it by IP (as <data-dir>/api does) or as localhost".into(),
        )
        .into_response();
    }
    next.run(req).await
}

/// The name or address of a `Host` (or an origin's host and port), without the port.
fn host_name(host: &str) -> &str {
    match host.strip_prefix('[') {
        // `[v6]:port`
        Some(rest) => rest.split_once(']').map_or(rest, |(v6, _)| v6),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    }
}

/// Whether a `Host` (or an origin's host and port) is this machine: `localhost` or a loopback
/// address.
fn is_localhost(host: &str) -> bool {
    let name = host_name(host);
    name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Mutating routes need `Authorization: Bearer <token>`, the token in `<data-dir>/api-token`.
async fn require_token(
    State(token): State<std::sync::Arc<String>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    // Compare in constant time: the token is a secret.
    let ok = given.is_some_and(|g| {
        g.len() == token.len() && g.bytes().zip(token.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    });
    if !ok {
        return ApiError(
            StatusCode::UNAUTHORIZED,
            format!("this route needs the node's token: send 'Authorization: Bearer <token>' with the token in <data-dir>/{TOKEN_FILE}"),
        )
        .into_response();
    }
    next.run(req).await
}

/// Binds the API on `addr`, writes the token (if there is none yet), then the bound address to
/// `<data-dir>/api`, and serves until aborted.
pub(crate) async fn spawn(node: NodeHandle, addr: SocketAddr) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot bind the API on {addr}: {e}; pick another with --api"))?;
    let bound = listener.local_addr()?;
    // Before the address: a command that finds the address reads the token next.
    let token = std::sync::Arc::new(load_or_create_token(&node.config().data_dir)?);
    let api_file = node.config().data_dir.join("api");
    let tmp = api_file.with_extension("tmp");
    anyhow::Context::with_context(
        std::fs::write(&tmp, bound.to_string()).and_then(|()| std::fs::rename(&tmp, &api_file)),
        || format!("cannot write the API's address to {}", api_file.display()),
    )?;
    tracing::info!(api = %bound, "HTTP API listening");
    let mutating = axum::Router::new()
        .route("/v1/blobs", post(add).get(list_blobs))
        .route("/v1/blobs/{hash}", axum::routing::delete(delete_blob))
        .route("/v1/pins/{hash}", post(pin).delete(unpin))
        .route_layer(axum::middleware::from_fn_with_state(token.clone(), require_token));
    let app = axum::Router::new()
        .merge(mutating)
        .route("/v1/blobs/{hash}", get(api_blob).head(api_blob))
        .route("/v1/blobs/{hash}/{*path}", get(gateway_entry).head(gateway_entry))
        .route("/v1/fetch/{hash}", post(fetch))
        .route("/v1/providers/{hash}", get(providers))
        .route("/v1/peers", get(peers))
        .route("/v1/status", get(status))
        .route("/metrics", get(metrics));
    // A transient node's API serves the one command that started it (`shoal get -o -`): every
    // route needs its token, so that nobody else on the machine has it fetch into a store
    // with no cache bound.
    let app = match node.config().transient {
        true => app.route_layer(axum::middleware::from_fn_with_state(token, require_token)),
        false => app,
    };
    let app = app
        .layer(axum::middleware::from_fn_with_state(node.clone(), record))
        .layer(axum::middleware::from_fn_with_state(bound.ip().is_loopback(), local_only))
        .layer(axum::middleware::map_response(crate::gateway::nosniff))
        .with_state(node);
    Ok(tokio::spawn(crate::http::serve(crate::http::Bounded::new(listener, MAX_API_CONNECTIONS), app)))
}

async fn add(State(node): State<NodeHandle>, Json(req): Json<AddRequest>) -> Result<Json<Added>, ApiError> {
    let published = node.publish(&req.path).await?;
    let imported = published.imported;
    Ok(Json(Added {
        hash: imported.hash.to_string(),
        size: imported.size,
        skipped: published.skipped,
        skipped_count: (published.skipped_count > 0).then_some(published.skipped_count),
    }))
}

async fn pin(State(node): State<NodeHandle>, Path(hash): Path<String>) -> Result<Response, ApiError> {
    let hash = parse_hash(&hash)?;
    node.pin(hash).await?;
    Ok(Json(serde_json::json!({ "pinned": hash.to_string() })).into_response())
}

async fn unpin(State(node): State<NodeHandle>, Path(hash): Path<String>) -> Result<Response, ApiError> {
    let hash = parse_hash(&hash)?;
    let evicted = node.unpin(hash).await?;
    let evicted: Vec<String> = evicted.iter().map(|h| h.to_string()).collect();
    Ok(Json(serde_json::json!({ "unpinned": hash.to_string(), "evicted": evicted })).into_response())
}

async fn list_blobs(State(node): State<NodeHandle>) -> Result<Response, ApiError> {
    Ok(Json(node.blobs().await?).into_response())
}

async fn delete_blob(State(node): State<NodeHandle>, Path(hash): Path<String>) -> Result<Response, ApiError> {
    let hash = parse_hash(&hash)?;
    node.delete(hash).await?;
    Ok(Json(serde_json::json!({ "deleted": hash.to_string() })).into_response())
}

async fn fetch(State(node): State<NodeHandle>, Path(hash): Path<String>) -> Result<Response, ApiError> {
    let hash = parse_hash(&hash)?;
    let (ptx, mut prx) = watch::channel(FetchProgress::default());
    let (lines, body) = mpsc::channel::<Result<Bytes, std::io::Error>>(16);
    tokio::spawn(
        async move {
            let fetch = node.fetch(hash, Some(ptx));
            tokio::pin!(fetch);
            let line = |p: FetchProgress, error: Option<String>| {
                let mut s = serde_json::to_string(&FetchLine { progress: p, error }).unwrap_or_default();
                s.push('\n');
                Ok(Bytes::from(s))
            };
            let result = loop {
                tokio::select! {
                    r = &mut fetch => break r,
                    // The client went: the fetch is dropped with this task (one it shares goes on
                    // for its other callers).
                    _ = lines.closed() => return,
                    changed = prx.changed() => {
                        if changed.is_err() {
                            continue;
                        }
                        let p = prx.borrow_and_update().clone();
                        // Never waited for: a client that reads slowly skips lines, and the fetch,
                        // which others may follow, goes on meanwhile.
                        if !p.done && let Err(mpsc::error::TrySendError::Closed(_)) = lines.try_send(line(p, None)) {
                            return;
                        }
                    }
                }
            };
            let last = match result {
                Ok(info) => line(
                    FetchProgress {
                        verified_bytes: info.size,
                        total_bytes: Some(info.size),
                        done: true,
                        ..prx.borrow().clone()
                    },
                    None,
                ),
                Err(e) => line(FetchProgress { done: true, ..prx.borrow().clone() }, Some(e.to_string())),
            };
            let _ = lines.send(last).await;
        }
        .instrument(info_span!("api_fetch")),
    );
    let stream = futures::stream::unfold(body, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) });
    Ok(([(header::CONTENT_TYPE, "application/x-ndjson")], Body::from_stream(stream)).into_response())
}

async fn gateway_blob(
    State(node): State<NodeHandle>,
    method: axum::http::Method,
    Path(hash): Path<String>,
    headers: axum::http::HeaderMap,
) -> Response {
    crate::gateway::serve(node, method, &hash, None, &headers, (false, true)).await
}

/// How a blob asked for on the API is fetched: `?fetch=while-read` stops a fetch the answer
/// started when the answer ends (`shoal get -o -`, whose user may stop reading).
#[derive(serde::Deserialize)]
struct BlobQuery {
    fetch: Option<String>,
}

async fn api_blob(
    State(node): State<NodeHandle>,
    method: axum::http::Method,
    Path(hash): Path<String>,
    axum::extract::Query(query): axum::extract::Query<BlobQuery>,
    headers: axum::http::HeaderMap,
) -> Response {
    let while_read = match query.fetch.as_deref() {
        None | Some("whole") => false,
        Some("while-read") => true,
        Some(other) => {
            let msg = format!("fetch={other:?}: say whole (the default) or while-read\n");
            return (StatusCode::BAD_REQUEST, msg).into_response();
        }
    };
    crate::gateway::serve(node, method, &hash, None, &headers, (while_read, false)).await
}

async fn gateway_entry(
    State(node): State<NodeHandle>,
    method: axum::http::Method,
    Path((hash, path)): Path<(String, String)>,
    headers: axum::http::HeaderMap,
) -> Response {
    crate::gateway::serve(node, method, &hash, Some(&path), &headers, (false, true)).await
}

/// Binds the read-only public gateway (`GET|HEAD /{hash}`) on `addr`.
pub(crate) async fn spawn_gateway(node: NodeHandle, addr: SocketAddr) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot bind the gateway on {addr}: {e}; pick another with --gateway"))?;
    let bound = listener.local_addr()?;
    let file = node.config().data_dir.join("gateway");
    std::fs::write(file.with_extension("tmp"), bound.to_string())?;
    std::fs::rename(file.with_extension("tmp"), &file)?;
    tracing::info!(gateway = %bound, "HTTP gateway listening");
    let app = axum::Router::new()
        .route("/{hash}", get(gateway_blob).head(gateway_blob))
        .route("/{hash}/{*path}", get(gateway_entry).head(gateway_entry))
        .layer(axum::middleware::map_response(crate::gateway::nosniff))
        .with_state(node);
    Ok(tokio::spawn(crate::http::serve(crate::http::Bounded::new(listener, MAX_GATEWAY_CONNECTIONS), app)))
}

async fn providers(State(node): State<NodeHandle>, Path(hash): Path<String>) -> Result<Response, ApiError> {
    let hash = parse_hash(&hash)?;
    let (found, stats) = node.lookup(hash).await?;
    let found: Vec<String> = found.iter().map(|p| p.to_string()).collect();
    // What the lookup cost, so that an empty answer can say why: nobody to ask, nobody answered,
    // or providers named that could not be reached. `null` when it outlived the lookup timeout.
    let lookup = stats.map(|s| {
        serde_json::json!({
            "requests": s.requests,
            "answered": s.answered,
            "named": s.providers,
            "seconds": s.duration.as_secs_f64(),
        })
    });
    Ok(Json(serde_json::json!({ "hash": hash.to_string(), "providers": found, "lookup": lookup })).into_response())
}

/// Counts every API request by method, route pattern and status, with its duration.
async fn record(State(node): State<NodeHandle>, req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let started = std::time::Instant::now();
    // A fixed set: HTTP lets a client make up methods, and each would be a series kept for good.
    let method = match *req.method() {
        axum::http::Method::GET => "GET",
        axum::http::Method::HEAD => "HEAD",
        axum::http::Method::POST => "POST",
        axum::http::Method::DELETE => "DELETE",
        _ => "other",
    }
    .to_string();
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let resp = next.run(req).await;
    let labels = crate::metrics::RouteLabels { method, route, status: resp.status().as_u16() };
    let m = &node.inner.metrics;
    m.api_requests.get_or_create(&labels).inc();
    m.api_duration.get_or_create(&labels).observe(started.elapsed().as_secs_f64());
    resp
}

/// Prometheus metrics in the text exposition format.
async fn metrics(State(node): State<NodeHandle>) -> Response {
    let m = &node.inner.metrics;
    let s = node.store().stats();
    m.cache_bytes.set(s.cache_bytes as i64);
    m.cache_capacity.set(s.cache_capacity as i64);
    m.pinned_bytes.set(s.pinned_bytes as i64);
    m.blobs.set(s.blobs as i64);
    m.evictions.set(s.evictions as i64);
    m.uploads.set(node.inner.uploads.active() as i64);
    m.watches.set(node.inner.uploads.watching() as i64);
    if let Ok(peers) = node.peers().await {
        m.peers.set(peers.len() as i64);
    }
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], m.encode()).into_response()
}

async fn peers(State(node): State<NodeHandle>) -> Result<Response, ApiError> {
    Ok(Json(node.peers().await?).into_response())
}

async fn status(State(node): State<NodeHandle>) -> Result<Response, ApiError> {
    Ok(Json(node.status().await?).into_response())
}
