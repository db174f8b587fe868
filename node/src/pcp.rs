//! Asking the LAN's router for a port mapping with PCP (RFC 6887), or with NAT-PMP (RFC 6886)
//! where the router speaks only that: the other way home routers forward a port on request,
//! offered by routers whose UPnP is off or missing (Apple's, many OpenWrt and FRITZ!Box setups).
//!
//! Both are one UDP exchange with the gateway of our default route, on port 5351: a `MAP`
//! request names our UDP port and a lifetime, and the answer names the public address and port
//! the router forwards to it. The router answers only the host a mapping is for (it takes the
//! request's source address as the internal one), so another host on the LAN can neither see
//! nor remove ours. Each answer is one datagram of at most [`MAX_MESSAGE`] bytes, taken only
//! from the gateway's port 5351 (the socket is connected) and only when it matches the request.
//! The request is sent at 0, 250 and 750 ms until an answer comes (NAT-PMP's first retries;
//! PCP's first retry would come at 3 s, long for a router on the LAN), and given up on at
//! [`WAIT`]; a gateway whose port 5351 is closed says so at once (ICMP).
//!
//! A PCP mapping belongs to the nonce it was made with: [`Server`] takes a nonce derived from
//! the node's key, so that a node restarted after a crash renews its own mapping rather than
//! being refused it until the old one lapses.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::time::Instant;

/// The port PCP and NAT-PMP servers listen on.
pub(crate) const SERVER_PORT: u16 = 5351;

/// The largest PCP message (RFC 6887, 7); NAT-PMP's are smaller.
const MAX_MESSAGE: usize = 1100;

/// When a request is sent, counted from the first send; the exchange fails at [`WAIT`].
const SENDS: [Duration; 3] = [Duration::ZERO, Duration::from_millis(250), Duration::from_millis(750)];

/// How long an exchange waits for its answer.
pub(crate) const WAIT: Duration = Duration::from_millis(1750);

const PCP_VERSION: u8 = 2;
const PCP_MAP: u8 = 1;
const IPPROTO_UDP: u8 = 17;

/// What went wrong asking for a mapping.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PcpError {
    #[error("the gateway has no PCP or NAT-PMP server (its port {SERVER_PORT} is closed)")]
    NoServer,
    #[error("the gateway did not answer PCP or NAT-PMP within {WAIT:?}")]
    Timeout,
    #[error("the gateway refused the mapping ({0})")]
    Refused(String),
    #[error("cannot reach the gateway: {0}")]
    Io(#[from] std::io::Error),
}

/// Which protocol a gateway speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Version {
    Pcp,
    NatPmp,
}

/// A gateway's PCP or NAT-PMP server, for one internal address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Server {
    pub(crate) gateway: IpAddr,
    /// The interface an IPv6 link-local gateway is on (its index); 0 otherwise.
    pub(crate) scope: u32,
    /// [`SERVER_PORT`] but in tests.
    port: u16,
    /// What the gateway answered in; `None` until it answered.
    version: Option<Version>,
    nonce: [u8; 12],
}

/// A mapping granted: the router's public address and port, and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Mapping {
    pub(crate) external: SocketAddr,
    pub(crate) lifetime: Duration,
}

impl Server {
    pub(crate) fn new(gateway: IpAddr, scope: u32, nonce: [u8; 12]) -> Self {
        Self { gateway, scope, port: SERVER_PORT, version: None, nonce }
    }

    pub(crate) fn version(&self) -> Option<Version> {
        self.version
    }

    /// Asks the gateway to forward UDP `external_port` (or whichever port it picks) to
    /// `internal` for `lifetime`; asked again, the same request renews the mapping. PCP first;
    /// a gateway that answers it as a NAT-PMP server that does not know the version is asked in
    /// NAT-PMP from then on (for an IPv4 address: NAT-PMP maps no IPv6). For an IPv6 address
    /// the mapping is a pinhole in the router's firewall, at our own address.
    pub(crate) async fn map(
        &mut self,
        internal: SocketAddr,
        external_port: u16,
        lifetime: Duration,
    ) -> Result<Mapping, PcpError> {
        let mut socket = self.socket(internal).await?;
        if self.version != Some(Version::NatPmp) {
            let request = pcp_map_request(internal, external_port, lifetime, &self.nonce);
            match exchange(&socket, &request, |a| parse_pcp_map(a, &self.nonce, internal)).await? {
                PcpAnswer::Mapped(m) => {
                    self.version = Some(Version::Pcp);
                    return Ok(m);
                }
                PcpAnswer::Failed(code) => {
                    self.version = Some(Version::Pcp);
                    return Err(PcpError::Refused(pcp_result(code)));
                }
                PcpAnswer::OldVersion if internal.is_ipv6() => {
                    return Err(PcpError::Refused("the gateway speaks NAT-PMP, which maps no IPv6".into()));
                }
                PcpAnswer::OldVersion => {
                    self.version = Some(Version::NatPmp);
                    // A socket of its own: on this one, a late answer to a resent PCP request
                    // (NAT-PMP's "unsupported version") would read as a refusal.
                    socket = self.socket(internal).await?;
                }
            }
        }
        let ip = exchange(&socket, &[0, 0], parse_pmp_address).await?.map_err(|c| PcpError::Refused(pmp_result(c)))?;
        let request = pmp_map_request(internal.port(), external_port, lifetime);
        let (port, lifetime) = exchange(&socket, &request, |a| parse_pmp_map(a, internal.port()))
            .await?
            .map_err(|c| PcpError::Refused(pmp_result(c)))?;
        Ok(Mapping { external: SocketAddr::new(ip.into(), port), lifetime })
    }

    /// Removes our mapping of `internal`'s port: the request for no lifetime (and, in NAT-PMP,
    /// no port), in the version the gateway answered, PCP if it has not answered yet. Only the
    /// host a mapping leads to can remove it, so what is removed is ours.
    pub(crate) async fn unmap(&self, internal: SocketAddr) -> Result<(), PcpError> {
        self.clone().map(internal, 0, Duration::ZERO).await.map(|_| ())
    }

    /// A socket from `internal`'s address to the server: the router takes a request's source
    /// address for the host to map to, and the kernel passes on only the server's datagrams.
    async fn socket(&self, internal: SocketAddr) -> Result<UdpSocket, PcpError> {
        let socket = UdpSocket::bind(SocketAddr::new(internal.ip(), 0)).await?;
        let server = match self.gateway {
            IpAddr::V4(v4) => SocketAddr::new(v4.into(), self.port),
            IpAddr::V6(v6) => SocketAddrV6::new(v6, self.port, 0, self.scope).into(),
        };
        socket.connect(server).await?;
        Ok(socket)
    }
}

/// Sends `request` until an answer `accept` takes comes, at the times of [`SENDS`], for at most
/// [`WAIT`]; datagrams it does not take (an answer to another request, garbage) are passed over.
async fn exchange<T>(socket: &UdpSocket, request: &[u8], accept: impl Fn(&[u8]) -> Option<T>) -> Result<T, PcpError> {
    let start = Instant::now();
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut sent = 0;
    loop {
        let next_send = SENDS.get(sent).map(|at| start + *at);
        let wake = next_send.unwrap_or(start + WAIT);
        tokio::select! {
            got = socket.recv(&mut buf) => match got {
                Ok(n) => {
                    if let Some(answer) = accept(&buf[..n]) {
                        return Ok(answer);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return Err(PcpError::NoServer),
                Err(e) => return Err(e.into()),
            },
            _ = tokio::time::sleep_until(wake) => {
                if next_send.is_none() {
                    return Err(PcpError::Timeout);
                }
                sent += 1;
                match socket.send(request).await {
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return Err(PcpError::NoServer),
                    Err(e) => return Err(e.into()),
                }
            }
        }
    }
}

/// A PCP `MAP` request for UDP `internal` (RFC 6887, 7.1 and 11.1).
fn pcp_map_request(internal: SocketAddr, external_port: u16, lifetime: Duration, nonce: &[u8; 12]) -> [u8; 60] {
    let (client, no_suggestion) = match internal.ip() {
        // An IPv4 address goes IPv4-mapped, and so does the all-zeros one that suggests none.
        IpAddr::V4(v4) => (v4.to_ipv6_mapped(), Ipv4Addr::UNSPECIFIED.to_ipv6_mapped()),
        IpAddr::V6(v6) => (v6, Ipv6Addr::UNSPECIFIED),
    };
    let mut m = [0u8; 60];
    m[0] = PCP_VERSION;
    m[1] = PCP_MAP;
    m[4..8].copy_from_slice(&seconds(lifetime).to_be_bytes());
    m[8..24].copy_from_slice(&client.octets());
    m[24..36].copy_from_slice(nonce);
    m[36] = IPPROTO_UDP;
    m[40..42].copy_from_slice(&internal.port().to_be_bytes());
    m[42..44].copy_from_slice(&external_port.to_be_bytes());
    m[44..60].copy_from_slice(&no_suggestion.octets());
    m
}

fn seconds(d: Duration) -> u32 {
    u32::try_from(d.as_secs()).unwrap_or(u32::MAX)
}

/// What a gateway answered a PCP `MAP` request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PcpAnswer {
    Mapped(Mapping),
    Failed(u8),
    /// A NAT-PMP server's "unsupported version": it speaks only NAT-PMP.
    OldVersion,
}

/// The answer to our `MAP` request for `internal` in `answer`, if it is one.
fn parse_pcp_map(answer: &[u8], nonce: &[u8; 12], internal: SocketAddr) -> Option<PcpAnswer> {
    if answer.len() >= 4 && answer[0] == 0 && u16::from_be_bytes([answer[2], answer[3]]) == 1 {
        return Some(PcpAnswer::OldVersion);
    }
    if answer.len() < 24 || answer[0] != PCP_VERSION || answer[1] != 0x80 | PCP_MAP {
        return None;
    }
    let result = answer[3];
    let ours = answer.len() >= 60 && answer[24..36] == nonce[..];
    if result != 0 {
        // An answer to a request the server could not read may not repeat the request.
        return (ours || answer.len() < 60).then_some(PcpAnswer::Failed(result));
    }
    if !ours || answer[36] != IPPROTO_UDP || u16::from_be_bytes([answer[40], answer[41]]) != internal.port() {
        return None;
    }
    let lifetime = Duration::from_secs(u32::from_be_bytes(answer[4..8].try_into().ok()?).into());
    let port = u16::from_be_bytes([answer[42], answer[43]]);
    let named = Ipv6Addr::from(<[u8; 16]>::try_from(&answer[44..60]).ok()?);
    // An address of the family asked for; an answer to a removal may name none.
    let ip: IpAddr = match (internal, named.to_ipv4_mapped()) {
        (SocketAddr::V4(_), Some(v4)) => v4.into(),
        (SocketAddr::V6(_), None) => named.into(),
        _ if lifetime.is_zero() => internal.ip(),
        _ => return None,
    };
    Some(PcpAnswer::Mapped(Mapping { external: SocketAddr::new(ip, port), lifetime }))
}

/// A NAT-PMP request to map UDP `internal_port` (RFC 6886, 3.3).
fn pmp_map_request(internal_port: u16, external_port: u16, lifetime: Duration) -> [u8; 12] {
    let mut m = [0u8; 12];
    m[1] = 1;
    m[4..6].copy_from_slice(&internal_port.to_be_bytes());
    m[6..8].copy_from_slice(&external_port.to_be_bytes());
    m[8..12].copy_from_slice(&seconds(lifetime).to_be_bytes());
    m
}

/// The answer to NAT-PMP's public address request: the address, or the result code.
fn parse_pmp_address(answer: &[u8]) -> Option<Result<Ipv4Addr, u16>> {
    if answer.len() < 8 || answer[0] != 0 || answer[1] != 128 {
        return None;
    }
    match u16::from_be_bytes([answer[2], answer[3]]) {
        0 if answer.len() >= 12 => Some(Ok(Ipv4Addr::new(answer[8], answer[9], answer[10], answer[11]))),
        0 => None,
        code => Some(Err(code)),
    }
}

/// The answer to our NAT-PMP UDP mapping request: the public port and the lifetime, or the
/// result code.
fn parse_pmp_map(answer: &[u8], internal_port: u16) -> Option<Result<(u16, Duration), u16>> {
    if answer.len() < 8 || answer[0] != 0 || answer[1] != 128 + 1 {
        return None;
    }
    match u16::from_be_bytes([answer[2], answer[3]]) {
        0 if answer.len() >= 16 && u16::from_be_bytes([answer[8], answer[9]]) == internal_port => {
            let port = u16::from_be_bytes([answer[10], answer[11]]);
            let lifetime = u32::from_be_bytes([answer[12], answer[13], answer[14], answer[15]]);
            Some(Ok((port, Duration::from_secs(lifetime.into()))))
        }
        0 => None,
        code => Some(Err(code)),
    }
}

/// A PCP result code's name (RFC 6887, 7.4).
fn pcp_result(code: u8) -> String {
    let name = match code {
        1 => "UNSUPP_VERSION",
        2 => "NOT_AUTHORIZED",
        3 => "MALFORMED_REQUEST",
        4 => "UNSUPP_OPCODE",
        5 => "UNSUPP_OPTION",
        6 => "MALFORMED_OPTION",
        7 => "NETWORK_FAILURE",
        8 => "NO_RESOURCES",
        9 => "UNSUPP_PROTOCOL",
        10 => "USER_EX_QUOTA",
        11 => "CANNOT_PROVIDE_EXTERNAL",
        12 => "ADDRESS_MISMATCH",
        13 => "EXCESSIVE_REMOTE_PEERS",
        _ => "unknown",
    };
    format!("PCP {code} {name}")
}

/// A NAT-PMP result code's meaning (RFC 6886, 3.5).
fn pmp_result(code: u16) -> String {
    let name = match code {
        1 => "unsupported version",
        2 => "not authorized",
        3 => "network failure",
        4 => "out of resources",
        5 => "unsupported opcode",
        _ => "unknown",
    };
    format!("NAT-PMP {code}, {name}")
}

#[cfg(test)]
mod tests {
    use super::*;

    const NONCE: [u8; 12] = *b"shoal-nonce!";

    fn internal() -> SocketAddr {
        "192.168.1.20:4737".parse().unwrap()
    }

    /// A server's answer to `request`, as RFC 6887 says one is made: the request's payload
    /// repeated, with the port and address assigned.
    fn pcp_answer(request: &[u8; 60], result: u8, port: u16, ip: Ipv4Addr) -> Vec<u8> {
        let mut a = request.to_vec();
        a[1] = 0x80 | PCP_MAP;
        a[3] = result;
        a[8..12].copy_from_slice(&7u32.to_be_bytes());
        a[12..24].fill(0);
        a[42..44].copy_from_slice(&port.to_be_bytes());
        a[44..60].copy_from_slice(&ip.to_ipv6_mapped().octets());
        a
    }

    #[test]
    fn a_pcp_map_request_names_us_our_port_and_the_lifetime() {
        let r = pcp_map_request(internal(), 4737, Duration::from_secs(3600), &NONCE);
        assert_eq!(&r[..4], &[2, 1, 0, 0]);
        assert_eq!(u32::from_be_bytes(r[4..8].try_into().unwrap()), 3600);
        assert_eq!(&r[8..24], &Ipv4Addr::new(192, 168, 1, 20).to_ipv6_mapped().octets());
        assert_eq!(&r[24..36], &NONCE);
        assert_eq!(r[36], 17);
        assert_eq!(&r[40..44], &[0x12, 0x81, 0x12, 0x81]);
        assert_eq!(&r[44..60], &Ipv4Addr::UNSPECIFIED.to_ipv6_mapped().octets());
    }

    #[test]
    fn only_the_answer_to_our_request_is_taken() {
        let request = pcp_map_request(internal(), 4737, Duration::from_secs(3600), &NONCE);
        let public = Ipv4Addr::new(11, 1, 2, 3);
        let answer = pcp_answer(&request, 0, 50_000, public);
        assert_eq!(
            parse_pcp_map(&answer, &NONCE, internal()),
            Some(PcpAnswer::Mapped(Mapping {
                external: SocketAddr::new(public.into(), 50_000),
                lifetime: Duration::from_secs(3600)
            }))
        );
        // Another nonce (another client's answer, or a forgery), another port, a request
        // rather than an answer, a cut-off answer: passed over.
        assert_eq!(parse_pcp_map(&answer, b"other-nonce!", internal()), None);
        let other_port = SocketAddr::new(internal().ip(), 4738);
        assert_eq!(parse_pcp_map(&answer, &NONCE, other_port), None);
        assert_eq!(parse_pcp_map(&request, &NONCE, internal()), None);
        assert_eq!(parse_pcp_map(&answer[..59], &NONCE, internal()), None);
        // An external address that is not IPv4 is no answer for an IPv4 mapping.
        let mut v6 = answer.clone();
        v6[44..60].copy_from_slice(&Ipv6Addr::LOCALHOST.octets());
        assert_eq!(parse_pcp_map(&v6, &NONCE, internal()), None);
    }

    #[test]
    fn refusals_and_a_nat_pmp_server_are_told_apart() {
        let request = pcp_map_request(internal(), 4737, Duration::from_secs(3600), &NONCE);
        let refused = pcp_answer(&request, 2, 0, Ipv4Addr::UNSPECIFIED);
        assert_eq!(parse_pcp_map(&refused, &NONCE, internal()), Some(PcpAnswer::Failed(2)));
        assert_eq!(parse_pcp_map(&refused, b"other-nonce!", internal()), None);
        // A header alone: the server could not read the request.
        assert_eq!(parse_pcp_map(&refused[..24], &NONCE, internal()), Some(PcpAnswer::Failed(2)));
        // NAT-PMP's "unsupported version", as such a server answers version 2.
        assert_eq!(parse_pcp_map(&[0, 129, 0, 1, 0, 0, 0, 9], &NONCE, internal()), Some(PcpAnswer::OldVersion));
        assert_eq!(pcp_result(8), "PCP 8 NO_RESOURCES");
    }

    #[test]
    fn an_ipv6_address_is_asked_for_as_it_is_and_answered_in_its_family() {
        let ours: SocketAddr = "[2001:db8:1::20]:4737".parse().unwrap();
        let request = pcp_map_request(ours, 4737, Duration::from_secs(3600), &NONCE);
        assert_eq!(&r_client(&request), &"2001:db8:1::20".parse::<Ipv6Addr>().unwrap().octets());
        assert_eq!(&request[44..60], &Ipv6Addr::UNSPECIFIED.octets(), "no external address suggested");
        let mut answer = request.to_vec();
        answer[1] = 0x80 | PCP_MAP;
        answer[44..60].copy_from_slice(&request[8..24]);
        assert_eq!(
            parse_pcp_map(&answer, &NONCE, ours),
            Some(PcpAnswer::Mapped(Mapping { external: ours, lifetime: Duration::from_secs(3600) }))
        );
        // An IPv4 address for an IPv6 mapping, or the other way round: not an answer.
        answer[44..60].copy_from_slice(&Ipv4Addr::new(11, 1, 2, 3).to_ipv6_mapped().octets());
        assert_eq!(parse_pcp_map(&answer, &NONCE, ours), None);
    }

    fn r_client(request: &[u8; 60]) -> [u8; 16] {
        request[8..24].try_into().unwrap()
    }

    #[test]
    fn nat_pmp_answers_are_read_and_checked() {
        assert_eq!(
            pmp_map_request(4737, 4737, Duration::from_secs(7200)),
            [0, 1, 0, 0, 18, 129, 18, 129, 0, 0, 28, 32]
        );
        assert_eq!(parse_pmp_address(&[0, 128, 0, 0, 0, 0, 0, 9, 11, 1, 2, 3]), Some(Ok(Ipv4Addr::new(11, 1, 2, 3))));
        assert_eq!(parse_pmp_address(&[0, 128, 0, 3, 0, 0, 0, 9]), Some(Err(3)));
        assert_eq!(parse_pmp_address(&[0, 128, 0, 0, 0, 0, 0, 9]), None);
        let mapped = [0, 129, 0, 0, 0, 0, 0, 9, 18, 129, 195, 80, 0, 0, 28, 32];
        assert_eq!(parse_pmp_map(&mapped, 4737), Some(Ok((50_000, Duration::from_secs(7200)))));
        assert_eq!(parse_pmp_map(&mapped, 4738), None);
        assert_eq!(parse_pmp_map(&mapped[..15], 4737), None);
        assert_eq!(parse_pmp_map(&[0, 129, 0, 2, 0, 0, 0, 9], 4737), Some(Err(2)));
    }

    /// A server on loopback that answers PCP as a NAT-PMP-only one does, then NAT-PMP, after
    /// dropping each kind of request once.
    #[tokio::test]
    async fn a_nat_pmp_gateway_is_asked_again_in_its_version_and_a_lost_request_is_resent() {
        let server = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = server.local_addr().unwrap().port();
        let played = std::thread::spawn(move || {
            let mut seen = Vec::new();
            let mut buf = [0u8; 1100];
            let mut dropped = std::collections::HashSet::new();
            while seen.len() < 6 {
                let (n, from) = server.recv_from(&mut buf).unwrap();
                let request = buf[..n].to_vec();
                seen.push(request.clone());
                if dropped.insert((request[0], request[1], request.get(11).copied())) {
                    continue;
                }
                let answer: Vec<u8> = match (request[0], request[1]) {
                    (2, _) => vec![0, 128 + 1, 0, 1, 0, 0, 0, 9],
                    (0, 0) => vec![0, 128, 0, 0, 0, 0, 0, 9, 11, 1, 2, 3],
                    (0, 1) => {
                        let mut a = vec![0, 129, 0, 0, 0, 0, 0, 9];
                        a.extend_from_slice(&request[4..6]);
                        a.extend_from_slice(&[0xc3, 0x50]);
                        a.extend_from_slice(&request[8..12]);
                        a
                    }
                    _ => continue,
                };
                server.send_to(&answer, from).unwrap();
            }
            seen
        });
        let mut s = Server { port, ..Server::new(Ipv4Addr::LOCALHOST.into(), 0, NONCE) };
        let inside: SocketAddr = "127.0.0.1:4737".parse().unwrap();
        let m = s.map(inside, 4737, Duration::from_secs(3600)).await.unwrap();
        assert_eq!(m, Mapping { external: "11.1.2.3:50000".parse().unwrap(), lifetime: Duration::from_secs(3600) });
        assert_eq!(s.version(), Some(Version::NatPmp));
        let seen = played.join().unwrap();
        let kinds: Vec<(u8, u8)> = seen.iter().map(|r| (r[0], r[1])).collect();
        assert_eq!(kinds, [(2, 1), (2, 1), (0, 0), (0, 0), (0, 1), (0, 1)]);
    }

    #[tokio::test]
    async fn a_closed_port_is_no_server_and_silence_a_timeout() {
        // A port nobody listens on: the kernel's ICMP answer ends the exchange at once.
        let port = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut s = Server { port, ..Server::new(Ipv4Addr::LOCALHOST.into(), 0, NONCE) };
        let inside: SocketAddr = "127.0.0.1:4737".parse().unwrap();
        assert!(matches!(s.map(inside, 4737, Duration::from_secs(60)).await, Err(PcpError::NoServer)));
        // A server that reads and never answers.
        let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        s.port = silent.local_addr().unwrap().port();
        assert!(matches!(s.map(inside, 4737, Duration::from_secs(60)).await, Err(PcpError::Timeout)));
        assert_eq!(s.version(), None);
    }
}
