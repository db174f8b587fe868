//! How a node is configured.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use libp2p::Multiaddr;

/// The UDP port a node listens on for QUIC unless told otherwise.
pub const DEFAULT_QUIC_PORT: u16 = 4737;

/// The TCP port of the local HTTP API unless told otherwise.
pub const DEFAULT_API_PORT: u16 = 4738;

/// The most `fetch-peers` accepted: a fetch holds every asked peer's have-map, and no crowd needs
/// more sources than this at once.
pub const MAX_FETCH_PEERS: usize = 1024;

/// The most `max-uploads` and `max-uploads-per-peer` accepted: far above what one machine's
/// disk and link serve at once, and well within what the upload slots can count.
pub const MAX_UPLOADS: usize = 65_536;

/// The most `max-connections` accepted: QUIC shares one socket, but every connection holds
/// its own state, and a typo of a few digits more should not pass for a setting.
pub const MAX_CONNECTIONS: u32 = 1_000_000;

/// The longest `lookup-timeout-secs` and `spread-patience-secs` accepted: a day. A deadline
/// far enough ahead does not fit in the clock, and the node panicked computing it.
pub const MAX_WAIT: Duration = Duration::from_secs(24 * 60 * 60);

/// The least cache a node takes (see [`NodeConfig::check`]).
pub const MIN_CACHE: u64 = 64 << 10;

/// Everything a node needs to start.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Where the identity, the store and the API address live.
    pub data_dir: PathBuf,
    /// Multiaddrs to listen on. The default ([`NodeConfig::default_listen`]) is QUIC on all IPv4
    /// and IPv6 interfaces, UDP port 4737; on a machine without IPv6 the node listens on IPv4
    /// alone.
    pub listen: Vec<Multiaddr>,
    /// Peers to join the DHT through (each ending in `/p2p/<peer id>`). The default is none.
    pub bootstrap: Vec<Multiaddr>,
    /// The most bytes of other people's content the node caches. The default is 10 GiB.
    pub cache_bytes: u64,
    /// Where the local HTTP API listens; `None` runs no API. The default is 127.0.0.1:4738.
    pub api: Option<SocketAddr>,
    /// Where the read-only HTTP gateway (`GET|HEAD /{hash}`) listens, if anywhere; it may be
    /// public. The default is none.
    pub gateway: Option<SocketAddr>,
    /// Concurrent uploads served by the whole node; past it peers get `Busy`. The default is 64.
    pub max_uploads: usize,
    /// Concurrent uploads served to one peer. The default is 8.
    pub max_uploads_per_peer: usize,
    /// Node-wide upload cap in bytes per second (everything served to peers). The default is none.
    pub upload_rate: Option<u64>,
    /// Node-wide download cap in bytes per second (everything fetched from peers). The default is none.
    pub download_rate: Option<u64>,
    /// If set, only these peers may fetch from this node (a private swarm); others get `Denied`.
    /// The default is everyone.
    pub allow_peers: Option<Vec<libp2p::PeerId>>,
    /// Established connections, in and out. The default is 256.
    pub max_connections: u32,
    /// Addresses to announce as reachable (to identify and in provider records), instead of the
    /// listen addresses. The default is to announce the listen addresses, the loopback ones only
    /// when there is no other (see `crate::addrs`).
    pub external: Vec<Multiaddr>,
    /// How long a provider lookup may run before `get` gives up. The default is 30 s.
    pub lookup_timeout: Duration,
    /// Whether the store fsyncs before marking pieces verified. The default is `true`.
    pub durable: bool,
    /// Bytes of recently served pieces kept in memory. The default is 64 MiB.
    pub hot_bytes: usize,
    /// How often the DHT routing table is refreshed (a Kademlia bootstrap: a lookup of our own id
    /// and of a random id in each bucket). The default is 5 minutes.
    pub dht_refresh: Duration,
    /// Whether a DHT bootstrap, after looking up our own id, also looks up a random id in each
    /// bucket farther out (Kademlia's bucket refresh). That is a few hundred requests at a
    /// thousand nodes, mostly on new connections; without it the far buckets fill from the peers
    /// the node meets (its bootstrap peers, and everyone who contacts it). The default is `true`.
    pub refresh_buckets: bool,
    /// How long a node that published a blob holds back, from one requester, a piece it already
    /// sent to another peer that is still online, so that the crowd passes it on and the
    /// publisher sends each piece about once (see the node's crowd module). A requester that
    /// cannot reach the other holders waits at most this long; zero turns holding back off. The
    /// default is 30 s.
    pub spread_patience: Duration,
    /// The most peers one fetch asks for have-maps and takes pieces from at once. More peers
    /// find more sources, and nearer ones among them; but a node's connections carry its own
    /// sources, the fetchers that chose it and the DHT, and in a crowd larger than its connection
    /// bound a fetch that asks more peers than a share of it makes the node trim peers still
    /// trading with it, who dial again. The default is 32; a node with few connections in a
    /// large crowd does better with about a third of `max_connections`.
    pub fetch_peers: usize,
    /// Whether every connection is pinged (libp2p's ping, every 15 s and once as it opens) for the
    /// round-trip times `shoal peers` shows. Nothing else reads them: QUIC keeps its connections
    /// alive and finds dead ones itself. The default is `true`; netsim turns it off, since at a
    /// thousand nodes ping's handler, pinging every new connection from both ends at once, was
    /// 7.4% of its CPU.
    pub ping: bool,
    /// How much slower than real time the network runs: 1 on a real network. An emulator that
    /// stretches latency and bandwidth by a factor (netsim's time scale) sets it, and the node
    /// stretches every timer it sets by the same factor, so that it behaves per emulated second
    /// as a node on a real network does per second: the durations in this configuration
    /// (`lookup_timeout`, `spread_patience`) are network time, and so are the node's own timers
    /// (a fetch's have-map refreshes, back-offs and request sizing; Kademlia's request timeout;
    /// ping; idle connections; the connection manager's windows; the transfer protocol's
    /// timeouts, waits, least rate and upload slots; the drain at shutdown). Rates
    /// (`upload_rate`, `download_rate`) are in the node's own time. Upkeep of minutes or hours
    /// (`dht_refresh`, re-announcing, record TTLs) and the fetch's fixed ceilings (seconds to a
    /// minute) are not stretched. Not a configuration-file key; netsim keeps it between 0.01 and
    /// 1,000.
    pub time_scale: f64,
    /// A node that runs for one command only (`shoal get` with no node running): it uses the DHT
    /// as a client, answering none of its requests, and announces nothing. Other nodes then keep
    /// neither a routing-table entry nor a provider record that points at it once it is gone;
    /// with it a server, each short-lived fetch left the others' lookups waiting on a peer that
    /// no longer answered. Not a configuration-file key. The default is `false`.
    pub transient: bool,
    /// Whether the node asks the LAN's router to forward its QUIC port (PCP or NAT-PMP, else
    /// UPnP IGD, as home routers offer) and announces the router's public address with that
    /// port (see `crate::portmap`): for the listen address on the default IPv4 route, checked
    /// every minute (a PCP or NAT-PMP mapping asked for again, a UPnP forward looked up and
    /// renewed every half hour), asked again while no router answers, removed when the node
    /// stops. Over IPv6 it asks the router (PCP) to open its firewall to our public address on
    /// the default IPv6 route, by the same rules. Only a node listening on a private IPv4
    /// address, on a public IPv6 one or on every interface (`0.0.0.0`, `::`), with no
    /// [`external`](Self::external) address configured, asks; a router whose own address is
    /// not public (a NAT in front of it) is left alone. Without it, a node behind a NAT or a
    /// router's firewall fetches, but no peer can dial it, so it serves only the peers it
    /// dialled itself. The default is `true`; netsim turns it off.
    pub upnp: bool,
}

impl NodeConfig {
    /// `d`, a duration of network time, in the node's own (wall-clock) time: stretched by
    /// [`time_scale`](Self::time_scale).
    pub(crate) fn stretch(&self, d: Duration) -> Duration {
        shoal_protocol::fetch::stretch(d, self.time_scale)
    }

    /// [`lookup_timeout`](Self::lookup_timeout) in the node's own time.
    pub(crate) fn lookup_wait(&self) -> Duration {
        self.stretch(self.lookup_timeout)
    }

    /// QUIC on every IPv4 and IPv6 interface, on UDP `port`.
    pub fn default_listen(port: u16) -> Vec<Multiaddr> {
        use libp2p::multiaddr::Protocol;
        [std::net::Ipv4Addr::UNSPECIFIED.into(), std::net::Ipv6Addr::UNSPECIFIED.into()]
            .into_iter()
            .map(|ip: std::net::IpAddr| Multiaddr::from(ip).with(Protocol::Udp(port)).with(Protocol::QuicV1))
            .collect()
    }

    /// The defaults for a node whose data lives in `data_dir`.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            listen: Self::default_listen(DEFAULT_QUIC_PORT),
            bootstrap: Vec::new(),
            cache_bytes: 10 << 30,
            api: Some(SocketAddr::from(([127, 0, 0, 1], DEFAULT_API_PORT))),
            gateway: None,
            max_uploads: 64,
            max_uploads_per_peer: 8,
            upload_rate: None,
            download_rate: None,
            allow_peers: None,
            max_connections: 256,
            external: Vec::new(),
            lookup_timeout: Duration::from_secs(30),
            durable: true,
            hot_bytes: shoal_cache::StoreConfig::default().hot_bytes,
            dht_refresh: Duration::from_secs(300),
            refresh_buckets: true,
            spread_patience: crate::crowd::PATIENCE,
            fetch_peers: shoal_protocol::fetch::FetchConfig::default().max_peers,
            ping: true,
            time_scale: 1.0,
            transient: false,
            upnp: true,
        }
    }

    /// The default data directory: `shoal` under the user's data directory
    /// (`~/.local/share/shoal` on Linux), or `./shoal-data` if there is none.
    pub fn default_data_dir() -> PathBuf {
        dirs::data_dir().map(|d| d.join("shoal")).unwrap_or_else(|| PathBuf::from("shoal-data"))
    }
}

/// The node's configuration file (`<data-dir>/config.toml`, or `--config FILE`): every flag of
/// `shoal node`, all optional. Precedence: defaults, then this file, then `SHOAL_*` environment
/// variables, then flags.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FileConfig {
    /// Multiaddrs to listen on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<Vec<String>>,
    /// Peers to join through.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bootstrap: Option<Vec<String>>,
    /// Cache bound: bytes, or a size such as "10G".
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "size_field::cache_size")]
    pub cache_size: Option<Size>,
    /// API address.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api: Option<SocketAddr>,
    /// Gateway address.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gateway: Option<SocketAddr>,
    /// Addresses announced as reachable.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub external: Option<Vec<String>>,
    /// Node-wide upload cap, bytes per second or a size such as "10M".
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "size_field::upload_rate")]
    pub upload_rate: Option<Size>,
    /// Node-wide download cap.
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "size_field::download_rate")]
    pub download_rate: Option<Size>,
    /// Concurrent uploads for the whole node.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_uploads: Option<usize>,
    /// Concurrent uploads per peer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_uploads_per_peer: Option<usize>,
    /// Established connections.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    /// Peers allowed to fetch (a private swarm).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allow_peers: Option<Vec<String>>,
    /// Seconds a provider lookup may take.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lookup_timeout_secs: Option<u64>,
    /// Seconds a publisher holds back a piece that another online peer can pass on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spread_patience_secs: Option<u64>,
    /// Peers one fetch asks at once.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fetch_peers: Option<usize>,
    /// Ask the router to forward the QUIC port (UPnP).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upnp: Option<bool>,
}

/// A byte count written as a number or with a unit: `1048576`, `"512M"`, `"10G"`, `"1.5GiB"` is not
/// accepted (whole numbers only).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
pub enum Size {
    /// Plain bytes.
    Bytes(u64),
    /// A number with a unit K, M, G or T (powers of 1024).
    Text(String),
}

/// The [`Size`] keys of [`FileConfig`], read so that a value of the wrong kind (`-1`, `1.5`)
/// names its key and what it takes, not serde's "did not match any variant of untagged enum".
mod size_field {
    use serde::{Deserialize, Deserializer, de::Error};

    use super::Size;

    fn named<'de, D: Deserializer<'de>>(d: D, key: &str) -> Result<Option<Size>, D::Error> {
        Size::deserialize(d)
            .map(Some)
            .map_err(|_| D::Error::custom(format!("{key}: expected a whole number of bytes or a size such as \"10G\"")))
    }

    pub(super) fn cache_size<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Size>, D::Error> {
        named(d, "cache-size")
    }

    pub(super) fn upload_rate<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Size>, D::Error> {
        named(d, "upload-rate")
    }

    pub(super) fn download_rate<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Size>, D::Error> {
        named(d, "download-rate")
    }
}

impl Size {
    /// The number of bytes.
    pub fn bytes(&self) -> Result<u64, String> {
        match self {
            Size::Bytes(n) => Ok(*n),
            Size::Text(s) => parse_size(s),
        }
    }
}

/// Parses `1048576`, `512M`, `10G`, `10GiB`, `4 K` (powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (digits, mult) = match s.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        None => (s, 1u64),
        Some((i, _)) => {
            let unit = s[i..].trim().to_ascii_uppercase();
            // Each unit whole (`K`, `KB`, `KiB`): not `10iB`, nor `10GBBB`.
            let prefix = unit.strip_suffix("IB").or_else(|| unit.strip_suffix('B')).unwrap_or(&unit);
            let mult = match (unit.as_str(), prefix) {
                ("B", _) => 1,
                (_, "K") => 1 << 10,
                (_, "M") => 1 << 20,
                (_, "G") => 1 << 30,
                (_, "T") => 1 << 40,
                _ => return Err(format!("unknown unit in {s:?}: use a number of bytes, or K, M, G, T")),
            };
            (&s[..i], mult)
        }
    };
    let n: u64 = digits.parse().map_err(|_| format!("{s:?} is not a size: use e.g. 10G, 512M or 1048576"))?;
    n.checked_mul(mult).ok_or_else(|| format!("{s:?} is too large"))
}

fn parse_addrs(field: &str, v: &[String]) -> Result<Vec<Multiaddr>, String> {
    v.iter().map(|a| a.parse().map_err(|e| format!("{field}: {a:?} is not a multiaddr ({e})"))).collect()
}

impl NodeConfig {
    /// Applies the values a configuration file sets; says which value is wrong, if one is (a value
    /// of the wrong kind; `fetch-peers`, which only a file sets, out of its range). The rest is for
    /// [`NodeConfig::check`] once every layer is applied: a file's value that a flag replaces is
    /// not refused.
    pub fn apply_file(&mut self, f: &FileConfig) -> Result<(), String> {
        if let Some(v) = &f.listen {
            self.listen = parse_addrs("listen", v)?;
        }
        if let Some(v) = &f.bootstrap {
            self.bootstrap = parse_addrs("bootstrap", v)?;
        }
        if let Some(v) = &f.external {
            self.external = parse_addrs("external", v)?;
        }
        if let Some(v) = &f.cache_size {
            self.cache_bytes = v.bytes().map_err(|e| format!("cache-size: {e}"))?;
        }
        if let Some(v) = f.api {
            self.api = Some(v);
        }
        if let Some(v) = f.gateway {
            self.gateway = Some(v);
        }
        if let Some(v) = &f.upload_rate {
            self.upload_rate = Some(v.bytes().map_err(|e| format!("upload-rate: {e}"))?);
        }
        if let Some(v) = &f.download_rate {
            self.download_rate = Some(v.bytes().map_err(|e| format!("download-rate: {e}"))?);
        }
        if let Some(v) = f.max_uploads {
            self.max_uploads = v;
        }
        if let Some(v) = f.max_uploads_per_peer {
            self.max_uploads_per_peer = v;
        }
        if let Some(v) = f.max_connections {
            self.max_connections = v;
        }
        if let Some(v) = &f.allow_peers {
            let peers = v
                .iter()
                .map(|p| p.parse().map_err(|e| format!("allow-peers: {p:?} is not a peer id ({e})")))
                .collect::<Result<Vec<libp2p::PeerId>, String>>()?;
            self.allow_peers = Some(peers);
        }
        if let Some(v) = f.lookup_timeout_secs {
            self.lookup_timeout = Duration::from_secs(v);
        }
        if let Some(v) = f.spread_patience_secs {
            self.spread_patience = Duration::from_secs(v);
        }
        if let Some(v) = f.fetch_peers {
            if v == 0 || v > MAX_FETCH_PEERS {
                return Err(format!("fetch-peers: {v} is not between 1 and {MAX_FETCH_PEERS}"));
            }
            self.fetch_peers = v;
        }
        if let Some(v) = f.upnp {
            self.upnp = v;
        }
        // Checked whole once the environment and flags are applied too (`check`): a file's
        // value that they replace is not refused.
        Ok(())
    }

    /// Refuses the settings a node cannot run with, naming the setting: a count of 0, which
    /// would serve or wait for nothing (it used to be taken for 1, unsaid), an allow-list of no
    /// peer, and values so large that the node panicked on them (a lookup deadline past what
    /// the clock holds, more upload slots than a semaphore counts).
    pub fn check(&self) -> Result<(), String> {
        // A cap of 0 would stop every transfer, not lift the cap: said plainly, not read as either.
        for (name, rate) in [("upload-rate", self.upload_rate), ("download-rate", self.download_rate)] {
            if rate == Some(0) {
                return Err(format!("{name} must be above 0 bytes per second; leave it out for no cap"));
            }
        }
        // A bare number is bytes: `--cache-size 10`, meant as gigabytes, would drop every blob
        // cached at the next start and make each fetch fail as too large for the cache.
        if self.cache_bytes < MIN_CACHE {
            return Err(format!(
                "cache-size must be at least 64K, not {} bytes; a bare number is bytes: write 10G for 10 GiB",
                self.cache_bytes
            ));
        }
        // What `config show` writes must read back: TOML integers are signed 64-bit.
        if self.cache_bytes > i64::MAX as u64 {
            return Err(format!("cache-size must be at most {} bytes, not {}", i64::MAX, self.cache_bytes));
        }
        if self.listen.is_empty() {
            return Err("listen is empty, so no peer could reach this node; name at least one address".into());
        }
        let counts = [
            ("max-uploads", self.max_uploads as u64, MAX_UPLOADS as u64),
            ("max-uploads-per-peer", self.max_uploads_per_peer as u64, MAX_UPLOADS as u64),
            ("max-connections", u64::from(self.max_connections), u64::from(MAX_CONNECTIONS)),
            ("fetch-peers", self.fetch_peers as u64, MAX_FETCH_PEERS as u64),
        ];
        for (name, v, most) in counts {
            if v == 0 || v > most {
                return Err(format!("{name} must be between 1 and {most}, not {v}"));
            }
        }
        let day = MAX_WAIT.as_secs();
        if self.lookup_timeout.is_zero() || self.lookup_timeout > MAX_WAIT {
            let v = self.lookup_timeout.as_secs();
            return Err(format!("lookup-timeout-secs must be between 1 and {day} (a day), not {v}"));
        }
        if self.spread_patience > MAX_WAIT {
            let v = self.spread_patience.as_secs();
            return Err(format!(
                "spread-patience-secs must be at most {day} (a day; 0 turns holding back off), not {v}"
            ));
        }
        if self.allow_peers.as_ref().is_some_and(Vec::is_empty) {
            return Err(
                "allow-peers is empty, so no peer could fetch from this node; remove the key to allow every peer"
                    .into(),
            );
        }
        Ok(())
    }

    /// The configuration as a file would say it, every value filled in (`shoal config show`).
    pub fn to_file(&self) -> FileConfig {
        let addrs = |v: &[Multiaddr]| Some(v.iter().map(|a| a.to_string()).collect());
        FileConfig {
            listen: addrs(&self.listen),
            bootstrap: addrs(&self.bootstrap),
            cache_size: Some(Size::Bytes(self.cache_bytes)),
            api: self.api,
            gateway: self.gateway,
            external: addrs(&self.external),
            upload_rate: self.upload_rate.map(Size::Bytes),
            download_rate: self.download_rate.map(Size::Bytes),
            max_uploads: Some(self.max_uploads),
            max_uploads_per_peer: Some(self.max_uploads_per_peer),
            max_connections: Some(self.max_connections),
            allow_peers: self.allow_peers.as_ref().map(|v| v.iter().map(|p| p.to_string()).collect()),
            lookup_timeout_secs: Some(self.lookup_timeout.as_secs()),
            spread_patience_secs: Some(self.spread_patience.as_secs()),
            fetch_peers: Some(self.fetch_peers),
            upnp: Some(self.upnp),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_sets_what_it_names_and_errors_name_the_field() {
        let f: FileConfig = toml::from_str(
            r#"
            listen = ["/ip4/127.0.0.1/udp/5000/quic-v1"]
            cache-size = "2G"
            upload-rate = 1048576
            max-uploads = 8
            spread-patience-secs = 3
            fetch-peers = 12
            upnp = false
            "#,
        )
        .expect("parses");
        let mut c = NodeConfig::new("/tmp/x");
        c.apply_file(&f).expect("valid");
        assert_eq!(c.cache_bytes, 2 << 30);
        assert_eq!(c.upload_rate, Some(1 << 20));
        assert_eq!(c.max_uploads, 8);
        assert_eq!(c.spread_patience, Duration::from_secs(3));
        assert_eq!(c.fetch_peers, 12);
        assert!(!c.upnp);
        assert_eq!(c.listen[0].to_string(), "/ip4/127.0.0.1/udp/5000/quic-v1");
        // What `config show` prints reads back to the same configuration.
        let shown = toml::to_string(&c.to_file()).expect("serializes");
        let mut again = NodeConfig::new("/tmp/x");
        again.apply_file(&toml::from_str(&shown).expect("reparses")).expect("valid");
        assert_eq!(again.to_file(), c.to_file());

        let bad: FileConfig = toml::from_str(r#"cache-size = "10 parsecs""#).expect("parses as text");
        assert!(NodeConfig::new("/x").apply_file(&bad).unwrap_err().contains("cache-size"));
        let bad: FileConfig = toml::from_str("fetch-peers = 0").expect("parses");
        assert!(NodeConfig::new("/x").apply_file(&bad).unwrap_err().contains("fetch-peers"));
        assert!(toml::from_str::<FileConfig>("cache-sise = 1").is_err(), "unknown keys are refused");
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("10GiB"), Ok(10 << 30));
        assert!(parse_size("-1").is_err());
        assert_eq!(parse_size("4 K"), Ok(4 << 10));
        assert_eq!(parse_size("7b"), Ok(7));
        assert_eq!(parse_size("3kb"), Ok(3 << 10));
        for odd in ["10iB", "10GBBB", "10GIBB", "10BB"] {
            assert!(parse_size(odd).is_err(), "{odd}");
        }
    }
}
