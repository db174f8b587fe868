//! Asking the LAN's router to forward our port (UPnP IGD), for the one address it can forward to.
//!
//! libp2p's `upnp` behaviour asks a forward for every private IPv4 listen address, all at the
//! same external port. A node on `0.0.0.0` on a Docker host has two (its LAN address and
//! Docker's `172.17.0.1`), and a router forwards only to the address that asks: it refuses the
//! other. Each refusal drops the forward that worked from the behaviour's table (both have the
//! same port), and the behaviour retries the refused one: seen with `miniupnpd` in front of a
//! namespace with both addresses, the node withdrew the router's address as soon as it had
//! announced it, or 30 s later, as the two answers came in, and the forward would lapse
//! unrenewed. So [`Forwarding`] passes on only the listen address the router sees us at: the
//! source address of our default IPv4 route.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, UdpSocket};
use std::task::{Context, Poll};

use libp2p::core::transport::PortUse;
use libp2p::core::{Endpoint, Multiaddr};
use libp2p::swarm::{
    ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, THandler, THandlerInEvent, THandlerOutEvent, ToSwarm,
};
use libp2p::{PeerId, upnp};

/// The address this machine sends from to the Internet over IPv4: the source address of its
/// default route, if it has one.
fn default_route_source() -> Option<Ipv4Addr> {
    // Connecting a UDP socket only looks the route up; nothing is sent. 192.0.2.0/24 is for
    // documentation, so any route to it is the default one.
    let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).ok()?;
    socket.connect((Ipv4Addr::new(192, 0, 2, 1), 9)).ok()?;
    match socket.local_addr().ok()?.ip() {
        IpAddr::V4(v4) if !v4.is_unspecified() => Some(v4),
        _ => None,
    }
}

/// The first IPv4 address of `addr`.
fn ipv4(addr: &Multiaddr) -> Option<Ipv4Addr> {
    match addr.iter().next()? {
        libp2p::multiaddr::Protocol::Ip4(v4) => Some(v4),
        _ => None,
    }
}

/// libp2p's UPnP behaviour, told only of the listen address on our default route.
pub(crate) struct Forwarding {
    inner: upnp::tokio::Behaviour,
    /// The listen addresses passed on, so that their expiry is passed on too.
    passed: HashSet<Multiaddr>,
}

impl Forwarding {
    /// Starts looking for the router at once: a multicast query on the LAN.
    pub(crate) fn new() -> Self {
        Self { inner: upnp::tokio::Behaviour::default(), passed: HashSet::new() }
    }
}

impl NetworkBehaviour for Forwarding {
    type ConnectionHandler = <upnp::tokio::Behaviour as NetworkBehaviour>::ConnectionHandler;
    type ToSwarm = upnp::Event;

    fn handle_established_inbound_connection(
        &mut self,
        id: ConnectionId,
        peer: PeerId,
        local: &Multiaddr,
        remote: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.inner.handle_established_inbound_connection(id, peer, local, remote)
    }

    fn handle_established_outbound_connection(
        &mut self,
        id: ConnectionId,
        peer: PeerId,
        addr: &Multiaddr,
        role: Endpoint,
        port_use: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.inner.handle_established_outbound_connection(id, peer, addr, role, port_use)
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        let pass = match event {
            FromSwarm::NewListenAddr(e) => {
                ipv4(e.addr).is_some_and(|ip| Some(ip) == default_route_source()) && self.passed.insert(e.addr.clone())
            }
            FromSwarm::ExpiredListenAddr(e) => self.passed.remove(e.addr),
            _ => true,
        };
        if pass {
            self.inner.on_swarm_event(event)
        }
    }

    fn on_connection_handler_event(&mut self, peer: PeerId, id: ConnectionId, event: THandlerOutEvent<Self>) {
        self.inner.on_connection_handler_event(peer, id, event)
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        self.inner.poll(cx)
    }
}
