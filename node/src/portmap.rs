//! Asking the LAN's router to forward our QUIC port, as home routers offer: with PCP or NAT-PMP
//! ([`crate::pcp`]), else with UPnP IGD (here).
//!
//! A node behind a home router's NAT fetches, but no peer can dial it. Most home routers forward
//! a port when a program on the LAN asks. [`run`] first asks the gateway of our default route
//! for a PCP mapping (NAT-PMP if that is what it speaks): one datagram each way, which names the
//! public address and port. A gateway that does not answer it is searched for as a UPnP router
//! (an SSDP search), whose description is read (one HTTP GET) and which is asked for its public
//! address and for a forward of our UDP port to the address we listen on (SOAP calls). A UPnP
//! forward is checked every minute and renewed every half hour; a PCP or NAT-PMP mapping, which
//! a router reports only when asked for it, is asked for again every minute. [`run`] tells the
//! swarm what to announce ([`Command::Forwarded`]), and removes the forward when the node stops.
//!
//! The client is our own, not libp2p's `upnp` behaviour on `igd-next`, which (checked in their
//! source, libp2p-upnp 0.7 and igd-next 0.17) reads every answer whole with no bound, from
//! whichever host on the LAN answers the search first, at whatever address its answer names (our
//! own API on loopback among them): any host on a café's network could fill our memory. It also
//! asked a forward for every private listen address at one port, and a router's refusal of one
//! (Docker's `172.17.0.1`, which is not the host that asks) dropped the forward that worked;
//! it searched once, at start; and a listen address that went away left its forward announced.
//! Here only answers from the gateway of our default route (read from Linux's route table; with
//! none, nothing is asked) naming that same host are taken; each answer is read up to
//! [`MAX_ANSWER`] bytes within [`IO_TIMEOUT`]; the forward asked for is the one for the address
//! on our default route; and the search is repeated while there is none. A host on the LAN that
//! forges the gateway's address can still answer the search, but only names a description on
//! the gateway itself.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use libp2p::Multiaddr;
use libp2p::multiaddr::Protocol;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tracing::{debug, info};

use crate::node::RouterMapping;
use crate::pcp::{self, PcpError};
use crate::swarm::Command;

/// The most bytes read of any answer (search reply, description, SOAP answer). A router's
/// description is a few KiB.
const MAX_ANSWER: usize = 64 << 10;

/// How long one exchange with the router may take, connecting included.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// How long the search waits for the router's reply.
const SEARCH_WAIT: Duration = Duration::from_secs(3);

/// How long a forward is asked for; it is renewed at half that.
const LEASE: Duration = Duration::from_secs(3600);

/// How often the listen addresses, the route and the forward are looked at again.
const RECHECK: Duration = Duration::from_secs(60);

/// The longest wait between attempts while no forward is in place.
const MAX_BACKOFF: Duration = Duration::from_secs(15 * 60);

/// How long removing the forward may hold up the node's stop.
const REMOVE_WAIT: Duration = Duration::from_millis(1500);

/// What went wrong talking to the router.
#[derive(Debug, thiserror::Error)]
pub(crate) enum UpnpError {
    #[error("no router answered PCP, NAT-PMP or the UPnP search")]
    NoRouter,
    #[error("the router's answer is malformed: {0}")]
    Malformed(String),
    #[error("the router's answer is over {MAX_ANSWER} bytes")]
    TooLarge,
    #[error("the router did not answer within {IO_TIMEOUT:?}")]
    Timeout,
    #[error("cannot reach the router: {0}")]
    Io(#[from] std::io::Error),
    #[error("the router refused: {code} {description}")]
    Refused { code: u32, description: String },
    #[error("the router's own address {0} is not public (another NAT in front of it)")]
    NotPublic(Ipv4Addr),
    #[error("{0}")]
    Pcp(#[from] PcpError),
}

/// Router-supplied text for a message: quoted (no line of its own in a log) and short.
fn quoted(text: &str) -> String {
    format!("{:?}", text.chars().take(100).collect::<String>())
}

/// A router's WAN connection service: where it takes SOAP calls.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Router {
    /// The gateway it was found at.
    gateway: Ipv4Addr,
    addr: SocketAddrV4,
    control_path: String,
    service: String,
}

/// How a forward was asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Via {
    Upnp(Router),
    Pcp(pcp::Server),
}

impl Via {
    fn gateway(&self) -> std::net::IpAddr {
        match self {
            Via::Upnp(r) => r.gateway.into(),
            Via::Pcp(s) => s.gateway,
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Via::Upnp(_) => "UPnP",
            Via::Pcp(s) if s.version() == Some(pcp::Version::NatPmp) => "NAT-PMP",
            Via::Pcp(_) => "PCP",
        }
    }
}

/// A forward asked for and perhaps granted: how, the port, and where it leads.
type Asked = Option<(Via, u16, SocketAddrV4)>;

/// A forward in place.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Forward {
    via: Via,
    /// Our listen address it forwards to.
    local: Multiaddr,
    internal: SocketAddrV4,
    /// The router's port: ours, unless another host holds that one.
    external_port: u16,
    /// The router's public address, with its port and our protocol.
    external: Multiaddr,
    /// The lease asked for (UPnP) or granted (PCP); zero for a UPnP router that takes only
    /// forwards without end.
    lease: Duration,
    /// When to ask again, and when the router lets it lapse (never, without a lease).
    renew_at: Instant,
    expires_at: Option<Instant>,
    /// Since when asking the router again has failed, if it has.
    failing_since: Option<Instant>,
}

/// Whether the router still forwards a forward's port to us.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Presence {
    Present,
    /// The router says it does not (a rebooted router, or another host took the port), or its
    /// UPnP service refuses connections (restarted, perhaps on another port).
    Gone,
    /// The router did not say.
    Unknown,
}

/// Keeps a forward of our IPv4 port on the LAN's router while the node runs, telling the swarm
/// over `commands`, and a pinhole for our IPv6 address in the router's firewall; removes them
/// (within [`REMOVE_WAIT`]) when `stop` fires or its sender is dropped, or when the swarm is
/// gone, also when that comes in the middle of asking the router.
/// `nonce` ties a PCP mapping to this node (see [`crate::pcp`]).
/// `router` is kept telling what the router does for us.
pub(crate) async fn run(
    commands: mpsc::Sender<Command>,
    stop: oneshot::Receiver<()>,
    nonce: [u8; 12],
    router: Arc<Mutex<RouterMapping>>,
) {
    // The first round looks at the listen addresses: wait (a second at most) for the listeners
    // to report theirs.
    for _ in 0..20 {
        match listening(&commands).await {
            None => return,
            Some((addrs, reported)) if reported && !addrs.is_empty() => break,
            Some(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    let (stopping, stopped) = watch::channel(false);
    let forward = Forwarding { current: None, asked: None, nonce, router: router.clone() };
    let pinhole = Pinhole { holes: Vec::new(), nonce, router };
    let both = async { tokio::join!(keep(forward, &commands, stopped.clone()), keep(pinhole, &commands, stopped)) };
    tokio::pin!(both);
    tokio::select! {
        _ = &mut both => return,
        _ = stop => {
            let _ = stopping.send(true);
        }
    }
    both.await;
}

/// What [`keep`] keeps on the router: a forward of our IPv4 port ([`Forwarding`]) or a
/// pinhole for our IPv6 address ([`Pinhole`]).
trait Kept {
    /// What the log says while there is none.
    const NONE: &'static str;

    /// Whether an error that leaves none is said only in debug logs.
    fn quiet(e: &UpnpError) -> bool {
        matches!(e, UpnpError::NoRouter)
    }

    /// One round; returns how long until the next.
    async fn step(&mut self, commands: &mpsc::Sender<Command>) -> Result<Duration, UpnpError>;

    /// Removes from the router what is kept there, and what was asked for in a round that the
    /// stop cut short.
    async fn remove(&self);
}

/// Runs `kept`'s rounds until the stop, or until the swarm is gone, backing off while they
/// fail; then removes what it keeps (within [`REMOVE_WAIT`]).
async fn keep<K: Kept>(mut kept: K, commands: &mpsc::Sender<Command>, mut stopped: watch::Receiver<bool>) {
    let mut backoff = RECHECK;
    // Said once per kind of outcome, not at every retry.
    let mut last_said = String::new();
    loop {
        let outcome = tokio::select! {
            r = kept.step(commands) => r,
            _ = stopped.wait_for(|s| *s) => break,
            _ = commands.closed() => break,
        };
        let wait = match outcome {
            Ok(next) => {
                backoff = RECHECK;
                last_said.clear();
                next
            }
            Err(e) => {
                let said = e.to_string();
                match &e {
                    e if K::quiet(e) => debug!("{said}"),
                    _ if said != last_said => info!(error = %said, "{}", K::NONE),
                    _ => debug!(error = %said, "{}", K::NONE),
                }
                last_said = said;
                let wait = backoff;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                wait
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stopped.wait_for(|s| *s) => break,
            _ = commands.closed() => break,
        }
    }
    let _ = tokio::time::timeout(REMOVE_WAIT, kept.remove()).await;
}

/// A forward of our IPv4 port on the router, announced at the router's public address.
struct Forwarding {
    current: Option<Forward>,
    /// A forward asked for and perhaps granted, not yet in `current`: removed if the stop comes
    /// before it is.
    asked: Asked,
    nonce: [u8; 12],
    router: Arc<Mutex<RouterMapping>>,
}

impl Kept for Forwarding {
    const NONE: &'static str = "no port forwarded by the router";

    async fn step(&mut self, commands: &mpsc::Sender<Command>) -> Result<Duration, UpnpError> {
        let outcome = step(commands, &mut self.current, &mut self.asked, self.nonce).await;
        let mut told = self.router.lock().unwrap_or_else(|e| e.into_inner());
        told.forwarded = self.current.as_ref().map(|f| f.external.to_string());
        told.forwarded_by = self.current.as_ref().map(|f| f.via.name().to_string());
        outcome
    }

    async fn remove(&self) {
        if let Some(f) = &self.current {
            delete_ours(&f.via, f.external_port, f.internal).await;
        }
        if let Some((via, port, internal)) = &self.asked
            && self.current.as_ref().is_none_or(|f| (&f.via, f.external_port) != (via, *port))
        {
            delete_ours(via, *port, *internal).await;
        }
    }
}

/// Pinholes in the router's IPv6 firewall for our port at our IPv6 addresses (PCP): a home
/// router hands out public IPv6 addresses but drops flows from outside, so peers cannot dial
/// the addresses the node announces. One for each public address we listen on on the
/// interface of the default IPv6 route (a machine with privacy addresses has a stable one and
/// temporary ones, and announces them all; it sends from a temporary one, which peers then try
/// first), at most [`MAX_PINHOLES`]. Nothing else is announced: the addresses are our own.
struct Pinhole {
    /// The pinholes asked for or in place.
    holes: Vec<Hole>,
    nonce: [u8; 12],
    router: Arc<Mutex<RouterMapping>>,
}

/// One pinhole: its server, our address it opens, and until when the router keeps it (`None`
/// while it is first asked for).
struct Hole {
    server: pcp::Server,
    internal: SocketAddr,
    expires_at: Option<Instant>,
}

/// The most pinholes asked for: more addresses than a LAN's router hands one host.
const MAX_PINHOLES: usize = 8;

impl Kept for Pinhole {
    const NONE: &'static str = "no IPv6 pinhole opened by the router";

    fn quiet(e: &UpnpError) -> bool {
        // Most gateways do not speak PCP: that is no news.
        matches!(e, UpnpError::NoRouter | UpnpError::Pcp(PcpError::NoServer | PcpError::Timeout | PcpError::Io(_)))
    }

    async fn step(&mut self, commands: &mpsc::Sender<Command>) -> Result<Duration, UpnpError> {
        let listening = listening(commands).await.map(|(addrs, _)| addrs).unwrap_or_default();
        let gateway = default_gateway_v6();
        let wanted: Vec<SocketAddr> = gateway
            .map(|(_, interface)| public_v6_on(interface))
            .unwrap_or_default()
            .into_iter()
            .filter_map(|ip| pick_v6(&listening, ip))
            .take(MAX_PINHOLES)
            .collect();
        // Those for an address no longer ours, or asked of another gateway, go.
        let mut i = 0;
        while i < self.holes.len() {
            let h = &self.holes[i];
            if wanted.contains(&h.internal) && gateway == Some((h.server.gateway, h.server.scope)) {
                i += 1;
                continue;
            }
            let _ = h.server.unmap(h.internal).await;
            self.holes.remove(i);
        }
        let Some((gateway, scope)) = gateway else {
            self.tell();
            return Err(UpnpError::NoRouter);
        };
        let mut next = RECHECK;
        let mut failed = None;
        for internal in wanted {
            let at = match self.holes.iter().position(|h| h.internal == internal) {
                Some(at) => at,
                None => {
                    // Kept while asked for, so that a stop in the middle removes what it made.
                    let server = pcp::Server::new(gateway, scope, self.nonce);
                    self.holes.push(Hole { server, internal, expires_at: None });
                    self.holes.len() - 1
                }
            };
            let hole = &mut self.holes[at];
            let now = Instant::now();
            let outcome = match hole.server.map(internal, internal.port(), LEASE).await {
                Ok(m) if m.lifetime.is_zero() => Err(UpnpError::Malformed("a pinhole granted for no time".into())),
                Ok(m) => Ok(m),
                Err(e) => Err(e.into()),
            };
            match (outcome, hole.expires_at) {
                (Ok(mapping), was) => {
                    if was.is_none() {
                        info!(address = %internal, "the router lets peers reach our IPv6 address (PCP)");
                    }
                    if mapping.external != internal {
                        debug!(external = %mapping.external, "the router maps our IPv6 address to another one");
                    }
                    hole.expires_at = Some(now + mapping.lifetime);
                    next = next.min(before_lapse(mapping.lifetime));
                }
                // Silence from a router that opened it: asked again next round while it lasts.
                (Err(UpnpError::Pcp(PcpError::Timeout | PcpError::Io(_))), Some(expires))
                    if expires > now + RECHECK => {}
                (Err(e), was) => {
                    if was.is_some() {
                        info!(error = %e, address = %internal, "the router no longer lets peers reach our IPv6 address");
                    }
                    self.holes.remove(at);
                    let no_pcp = matches!(e, UpnpError::Pcp(PcpError::NoServer | PcpError::Timeout));
                    failed = Some(e);
                    if no_pcp {
                        // Nor for our other addresses.
                        break;
                    }
                }
            }
        }
        self.tell();
        match failed {
            Some(e) if self.holes.is_empty() => Err(e),
            _ => Ok(next),
        }
    }

    async fn remove(&self) {
        for h in &self.holes {
            let _ = h.server.unmap(h.internal).await;
        }
    }
}

impl Pinhole {
    /// Tells `shoal status` the pinholes in place.
    fn tell(&self) {
        let open = self.holes.iter().filter(|h| h.expires_at.is_some()).map(|h| h.internal.to_string()).collect();
        self.router.lock().unwrap_or_else(|e| e.into_inner()).pinholes = open;
    }
}

/// Our listen addresses, and whether every listener has reported; `None` once the swarm is gone.
async fn listening(commands: &mpsc::Sender<Command>) -> Option<(Vec<Multiaddr>, bool)> {
    let (tx, rx) = oneshot::channel();
    commands.send(Command::Listening(tx)).await.ok()?;
    rx.await.ok()
}

/// One round: forwards, checks, renews or withdraws as the listen addresses, the route and the
/// router say. Returns how long until the next round. `current` is changed only where a round
/// ends, so that a round cut short leaves it as it was.
async fn step(
    commands: &mpsc::Sender<Command>,
    current: &mut Option<Forward>,
    asked: &mut Asked,
    nonce: [u8; 12],
) -> Result<Duration, UpnpError> {
    let listening = listening(commands).await.map(|(addrs, _)| addrs).unwrap_or_default();
    let wanted = default_route_source().and_then(|ip| pick(&listening, ip));
    let gateway = default_gateway();
    if let Some(kept) = current.as_ref() {
        if wanted.as_ref() == Some(&kept.local) && gateway.map(Into::into) == Some(kept.via.gateway()) {
            let mut f = kept.clone();
            let now = Instant::now();
            // A PCP or NAT-PMP router tells of a mapping only when asked for it, which is one
            // datagram: asked every round, so that one a rebooted router lost is back within a
            // minute.
            let presence = match &f.via {
                Via::Upnp(router) => presence(router, &f).await,
                Via::Pcp(_) => Presence::Unknown,
            };
            if now >= f.renew_at || presence == Presence::Gone || matches!(f.via, Via::Pcp(_)) {
                // Asked again (it is time, or the router lost it), the public address with it.
                if let Err(e) = renew(&mut f, asked).await {
                    let failing = *f.failing_since.get_or_insert(now);
                    let lapsed = f.expires_at.is_some_and(|t| t <= now + RECHECK);
                    // A PCP router that says no, or closed its port (restarted without PCP),
                    // keeps no mapping for us.
                    let refused = matches!(f.via, Via::Pcp(_))
                        && matches!(
                            e,
                            UpnpError::Pcp(PcpError::Refused(_) | PcpError::NoServer)
                                | UpnpError::NotPublic(_)
                                | UpnpError::Malformed(_)
                        );
                    if presence == Presence::Gone || refused || lapsed || now.duration_since(failing) >= LEASE / 2 {
                        // Gone from the router, or about to be: withdrawn, and the router
                        // searched for anew.
                        tell(commands, None).await;
                        *current = None;
                        return Err(e);
                    }
                    debug!(error = %e, "renewing the router's forward failed; asking again in a minute");
                }
            } else if presence == Presence::Present
                && let Via::Upnp(router) = &f.via
                && let Ok(public) = external_ip(router).await
                && is_public(public)
            {
                // The ISP may have given the router another address.
                f.external = as_external(&f.local, public, f.external_port);
            }
            // Told every round: the swarm drops it while the address it leads to is gone, and
            // takes it back once that address is back.
            tell(commands, Some(&f)).await;
            let next = next_round(&f);
            *current = Some(f);
            *asked = None;
            return Ok(next);
        }
        // The address it forwards to is no longer ours or on the default route, or the network
        // changed.
        tell(commands, None).await;
        let f = current.take().expect("checked above");
        delete_ours(&f.via, f.external_port, f.internal).await;
    }
    let Some(local) = wanted else { return Ok(RECHECK) };
    let forward = establish(local, gateway.ok_or(UpnpError::NoRouter)?, asked, nonce).await?;
    info!(external = %forward.external, via = forward.via.name(), "the router forwards our port");
    tell(commands, Some(&forward)).await;
    let next = next_round(&forward);
    *current = Some(forward);
    *asked = None;
    Ok(next)
}

/// When to look at `f` again: in a minute, or sooner for a PCP or NAT-PMP mapping granted for
/// less than two (a router may shorten the lifetime asked for).
fn next_round(f: &Forward) -> Duration {
    match f.via {
        Via::Pcp(_) => before_lapse(f.lease),
        Via::Upnp(_) => RECHECK,
    }
}

/// When to ask again for a PCP or NAT-PMP mapping granted for `lifetime`: in a minute, or at
/// half its lifetime if that is sooner (at least 5 s apart), so that it never lapses.
fn before_lapse(lifetime: Duration) -> Duration {
    RECHECK.min(lifetime / 2).max(Duration::from_secs(5))
}

async fn tell(commands: &mpsc::Sender<Command>, forward: Option<&Forward>) {
    let _ = commands.send(Command::Forwarded(forward.map(|f| (f.local.clone(), f.external.clone())))).await;
}

/// Of our listen addresses, the IPv4 one on `ip` (the source of our default route) with a UDP
/// port, if it is private: the one a router in front of us can forward to.
fn pick(listening: &[Multiaddr], ip: Ipv4Addr) -> Option<Multiaddr> {
    listening
        .iter()
        .map(crate::addrs::bare)
        .find(|a| crate::addrs::ipv4(a).is_some_and(|v4| v4 == ip && v4.is_private()) && udp_port(a).is_some())
}

fn udp_port(addr: &Multiaddr) -> Option<u16> {
    addr.iter().find_map(|p| match p {
        Protocol::Udp(port) => Some(port),
        _ => None,
    })
}

/// `local` as the router's public side shows it: `ip`, and `port` for its UDP port.
fn as_external(local: &Multiaddr, ip: Ipv4Addr, port: u16) -> Multiaddr {
    local
        .iter()
        .map(|p| match p {
            Protocol::Ip4(_) => Protocol::Ip4(ip),
            Protocol::Udp(_) => Protocol::Udp(port),
            other => other,
        })
        .collect()
}

/// Asks the gateway to forward our port to `local`: with PCP or NAT-PMP if it answers them,
/// else as a UPnP router, on the first of its WAN connection services that has a public address
/// (a DSL router may list a dead one first).
async fn establish(
    local: Multiaddr,
    gateway: Ipv4Addr,
    asked: &mut Asked,
    nonce: [u8; 12],
) -> Result<Forward, UpnpError> {
    let (ip, port) = match (crate::addrs::ipv4(&local), udp_port(&local)) {
        (Some(ip), Some(port)) => (ip, port),
        _ => return Err(UpnpError::Malformed("no IPv4 UDP listen address".into())),
    };
    let forward = |via| Forward {
        via,
        external: local.clone(),
        internal: SocketAddrV4::new(ip, port),
        external_port: port,
        local: local.clone(),
        lease: LEASE,
        renew_at: Instant::now(),
        expires_at: None,
        failing_since: None,
    };
    let mut f = forward(Via::Pcp(pcp::Server::new(gateway.into(), 0, nonce)));
    // What the gateway said to PCP, if it said anything: the error to report if UPnP finds no
    // router either.
    let mut last = match renew(&mut f, asked).await {
        Ok(()) => return Ok(f),
        // No PCP here (a closed port, silence, or an ICMP error such as "administratively
        // prohibited"): only UPnP's outcome is worth saying.
        Err(UpnpError::Pcp(PcpError::NoServer | PcpError::Timeout | PcpError::Io(_))) => UpnpError::NoRouter,
        Err(e) => e,
    };
    let routers = match find_routers(gateway).await {
        Ok(routers) => routers,
        Err(UpnpError::NoRouter) => return Err(last),
        Err(e) => return Err(e),
    };
    for router in routers {
        let mut f = forward(Via::Upnp(router));
        match renew(&mut f, asked).await {
            Ok(()) => return Ok(f),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// Asks the router for the forward (again) and for its public address, updating `f` where it
/// succeeds.
async fn renew(f: &mut Forward, asked: &mut Asked) -> Result<(), UpnpError> {
    let now = Instant::now();
    let public = match &mut f.via {
        Via::Upnp(router) => {
            let public = external_ip(router).await?;
            if !is_public(public) {
                return Err(UpnpError::NotPublic(public));
            }
            // Another port than the one asked for: ours is another host's, and left to it.
            f.external_port = request(router, f.internal, f.external_port, &mut f.lease, asked).await?;
            public
        }
        Via::Pcp(server) => {
            *asked = Some((Via::Pcp(server.clone()), f.external_port, f.internal));
            let mapping = server.map(f.internal.into(), f.external_port, LEASE).await?;
            // Known from here on to speak what it answered.
            *asked = Some((Via::Pcp(server.clone()), f.external_port, f.internal));
            let std::net::SocketAddr::V4(external) = mapping.external else {
                return Err(UpnpError::Malformed("an IPv6 address for an IPv4 mapping".into()));
            };
            let public = *external.ip();
            if !is_public(public) {
                // Of no use to peers: not kept.
                let _ = server.unmap(f.internal.into()).await;
                return Err(UpnpError::NotPublic(public));
            }
            if mapping.lifetime.is_zero() {
                return Err(UpnpError::Malformed("a mapping granted for no time".into()));
            }
            f.external_port = mapping.external.port();
            f.lease = mapping.lifetime;
            public
        }
    };
    let lease = if f.lease.is_zero() { LEASE } else { f.lease };
    f.renew_at = now + lease / 2;
    f.expires_at = (!f.lease.is_zero()).then(|| now + f.lease);
    f.failing_since = None;
    f.external = as_external(&f.local, public, f.external_port);
    Ok(())
}

/// Asks the router to forward UDP `port` to `internal` for `lease`, and returns the port it
/// forwards. A router that takes only forwards without end (725) gets one (`lease` becomes
/// zero). A port forwarded already (718) to `internal` (left by an earlier run, or a router
/// that will not renew a client's own forward) is deleted and asked for again; one forwarded to
/// another host (another node on the LAN) has one of three other ports, picked from `internal`,
/// asked for instead, so that a node asks for the same ones each time.
async fn request(
    router: &Router,
    internal: SocketAddrV4,
    port: u16,
    lease: &mut Duration,
    asked: &mut Asked,
) -> Result<u16, UpnpError> {
    let seed = u32::from(*internal.ip()) ^ u32::from(internal.port());
    let others = (1..=3u32).map(|salt| 1024 + (seed.wrapping_mul(2_654_435_761).rotate_left(salt * 7) % 64_000) as u16);
    for candidate in std::iter::once(port).chain(others) {
        // A candidate is asked at most three times: after a 725 and after clearing our own.
        for _ in 0..3 {
            *asked = Some((Via::Upnp(router.clone()), candidate, internal));
            match add_mapping(router, internal, candidate, *lease).await {
                Ok(()) => return Ok(candidate),
                Err(UpnpError::Refused { code: 725, .. }) if !lease.is_zero() => *lease = Duration::ZERO,
                Err(UpnpError::Refused { code: 718, .. }) => match mapped_to(router, candidate).await? {
                    Some(at) if at == internal => delete(router, candidate).await?,
                    // Gone meanwhile: asked again.
                    None => {}
                    Some(_) => break,
                },
                Err(e) => return Err(e),
            }
        }
    }
    Err(UpnpError::Refused { code: 718, description: "every port asked for is forwarded to another host".into() })
}

/// Whether the UPnP router still forwards `f`'s port to us.
async fn presence(router: &Router, f: &Forward) -> Presence {
    match mapped_to(router, f.external_port).await {
        Ok(to) if to == Some(f.internal) => Presence::Present,
        Ok(_) => Presence::Gone,
        Err(UpnpError::Io(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => Presence::Gone,
        Err(_) => Presence::Unknown,
    }
}

/// Removes the router's forward of `port`, if it leads to `internal`: one that another host took
/// meanwhile (after the router rebooted, say) is left alone. A PCP or NAT-PMP router removes
/// only the asking host's own.
async fn delete_ours(via: &Via, port: u16, internal: SocketAddrV4) {
    match via {
        Via::Upnp(router) => {
            if matches!(mapped_to(router, port).await, Ok(Some(at)) if at == internal) {
                let _ = delete(router, port).await;
            }
        }
        Via::Pcp(server) => {
            let _ = server.unmap(internal.into()).await;
        }
    }
}

/// Whether a router's public address is one peers can reach: public as a peer's address is
/// ([`crate::addrs::is_public`]: not private, shared, loopback, link-local or unspecified), and
/// not IETF-reserved (`192.0.0.0/24`, DS-Lite's inner addresses among them), documentation,
/// benchmarking, reserved, multicast, broadcast or "this network".
fn is_public(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    crate::addrs::is_public(ip.into())
        && !(ip.is_broadcast()
            || ip.is_documentation()
            || ip.is_multicast()
            || a == 0
            || (a == 192 && b == 0 && c == 0)
            || (a == 198 && (b == 18 || b == 19))
            || a >= 240)
}

/// The gateway of our default IPv4 route, from Linux's route table; `None` elsewhere, and then
/// no router is asked.
fn default_gateway() -> Option<Ipv4Addr> {
    parse_route_table(&std::fs::read_to_string("/proc/net/route").ok()?)
}

/// The gateway of the default route of lowest metric in `/proc/net/route`'s text (addresses in
/// hex, as the kernel holds them in memory).
fn parse_route_table(text: &str) -> Option<Ipv4Addr> {
    const RTF_UP: u16 = 0x1;
    const RTF_GATEWAY: u16 = 0x2;
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (dest, gateway, flags, metric, mask) = (f.get(1)?, f.get(2)?, f.get(3)?, f.get(6)?, f.get(7)?);
            let flags = u16::from_str_radix(flags, 16).ok()?;
            let default = *dest == "00000000" && *mask == "00000000";
            if !default || flags & RTF_UP == 0 || flags & RTF_GATEWAY == 0 {
                return None;
            }
            let gateway = Ipv4Addr::from(u32::from_str_radix(gateway, 16).ok()?.to_ne_bytes());
            Some((metric.parse::<u32>().ok()?, gateway))
        })
        .min_by_key(|(metric, _)| *metric)
        .map(|(_, gateway)| gateway)
}

/// The gateway of our default IPv6 route of lowest metric, with the index of the interface it
/// is on (a router's address there is most often link-local), from Linux's route table; `None`
/// elsewhere.
fn default_gateway_v6() -> Option<(IpAddr, u32)> {
    let (gateway, device) = parse_ipv6_route_table(&std::fs::read_to_string("/proc/net/ipv6_route").ok()?)?;
    let index = std::fs::read_to_string(format!("/sys/class/net/{device}/ifindex")).ok()?;
    Some((gateway.into(), index.trim().parse().ok()?))
}

/// The next hop and device of the default route of lowest metric in `/proc/net/ipv6_route`'s
/// text.
fn parse_ipv6_route_table(text: &str) -> Option<(Ipv6Addr, String)> {
    const RTF_UP: u32 = 0x1;
    const RTF_GATEWAY: u32 = 0x2;
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (dest, prefix, source_prefix) = (f.first()?, f.get(1)?, f.get(3)?);
            let (hop, metric, flags, device) = (f.get(4)?, f.get(5)?, f.get(8)?, f.get(9)?);
            let flags = u32::from_str_radix(flags, 16).ok()?;
            // A route for some sources only (policy routing) is not the default one.
            let default = dest.bytes().all(|b| b == b'0') && *prefix == "00" && *source_prefix == "00";
            if !default || flags & RTF_UP == 0 || flags & RTF_GATEWAY == 0 || hop.len() != 32 {
                return None;
            }
            let hop = Ipv6Addr::from(u128::from_str_radix(hop, 16).ok()?);
            Some((u32::from_str_radix(metric, 16).ok()?, hop, device.to_string()))
        })
        .min_by_key(|(metric, _, _)| *metric)
        .map(|(_, hop, device)| (hop, device))
}

/// Our public IPv6 addresses on the interface of index `interface`, from Linux's address list;
/// none elsewhere. Those still being checked for duplicates, found duplicate, or deprecated
/// (a temporary address past its time, kept only for the connections it has) are left out.
fn public_v6_on(interface: u32) -> Vec<Ipv6Addr> {
    std::fs::read_to_string("/proc/net/if_inet6").map(|t| parse_if_inet6(&t, interface)).unwrap_or_default()
}

/// The addresses of [`public_v6_on`] in `/proc/net/if_inet6`'s text.
fn parse_if_inet6(text: &str, interface: u32) -> Vec<Ipv6Addr> {
    const DADFAILED: u32 = 0x08;
    const DEPRECATED: u32 = 0x20;
    const TENTATIVE: u32 = 0x40;
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (address, index, flags) = (f.first()?, f.get(1)?, f.get(4)?);
            let usable = u32::from_str_radix(flags, 16).ok()? & (DADFAILED | DEPRECATED | TENTATIVE) == 0;
            let ip = Ipv6Addr::from(u128::from_str_radix(address, 16).ok()?);
            let ours = u32::from_str_radix(index, 16).ok()? == interface && address.len() == 32;
            (ours && usable && crate::addrs::is_public(ip.into())).then_some(ip)
        })
        .collect()
}

/// Of our listen addresses, the UDP one at `ip`, as a socket address.
fn pick_v6(listening: &[Multiaddr], ip: Ipv6Addr) -> Option<SocketAddr> {
    listening.iter().find_map(|a| {
        let on_ip = a.iter().next() == Some(Protocol::Ip6(ip));
        on_ip.then(|| udp_port(a)).flatten().map(|port| SocketAddr::new(ip.into(), port))
    })
}

/// The address this machine sends from over its default IPv4 route, if it has one.
fn default_route_source() -> Option<Ipv4Addr> {
    // Connecting a UDP socket only looks the route up; nothing is sent. 192.0.2.0/24 is for
    // documentation, so any route to it is the default one.
    let socket = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).ok()?;
    socket.connect((Ipv4Addr::new(192, 0, 2, 1), 9)).ok()?;
    match socket.local_addr().ok()?.ip() {
        std::net::IpAddr::V4(v4) if !v4.is_unspecified() => Some(v4),
        _ => None,
    }
}

const SEARCH: &str = "M-SEARCH * HTTP/1.1\r\nHOST: 239.255.255.250:1900\r\n\
    ST: urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\nMAN: \"ssdp:discover\"\r\nMX: 2\r\n\r\n";

/// Finds the router at `gateway`: an answer to the SSDP search from it, naming a description on
/// that same host, with a WAN connection service. The search goes out twice (multicast over
/// Wi-Fi gets lost), and an answer whose description fails leaves the others to try.
async fn find_routers(gateway: Ipv4Addr) -> Result<Vec<Router>, UpnpError> {
    let socket = tokio::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).await?;
    for _ in 0..2 {
        socket.send_to(SEARCH.as_bytes(), (Ipv4Addr::new(239, 255, 255, 250), 1900)).await?;
    }
    let deadline = Instant::now() + SEARCH_WAIT;
    let mut buf = vec![0u8; 2048];
    let mut tried = Vec::new();
    let mut last = UpnpError::NoRouter;
    loop {
        let Ok(received) = tokio::time::timeout_at(deadline, socket.recv_from(&mut buf)).await else {
            return Err(last);
        };
        let (n, from) = received?;
        let std::net::IpAddr::V4(from) = from.ip() else { continue };
        let location = match search_answer(&buf[..n], from, gateway) {
            Ok(location) => location,
            Err(e) => {
                debug!(%from, error = %e, "an answer to the UPnP search not taken");
                continue;
            }
        };
        if tried.contains(&location) || tried.len() >= 4 {
            continue;
        }
        tried.push(location.clone());
        match describe(gateway, location).await {
            Ok(routers) => return Ok(routers),
            Err(e) => {
                debug!(error = %e, "a router's description not taken");
                last = e;
            }
        }
    }
}

/// The description's address and path in an answer to the search from `from`, if it is one to
/// trust: from our default `gateway`, naming a description on that host.
fn search_answer(answer: &[u8], from: Ipv4Addr, gateway: Ipv4Addr) -> Result<(SocketAddrV4, String), UpnpError> {
    if from != gateway {
        return Err(UpnpError::Malformed(format!("{from} is not our default gateway")));
    }
    let text = String::from_utf8_lossy(answer);
    let location = header(&text, "location").ok_or_else(|| UpnpError::Malformed("no LOCATION".into()))?;
    let (addr, path) = parse_url(location)?;
    if *addr.ip() != from {
        return Err(UpnpError::Malformed(format!("{from} named a description on another host, {addr}")));
    }
    Ok((addr, path))
}

/// The value of an HTTP-style header (any case) in `text`.
fn header<'a>(text: &'a str, name: &str) -> Option<&'a str> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// `http://a.b.c.d[:port]/path` as its socket address and path.
fn parse_url(url: &str) -> Result<(SocketAddrV4, String), UpnpError> {
    let rest =
        url.strip_prefix("http://").ok_or_else(|| UpnpError::Malformed(format!("not an http URL: {}", quoted(url))))?;
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let addr = match host.parse::<SocketAddrV4>() {
        Ok(a) => a,
        Err(_) => SocketAddrV4::new(
            host.parse().map_err(|_| UpnpError::Malformed(format!("not an IPv4 host: {}", quoted(host))))?,
            80,
        ),
    };
    Ok((addr, path.to_string()))
}

/// Reads the router's description at `location` for its WAN connection services.
async fn describe(gateway: Ipv4Addr, (addr, path): (SocketAddrV4, String)) -> Result<Vec<Router>, UpnpError> {
    let request =
        format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\nUser-Agent: shoal UPnP/1.1\r\n\r\n");
    let (status, body) = exchange(addr, &request).await?;
    if status != 200 {
        return Err(UpnpError::Malformed(format!("description answered HTTP {status}")));
    }
    // An IGD 1 description may name the base of its relative URLs, on another port.
    let base = match element(&body, "URLBase").map(parse_url) {
        Some(Ok((at, _))) if at.ip() == addr.ip() => at,
        _ => addr,
    };
    let mut routers = Vec::new();
    for (service, control) in wan_services(&body) {
        let (at, control_path) = if control.starts_with("http://") {
            match parse_url(&control) {
                // A full URL must name the same host.
                Ok((at, p)) if at.ip() == addr.ip() => (at, p),
                _ => continue,
            }
        } else if control.starts_with('/') {
            (base, control)
        } else {
            (base, format!("/{control}"))
        };
        routers.push(Router { gateway, addr: at, control_path, service });
    }
    match routers.is_empty() {
        true => Err(UpnpError::Malformed("no WAN connection service".into())),
        false => Ok(routers),
    }
}

/// The WAN connection services in a description (at most 4): each one's type and control URL.
fn wan_services(description: &str) -> Vec<(String, String)> {
    const WANTED: [&str; 2] =
        ["urn:schemas-upnp-org:service:WANIPConnection:", "urn:schemas-upnp-org:service:WANPPPConnection:"];
    let mut found = Vec::new();
    let mut rest = description;
    while let Some(start) = rest.find("<service>") {
        let Some(end) = rest[start..].find("</service>").map(|e| e + start) else { break };
        let block = &rest[start..end];
        rest = &rest[end..];
        if let (Some(kind), Some(control)) = (element(block, "serviceType"), element(block, "controlURL"))
            && WANTED.iter().any(|w| kind.starts_with(w))
            && found.len() < 4
        {
            found.push((kind.to_string(), control.to_string()));
        }
    }
    found
}

/// The text of the first `<name>…</name>` in `xml`, trimmed.
fn element<'a>(xml: &'a str, name: &str) -> Option<&'a str> {
    let open = format!("<{name}>");
    let start = xml.find(&open)? + open.len();
    let end = xml[start..].find(&format!("</{name}>"))? + start;
    Some(xml[start..end].trim())
}

/// Calls `action` on the router's WAN connection service; the answer's body.
async fn soap(router: &Router, action: &str, args: &[(&str, String)]) -> Result<String, UpnpError> {
    let args: String = args.iter().map(|(k, v)| format!("<{k}>{v}</{k}>")).collect();
    let body = format!(
        "<?xml version=\"1.0\"?>\r\n<s:Envelope xmlns:s=\"http://schemas.xmlsoap.org/soap/envelope/\" \
         s:encodingStyle=\"http://schemas.xmlsoap.org/soap/encoding/\"><s:Body><u:{action} xmlns:u=\"{}\">{args}\
         </u:{action}></s:Body></s:Envelope>\r\n",
        router.service
    );
    let request = format!(
        "POST {} HTTP/1.0\r\nHost: {}\r\nContent-Type: text/xml; charset=\"utf-8\"\r\nSOAPAction: \"{}#{action}\"\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        router.control_path,
        router.addr,
        router.service,
        body.len()
    );
    let (status, answer) = exchange(router.addr, &request).await?;
    match status {
        200 => Ok(answer),
        _ => Err(UpnpError::Refused {
            code: element(&answer, "errorCode").and_then(|c| c.parse().ok()).unwrap_or(u32::from(status)),
            description: quoted(element(&answer, "errorDescription").unwrap_or("no description")),
        }),
    }
}

async fn external_ip(router: &Router) -> Result<Ipv4Addr, UpnpError> {
    let answer = soap(router, "GetExternalIPAddress", &[]).await?;
    let ip =
        element(&answer, "NewExternalIPAddress").ok_or_else(|| UpnpError::Malformed("no external address".into()))?;
    ip.parse().map_err(|_| UpnpError::Malformed(format!("external address {}", quoted(ip))))
}

async fn add_mapping(
    router: &Router,
    internal: SocketAddrV4,
    external_port: u16,
    lease: Duration,
) -> Result<(), UpnpError> {
    let args = [
        ("NewRemoteHost", String::new()),
        ("NewExternalPort", external_port.to_string()),
        ("NewProtocol", "UDP".to_string()),
        ("NewInternalPort", internal.port().to_string()),
        ("NewInternalClient", internal.ip().to_string()),
        ("NewEnabled", "1".to_string()),
        ("NewPortMappingDescription", "shoal".to_string()),
        ("NewLeaseDuration", lease.as_secs().to_string()),
    ];
    soap(router, "AddPortMapping", &args).await.map(drop)
}

/// Where the router forwards UDP `external_port` to, if anywhere.
async fn mapped_to(router: &Router, external_port: u16) -> Result<Option<SocketAddrV4>, UpnpError> {
    let args = [
        ("NewRemoteHost", String::new()),
        ("NewExternalPort", external_port.to_string()),
        ("NewProtocol", "UDP".into()),
    ];
    match soap(router, "GetSpecificPortMappingEntry", &args).await {
        Ok(answer) => {
            let client = element(&answer, "NewInternalClient").and_then(|c| c.parse().ok());
            let port = element(&answer, "NewInternalPort").and_then(|p| p.parse().ok());
            Ok(client.zip(port).map(|(c, p)| SocketAddrV4::new(c, p)))
        }
        // NoSuchEntryInArray.
        Err(UpnpError::Refused { code: 714, .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

async fn delete(router: &Router, external_port: u16) -> Result<(), UpnpError> {
    let args = [
        ("NewRemoteHost", String::new()),
        ("NewExternalPort", external_port.to_string()),
        ("NewProtocol", "UDP".into()),
    ];
    soap(router, "DeletePortMapping", &args).await.map(drop)
}

/// Sends `request` to `addr` and reads the answer, at most [`MAX_ANSWER`] bytes within
/// [`IO_TIMEOUT`], up to its `Content-Length` or last chunk, or until the router closes the
/// connection (HTTP/1.0): its status and body.
async fn exchange(addr: SocketAddrV4, request: &str) -> Result<(u16, String), UpnpError> {
    let read = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream.write_all(request.as_bytes()).await?;
        let mut answer = Vec::new();
        let mut buf = [0u8; 4096];
        while answer.len() <= MAX_ANSWER {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            answer.extend_from_slice(&buf[..n]);
            if is_whole(&answer) {
                break;
            }
        }
        Ok::<_, std::io::Error>(answer)
    };
    let answer = tokio::time::timeout(IO_TIMEOUT, read).await.map_err(|_| UpnpError::Timeout)??;
    if answer.len() > MAX_ANSWER {
        return Err(UpnpError::TooLarge);
    }
    parse_http(&answer)
}

/// An HTTP answer's head (as text) and body.
fn split_answer(answer: &[u8]) -> Option<(String, &[u8])> {
    let end = answer.windows(4).position(|w| w == b"\r\n\r\n")?;
    Some((String::from_utf8_lossy(&answer[..end]).into_owned(), &answer[end + 4..]))
}

/// Whether `answer` holds a whole HTTP answer by its own account (`Content-Length`, or the last
/// chunk and its trailers); one that says neither ends when the router closes the connection.
/// A malformed one is whole too: reading more would not mend it.
fn is_whole(answer: &[u8]) -> bool {
    let Some((head, body)) = split_answer(answer) else { return false };
    if is_chunked(&head) {
        return !matches!(chunks(body), Chunks::Incomplete);
    }
    header(&head, "content-length").and_then(|l| l.parse::<usize>().ok()).is_some_and(|len| body.len() >= len)
}

fn is_chunked(head: &str) -> bool {
    header(head, "transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
}

/// An HTTP answer's status and body (de-chunked, for a router that chunks even for HTTP/1.0).
fn parse_http(answer: &[u8]) -> Result<(u16, String), UpnpError> {
    let (head, body) = split_answer(answer).ok_or_else(|| UpnpError::Malformed("no end of headers".into()))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| UpnpError::Malformed("no HTTP status".into()))?;
    let body = if is_chunked(&head) {
        match chunks(body) {
            Chunks::Whole(data) => data,
            Chunks::Incomplete => return Err(UpnpError::Malformed("chunks cut short".into())),
            Chunks::Bad(what) => return Err(UpnpError::Malformed(format!("bad chunk {what}"))),
        }
    } else {
        match header(&head, "content-length").and_then(|l| l.parse::<usize>().ok()) {
            Some(len) => body[..len.min(body.len())].to_vec(),
            None => body.to_vec(),
        }
    };
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// A chunked body, walked.
#[derive(Debug, PartialEq, Eq)]
enum Chunks {
    /// Its data, joined: the last chunk and the trailers after it (if any) are there.
    Whole(Vec<u8>),
    /// More is to come.
    Incomplete,
    /// Not chunks.
    Bad(&'static str),
}

fn chunks(mut body: &[u8]) -> Chunks {
    let mut data = Vec::new();
    loop {
        let Some(line_end) = body.windows(2).position(|w| w == b"\r\n") else {
            // A size line is a few hex digits; a long one without its end is not one.
            return if body.len() > 64 { Chunks::Bad("size line") } else { Chunks::Incomplete };
        };
        let size_text = String::from_utf8_lossy(&body[..line_end]);
        let Ok(size) = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16) else {
            return Chunks::Bad("size");
        };
        let rest = &body[line_end + 2..];
        if size == 0 {
            // Trailers, each a line, then an empty line.
            let mut rest = rest;
            loop {
                match rest.windows(2).position(|w| w == b"\r\n") {
                    Some(0) => return Chunks::Whole(data),
                    Some(end) => rest = &rest[end + 2..],
                    None => return Chunks::Incomplete,
                }
            }
        }
        let Some(chunk) = rest.get(..size) else { return Chunks::Incomplete };
        data.extend_from_slice(chunk);
        match rest[size..].strip_prefix(b"\r\n") {
            Some(next) => body = next,
            None if rest.len() < size + 2 => return Chunks::Incomplete,
            None => return Chunks::Bad("end"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DESCRIPTION: &str = "<?xml version=\"1.0\"?><root><device><serviceList><service>\
        <serviceType>urn:schemas-upnp-org:service:Layer3Forwarding:1</serviceType><controlURL>/ctl/L3F</controlURL>\
        </service></serviceList><deviceList><device><serviceList><service>\
        <serviceType>urn:schemas-upnp-org:service:WANIPConnection:2</serviceType>\
        <controlURL>/ctl/IPConn</controlURL></service></serviceList></device></deviceList></device></root>";

    #[test]
    fn the_wan_connection_services_are_found_in_a_description() {
        let found = wan_services(DESCRIPTION);
        assert_eq!(found, [("urn:schemas-upnp-org:service:WANIPConnection:2".to_string(), "/ctl/IPConn".to_string())]);
        // A DSL router may list a PPP service (dead, here) before the IP one: both are offered.
        let both = DESCRIPTION.replace(
            "<service><serviceType>urn:schemas-upnp-org:service:WANIPConnection:2",
            "<service><serviceType>urn:schemas-upnp-org:service:WANPPPConnection:1</serviceType>\
             <controlURL>/ctl/PPP</controlURL></service><service><serviceType>bad</service>\
             <service><serviceType>urn:schemas-upnp-org:service:WANIPConnection:2",
        );
        let kinds: Vec<String> = wan_services(&both).into_iter().map(|(k, _)| k).collect();
        assert_eq!(kinds.len(), 2, "{kinds:?}");
        assert!(kinds[0].contains("WANPPPConnection:1") && kinds[1].contains("WANIPConnection:2"));
        assert!(wan_services(&DESCRIPTION.replace("WANIPConnection", "Other")).is_empty());
        assert!(wan_services("<service><serviceType>").is_empty(), "cut short");
    }

    #[test]
    fn only_the_default_gateway_naming_itself_is_trusted() {
        let router = Ipv4Addr::new(192, 168, 1, 1);
        let answer = |location: &str| format!("HTTP/1.1 200 OK\r\nST: x\r\nLocation: {location}\r\n\r\n");
        let ok = answer("http://192.168.1.1:5000/rootDesc.xml");
        let (addr, path) = search_answer(ok.as_bytes(), router, router).expect("trusted");
        assert_eq!((addr, path.as_str()), (SocketAddrV4::new(router, 5000), "/rootDesc.xml"));
        let stranger = Ipv4Addr::new(192, 168, 1, 66);
        assert!(search_answer(ok.as_bytes(), stranger, router).is_err(), "not the gateway");
        let elsewhere = answer("http://127.0.0.1:4738/v1/blobs");
        assert!(search_answer(elsewhere.as_bytes(), router, router).is_err(), "names another host");
        assert!(search_answer(b"HTTP/1.1 200 OK\r\n\r\n", router, router).is_err(), "no location");
        let named = answer("http://router.lan/desc.xml");
        assert!(search_answer(named.as_bytes(), router, router).is_err(), "a name, not the host's IP");
        let latin1 = b"HTTP/1.1 200 OK\r\nSERVER: Fritz\xe9\r\nLocation: http://192.168.1.1:5000/d.xml\r\n\r\n";
        assert!(search_answer(latin1, router, router).is_ok(), "a header that is not UTF-8");
    }

    #[test]
    fn the_ipv6_default_gateway_is_the_one_of_lowest_metric_with_its_device() {
        let table = "fd000000000000000000000000000000 40 00000000000000000000000000000000 00 \
            00000000000000000000000000000000 00000100 00000001 00000000 00000001     eth0\n\
            00000000000000000000000000000000 00 00000000000000000000000000000000 00 \
            fe800000000000000000000000000001 00000400 00000003 00000000 00450003    wlan0\n\
            00000000000000000000000000000000 00 00000000000000000000000000000000 00 \
            fe80000000000000021122fffe334455 00000064 00000003 00000000 00450003     eth0\n\
            00000000000000000000000000000000 00 00000000000000000000000000000000 00 \
            00000000000000000000000000000000 ffffffff 00000001 00000000 00200200       lo\n";
        let eth0 = ("fe80::211:22ff:fe33:4455".parse().expect("address"), "eth0".to_string());
        assert_eq!(parse_ipv6_route_table(table), Some(eth0));
        // Without the lower metric's route, the other; a rejecting route is none.
        let wlan0 = ("fe80::1".parse().expect("address"), "wlan0".to_string());
        assert_eq!(parse_ipv6_route_table(&table.replace("00000064", "00000fff")), Some(wlan0));
        assert_eq!(parse_ipv6_route_table(&table.replace("00450003", "00000001")), None, "not via a gateway");
        // A route for one source prefix only (policy routing, a VPN) is not the default one.
        let sourced = table.replace(
            "00 00000000000000000000000000000000 00 fe80000000000000021122fffe334455",
            "00 20010db8000900000000000000000000 40 fe80000000000000021122fffe334455",
        );
        assert_eq!(parse_ipv6_route_table(&sourced).map(|(_, d)| d).as_deref(), Some("wlan0"));
    }

    #[test]
    fn pinholes_are_for_our_usable_public_addresses_on_the_gateway_interface() {
        // eth0 (index 2): a stable and a temporary public address, one deprecated, one still
        // being checked, a unique-local and a link-local one; wlan0 (3): another public one.
        let text = "20010db8000100000000000000000020 02 40 00 80     eth0\n\
            20010db80001000012345678abcdef01 02 40 00 01     eth0\n\
            20010db80001000000000000000000aa 02 40 00 21     eth0\n\
            20010db80001000000000000000000bb 02 40 00 40     eth0\n\
            fd000000000000000000000000000002 02 40 00 80     eth0\n\
            fe800000000000000000000000000002 02 40 20 80     eth0\n\
            20010db8000200000000000000000020 03 40 00 80    wlan0\n";
        let ip = |s: &str| s.parse::<Ipv6Addr>().expect("address");
        assert_eq!(parse_if_inet6(text, 2), [ip("2001:db8:1::20"), ip("2001:db8:1:0:1234:5678:abcd:ef01")]);
        assert_eq!(parse_if_inet6(text, 3), [ip("2001:db8:2::20")]);
        assert_eq!(parse_if_inet6(text, 4), Vec::<Ipv6Addr>::new());
    }

    #[test]
    fn a_pinhole_is_for_a_listen_address_at_one_of_our_public_addresses() {
        let a = |s: &str| s.parse::<Multiaddr>().expect("multiaddr");
        let listening = [
            a("/ip4/192.168.1.20/udp/4737/quic-v1"),
            a("/ip6/2001:db8:1::20/udp/4737/quic-v1/p2p/12D3KooWRmZAZHPbgsyX9f6cxoNw2CJK5DjHWgssqZqoj2NC3SfG"),
            a("/ip6/2001:db8:1::21/udp/4738/quic-v1"),
        ];
        let ours: Ipv6Addr = "2001:db8:1::21".parse().expect("address");
        assert_eq!(pick_v6(&listening, ours), Some("[2001:db8:1::21]:4738".parse().expect("address")));
        assert_eq!(pick_v6(&listening, "2001:db8:1::22".parse().expect("address")), None);
    }

    #[test]
    fn the_default_gateway_is_the_one_of_lowest_metric() {
        let table = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
            wlan0\t00000000\t0102A8C0\t0003\t0\t0\t600\t00000000\t0\t0\t0\n\
            eth0\t0001A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
            eth0\t00000000\t0101A8C0\t0003\t0\t0\t100\t00000000\t0\t0\t0\n";
        let expected = Ipv4Addr::from(u32::from_str_radix("0101A8C0", 16).expect("hex").to_ne_bytes());
        assert_eq!(parse_route_table(table), Some(expected));
        if cfg!(target_endian = "little") {
            assert_eq!(expected, Ipv4Addr::new(192, 168, 1, 1));
        }
        assert_eq!(parse_route_table(&table.replace("\t0003\t", "\t0001\t")), None, "not via a gateway");
        assert_eq!(parse_route_table("Iface\n"), None);
    }

    #[test]
    fn answers_are_parsed_whole_and_bounded() {
        let plain = b"HTTP/1.1 200 OK\r\nContent-Type: text/xml\r\nContent-Length: 8\r\n\r\n<a>1</a>";
        assert!(is_whole(plain));
        assert!(!is_whole(&plain[..plain.len() - 1]));
        assert_eq!(parse_http(plain).expect("parsed"), (200, "<a>1</a>".to_string()));
        let chunked =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n<a>\xc3\r\n6\r\n\xa91</a>\r\n0\r\n\r\n";
        assert!(is_whole(chunked));
        assert_eq!(parse_http(chunked).expect("parsed").1, "<a>\u{e9}1</a>", "a character split across chunks");
        assert!(parse_http(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n").is_err());
        assert!(parse_http(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n9\r\nab\r\n").is_err());
        assert!(parse_http(b"garbage").is_err());
        let fault = "<s:Fault><detail><UPnPError><errorCode>718</errorCode>\
            <errorDescription>ConflictInMappingEntry</errorDescription></UPnPError></detail></s:Fault>";
        assert_eq!(element(fault, "errorCode"), Some("718"));
        assert_eq!(quoted("a\nforged line"), "\"a\\nforged line\"");
        assert!(is_public(Ipv4Addr::new(11, 213, 7, 2)));
        for ip in [[192, 168, 1, 1], [10, 0, 0, 1], [100, 64, 0, 1], [127, 0, 0, 1], [203, 0, 113, 5], [192, 0, 0, 2]] {
            assert!(!is_public(Ipv4Addr::from(ip)), "{ip:?}");
        }
    }

    #[test]
    fn chunks_are_whole_only_with_their_last_chunk_and_trailers() {
        assert_eq!(chunks(b"3\r\nabc\r\n0\r\n\r\n"), Chunks::Whole(b"abc".to_vec()));
        assert_eq!(chunks(b"3\r\nabc\r\n0\r\nX-Trailer: 1\r\n\r\n"), Chunks::Whole(b"abc".to_vec()));
        assert_eq!(chunks(b"3\r\nabc\r\n0\r\nX-Trailer: 1\r\n"), Chunks::Incomplete);
        // A chunk of 0x400 bytes whose data begins with an empty line: not the end.
        let mut big = b"400\r\n\r\n".to_vec();
        assert_eq!(chunks(&big), Chunks::Incomplete);
        big.extend(vec![b'x'; 0x3fe]);
        big.extend(b"\r\n0\r\n\r\n");
        assert!(matches!(chunks(&big), Chunks::Whole(d) if d.len() == 0x400));
        assert_eq!(chunks(b"3\r\nabcdef"), Chunks::Bad("end"));
        assert_eq!(chunks(&[b'1'; 100]), Chunks::Bad("size line"));
    }

    /// A router's WAN connection service on loopback, for the forward's decisions: it forwards
    /// what it is asked, refuses a port forwarded to another host (718), a forward with a lease
    /// if `permanent_only` (725), and, if `refuse_own`, a client's own forward asked again.
    #[derive(Default)]
    struct Fake {
        forwards: std::collections::HashMap<u16, SocketAddrV4>,
        permanent_only: bool,
        refuse_own: bool,
    }

    async fn fake_router(state: std::sync::Arc<std::sync::Mutex<Fake>>) -> Router {
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.expect("bind");
        let std::net::SocketAddr::V4(addr) = listener.local_addr().expect("addr") else { unreachable!() };
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let state = state.clone();
                tokio::spawn(async move {
                    let (mut request, mut buf) = (Vec::new(), [0u8; 4096]);
                    while !is_whole(&request) {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => request.extend_from_slice(&buf[..n]),
                        }
                    }
                    let text = String::from_utf8_lossy(&request).into_owned();
                    let action = header(&text, "soapaction").and_then(|a| a.trim_matches('"').split('#').nth(1));
                    let arg = |name: &str| element(&text, name).unwrap_or("").to_string();
                    let port: u16 = arg("NewExternalPort").parse().unwrap_or(0);
                    let fault = |code: u32| (500, format!("<UPnPError><errorCode>{code}</errorCode></UPnPError>"));
                    let (status, body) = {
                        let mut st = state.lock().expect("lock");
                        match action.unwrap_or("") {
                            "GetExternalIPAddress" => {
                                (200, "<NewExternalIPAddress>11.213.7.2</NewExternalIPAddress>".into())
                            }
                            "AddPortMapping" => {
                                let to = SocketAddrV4::new(
                                    arg("NewInternalClient").parse().expect("client"),
                                    arg("NewInternalPort").parse().expect("port"),
                                );
                                match st.forwards.get(&port) {
                                    _ if st.permanent_only && arg("NewLeaseDuration") != "0" => fault(725),
                                    Some(at) if *at != to || st.refuse_own => fault(718),
                                    _ => {
                                        st.forwards.insert(port, to);
                                        (200, String::new())
                                    }
                                }
                            }
                            "GetSpecificPortMappingEntry" => match st.forwards.get(&port) {
                                Some(at) => (
                                    200,
                                    format!(
                                        "<NewInternalPort>{}</NewInternalPort><NewInternalClient>{}</NewInternalClient>",
                                        at.port(),
                                        at.ip()
                                    ),
                                ),
                                None => fault(714),
                            },
                            "DeletePortMapping" => match st.forwards.remove(&port) {
                                Some(_) => (200, String::new()),
                                None => fault(714),
                            },
                            _ => fault(401),
                        }
                    };
                    let answer = format!("HTTP/1.1 {status} X\r\nContent-Length: {}\r\n\r\n{body}", body.len());
                    let _ = s.write_all(answer.as_bytes()).await;
                });
            }
        });
        let service = "urn:schemas-upnp-org:service:WANIPConnection:1".to_string();
        Router { gateway: Ipv4Addr::LOCALHOST, addr, control_path: "/ctl".into(), service }
    }

    #[tokio::test]
    async fn a_port_another_host_holds_is_left_to_it_and_our_own_is_taken_back() {
        let state = std::sync::Arc::new(std::sync::Mutex::new(Fake::default()));
        let router = fake_router(state.clone()).await;
        let (us, them) = (
            SocketAddrV4::new(Ipv4Addr::new(192, 168, 1, 20), 4737),
            SocketAddrV4::new(Ipv4Addr::new(192, 168, 1, 21), 4737),
        );
        let mut asked = None;
        // Another node on the LAN holds 4737: another port, the same one each time.
        state.lock().expect("lock").forwards.insert(4737, them);
        let mut lease = LEASE;
        let port = request(&router, us, 4737, &mut lease, &mut asked).await.expect("forwarded");
        assert_ne!(port, 4737);
        assert_eq!(state.lock().expect("lock").forwards.get(&4737), Some(&them), "theirs left alone");
        assert_eq!(state.lock().expect("lock").forwards.get(&port), Some(&us));
        assert_eq!(request(&router, us, 4737, &mut lease, &mut asked).await.expect("again"), port);
        delete_ours(&Via::Upnp(router.clone()), 4737, us).await;
        assert_eq!(state.lock().expect("lock").forwards.get(&4737), Some(&them), "not ours to delete");
        // Our own forward left by an earlier run, on a router that refuses to renew it: taken
        // back, on our port.
        state.lock().expect("lock").forwards = [(4737, us)].into();
        state.lock().expect("lock").refuse_own = true;
        assert_eq!(request(&router, us, 4737, &mut lease, &mut asked).await.expect("taken back"), 4737);
        // A router that takes only forwards without end.
        let state = std::sync::Arc::new(std::sync::Mutex::new(Fake { permanent_only: true, ..Fake::default() }));
        let router = fake_router(state.clone()).await;
        assert_eq!(request(&router, us, 4737, &mut lease, &mut asked).await.expect("forwarded"), 4737);
        assert!(lease.is_zero());
    }

    #[tokio::test]
    async fn a_forward_the_router_lost_is_found_gone() {
        let state = std::sync::Arc::new(std::sync::Mutex::new(Fake::default()));
        let router = fake_router(state.clone()).await;
        let us = SocketAddrV4::new(Ipv4Addr::new(192, 168, 1, 20), 4737);
        let local: Multiaddr = "/ip4/192.168.1.20/udp/4737/quic-v1".parse().expect("multiaddr");
        let mut f = Forward {
            via: Via::Upnp(router.clone()),
            external: local.clone(),
            internal: us,
            external_port: 4737,
            local,
            lease: LEASE,
            renew_at: Instant::now(),
            expires_at: None,
            failing_since: None,
        };
        renew(&mut f, &mut None).await.expect("forwarded");
        assert_eq!(f.external.to_string(), "/ip4/11.213.7.2/udp/4737/quic-v1");
        assert_eq!(presence(&router, &f).await, Presence::Present);
        state.lock().expect("lock").forwards.clear();
        assert_eq!(presence(&router, &f).await, Presence::Gone, "a rebooted router");
        state.lock().expect("lock").forwards.insert(4737, SocketAddrV4::new(Ipv4Addr::new(192, 168, 1, 21), 4737));
        assert_eq!(presence(&router, &f).await, Presence::Gone, "another host took the port");
        // Nobody listens there any more: its service restarted elsewhere.
        let closed = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.expect("bind");
        let std::net::SocketAddr::V4(gone) = closed.local_addr().expect("addr") else { unreachable!() };
        drop(closed);
        let mut moved = router.clone();
        moved.addr = gone;
        assert_eq!(presence(&moved, &f).await, Presence::Gone);
    }

    #[tokio::test]
    async fn a_host_that_answers_without_end_is_cut_off() {
        // A description (or SOAP answer) that never ends: read up to the bound, then refused.
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.expect("bind");
        let std::net::SocketAddr::V4(addr) = listener.local_addr().expect("addr") else { unreachable!() };
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.expect("accept");
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await;
            let chunk = vec![b'x'; 16 << 10];
            while s.write_all(&chunk).await.is_ok() {}
        });
        let got = exchange(addr, "GET / HTTP/1.0\r\n\r\n").await;
        assert!(matches!(got, Err(UpnpError::TooLarge)), "{got:?}");
    }

    #[tokio::test]
    async fn an_answer_of_stated_length_is_taken_though_the_router_keeps_the_connection() {
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.expect("bind");
        let std::net::SocketAddr::V4(addr) = listener.local_addr().expect("addr") else { unreachable!() };
        let (done, held) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.expect("accept");
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc").await;
            let _ = held.await;
        });
        let got = tokio::time::timeout(Duration::from_secs(2), exchange(addr, "GET / HTTP/1.0\r\n\r\n")).await;
        assert_eq!(got.expect("not waiting for the close").expect("answer"), (200, "abc".to_string()));
        drop(done);
    }

    #[test]
    fn the_forwarded_address_is_the_listen_address_on_the_default_route() {
        let a = |s: &str| s.parse::<Multiaddr>().expect("multiaddr");
        let listening = [
            a("/ip4/127.0.0.1/udp/4737/quic-v1/p2p/12D3KooWRmZAZHPbgsyX9f6cxoNw2CJK5DjHWgssqZqoj2NC3SfG"),
            a("/ip4/172.17.0.1/udp/4737/quic-v1"),
            a("/ip4/192.168.1.20/udp/4737/quic-v1/p2p/12D3KooWRmZAZHPbgsyX9f6cxoNw2CJK5DjHWgssqZqoj2NC3SfG"),
        ];
        let lan = Ipv4Addr::new(192, 168, 1, 20);
        let local = a("/ip4/192.168.1.20/udp/4737/quic-v1");
        assert_eq!(pick(&listening, lan), Some(local.clone()));
        assert_eq!(pick(&listening, Ipv4Addr::new(192, 168, 1, 21)), None);
        assert_eq!(pick(&[a("/ip4/8.8.4.4/udp/4737/quic-v1")], Ipv4Addr::new(8, 8, 4, 4)), None, "public already");
        let public = Ipv4Addr::new(11, 213, 7, 2);
        assert_eq!(as_external(&local, public, 51000), a("/ip4/11.213.7.2/udp/51000/quic-v1"));
    }
}
