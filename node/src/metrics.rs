//! Prometheus metrics, RED-style: rate, errors and duration per API route and per transfer
//! request kind, plus bytes served and fetched, the cache, the DHT and the peers.
//!
//! Names start with `shoal_`. Label values come from a small fixed set (routes are the router's
//! patterns, not raw paths), so the number of series is bounded.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of an HTTP API request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RouteLabels {
    pub(crate) method: String,
    pub(crate) route: String,
    pub(crate) status: u16,
}

/// Labels of a transfer request, served or made.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct TransferLabels {
    /// `have` or `get`.
    pub(crate) kind: &'static str,
    /// `ok`, or the failure: `not_found`, `busy`, `denied`, `corrupt`, `truncated`, `timeout`,
    /// `io`, `protocol`, `bad_request`.
    pub(crate) outcome: &'static str,
}

/// Labels that name a transfer kind only (durations).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct KindLabels {
    pub(crate) kind: &'static str,
}

/// Labels of a connection event.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ConnectionLabels {
    /// `in` (the peer dialled) or `out` (we dialled).
    pub(crate) direction: &'static str,
    /// `opened`, `closed`, or `failed` (a dial or an incoming connection that never opened,
    /// refusals at the connection cap among them).
    pub(crate) event: &'static str,
}

/// Labels of a DHT request this node answered.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct DhtLabels {
    /// `find_node`, `get_providers`, `add_provider`, `get_record` or `put_record`.
    pub(crate) request: &'static str,
}

/// Labels of the DHT requests this node's own queries sent.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct DhtQueryLabels {
    /// The query: `providers`, `provide`, `bootstrap`, `closest`, or another of libp2p's kinds.
    pub(crate) query: &'static str,
    /// `ok` (answered) or `failed` (no answer: a dial that failed, a timeout, an error).
    pub(crate) outcome: &'static str,
}

fn seconds() -> Histogram {
    // 0.5 ms … ~16 s
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

/// Every metric the node exports.
#[derive(Debug)]
pub(crate) struct Metrics {
    pub(crate) registry: Registry,
    pub(crate) api_requests: Family<RouteLabels, Counter>,
    pub(crate) api_duration: Family<RouteLabels, Histogram, fn() -> Histogram>,
    pub(crate) served: Family<TransferLabels, Counter>,
    pub(crate) served_duration: Family<KindLabels, Histogram, fn() -> Histogram>,
    pub(crate) requested: Family<TransferLabels, Counter>,
    pub(crate) requested_duration: Family<KindLabels, Histogram, fn() -> Histogram>,
    pub(crate) bytes_served: Counter,
    pub(crate) bytes_fetched: Counter,
    pub(crate) cache_hits: Counter,
    pub(crate) cache_misses: Counter,
    pub(crate) collections_decoded: Counter,
    pub(crate) cache_bytes: Gauge,
    pub(crate) cache_capacity: Gauge,
    pub(crate) pinned_bytes: Gauge,
    pub(crate) blobs: Gauge,
    pub(crate) evictions: Gauge,
    pub(crate) uploads: Gauge,
    pub(crate) watches: Gauge,
    pub(crate) peers: Gauge,
    pub(crate) connections: Family<ConnectionLabels, Counter>,
    pub(crate) connections_trimmed: Counter,
    pub(crate) streams_dropped: Counter,
    pub(crate) dht_served: Family<DhtLabels, Counter>,
    pub(crate) dht_requests: Family<DhtQueryLabels, Counter>,
    pub(crate) announcements_deferred: Counter,
    pub(crate) lookup_duration: Histogram,
    pub(crate) providers_found: Histogram,
    pub(crate) fetches: Family<TransferLabels, Counter>,
}

impl Metrics {
    pub(crate) fn new() -> Self {
        let mut registry = Registry::with_prefix("shoal");
        let m = Self {
            api_requests: Family::default(),
            api_duration: Family::new_with_constructor(seconds as fn() -> Histogram),
            served: Family::default(),
            served_duration: Family::new_with_constructor(seconds as fn() -> Histogram),
            requested: Family::default(),
            requested_duration: Family::new_with_constructor(seconds as fn() -> Histogram),
            bytes_served: Counter::default(),
            bytes_fetched: Counter::default(),
            cache_hits: Counter::default(),
            cache_misses: Counter::default(),
            collections_decoded: Counter::default(),
            cache_bytes: Gauge::default(),
            cache_capacity: Gauge::default(),
            pinned_bytes: Gauge::default(),
            blobs: Gauge::default(),
            evictions: Gauge::default(),
            uploads: Gauge::default(),
            watches: Gauge::default(),
            peers: Gauge::default(),
            connections: Family::default(),
            connections_trimmed: Counter::default(),
            streams_dropped: Counter::default(),
            dht_served: Family::default(),
            dht_requests: Family::default(),
            announcements_deferred: Counter::default(),
            lookup_duration: seconds(),
            providers_found: Histogram::new([0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0]),
            fetches: Family::default(),
            registry: Registry::default(),
        };
        registry.register("api_requests", "HTTP API requests by route and status", m.api_requests.clone());
        registry.register("api_request_duration_seconds", "HTTP API request duration", m.api_duration.clone());
        registry.register("transfer_served_requests", "Transfer requests served to peers", m.served.clone());
        registry.register(
            "transfer_served_duration_seconds",
            "Time to serve a transfer request",
            m.served_duration.clone(),
        );
        registry.register("transfer_requests", "Transfer requests made to peers", m.requested.clone());
        registry.register(
            "transfer_request_duration_seconds",
            "Time for a transfer request to a peer",
            m.requested_duration.clone(),
        );
        registry.register("served_bytes", "Bytes served to peers (pieces with proofs)", m.bytes_served.clone());
        registry.register("fetched_bytes", "Bytes received from peers (pieces with proofs)", m.bytes_fetched.clone());
        registry.register("cache_hits", "HTTP reads of blobs held whole", m.cache_hits.clone());
        registry.register("cache_misses", "HTTP reads of blobs that had to be fetched", m.cache_misses.clone());
        registry.register(
            "gateway_collections_decoded",
            "Collections the gateway read whole and decoded, not finding them kept decoded",
            m.collections_decoded.clone(),
        );
        registry.register("cache_bytes", "Bytes of cached (unpinned) blobs", m.cache_bytes.clone());
        registry.register("cache_capacity_bytes", "The cache bound", m.cache_capacity.clone());
        registry.register("pinned_bytes", "Bytes of pinned blobs", m.pinned_bytes.clone());
        registry.register("blobs", "Blobs held, whole or partial", m.blobs.clone());
        registry.register("cache_evictions", "Blobs evicted since start", m.evictions.clone());
        registry.register("uploads", "Uploads in progress", m.uploads.clone());
        registry.register("watches", "Watches held: peers waiting to hear of new pieces", m.watches.clone());
        registry.register("connected_peers", "Connected peers", m.peers.clone());
        registry.register("connections", "Connections opened, closed and failed", m.connections.clone());
        registry.register(
            "connections_trimmed",
            "Idle connections closed to get back to the connection target",
            m.connections_trimmed.clone(),
        );
        registry.register("dht_served_requests", "DHT requests answered, by kind", m.dht_served.clone());
        registry.register(
            "dht_requests",
            "DHT requests this node's queries sent, by query and outcome",
            m.dht_requests.clone(),
        );
        registry.register(
            "dht_announcements_deferred",
            "Announcements of crowded blobs spread over the next minutes",
            m.announcements_deferred.clone(),
        );
        registry.register(
            "transfer_streams_dropped",
            "Inbound transfer streams reset because the accept queue was full",
            m.streams_dropped.clone(),
        );
        registry.register("dht_lookup_duration_seconds", "Provider lookup duration", m.lookup_duration.clone());
        registry.register("dht_providers_found", "Providers found per lookup", m.providers_found.clone());
        registry.register("fetches", "Blob fetches by outcome", m.fetches.clone());
        Self { registry, ..m }
    }

    /// Counts a request made to a peer.
    pub(crate) fn requested(&self, kind: &'static str, outcome: &'static str, elapsed: Duration) {
        self.requested.get_or_create(&TransferLabels { kind, outcome }).inc();
        self.requested_duration.get_or_create(&KindLabels { kind }).observe(elapsed.as_secs_f64());
    }

    /// Counts a request served to a peer.
    pub(crate) fn served(&self, kind: &'static str, outcome: &'static str, elapsed: Duration) {
        self.served.get_or_create(&TransferLabels { kind, outcome }).inc();
        self.served_duration.get_or_create(&KindLabels { kind }).observe(elapsed.as_secs_f64());
    }

    /// Counts a connection event.
    pub(crate) fn connection(&self, direction: &'static str, event: &'static str) {
        self.connections.get_or_create(&ConnectionLabels { direction, event }).inc();
    }

    /// How many connections had `event` in `direction` since the start.
    pub(crate) fn connections(&self, direction: &'static str, event: &'static str) -> u64 {
        self.connections.get_or_create(&ConnectionLabels { direction, event }).get()
    }

    /// The text exposition.
    pub(crate) fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
