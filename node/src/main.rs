//! The `shoal` command: runs a node, and talks to a running one through its local HTTP API.

use std::collections::HashMap;
use std::io::{IsTerminal, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use bytes::Bytes;
use clap::{Parser, Subcommand};
use libp2p::Multiaddr;
use shoal_node::api::{AddRequest, Added, FetchLine};
use shoal_node::protocol::Hash;
use shoal_node::protocol::collection::{Collection, MAGIC, MAX_ENCODED};
use shoal_node::{FetchProgress, Node, NodeConfig};

/// Shoal: a peer-to-peer content delivery network. Blobs are named by their BLAKE3 hash (the
/// string `b3sum` prints) and verified piece by piece.
#[derive(Debug, Parser)]
#[command(name = "shoal", version, propagate_version = true)]
struct Cli {
    /// The node's data directory [default: shoal under your data directory, e.g. ~/.local/share/shoal]
    #[arg(long, global = true, env = "SHOAL_DATA_DIR")]
    data_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run a node until interrupted.
    Node(NodeArgs),
    /// Publish a file or a directory (as a collection): import it into the running node, pin it
    /// and announce it. Prints its hash.
    Add {
        /// The file or directory.
        path: PathBuf,
    },
    /// Fetch a blob by hash, verified, into a file.
    Get {
        /// The blob's BLAKE3 hash (64 hex digits, as b3sum prints it).
        hash: String,
        /// Where to write it ("-" for standard output) [default: the hash, in the current directory]
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// With no node running, join the swarm through these peers (each ending in /p2p/<peer id>).
        #[arg(long, env = "SHOAL_BOOTSTRAP", value_delimiter = ',')]
        bootstrap: Vec<Multiaddr>,
    },
    /// List the blobs the running node holds: hash, size, pinned or cached, and how much of a
    /// partial one it holds.
    Ls {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove a blob from the running node: it no longer stores, serves or announces it.
    Rm {
        /// The blob's hash.
        hash: String,
    },
    /// Pin a blob the running node holds: it is never evicted.
    Pin {
        /// The blob's hash.
        hash: String,
    },
    /// Unpin a blob: it joins the cache, which evicts the least recently used blobs when it is full.
    Unpin {
        /// The blob's hash.
        hash: String,
    },
    /// List the providers of a blob found through the DHT.
    Providers {
        /// The blob's hash.
        hash: String,
    },
    /// List the connected peers.
    Peers {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// The node's configuration.
    #[command(subcommand)]
    Config(ConfigCmd),
    /// Show the node's state.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, clap::Args)]
struct NodeArgs {
    /// Read settings from this TOML file [default: <data-dir>/config.toml, if it exists]
    #[arg(long, env = "SHOAL_CONFIG")]
    config: Option<PathBuf>,
    /// Listen on this multiaddr (repeatable) [default: /ip4/0.0.0.0/udp/4737/quic-v1 and /ip6/::/udp/4737/quic-v1, IPv4 alone on a machine without IPv6]
    #[arg(long, env = "SHOAL_LISTEN", value_delimiter = ',')]
    listen: Vec<Multiaddr>,
    /// Join the swarm through this peer (repeatable; each ends in /p2p/<peer id>).
    #[arg(long, env = "SHOAL_BOOTSTRAP", value_delimiter = ',')]
    bootstrap: Vec<Multiaddr>,
    /// The most bytes of other people's content to cache, e.g. 10G, 512M [default: 10G]
    #[arg(long, env = "SHOAL_CACHE_SIZE", value_parser = parse_size)]
    cache_size: Option<u64>,
    /// Where the local HTTP API listens [default: 127.0.0.1:4738]
    #[arg(long, env = "SHOAL_API_ADDR")]
    api: Option<SocketAddr>,
    /// Serve blobs read-only over HTTP at this address, as GET /<hash> (may be public) [default: off]
    #[arg(long, env = "SHOAL_GATEWAY")]
    gateway: Option<SocketAddr>,
    /// Announce this address as reachable, instead of the listen addresses (repeatable) [default: the listen addresses but loopback ones]
    #[arg(long, env = "SHOAL_EXTERNAL", value_delimiter = ',')]
    external: Vec<Multiaddr>,
    /// Do not ask the LAN's router to forward the QUIC port (PCP, NAT-PMP or UPnP), nor to open its IPv6 firewall to it (PCP); SHOAL_NO_UPNP takes 1, true, yes, on, or 0, false, no, off [default: ask, when listening on a private IPv4 address, a public IPv6 one, 0.0.0.0 or :: with no --external]
    #[arg(long, env = "SHOAL_NO_UPNP", value_parser = clap::builder::BoolishValueParser::new())]
    no_upnp: bool,
    /// Cap on everything uploaded to peers, bytes per second, e.g. 10M [default: none]
    #[arg(long, env = "SHOAL_UPLOAD_RATE", value_parser = parse_size)]
    upload_rate: Option<u64>,
    /// Cap on everything downloaded from peers, bytes per second [default: none]
    #[arg(long, env = "SHOAL_DOWNLOAD_RATE", value_parser = parse_size)]
    download_rate: Option<u64>,
    /// Concurrent uploads for the whole node [default: 64]
    #[arg(long, env = "SHOAL_MAX_UPLOADS")]
    max_uploads: Option<usize>,
    /// Established connections [default: 256]
    #[arg(long, env = "SHOAL_MAX_CONNECTIONS")]
    max_connections: Option<u32>,
    /// Only these peers may fetch from this node (repeatable): a private swarm [default: everyone]
    #[arg(long, env = "SHOAL_ALLOW_PEER", value_delimiter = ',')]
    allow_peer: Vec<libp2p::PeerId>,
    /// Log format: text or json (logs go to standard error; filter with RUST_LOG)
    #[arg(long, env = "SHOAL_LOG_FORMAT", default_value = "text")]
    log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum ConfigCmd {
    /// Print the effective node configuration (defaults, file, environment, flags) as TOML.
    Show(NodeArgs),
}

fn parse_size(s: &str) -> Result<u64, String> {
    shoal_node::config::parse_size(s)
}

/// The node configuration: defaults, then the file, then environment and flags (clap reads both).
fn effective_config(data_dir: PathBuf, args: &NodeArgs) -> anyhow::Result<NodeConfig> {
    let mut config = NodeConfig::new(&data_dir);
    let (path, explicit) = match &args.config {
        Some(p) => (p.clone(), true),
        None => (data_dir.join("config.toml"), false),
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let file: shoal_node::config::FileConfig =
                toml::from_str(&text).map_err(|e| anyhow!("{}: {e}", path.display()))?;
            config.apply_file(&file).map_err(|e| anyhow!("{}: {e}", path.display()))?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {}
        Err(e) => bail!("cannot read the config file {}: {e}", path.display()),
    }
    if !args.listen.is_empty() {
        config.listen = args.listen.clone();
    }
    if !args.bootstrap.is_empty() {
        config.bootstrap = args.bootstrap.clone();
    }
    if !args.external.is_empty() {
        config.external = args.external.clone();
    }
    if args.no_upnp {
        config.upnp = false;
    }
    if let Some(v) = args.cache_size {
        config.cache_bytes = v;
    }
    if let Some(v) = args.api {
        config.api = Some(v);
    }
    if let Some(v) = args.gateway {
        config.gateway = Some(v);
    }
    if let Some(v) = args.upload_rate {
        config.upload_rate = Some(v);
    }
    if let Some(v) = args.download_rate {
        config.download_rate = Some(v);
    }
    if let Some(v) = args.max_uploads {
        config.max_uploads = v;
    }
    if let Some(v) = args.max_connections {
        config.max_connections = v;
    }
    if !args.allow_peer.is_empty() {
        config.allow_peers = Some(args.allow_peer.clone());
    }
    config.check().map_err(|e| anyhow!(e))?;
    Ok(config)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let json_logs = matches!(&cli.command, Cmd::Node(a) if a.log_format == LogFormat::Json);
    init_tracing(matches!(cli.command, Cmd::Node(_)), json_logs);
    let data_dir = cli.data_dir.clone().unwrap_or_else(NodeConfig::default_data_dir);
    let result = match cli.command {
        Cmd::Node(args) => run_node(data_dir, args),
        Cmd::Add { path } => add(&data_dir, &path),
        Cmd::Get { hash, output, bootstrap } => {
            remove_scratch_on_interrupt();
            get(&data_dir, &hash, output, bootstrap)
        }
        Cmd::Ls { json } => ls(&data_dir, json),
        Cmd::Rm { hash } => change(&data_dir, &hash, Change::Remove),
        Cmd::Pin { hash } => change(&data_dir, &hash, Change::Pin),
        Cmd::Unpin { hash } => change(&data_dir, &hash, Change::Unpin),
        Cmd::Providers { hash } => providers(&data_dir, &hash),
        Cmd::Peers { json } => peers(&data_dir, json),
        Cmd::Status { json } => status(&data_dir, json),
        Cmd::Config(ConfigCmd::Show(args)) => effective_config(data_dir, &args).and_then(|c| {
            let text = toml::to_string(&c.to_file())?;
            print_out(|out| out.write_all(text.as_bytes()))
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// What an interrupted `shoal get` removes: its temporary directory and the partial files and
/// directories it writes beside its output before they verified.
static SCRATCH: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());

/// Marks `path` to be removed if the command is interrupted. A path renamed into place since is
/// gone, and removing it does nothing.
fn scratch(path: &Path) {
    SCRATCH.lock().unwrap_or_else(|e| e.into_inner()).push(path.to_owned());
}

/// On SIGINT or SIGTERM, removes what [`scratch`] marked and exits with status 130, as an
/// interrupted command does.
fn remove_scratch_on_interrupt() {
    std::thread::spawn(|| {
        let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
        runtime.block_on(async { shutdown_signal().await });
        for path in SCRATCH.lock().unwrap_or_else(|e| e.into_inner()).drain(..) {
            let _ = std::fs::remove_dir_all(&path).or_else(|_| std::fs::remove_file(&path));
        }
        std::process::exit(130);
    });
}

fn init_tracing(node: bool, json: bool) {
    // A lone node's "no known peers" from Kademlia's bootstrap is expected, not a warning.
    let default = if node { "info,libp2p_kad=error" } else { "warn,libp2p_kad=error" };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let fmt = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if json {
        fmt.json().with_current_span(true).with_span_list(true).init();
    } else {
        fmt.with_ansi(std::io::stderr().is_terminal()).init();
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?)
}

fn run_node(data_dir: PathBuf, args: NodeArgs) -> anyhow::Result<()> {
    let config = effective_config(data_dir, &args)?;
    raise_open_files_limit();
    let runtime = runtime()?;
    let result = runtime.block_on(async move {
        // Before anything can take a while: a SIGTERM that comes early still stops us cleanly.
        let stop = shutdown_signal();
        let node = Node::start(config.clone()).await?;
        let handle = node.handle();
        let addrs = tokio::time::timeout(Duration::from_secs(10), handle.wait_listening())
            .await
            .map_err(|_| anyhow!("the node did not start listening within 10 s"))??;
        // Best effort: a node keeps running when whoever started it stops reading its output.
        let mut banner = format!("peer id: {}\n", handle.peer_id());
        for a in &addrs {
            banner.push_str(&format!("listening: {a}\n"));
        }
        if let Ok(api) = std::fs::read_to_string(config.data_dir.join("api")) {
            banner.push_str(&format!("api: http://{api}\n"));
            // Two names, easy to swap: `SHOAL_API` tells commands where to look, not the node
            // where to listen.
            if let Some(look) = api_from_env()
                && look != api.trim()
            {
                tracing::warn!(
                    SHOAL_API = %look,
                    api = %api.trim(),
                    "SHOAL_API is where shoal commands look for a node; this node's API listens where \
                     --api or SHOAL_API_ADDR says"
                );
            }
        }
        // The file a gateway of this run wrote, not one a crash left behind.
        if config.gateway.is_some()
            && let Ok(gateway) = std::fs::read_to_string(config.data_dir.join("gateway"))
        {
            banner.push_str(&format!("gateway: http://{gateway}\n"));
        }
        banner.push_str(&format!("data: {}\n", config.data_dir.display()));
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(banner.as_bytes()).and_then(|()| out.flush());
        drop(out);
        stop.await;
        let _ = writeln!(std::io::stderr(), "stopping: finishing uploads and flushing the store");
        node.shutdown().await
    });
    // Dropping the runtime would wait for every blocking task: one stuck in a read that never
    // ends (an import of a file on a hung network mount) kept the stopped node from exiting.
    runtime.shutdown_timeout(SHUTDOWN_GRACE);
    result
}

/// How long a stopped node waits for its blocking tasks (imports, store reads) before it exits.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Raises the soft limit on open files to the hard one (at most 2^20), as Go's runtime does for
/// every program: a shell's default of 1,024 is little for a node that keeps many blobs' files
/// and its clients' connections open. The store sizes what it keeps open by the limit then.
fn raise_open_files_limit() {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let now = getrlimit(Resource::Nofile);
    let Some(current) = now.current else { return };
    let target = now.maximum.unwrap_or(u64::MAX).min(1 << 20);
    if target > current {
        match setrlimit(Resource::Nofile, Rlimit { current: Some(target), maximum: now.maximum }) {
            Ok(()) => tracing::debug!(from = current, to = target, "raised the limit on open files"),
            Err(e) => tracing::debug!(limit = current, error = %e, "cannot raise the limit on open files"),
        }
    }
}

/// Installs the SIGINT and SIGTERM handlers now; the future resolves at the first signal.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let int = signal(SignalKind::interrupt());
        let term = signal(SignalKind::terminate());
        async move {
            match (int, term) {
                (Ok(mut int), Ok(mut term)) => {
                    tokio::select! {
                        _ = int.recv() => {}
                        _ = term.recv() => {}
                    }
                }
                _ => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    async move {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// The running node's API address: `SHOAL_API`, else `<data-dir>/api` while a node holds the
/// store there (a node killed before it could remove the file leaves it behind).
fn api_addr(data_dir: &Path) -> Option<String> {
    if let Some(a) = api_from_env() {
        return Some(a);
    }
    let addr = std::fs::read_to_string(data_dir.join("api")).ok().map(|s| s.trim().to_string())?;
    match shoal_node::cache::Store::in_use(&data_dir.join("store")) {
        Ok(false) => None,
        Ok(true) | Err(_) => Some(addr),
    }
}

/// `SHOAL_API`, if set, as `host:port`.
fn api_from_env() -> Option<String> {
    let a = std::env::var("SHOAL_API").ok()?;
    Some(a.trim().trim_start_matches("http://").trim_end_matches('/').to_string())
}

fn require_api(data_dir: &Path) -> anyhow::Result<String> {
    api_addr(data_dir).ok_or_else(|| {
        anyhow!("no running node found (no {}/api); start one with `shoal node`, or set SHOAL_API", data_dir.display())
    })
}

/// The running node's API token: `SHOAL_API_TOKEN`, else `<data-dir>/api-token`.
fn token(data_dir: &Path) -> anyhow::Result<String> {
    if let Ok(t) = std::env::var("SHOAL_API_TOKEN") {
        return Ok(t.trim().to_string());
    }
    let path = data_dir.join(shoal_node::api::TOKEN_FILE);
    std::fs::read_to_string(&path).map(|t| t.trim().to_string()).with_context(|| {
        format!(
            "cannot read the node's API token at {} (set SHOAL_API_TOKEN, or run as the node's user)",
            path.display()
        )
    })
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder().http_status_as_error(false).build().into()
}

/// Reads an API answer: the JSON body on success, the node's error message otherwise.
fn answer<T: serde::de::DeserializeOwned>(
    resp: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    api: &str,
) -> anyhow::Result<T> {
    Ok(checked(resp.map_err(|e| unreachable(api, e))?)?.body_mut().read_json()?)
}

/// What a request the node's API did not answer says.
fn unreachable(api: &str, e: ureq::Error) -> anyhow::Error {
    anyhow!("cannot reach the node's API at {api} ({e}); is `shoal node` running?")
}

/// An API answer that succeeded, or the node's error message.
fn checked(mut resp: ureq::http::Response<ureq::Body>) -> anyhow::Result<ureq::http::Response<ureq::Body>> {
    if !resp.status().is_success() {
        let body: serde_json::Value = resp.body_mut().read_json().unwrap_or_default();
        let msg = body.get("error").and_then(|e| e.as_str()).unwrap_or("no details").to_string();
        bail!("{msg}");
    }
    Ok(resp)
}

fn parse_hash(s: &str) -> anyhow::Result<Hash> {
    s.parse().map_err(|e| anyhow!("{s:?} is not a content id: {e}"))
}

fn add(data_dir: &Path, path: &Path) -> anyhow::Result<()> {
    // The node opens the file itself, by its full path.
    let full = std::fs::canonicalize(path).with_context(|| format!("cannot read {}", path.display()))?;
    // The API names files in JSON, which holds text only.
    if full.to_str().is_none() {
        bail!(
            "{} has a name that is not valid UTF-8, which the node's API cannot carry; add a copy under a UTF-8 name (a name plays no part in a hash)",
            path.display()
        );
    }
    let api = require_api(data_dir)?;
    let token = token(data_dir)?;
    let added: Added = answer(
        agent()
            .post(format!("http://{api}/v1/blobs"))
            .header("Authorization", format!("Bearer {token}"))
            .send_json(&AddRequest { path: full }),
        &api,
    )?;
    // As b3sum prints it: the path as given.
    print_out(|out| writeln!(out, "{}  {}", added.hash, path.display()))?;
    if !added.skipped.is_empty() {
        eprintln!("{}", skipped_note(&added.skipped, added.skipped_count.unwrap_or(added.skipped.len())));
    }
    Ok(())
}

/// What `shoal add DIR` says of the `count` entries its collection left out: the first few by name.
fn skipped_note(skipped: &[String], count: usize) -> String {
    const SHOWN: usize = 10;
    let count = count.max(skipped.len());
    let shown = skipped.len().min(SHOWN);
    let mut names = skipped[..shown].join(", ");
    if count > shown {
        names.push_str(&format!(" and {} more", count - shown));
    }
    match count {
        1 => format!("skipped 1 entry (not a regular file, or one that changed as it was read): {names}"),
        n => format!("skipped {n} entries (not regular files, or ones that changed as they were read): {names}"),
    }
}

/// Writes to standard output; a reader that stopped reading (`shoal peers | head`) is not an error.
fn print_out(write: impl FnOnce(&mut std::io::StdoutLock<'static>) -> std::io::Result<()>) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match write(&mut out).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}

fn ls(data_dir: &Path, json: bool) -> anyhow::Result<()> {
    let api = require_api(data_dir)?;
    let resp = agent()
        .get(format!("http://{api}/v1/blobs"))
        .header("Authorization", format!("Bearer {}", token(data_dir)?))
        .call()
        .map_err(|e| unreachable(&api, e))?;
    let mut resp = checked(resp)?;
    // A store of a million blobs lists in about 150 MB.
    let held: Vec<shoal_node::HeldBlob> = resp.body_mut().with_config().limit(1 << 30).read_json()?;
    if json {
        return print_out(|out| {
            serde_json::to_writer_pretty(&mut *out, &held).map_err(std::io::Error::from).and_then(|()| writeln!(out))
        });
    }
    if held.is_empty() {
        // On standard error: the list itself stays empty for scripts.
        eprintln!("no blobs held; `shoal add PATH` publishes one, `shoal get HASH` fetches one");
    }
    print_out(|out| {
        held.iter().try_for_each(|b| {
            let kind = if b.pinned { "pinned" } else { "cached" };
            let partial = match b.complete {
                true => String::new(),
                false => format!("  {}% held", b.held_bytes.saturating_mul(100) / b.size.max(1)),
            };
            writeln!(out, "{}  {:>10}  {kind}{partial}", b.hash, human_size(b.size))
        })
    })
}

/// `bytes` as people read it: `512 B`, `4.0 MiB`.
fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// What `shoal rm`, `pin` and `unpin` ask of the node.
#[derive(Debug, Clone, Copy)]
enum Change {
    Remove,
    Pin,
    Unpin,
}

fn change(data_dir: &Path, hash: &str, what: Change) -> anyhow::Result<()> {
    let hash = parse_hash(hash)?;
    let api = require_api(data_dir)?;
    let auth = format!("Bearer {}", token(data_dir)?);
    let (resp, done) = match what {
        Change::Remove => {
            (agent().delete(format!("http://{api}/v1/blobs/{hash}")).header("Authorization", auth).call(), "removed")
        }
        Change::Pin => {
            (agent().post(format!("http://{api}/v1/pins/{hash}")).header("Authorization", auth).send_empty(), "pinned")
        }
        Change::Unpin => {
            (agent().delete(format!("http://{api}/v1/pins/{hash}")).header("Authorization", auth).call(), "unpinned")
        }
    };
    let said: serde_json::Value = answer(resp, &api)?;
    print_out(|out| writeln!(out, "{done} {hash}"))?;
    // The cache took the unpinned blob by evicting others, or could not hold it at all.
    for evicted in said.get("evicted").and_then(|e| e.as_array()).into_iter().flatten() {
        match evicted.as_str() {
            Some(h) if h == hash.to_string() => {
                eprintln!("{hash} is larger than the room in the cache (--cache-size), so it was removed")
            }
            Some(h) => eprintln!("evicted {h} to make room for it"),
            None => {}
        }
    }
    Ok(())
}

fn get(data_dir: &Path, hash: &str, output: Option<PathBuf>, bootstrap: Vec<Multiaddr>) -> anyhow::Result<()> {
    let hash = parse_hash(hash)?;
    let output = output.unwrap_or_else(|| PathBuf::from(hash.to_string()));
    check_output(&output)?;
    match api_addr(data_dir) {
        Some(api) => get_blob(&mut ViaApi { api, agent: agent(), token: None }, hash, &output),
        None => get_with_own_node(hash, &output, bootstrap),
    }
}

/// Refuses, before anything is fetched, an output `shoal get` cannot write, naming it as the user
/// gave it: an existing directory (a file is not written into one, and a collection goes to a new
/// directory), a symlink to nothing, or a path in a directory that does not exist. These were
/// found only once the whole blob was fetched, and named the partial file beside the output.
fn check_output(output: &Path) -> anyhow::Result<()> {
    if output == Path::new("-") {
        return Ok(());
    }
    match std::fs::metadata(output) {
        Ok(m) if m.is_dir() => bail!(
            "{} exists and is a directory; name a new path with -o (a file, or the directory to write a collection to)",
            output.display()
        ),
        Ok(_) => return Ok(()),
        Err(_) if std::fs::symlink_metadata(output).is_ok() => {
            bail!("cannot write to {}: it is a symlink to nothing", output.display())
        }
        Err(_) => {}
    }
    let parent = match output.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    match std::fs::metadata(parent) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => bail!("cannot write to {}: {} is not a directory", output.display(), parent.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("cannot write to {}: the directory {} does not exist", output.display(), parent.display())
        }
        Err(e) => bail!("cannot write to {}: cannot read {} ({e})", output.display(), parent.display()),
    }
}

/// Where `shoal get` fetches blobs and reads them back from: the running node's API, or a node of
/// its own.
trait Blobs {
    /// Fetches `hash` into the node's store, showing progress.
    fn fetch(&mut self, hash: Hash) -> anyhow::Result<FetchProgress>;
    /// The blob's bytes, as the node verified them.
    fn open(&mut self, hash: Hash) -> anyhow::Result<Box<dyn Read + '_>>;
    /// The blob's first `len` bytes (fewer if it is shorter).
    fn head(&mut self, hash: Hash, len: usize) -> anyhow::Result<Vec<u8>> {
        let mut head = Vec::with_capacity(len);
        self.open(hash)?.take(len as u64).read_to_end(&mut head)?;
        Ok(head)
    }
    /// Fetches `hash` and writes it to standard output as its pieces verify, in order, rather
    /// than once the whole blob is held; returns the bytes written. `None` where that is not
    /// offered: the caller fetches first, then writes.
    fn stream_to_stdout(&mut self, _hash: Hash) -> anyhow::Result<Option<u64>> {
        Ok(None)
    }
    /// Writes the fetched blob to the regular file `target`, replacing it only once the bytes
    /// verified. With `keep`, the blob stays where [`Blobs::open`] reads it (another file is to
    /// hold it too).
    fn write_file(&mut self, hash: Hash, target: &Path, _keep: bool) -> anyhow::Result<()> {
        write_into_place(hash, self.open(hash)?, target)
    }
}

/// Fetches `hash` and writes it to `output`. A collection (what `shoal add` made of a directory)
/// is written out as that directory, each file fetched in turn, unless the output is "-".
fn get_blob(blobs: &mut dyn Blobs, hash: Hash, output: &Path) -> anyhow::Result<()> {
    if output == Path::new("-")
        && let Some(bytes) = blobs.stream_to_stdout(hash)?
    {
        eprintln!("verified {hash}: {bytes} bytes, written as they came");
        return Ok(());
    }
    let progress = blobs.fetch(hash)?;
    let collection = match output != Path::new("-") && progress.total_bytes.unwrap_or(0) <= MAX_ENCODED as u64 {
        true => read_collection(blobs, hash)?,
        false => None,
    };
    let Some(collection) = collection else {
        write_blob(blobs, hash, output, false)?;
        report(hash, &progress);
        return Ok(());
    };
    report(hash, &progress);
    // A collection's publisher names its paths: they go into a directory of their own, made
    // fresh beside the output and renamed into place once every file verified, never into a
    // directory that exists (a home directory's dotfiles, a symlink planted in it).
    if std::fs::symlink_metadata(output).is_ok() {
        bail!(
            "{hash} is a directory of {} files; {} exists, so name a new path with -o",
            collection.entries().len(),
            output.display()
        );
    }
    let partial = partial_path(output);
    scratch(&partial);
    let written = (|| {
        std::fs::create_dir(&partial).with_context(|| format!("cannot write {}", output.display()))?;
        let mut bytes = 0;
        // How many files still to write hold each blob: a blob written out for good leaves a
        // short-lived node's store (see [`Blobs::write_file`]).
        let mut uses: HashMap<Hash, usize> = HashMap::new();
        for entry in collection.entries() {
            *uses.entry(entry.hash).or_default() += 1;
        }
        for entry in collection.entries() {
            let relative: PathBuf = entry.path.split('/').collect();
            // Names only: on Windows a component like `C:` would take the join elsewhere.
            if !relative.components().all(|c| matches!(c, std::path::Component::Normal(_))) {
                bail!("{hash} names {:?}, which is no path inside a directory here", entry.path);
            }
            let path = partial.join(&relative);
            // Two entries the file system takes for one (names that differ in case, on a file
            // system that ignores it): the second would replace the first.
            if std::fs::symlink_metadata(&path).is_ok() {
                bail!("{hash} names {:?} twice, as this file system sees names; nothing was written", entry.path);
            }
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
            }
            let progress = blobs.fetch(entry.hash)?;
            let left = uses.get_mut(&entry.hash).map_or(0, |n| {
                *n -= 1;
                *n
            });
            write_blob(blobs, entry.hash, &path, left > 0)?;
            bytes += progress.verified_bytes;
            eprintln!("  {}: {} bytes", output.join(&relative).display(), progress.verified_bytes);
        }
        std::fs::rename(&partial, output).with_context(|| format!("cannot write {}", output.display()))?;
        anyhow::Ok(bytes)
    })();
    let bytes = match written {
        Ok(bytes) => bytes,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&partial);
            return Err(e);
        }
    };
    eprintln!("collection {hash}: {} files, {bytes} bytes, in {}", collection.entries().len(), output.display());
    Ok(())
}

/// The collection the fetched blob `hash` is, if it is one; `None` for any other blob, including
/// bytes that only start like a collection.
fn read_collection(blobs: &mut dyn Blobs, hash: Hash) -> anyhow::Result<Option<Collection>> {
    if !Collection::is_collection(&blobs.head(hash, MAGIC.len() + 1)?) {
        return Ok(None);
    }
    let mut head = Vec::new();
    blobs.open(hash)?.read_to_end(&mut head).context("the download was interrupted")?;
    let got = Hash::of(&head);
    if got != hash {
        bail!("the bytes received hash to {got}, not {hash}; nothing was written");
    }
    Ok(Collection::decode(&head).ok())
}

/// Where `output` is written before it verified: beside it, so that the rename into place stays
/// on one file system, under a name of this run's own (made with `create_new` or `create_dir`,
/// never one that exists: a user's file, another run's, a symlink planted there).
fn partial_path(output: &Path) -> PathBuf {
    let mut name = output.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(format!(".shoal-partial-{}-{:08x}", std::process::id(), rand::random::<u32>()));
    output.with_file_name(name)
}

fn report(hash: Hash, progress: &FetchProgress) {
    eprintln!(
        "verified {hash}: {} bytes ({} already held, {} received from peers)",
        progress.verified_bytes, progress.resumed_bytes, progress.fetched_bytes
    );
}

fn show_progress(p: &FetchProgress) {
    let mut err = std::io::stderr();
    if !err.is_terminal() {
        return;
    }
    let line = match p.total_bytes {
        Some(t) if t > 0 => format!(
            "\r{:>5.1}%  {} / {} MiB from {} peers   ",
            100.0 * p.verified_bytes as f64 / t as f64,
            p.verified_bytes >> 20,
            t >> 20,
            p.peers
        ),
        _ => "\rlooking for providers…   ".to_string(),
    };
    let _ = err.write_all(line.as_bytes());
    let _ = err.flush();
}

/// `shoal get` through the running node's API.
struct ViaApi {
    api: String,
    agent: ureq::Agent,
    /// Sent with the requests that stream a blob: a transient node's API asks it on every route.
    token: Option<String>,
}

impl Blobs for ViaApi {
    fn fetch(&mut self, hash: Hash) -> anyhow::Result<FetchProgress> {
        let api = &self.api;
        let mut resp =
            self.agent.post(format!("http://{api}/v1/fetch/{hash}")).send_empty().map_err(|e| unreachable(api, e))?;
        if !resp.status().is_success() {
            let body: serde_json::Value = resp.body_mut().read_json().unwrap_or_default();
            bail!("{}", body.get("error").and_then(|e| e.as_str()).unwrap_or("fetch refused"));
        }
        let reader = std::io::BufReader::new(resp.into_body().into_reader());
        let mut last = None;
        for line in std::io::BufRead::lines(reader) {
            let line = line.map_err(|e| anyhow!("the node stopped answering during the fetch ({e})"))?;
            let line: FetchLine = serde_json::from_str(&line)?;
            show_progress(&line.progress);
            last = Some(line);
        }
        if std::io::stderr().is_terminal() {
            eprintln!();
        }
        match last {
            Some(FetchLine { error: Some(e), .. }) => bail!("{e}"),
            Some(FetchLine { progress, .. }) if progress.done => Ok(progress),
            _ => bail!("the node stopped answering during the fetch"),
        }
    }

    fn head(&mut self, hash: Hash, len: usize) -> anyhow::Result<Vec<u8>> {
        if len == 0 {
            return Ok(Vec::new());
        }
        let Some(body) = self.read_back(hash, Some(len))? else { return Ok(Vec::new()) };
        let mut head = Vec::with_capacity(len);
        body.take(len as u64).read_to_end(&mut head)?;
        Ok(head)
    }

    fn open(&mut self, hash: Hash) -> anyhow::Result<Box<dyn Read + '_>> {
        // An empty blob is only refused a range, so this is never `None`.
        let body = self.read_back(hash, None)?.ok_or_else(|| anyhow!("the node cannot read {hash} back"))?;
        Ok(Box::new(body))
    }

    /// The node's `GET /v1/blobs/{hash}` fetches the blob if it lacks it and streams each piece
    /// once verified, the pieces it sends next fetched first: a player reading standard output
    /// starts within a few pieces, not after the whole blob. The fetch stops if this command
    /// does (`fetch=while-read`). A piece that fails ends the body early, and the whole is checked
    /// against the hash at the end.
    fn stream_to_stdout(&mut self, hash: Hash) -> anyhow::Result<Option<u64>> {
        let mut req = self
            .agent
            .get(format!("http://{}/v1/blobs/{hash}?fetch=while-read", self.api))
            .header("Accept", "application/octet-stream");
        if let Some(token) = &self.token {
            req = req.header("Authorization", format!("Bearer {token}"));
        }
        let resp = req.call().map_err(|e| unreachable(&self.api, e))?;
        let status = resp.status();
        if !status.is_success() {
            let mut reason = String::new();
            let _ = resp.into_body().into_reader().take(64 << 10).read_to_string(&mut reason);
            match reason.trim() {
                "" => bail!("the node could not serve {hash} (status {status})"),
                reason => bail!("{reason}"),
            }
        }
        let total: Option<u64> =
            resp.headers().get("content-length").and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok());
        let shown = total.filter(|t| *t > 0 && std::io::stderr().is_terminal());
        let mut body =
            Progressing { inner: resp.into_body().into_reader(), read: 0, total: shown, shown: None, cut: false };
        let written = write_verified_into(hash, &mut body, std::io::stdout().lock(), Path::new("-"));
        if shown.is_some() {
            eprintln!();
        }
        match (written, total) {
            (Err(_), Some(total)) if body.cut => bail!(
                "the node ended {hash} after {} of {total} bytes: a piece could not be fetched or verified (see the node's log)",
                body.read
            ),
            (written, _) => written.map(|()| Some(body.read)),
        }
    }
}

/// A body read as it streams, its progress shown on a terminal (`total`, if one is).
struct Progressing<R> {
    inner: R,
    read: u64,
    total: Option<u64>,
    /// The tenth of a percent shown last.
    shown: Option<u64>,
    /// The body ended in an error: the node cut it short.
    cut: bool,
}

impl<R: Read> Read for Progressing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf).inspect_err(|_| self.cut = true)?;
        self.read += n as u64;
        if let Some(total) = self.total {
            let permille = self.read.saturating_mul(1000) / total;
            if self.shown != Some(permille) {
                self.shown = Some(permille);
                let line =
                    format!("\r{:>5.1}%  {} / {} MiB written   ", permille as f64 / 10.0, self.read >> 20, total >> 20);
                let _ = std::io::stderr().write_all(line.as_bytes());
            }
        }
        Ok(n)
    }
}

impl ViaApi {
    /// The blob's own bytes (a collection is not turned into its listing), or its first `len`;
    /// `None` for a range an empty blob does not have.
    fn read_back(&self, hash: Hash, len: Option<usize>) -> anyhow::Result<Option<impl Read + use<>>> {
        let mut req =
            self.agent.get(format!("http://{}/v1/blobs/{hash}", self.api)).header("Accept", "application/octet-stream");
        if let Some(len) = len {
            req = req.header("Range", format!("bytes=0-{}", len.saturating_sub(1)));
        }
        let resp = req.call()?;
        if len.is_some() && resp.status() == 416 {
            return Ok(None);
        }
        if !resp.status().is_success() {
            bail!("the node fetched {hash} but cannot read it back (status {})", resp.status());
        }
        Ok(Some(resp.into_body().into_reader()))
    }
}

/// Where `shoal get` writes a blob.
enum Output {
    /// Standard output ("-").
    Stdout,
    /// A file that is not a regular one (a device such as /dev/null, a pipe): written into as the
    /// bytes come, not replaced.
    Special,
    /// A regular file (a symlink's target), new or replaced once the bytes verified.
    File(PathBuf),
}

impl Output {
    fn of(output: &Path) -> anyhow::Result<Self> {
        if output == Path::new("-") {
            return Ok(Output::Stdout);
        }
        // A symlink is written through, as a shell's `>` would.
        match std::fs::metadata(output) {
            Ok(m) if m.is_dir() => bail!("cannot write to {}: it is a directory", output.display()),
            Ok(m) if !m.is_file() => Ok(Output::Special),
            Ok(_) => Ok(Output::File(
                std::fs::canonicalize(output).with_context(|| format!("cannot resolve {}", output.display()))?,
            )),
            Err(_) if std::fs::symlink_metadata(output).is_ok() => {
                bail!("cannot write to {}: it is a symlink to nothing", output.display())
            }
            Err(_) => Ok(Output::File(output.to_owned())),
        }
    }
}

/// Writes the fetched blob `hash` to `output`, standard output ("-") or a device or pipe as its
/// verified bytes come, a regular file as [`Blobs::write_file`] does (`keep` as there).
fn write_blob(blobs: &mut dyn Blobs, hash: Hash, output: &Path, keep: bool) -> anyhow::Result<()> {
    match Output::of(output)? {
        Output::Stdout => write_verified_into(hash, blobs.open(hash)?, std::io::stdout().lock(), output),
        Output::Special => {
            // Opened once the node has the bytes to give: a reader at a pipe sees nothing, not an
            // empty end, if it has not.
            let source = blobs.open(hash)?;
            let to = std::fs::OpenOptions::new()
                .write(true)
                .open(output)
                .with_context(|| format!("cannot open {}", output.display()))?;
            write_verified_into(hash, source, to, output)
        }
        Output::File(target) => blobs.write_file(hash, &target, keep),
    }
}

/// Writes `source` to the regular file `output` only if its BLAKE3 hash is `hash`: into a
/// temporary file beside it, renamed into place after the check.
///
/// A file replaced keeps its mode ([`keep_attributes`]), set before the new one takes its place.
fn write_into_place(hash: Hash, mut source: impl Read, output: &Path) -> anyhow::Result<()> {
    let replaced = std::fs::metadata(output).ok().filter(|m| m.is_file());
    let partial = partial_path(output);
    scratch(&partial);
    let result = (|| {
        // No wider open than the file replaced while the bytes come.
        use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
        let mut file = std::io::BufWriter::new(
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(replaced.as_ref().map_or(0o666, |m| m.mode() & 0o777))
                .open(&partial)
                .with_context(|| format!("cannot write {}", output.display()))?,
        );
        let got = copy_hashing(&mut source, &mut file, output)?;
        let file = file.into_inner().map_err(|e| e.into_error())?;
        if let Some(old) = &replaced {
            keep_attributes(&file, old, output);
        }
        file.sync_all()?;
        if got != hash {
            bail!("the bytes received hash to {got}, not {hash}; nothing was written");
        }
        std::fs::rename(&partial, output).with_context(|| format!("cannot write {}", output.display()))?;
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    result
}

/// Gives `file`, which is to replace `output`, the permission bits of `old`, the file it
/// replaces, and its owner and group if this process may (root may; a user may keep a group of
/// their own). Set-id and sticky bits are not kept: they were granted to the bytes replaced.
/// Through the descriptor only: a name can be swapped (for a link to a file of root's, in a
/// directory another user writes to) between any check and the change. A file system that
/// refuses (some network and FUSE mounts) gets a warning: the bytes are still written.
fn keep_attributes(file: &std::fs::File, old: &std::fs::Metadata, output: &Path) {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let kept = (|| {
        let new = file.metadata()?;
        if (new.uid(), new.gid()) != (old.uid(), old.gid()) {
            // Before the mode: a change of owner clears set-id bits, and is refused to most users.
            let _ = std::os::unix::fs::fchown(file, Some(old.uid()), Some(old.gid()))
                .or_else(|_| std::os::unix::fs::fchown(file, None, Some(old.gid())));
        }
        let mode = old.mode() & 0o777;
        match new.mode() & 0o7777 == mode {
            true => Ok(()),
            false => file.set_permissions(std::fs::Permissions::from_mode(mode)),
        }
    })();
    if let Err(e) = kept {
        eprintln!("warning: {} does not keep the mode of the file it replaces: {e}", output.display());
    }
}

/// [`write_blob`] for an output that cannot be replaced once the bytes verified (standard
/// output, a device, a pipe): it gets the bytes the node verified as they come, and the whole is
/// checked against `hash` at the end.
///
/// A reader that leaves early (`shoal get HASH -o - | head`) ends it quietly, as it ends
/// [`print_out`]: what it read was verified, and it wanted no more.
fn write_verified_into(hash: Hash, source: impl Read, mut to: impl Write, output: &Path) -> anyhow::Result<()> {
    let written = copy_hashing(source, &mut to, output).and_then(|got| {
        to.flush().map_err(|e| write_error(e, output))?;
        Ok(got)
    });
    let got = match written {
        Err(e) if e.is::<ReaderGone>() => return Ok(()),
        other => other?,
    };
    if got != hash {
        bail!("the bytes received hash to {got}, not {hash}");
    }
    Ok(())
}

/// Copies `source` to `to` (named `output` in errors) and returns the BLAKE3 hash of what it copied.
fn copy_hashing(mut source: impl Read, mut to: impl Write, output: &Path) -> anyhow::Result<Hash> {
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = source.read(&mut buf).context("the download was interrupted")?;
        if n == 0 {
            return Ok(Hash::from(hasher.finalize()));
        }
        hasher.update(&buf[..n]);
        to.write_all(&buf[..n]).map_err(|e| write_error(e, output))?;
    }
}

/// What a write to `output` that failed says; [`ReaderGone`] if a pipe's reader left.
fn write_error(e: std::io::Error, output: &Path) -> anyhow::Error {
    match e.kind() {
        std::io::ErrorKind::BrokenPipe => ReaderGone.into(),
        _ => anyhow::Error::new(e).context(format!("cannot write {}", output.display())),
    }
}

/// A write into a pipe whose reader went away (`shoal get HASH -o - | head`).
#[derive(Debug, thiserror::Error)]
#[error("the reader of the output went away")]
struct ReaderGone;

fn get_with_own_node(hash: Hash, output: &Path, bootstrap: Vec<Multiaddr>) -> anyhow::Result<()> {
    if bootstrap.is_empty() {
        bail!(
            "no running node found, and no --bootstrap peer to join the swarm through; start `shoal node` or pass --bootstrap"
        );
    }
    // Its store sits beside the output, on the file system the blob is going to anyway: the
    // system's temporary directory is often in memory (tmpfs) and smaller than a large blob.
    // Standard output, a device or a pipe (`-o /dev/null`) has no file system of its own to
    // share: the temporary directory then.
    let to_file = output != Path::new("-") && std::fs::metadata(output).map_or(true, |m| m.is_file());
    let beside = match output.parent() {
        Some(p) if to_file && !p.as_os_str().is_empty() => p.to_owned(),
        _ if to_file => std::env::current_dir().context("cannot read the current directory")?,
        _ => std::env::temp_dir(),
    };
    remove_stale_scratch(&beside);
    let dir = scratch_dir(&beside)?;
    let mut config = NodeConfig::new(&dir);
    config.listen = NodeConfig::default_listen(0);
    config.bootstrap = bootstrap;
    // To standard output it streams as a running node's API does (see `ViaApi::stream_to_stdout`),
    // through an API of its own on loopback for as long as the command runs.
    let streaming = output == Path::new("-");
    config.api = streaming.then(|| std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
    config.durable = false;
    config.transient = true;
    // It holds the one blob asked for, whatever its size: no cache bound to refuse it.
    config.cache_bytes = u64::MAX;
    let result = (|| {
        let runtime = runtime()?;
        let node = runtime.block_on(Node::start(config))?;
        let home = std::fs::canonicalize(&beside).ok();
        let read = |name: &str| {
            std::fs::read_to_string(dir.join(name))
                .map(|s| s.trim().to_string())
                .context("the node's API did not start")
        };
        let api = match streaming {
            true => Some((read("api")?, read("api-token")?)),
            false => None,
        };
        let mut own = OwnNode { handle: node.handle(), runtime: &runtime, home, api };
        let outcome = get_blob(&mut own, hash, output);
        // What the get did is its outcome: a node that then stops badly changes nothing written.
        if let Err(e) = runtime.block_on(node.shutdown()) {
            eprintln!("warning: the node `shoal get` ran did not stop cleanly: {e}");
        }
        outcome
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// `shoal get` through a short-lived node of its own.
struct OwnNode<'a> {
    handle: shoal_node::NodeHandle,
    runtime: &'a tokio::runtime::Runtime,
    /// The directory its store was made in (canonical): files written under it are moved out of
    /// the store (see [`Blobs::write_file`]).
    home: Option<PathBuf>,
    /// Its API's address and token, when it has one: to stream to standard output.
    api: Option<(String, String)>,
}

impl Blobs for OwnNode<'_> {
    fn stream_to_stdout(&mut self, hash: Hash) -> anyhow::Result<Option<u64>> {
        match &self.api {
            Some((api, token)) => {
                ViaApi { api: api.clone(), agent: agent(), token: Some(token.clone()) }.stream_to_stdout(hash)
            }
            None => Ok(None),
        }
    }

    fn fetch(&mut self, hash: Hash) -> anyhow::Result<FetchProgress> {
        let handle = self.handle.clone();
        let (ptx, mut prx) = tokio::sync::watch::channel(FetchProgress::default());
        let result = self.runtime.block_on(async {
            let fetch = handle.fetch(hash, Some(ptx));
            tokio::pin!(fetch);
            loop {
                tokio::select! {
                    r = &mut fetch => break r,
                    Ok(()) = prx.changed() => show_progress(&prx.borrow_and_update().clone()),
                }
            }
        });
        if std::io::stderr().is_terminal() {
            eprintln!();
        }
        result?;
        Ok(prx.borrow().clone())
    }

    fn open(&mut self, hash: Hash) -> anyhow::Result<Box<dyn Read + '_>> {
        let reader = self.handle.store().reader(hash).map_err(|_| anyhow!("{hash} is not in the store"))?;
        let pieces = reader.info().pieces.piece_count();
        Ok(Box::new(PieceReader { reader, next: 0, pieces, current: std::io::Cursor::new(Bytes::new()) }))
    }

    /// Moves the blob's file out of the store into place, once its hash is checked: the store is
    /// beside the output (see [`get_with_own_node`]), and a copy would need the blob's size twice
    /// on disk. A file it replaces gives its mode to the store's copy before that is renamed over
    /// it. A file elsewhere (a symlink's target) is copied, so that it is made where it goes
    /// (its group, its directory's default permissions), as is a blob to `keep` and one the file
    /// system will not rename.
    fn write_file(&mut self, hash: Hash, target: &Path, keep: bool) -> anyhow::Result<()> {
        let under_home = || {
            let parent = match target.parent() {
                Some(p) if !p.as_os_str().is_empty() => p,
                _ => Path::new("."),
            };
            let parent = std::fs::canonicalize(parent).ok();
            parent.zip(self.home.as_ref()).is_some_and(|(p, home)| p.starts_with(home))
        };
        if keep || !under_home() {
            return write_into_place(hash, self.open(hash)?, target);
        }
        // A file replaced: the store's copy takes its mode, through its own descriptor, before
        // it takes the old one's place.
        let replaced = std::fs::metadata(target).ok().filter(|m| m.is_file());
        let moved = self.handle.store().move_out_as(hash, target, |data| {
            if let Some(old) = &replaced {
                keep_attributes(data, old, target);
            }
        });
        match moved {
            Ok(_) => {
                tracing::debug!(blob = %hash, to = %target.display(), "moved out of the store");
                Ok(())
            }
            Err(shoal_node::cache::StoreError::Io { .. }) => write_into_place(hash, self.open(hash)?, target),
            Err(e) => Err(e).with_context(|| format!("nothing was written to {}", target.display())),
        }
    }
}

/// A blob read from a store piece by piece; each piece is checked as it is read. It holds the
/// blob's files: an eviction meanwhile does not cut the copy short.
struct PieceReader {
    reader: shoal_node::cache::BlobReader,
    next: u32,
    pieces: u32,
    current: std::io::Cursor<Bytes>,
}

impl Read for PieceReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            let n = self.current.read(buf)?;
            if n > 0 || buf.is_empty() || self.next == self.pieces {
                return Ok(n);
            }
            let piece = self.reader.read_piece(self.next).map_err(std::io::Error::other)?;
            self.current = std::io::Cursor::new(piece);
            self.next += 1;
        }
    }
}

/// Removes what a `shoal get` killed outright (SIGKILL, a power loss) left in `parent`: its
/// hidden directory, which can hold most of a blob. One is taken for a leftover if it is named
/// as ours, is this user's directory (not a link), untouched for 10 minutes, and holds a store
/// that was opened and is not open now: a get still running holds its store's lock, one just
/// started has a fresh directory and no store yet. (Where file locks are local to one machine,
/// an NFS mount with `nolock`, a get running on another machine into the same directory for
/// over 10 minutes would look stale.)
fn remove_stale_scratch(parent: &Path) {
    use std::os::unix::fs::MetadataExt;
    const STALE: std::time::Duration = std::time::Duration::from_secs(600);
    let Ok(entries) = std::fs::read_dir(parent) else { return };
    let me = rustix::process::geteuid().as_raw();
    // Named as `scratch_dir` names them: `.shoal-get-<pid>-<16 hex digits>`.
    let ours = |name: &str| {
        name.strip_prefix(".shoal-get-").and_then(|rest| rest.split_once('-')).is_some_and(|(pid, tag)| {
            !pid.is_empty()
                && pid.bytes().all(|b| b.is_ascii_digit())
                && tag.len() == 16
                && tag.bytes().all(|b| b.is_ascii_hexdigit())
        })
    };
    for e in entries.flatten() {
        if !ours(&e.file_name().to_string_lossy()) {
            continue;
        }
        let Ok(meta) = e.metadata() else { continue };
        let old = meta.modified().ok().and_then(|m| m.elapsed().ok()).is_some_and(|age| age >= STALE);
        if !(meta.is_dir() && meta.uid() == me && old) {
            continue;
        }
        // One whose store was opened (it has a lock file) and is not open now.
        let store = e.path().join("store");
        if store.join("lock").is_file()
            && matches!(shoal_node::cache::Store::in_use(&store), Ok(false))
            && std::fs::remove_dir_all(e.path()).is_ok()
        {
            eprintln!("removed {}, left by a `shoal get` that was killed", e.path().display());
        }
    }
}

/// A new hidden directory in `parent`, made for us alone: a name another user could have taken
/// first is not used. It is removed if `shoal get` is interrupted.
fn scratch_dir(parent: &Path) -> anyhow::Result<PathBuf> {
    let mut builder = std::fs::DirBuilder::new();
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    for _ in 0..16 {
        let dir = parent.join(format!(".shoal-get-{}-{:016x}", std::process::id(), rand::random::<u64>()));
        match builder.create(&dir) {
            Ok(()) => {
                scratch(&dir);
                return Ok(dir);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e).with_context(|| format!("cannot create {}", dir.display())),
        }
    }
    bail!("cannot create a scratch directory in {}", parent.display())
}

fn providers(data_dir: &Path, hash: &str) -> anyhow::Result<()> {
    let hash = parse_hash(hash)?;
    let api = require_api(data_dir)?;
    let v: serde_json::Value = answer(agent().get(format!("http://{api}/v1/providers/{hash}")).call(), &api)?;
    let list = v.get("providers").and_then(|p| p.as_array()).cloned().unwrap_or_default();
    if list.is_empty() {
        bail!("{}", no_providers(&hash, v.get("lookup")));
    }
    print_out(|out| list.iter().try_for_each(|p| writeln!(out, "{}", p.as_str().unwrap_or_default())))
}

/// Why a lookup listed nobody, from what it cost (the API's `lookup` object; absent or `null`
/// from a node that outlived its lookup timeout, or one of an older version).
fn no_providers(hash: &Hash, lookup: Option<&serde_json::Value>) -> String {
    let n = |k: &str| lookup.and_then(|l| l.get(k)).and_then(serde_json::Value::as_u64);
    match (n("requests"), n("answered"), n("named")) {
        // First: records held here name providers before any peer is asked.
        (_, _, Some(named)) if named > 0 => {
            format!("the DHT named {named} provider(s) of {hash}, but none could be reached; they may be offline")
        }
        (Some(0), _, _) => format!(
            "no providers of {hash} found: the node knows no DHT peer to ask; start it with \
             --bootstrap <multiaddr> (`shoal peers` lists its connections)"
        ),
        (Some(asked), Some(0), _) => format!(
            "no providers of {hash} found: none of the {asked} DHT peers asked answered; the node may \
             have only just joined, or lost its connections (`shoal peers`)"
        ),
        (Some(asked), Some(answered), _) => {
            format!("no providers of {hash} found ({answered} of {asked} DHT peers asked answered)")
        }
        _ => format!("no providers of {hash} found"),
    }
}

fn peers(data_dir: &Path, json: bool) -> anyhow::Result<()> {
    let api = require_api(data_dir)?;
    let v: Vec<shoal_node::PeerInfo> = answer(agent().get(format!("http://{api}/v1/peers")).call(), &api)?;
    if json {
        let text = serde_json::to_string_pretty(&v)?;
        return print_out(|out| writeln!(out, "{text}"));
    }
    if v.is_empty() {
        // On standard error: the list itself stays empty for scripts.
        eprintln!("no peer connected; a node joins a swarm with --bootstrap <multiaddr>");
    }
    print_out(|out| {
        v.iter().try_for_each(|p| match p.rtt_ms {
            Some(rtt) => writeln!(out, "{}  {}  rtt {rtt:.2} ms", p.peer_id, p.address),
            None => writeln!(out, "{}  {}", p.peer_id, p.address),
        })
    })
}

fn status(data_dir: &Path, json: bool) -> anyhow::Result<()> {
    let api = require_api(data_dir)?;
    let v: serde_json::Value = answer(agent().get(format!("http://{api}/v1/status")).call(), &api)?;
    if json {
        let text = serde_json::to_string_pretty(&v)?;
        return print_out(|out| writeln!(out, "{text}"));
    }
    let g = |k: &str| v.get(k).cloned().unwrap_or_default();
    print_out(|out| {
        writeln!(out, "peer id:   {}", g("peer_id").as_str().unwrap_or_default())?;
        for a in g("listen_addrs").as_array().cloned().unwrap_or_default() {
            writeln!(out, "listening: {}", a.as_str().unwrap_or_default())?;
        }
        for a in g("announced_addrs").as_array().cloned().unwrap_or_default() {
            writeln!(out, "announced: {}", a.as_str().unwrap_or_default())?;
        }
        let router = g("router");
        if let (Some(at), Some(by)) = (router["forwarded"].as_str(), router["forwarded_by"].as_str()) {
            writeln!(out, "forwarded: {at} by the router ({by})")?;
        }
        for pinhole in router["pinholes"].as_array().cloned().unwrap_or_default() {
            writeln!(out, "pinhole:   {} open in the router's firewall (PCP)", pinhole.as_str().unwrap_or_default())?;
        }
        writeln!(
            out,
            "inbound:   {} connections opened by peers since start",
            g("inbound_connections").as_u64().unwrap_or(0)
        )?;
        writeln!(out, "peers:     {}", g("peers"))?;
        writeln!(out, "blobs:     {}", g("blobs"))?;
        writeln!(
            out,
            "cache:     {} / {} MiB (pinned {} MiB)",
            g("cache_bytes").as_u64().unwrap_or(0) >> 20,
            g("cache_capacity").as_u64().unwrap_or(0) >> 20,
            g("pinned_bytes").as_u64().unwrap_or(0) >> 20
        )?;
        writeln!(out, "uploads:   {}", g("uploads"))?;
        writeln!(out, "watches:   {}", g("watches"))?;
        for p in g("penalties").as_array().cloned().unwrap_or_default() {
            writeln!(out, "penalised: {} ({} times)", p[0].as_str().unwrap_or_default(), p[1])?;
        }
        for p in g("avoided").as_array().cloned().unwrap_or_default() {
            let peer = p[0].as_str().unwrap_or_default();
            writeln!(
                out,
                "avoided:   {peer} for {} s more (lied {} times: bytes or proofs that failed verification)",
                p[2], p[1]
            )?;
        }
        Ok(())
    })
}
