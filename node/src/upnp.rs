//! Asking the LAN's router to forward our QUIC port (UPnP IGD), as home routers offer.
//!
//! A node behind a home router's NAT fetches, but no peer can dial it. Most home routers forward
//! a port when a program on the LAN asks: [`run`] finds the router (an SSDP search), reads its
//! description (one HTTP GET), asks it for its public address and for a forward of our UDP port
//! to the address we listen on (SOAP calls), renews the forward every half hour, and tells the
//! swarm what to announce ([`Command::Forwarded`]). It removes the forward when the node stops.
//!
//! The client is our own, not libp2p's `upnp` behaviour on `igd-next`, which (checked in their
//! source, libp2p-upnp 0.7 and igd-next 0.17) reads every answer whole with no bound, from
//! whichever host on the LAN answers the search first, at whatever address its answer names (our
//! own API on loopback among them): any host on a café's network could fill our memory. It also
//! asked a forward for every private listen address at one port, and a router's refusal of one
//! (Docker's `172.17.0.1`, which is not the host that asks) dropped the forward that worked;
//! it searched once, at start; and a listen address that went away left its forward announced.
//! Here only the host our default route goes through is trusted, at its own address; each
//! answer is read up to [`MAX_ANSWER`] bytes within [`IO_TIMEOUT`]; the forward asked for is the
//! one for the address on our default route; and the search is repeated while there is none.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use libp2p::Multiaddr;
use libp2p::multiaddr::Protocol;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info};

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

/// How often the listen addresses and the default route are looked at again.
const RECHECK: Duration = Duration::from_secs(60);

/// The longest wait between attempts while no forward is in place.
const MAX_BACKOFF: Duration = Duration::from_secs(15 * 60);

/// What went wrong talking to the router.
#[derive(Debug, thiserror::Error)]
pub(crate) enum UpnpError {
    #[error("no router answered the UPnP search")]
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
}

/// A router that forwards ports: where its WAN connection service takes SOAP calls.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Router {
    addr: SocketAddrV4,
    control_path: String,
    service: String,
}

/// A forward in place.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Forward {
    router: Router,
    /// Our listen address it forwards to.
    local: Multiaddr,
    internal: SocketAddrV4,
    /// The router's public address, with our port and protocol.
    external: Multiaddr,
    /// The lease asked for; zero for a router that takes only forwards without end.
    lease: Duration,
    /// When to ask again: half the lease on.
    renew_at: tokio::time::Instant,
}

/// Keeps a forward of our port on the LAN's router while the node runs, telling the swarm over
/// `commands`; removes it when `stop` fires (or its sender is dropped).
pub(crate) async fn run(commands: mpsc::Sender<Command>, mut stop: oneshot::Receiver<()>) {
    // The first round looks at the listen addresses: wait (a second at most) for the listeners
    // to report theirs.
    for _ in 0..20 {
        let (tx, rx) = oneshot::channel();
        if commands.send(Command::Listening(tx)).await.is_err() {
            return;
        }
        if rx.await.is_ok_and(|(addrs, reported)| reported && !addrs.is_empty()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut current: Option<Forward> = None;
    let mut backoff = RECHECK;
    // Said once per kind of outcome, not at every retry.
    let mut last_said = String::new();
    loop {
        let wait = match step(&commands, &mut current).await {
            Ok(renew_in) => {
                backoff = RECHECK;
                last_said.clear();
                renew_in
            }
            Err(e) => {
                let said = e.to_string();
                match &e {
                    UpnpError::NoRouter => debug!("{said}"),
                    _ if said != last_said => info!(error = %said, "no port forwarded by the router (UPnP)"),
                    _ => debug!(error = %said, "no port forwarded by the router (UPnP)"),
                }
                last_said = said;
                let wait = backoff;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                wait
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = &mut stop => break,
        }
        if commands.is_closed() {
            return;
        }
    }
    if let Some(f) = current {
        let _ = delete(&f).await;
    }
}

/// One round: forwards, renews or withdraws as the listen addresses and the route say. Returns
/// how long until the next round.
async fn step(commands: &mpsc::Sender<Command>, current: &mut Option<Forward>) -> Result<Duration, UpnpError> {
    let (tx, rx) = oneshot::channel();
    if commands.send(Command::Listening(tx)).await.is_err() {
        return Ok(RECHECK);
    }
    let listening = rx.await.map(|(addrs, _)| addrs).unwrap_or_default();
    let wanted = default_route_source().and_then(|ip| pick(&listening, ip));
    if let Some(f) = current.take() {
        if wanted.as_ref() == Some(&f.local) {
            let now = tokio::time::Instant::now();
            if now < f.renew_at {
                let left = f.renew_at - now;
                *current = Some(f);
                return Ok(left.min(RECHECK));
            }
            // Renewed, and the public address read again: it may have changed.
            return match renew(&f).await {
                Ok(renewed) => {
                    if renewed.external != f.external {
                        tell(commands, Some(&renewed)).await;
                    }
                    *current = Some(renewed);
                    Ok(RECHECK)
                }
                Err(e) => {
                    tell(commands, None).await;
                    Err(e)
                }
            };
        }
        // The address it forwards to is no longer ours, or no longer on the default route.
        tell(commands, None).await;
        let _ = delete(&f).await;
    }
    let Some(local) = wanted else { return Ok(RECHECK) };
    let forward = establish(local).await?;
    tell(commands, Some(&forward)).await;
    *current = Some(forward);
    Ok(RECHECK)
}

async fn tell(commands: &mpsc::Sender<Command>, forward: Option<&Forward>) {
    let _ = commands.send(Command::Forwarded(forward.map(|f| (f.local.clone(), f.external.clone())))).await;
}

/// Of our listen addresses, the IPv4 one on `ip` (the source of our default route) with a UDP
/// port, if it is private: the one a router in front of us can forward to.
fn pick(listening: &[Multiaddr], ip: Ipv4Addr) -> Option<Multiaddr> {
    listening.iter().map(crate::addrs::bare).find(|a| {
        matches!(a.iter().next(), Some(Protocol::Ip4(v4)) if v4 == ip && v4.is_private()) && udp_port(a).is_some()
    })
}

fn udp_port(addr: &Multiaddr) -> Option<u16> {
    addr.iter().find_map(|p| match p {
        Protocol::Udp(port) => Some(port),
        _ => None,
    })
}

fn ipv4(addr: &Multiaddr) -> Option<Ipv4Addr> {
    match addr.iter().next()? {
        Protocol::Ip4(v4) => Some(v4),
        _ => None,
    }
}

/// Finds the router, and asks it to forward our port to `local`.
async fn establish(local: Multiaddr) -> Result<Forward, UpnpError> {
    let router = find_router().await?;
    let (ip, port) = (ipv4(&local).expect("picked IPv4"), udp_port(&local).expect("picked with a port"));
    let forward = Forward {
        router,
        external: local.clone(),
        internal: SocketAddrV4::new(ip, port),
        local,
        lease: LEASE,
        renew_at: tokio::time::Instant::now(),
    };
    renew(&forward).await
}

/// Asks the router for its public address and for the forward (again): the forward as it now
/// stands.
async fn renew(f: &Forward) -> Result<Forward, UpnpError> {
    let public = external_ip(&f.router).await?;
    if !is_public(public) {
        return Err(UpnpError::NotPublic(public));
    }
    let mut lease = f.lease;
    match add_mapping(&f.router, f.internal, lease).await {
        // Some older routers take only forwards without end.
        Err(UpnpError::Refused { code: 725, .. }) if !lease.is_zero() => {
            lease = Duration::ZERO;
            add_mapping(&f.router, f.internal, lease).await?
        }
        other => other?,
    }
    let external = f.local.replace(0, |_| Some(Protocol::Ip4(public))).expect("an address with an IP");
    // A forward without end is asked for again all the same, for the public address.
    let renew_in = if lease.is_zero() { LEASE / 2 } else { lease / 2 };
    Ok(Forward { external, lease, renew_at: tokio::time::Instant::now() + renew_in, ..f.clone() })
}

/// Whether a router's public address is one peers can reach: not private, shared (CGNAT),
/// loopback, link-local, documentation, benchmarking, reserved, multicast or unspecified.
fn is_public(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    !(ip.is_private()
        || ip.is_loopback()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_documentation()
        || ip.is_multicast()
        || a == 0
        || (a == 100 && (64..128).contains(&b))
        || (a == 198 && (b == 18 || b == 19))
        || a >= 240)
}

/// The gateway of our default IPv4 route, from the kernel's table (Linux); `None` elsewhere.
fn default_gateway() -> Option<Ipv4Addr> {
    parse_route_table(&std::fs::read_to_string("/proc/net/route").ok()?)
}

/// The gateway of the default route in `/proc/net/route`'s text (addresses in hex, in the
/// machine's byte order, which is little-endian on every platform Shoal builds for).
fn parse_route_table(text: &str) -> Option<Ipv4Addr> {
    const RTF_UP: u16 = 0x1;
    const RTF_GATEWAY: u16 = 0x2;
    text.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (dest, gateway, flags, mask) = (f.get(1)?, f.get(2)?, f.get(3)?, f.get(7)?);
        let flags = u16::from_str_radix(flags, 16).ok()?;
        let default = *dest == "00000000" && *mask == "00000000";
        (default && flags & RTF_UP != 0 && flags & RTF_GATEWAY != 0)
            .then(|| u32::from_str_radix(gateway, 16).ok().map(|g| Ipv4Addr::from(g.swap_bytes())))
            .flatten()
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

/// Finds the router: the SSDP search's answer from our default gateway, naming a description on
/// that same host, whose WAN connection service takes our calls.
async fn find_router() -> Result<Router, UpnpError> {
    let gateway = default_gateway();
    let socket = tokio::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).await?;
    socket.send_to(SEARCH.as_bytes(), (Ipv4Addr::new(239, 255, 255, 250), 1900)).await?;
    let deadline = tokio::time::Instant::now() + SEARCH_WAIT;
    let mut buf = vec![0u8; 2048];
    loop {
        let Ok(received) = tokio::time::timeout_at(deadline, socket.recv_from(&mut buf)).await else {
            return Err(UpnpError::NoRouter);
        };
        let (n, from) = received?;
        let std::net::IpAddr::V4(from) = from.ip() else { continue };
        match search_answer(&buf[..n], from, gateway) {
            Ok(location) => return describe(location).await,
            Err(e) => debug!(%from, error = %e, "an answer to the UPnP search not taken"),
        }
    }
}

/// The description's address and path in an answer to the search from `from`, if it is one to
/// trust: from our default gateway (where it is known), naming a description on the host that
/// answered.
fn search_answer(
    answer: &[u8],
    from: Ipv4Addr,
    gateway: Option<Ipv4Addr>,
) -> Result<(SocketAddrV4, String), UpnpError> {
    if gateway.is_some_and(|g| g != from) {
        return Err(UpnpError::Malformed(format!("{from} is not our default gateway")));
    }
    let text = std::str::from_utf8(answer).map_err(|_| UpnpError::Malformed("not text".into()))?;
    let location = header(text, "location").ok_or_else(|| UpnpError::Malformed("no LOCATION".into()))?;
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

/// `http://a.b.c.d:port/path` as its socket address and path.
fn parse_url(url: &str) -> Result<(SocketAddrV4, String), UpnpError> {
    let rest = url.strip_prefix("http://").ok_or_else(|| UpnpError::Malformed(format!("not an http URL: {url}")))?;
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let addr = match host.parse::<SocketAddrV4>() {
        Ok(a) => a,
        Err(_) => {
            SocketAddrV4::new(host.parse().map_err(|_| UpnpError::Malformed(format!("not an IPv4 host: {host}")))?, 80)
        }
    };
    Ok((addr, path.to_string()))
}

/// Reads the router's description at `location` for its WAN connection service.
async fn describe((addr, path): (SocketAddrV4, String)) -> Result<Router, UpnpError> {
    let request =
        format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\nUser-Agent: shoal UPnP/1.1\r\n\r\n");
    let (status, body) = exchange(addr, &request).await?;
    if status != 200 {
        return Err(UpnpError::Malformed(format!("description answered HTTP {status}")));
    }
    let (service, control) =
        wan_service(&body).ok_or_else(|| UpnpError::Malformed("no WAN connection service".into()))?;
    let control_path = match control.strip_prefix("http://") {
        // A full URL must name the same host.
        Some(_) => {
            let (at, p) = parse_url(&control)?;
            if at.ip() != addr.ip() {
                return Err(UpnpError::Malformed(format!("the control URL names another host, {at}")));
            }
            return Ok(Router { addr: at, control_path: p, service });
        }
        None if control.starts_with('/') => control,
        None => format!("/{control}"),
    };
    Ok(Router { addr, control_path, service })
}

/// The first WAN connection service in a description: its type and control URL.
fn wan_service(description: &str) -> Option<(String, String)> {
    let mut rest = description;
    while let Some(start) = rest.find("<service>") {
        let end = rest[start..].find("</service>")? + start;
        let block = &rest[start..end];
        rest = &rest[end..];
        let kind = element(block, "serviceType")?;
        let wanted =
            ["urn:schemas-upnp-org:service:WANIPConnection:", "urn:schemas-upnp-org:service:WANPPPConnection:"];
        if wanted.iter().any(|w| kind.starts_with(w)) {
            return Some((kind.to_string(), element(block, "controlURL")?.to_string()));
        }
    }
    None
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
            description: element(&answer, "errorDescription").unwrap_or("no description").chars().take(200).collect(),
        }),
    }
}

async fn external_ip(router: &Router) -> Result<Ipv4Addr, UpnpError> {
    let answer = soap(router, "GetExternalIPAddress", &[]).await?;
    let ip =
        element(&answer, "NewExternalIPAddress").ok_or_else(|| UpnpError::Malformed("no external address".into()))?;
    ip.parse().map_err(|_| UpnpError::Malformed(format!("external address {ip:?}")))
}

async fn add_mapping(router: &Router, internal: SocketAddrV4, lease: Duration) -> Result<(), UpnpError> {
    let args = [
        ("NewRemoteHost", String::new()),
        ("NewExternalPort", internal.port().to_string()),
        ("NewProtocol", "UDP".to_string()),
        ("NewInternalPort", internal.port().to_string()),
        ("NewInternalClient", internal.ip().to_string()),
        ("NewEnabled", "1".to_string()),
        ("NewPortMappingDescription", "shoal".to_string()),
        ("NewLeaseDuration", lease.as_secs().to_string()),
    ];
    soap(router, "AddPortMapping", &args).await.map(drop)
}

async fn delete(f: &Forward) -> Result<(), UpnpError> {
    let args = [
        ("NewRemoteHost", String::new()),
        ("NewExternalPort", f.internal.port().to_string()),
        ("NewProtocol", "UDP".to_string()),
    ];
    soap(&f.router, "DeletePortMapping", &args).await.map(drop)
}

/// Sends `request` to `addr` (HTTP/1.0: the router closes the connection after its answer) and
/// reads the answer, at most [`MAX_ANSWER`] bytes within [`IO_TIMEOUT`]: its status and body.
async fn exchange(addr: SocketAddrV4, request: &str) -> Result<(u16, String), UpnpError> {
    let read = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream.write_all(request.as_bytes()).await?;
        let mut answer = Vec::new();
        (&mut stream).take(MAX_ANSWER as u64 + 1).read_to_end(&mut answer).await?;
        Ok::<_, std::io::Error>(answer)
    };
    let answer = tokio::time::timeout(IO_TIMEOUT, read).await.map_err(|_| UpnpError::Timeout)??;
    if answer.len() > MAX_ANSWER {
        return Err(UpnpError::TooLarge);
    }
    parse_http(&answer)
}

/// An HTTP answer's status and body (de-chunked, for a router that chunks even for HTTP/1.0).
fn parse_http(answer: &[u8]) -> Result<(u16, String), UpnpError> {
    let text = String::from_utf8_lossy(answer);
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| UpnpError::Malformed("no end of headers".into()))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| UpnpError::Malformed("no HTTP status".into()))?;
    let chunked = header(head, "transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
    Ok((status, if chunked { dechunk(body)? } else { body.to_string() }))
}

fn dechunk(mut body: &str) -> Result<String, UpnpError> {
    let mut out = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n").ok_or_else(|| UpnpError::Malformed("bad chunk".into()))?;
        let size = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| UpnpError::Malformed("bad chunk size".into()))?;
        if size == 0 {
            return Ok(out);
        }
        let chunk = rest.get(..size).ok_or_else(|| UpnpError::Malformed("short chunk".into()))?;
        out.push_str(chunk);
        body = rest[size..].strip_prefix("\r\n").unwrap_or(&rest[size..]);
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
    fn the_wan_connection_service_is_found_in_a_description() {
        let (kind, control) = wan_service(DESCRIPTION).expect("found");
        assert_eq!(kind, "urn:schemas-upnp-org:service:WANIPConnection:2");
        assert_eq!(control, "/ctl/IPConn");
        let ppp = DESCRIPTION.replace("WANIPConnection:2", "WANPPPConnection:1");
        assert_eq!(wan_service(&ppp).expect("found").0, "urn:schemas-upnp-org:service:WANPPPConnection:1");
        assert_eq!(wan_service(&DESCRIPTION.replace("WANIPConnection", "Other")), None);
        assert_eq!(wan_service("<service><serviceType>"), None, "cut short");
    }

    #[test]
    fn only_the_default_gateway_naming_itself_is_trusted() {
        let router = Ipv4Addr::new(192, 168, 1, 1);
        let answer = |location: &str| format!("HTTP/1.1 200 OK\r\nST: x\r\nLocation: {location}\r\n\r\n");
        let ok = answer("http://192.168.1.1:5000/rootDesc.xml");
        let (addr, path) = search_answer(ok.as_bytes(), router, Some(router)).expect("trusted");
        assert_eq!((addr, path.as_str()), (SocketAddrV4::new(router, 5000), "/rootDesc.xml"));
        assert!(search_answer(ok.as_bytes(), router, None).is_ok(), "no route table to check against");
        let stranger = Ipv4Addr::new(192, 168, 1, 66);
        assert!(search_answer(ok.as_bytes(), stranger, Some(router)).is_err(), "not the gateway");
        let elsewhere = answer("http://127.0.0.1:4738/v1/blobs");
        assert!(search_answer(elsewhere.as_bytes(), router, Some(router)).is_err(), "names another host");
        assert!(search_answer(b"HTTP/1.1 200 OK\r\n\r\n", router, Some(router)).is_err(), "no location");
        assert!(search_answer(&[0xff, 0xfe], router, Some(router)).is_err());
        let named = answer("http://router.lan/desc.xml");
        assert!(search_answer(named.as_bytes(), router, Some(router)).is_err(), "a name, not the host's IP");
    }

    #[test]
    fn the_default_gateway_is_read_from_the_route_table() {
        let table = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
            eth0\t0001A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
            eth0\t00000000\t0101A8C0\t0003\t0\t0\t100\t00000000\t0\t0\t0\n";
        assert_eq!(parse_route_table(table), Some(Ipv4Addr::new(192, 168, 1, 1)));
        assert_eq!(parse_route_table(&table.replace("\t0003\t", "\t0001\t")), None, "not via a gateway");
        assert_eq!(parse_route_table("Iface\n"), None);
    }

    #[test]
    fn answers_are_parsed_and_bounded() {
        let (status, body) = parse_http(b"HTTP/1.1 200 OK\r\nContent-Type: text/xml\r\n\r\n<a>1</a>").expect("parsed");
        assert_eq!((status, body.as_str()), (200, "<a>1</a>"));
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n<a>1\r\n4\r\n</a>\r\n0\r\n\r\n";
        assert_eq!(parse_http(chunked).expect("parsed").1, "<a>1</a>");
        assert!(parse_http(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n").is_err());
        assert!(parse_http(b"garbage").is_err());
        let fault = "<s:Fault><detail><UPnPError><errorCode>718</errorCode>\
            <errorDescription>ConflictInMappingEntry</errorDescription></UPnPError></detail></s:Fault>";
        assert_eq!(element(fault, "errorCode"), Some("718"));
        assert!(is_public(Ipv4Addr::new(11, 213, 7, 2)));
        for ip in [[192, 168, 1, 1], [10, 0, 0, 1], [100, 64, 0, 1], [127, 0, 0, 1], [203, 0, 113, 5], [0, 0, 0, 0]] {
            assert!(!is_public(Ipv4Addr::from(ip)), "{ip:?}");
        }
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

    #[test]
    fn the_forwarded_address_is_the_listen_address_on_the_default_route() {
        let a = |s: &str| s.parse::<Multiaddr>().expect("multiaddr");
        let listening = [
            a("/ip4/127.0.0.1/udp/4737/quic-v1/p2p/12D3KooWRmZAZHPbgsyX9f6cxoNw2CJK5DjHWgssqZqoj2NC3SfG"),
            a("/ip4/172.17.0.1/udp/4737/quic-v1"),
            a("/ip4/192.168.1.20/udp/4737/quic-v1/p2p/12D3KooWRmZAZHPbgsyX9f6cxoNw2CJK5DjHWgssqZqoj2NC3SfG"),
        ];
        let lan = Ipv4Addr::new(192, 168, 1, 20);
        assert_eq!(pick(&listening, lan), Some(a("/ip4/192.168.1.20/udp/4737/quic-v1")));
        assert_eq!(pick(&listening, Ipv4Addr::new(192, 168, 1, 21)), None);
        assert_eq!(pick(&[a("/ip4/8.8.4.4/udp/4737/quic-v1")], Ipv4Addr::new(8, 8, 4, 4)), None, "public already");
    }
}
