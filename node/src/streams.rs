//! Raw libp2p streams of one protocol (the transfer protocol): opened on request, accepted into a
//! bounded queue.
//!
//! libp2p-stream does the same job but hands each inbound stream over through a channel that
//! holds one stream: a second stream negotiated before the accepting task took the first is
//! dropped, and the requester sees its stream reset. A node that serves a crowd receives streams
//! in bursts from many connections at once, and on a loaded machine the accepting task runs
//! milliseconds after it is woken; in a 100-node emulated crowd one inbound stream in five was
//! lost that way, each counted by its requester as a failure of a healthy peer. Here the queue
//! holds [`INBOUND_QUEUE`] streams, and a stream that finds it full is counted before it is
//! dropped.
//!
//! Opening a stream to a peer we are not connected to dials it first, as libp2p-stream does. The
//! addresses given to `Swarm::add_peer_address` (those other peers named for a peer, and those a
//! peer announced itself, when the node believes them) are remembered for up to
//! [`REMEMBERED_PEERS`] peers and offered to every dial of that peer.

use std::collections::{HashMap, HashSet, VecDeque};
use std::convert::Infallible;
use std::num::NonZeroUsize;
use std::task::{Context, Poll};

use libp2p::core::transport::PortUse;
use libp2p::core::upgrade::ReadyUpgrade;
use libp2p::core::{Endpoint, Multiaddr};
use libp2p::swarm::dial_opts::DialOpts;
use libp2p::swarm::handler::{ConnectionEvent, DialUpgradeError, FullyNegotiatedInbound, FullyNegotiatedOutbound};
use libp2p::swarm::{
    ConnectionDenied, ConnectionHandler, ConnectionHandlerEvent, ConnectionId, DialError, FromSwarm, NetworkBehaviour,
    NotifyHandler, PeerAddresses, StreamUpgradeError, SubstreamProtocol, THandler, THandlerInEvent, THandlerOutEvent,
    ToSwarm,
};
use libp2p::{PeerId, Stream, StreamProtocol};
use prometheus_client::metrics::counter::Counter;
use tokio::sync::{mpsc, oneshot};

/// Inbound streams waiting for the accepting task, per node. A stream costs a few hundred bytes
/// while it waits; past this the node is overloaded and new streams are reset.
pub(crate) const INBOUND_QUEUE: usize = 1024;

/// Open requests waiting for the swarm to take them, per node; past it `open` waits for room. The
/// swarm takes every one it finds at each poll: what bounds the requests handed to connections,
/// or waiting for a dial ([`MAX_WAITING_PER_PEER`]), is their callers (this node's own fetches and
/// lookups), each of which gives up at its timeout.
const OPEN_QUEUE: usize = 1024;

/// Open requests waiting for a dial to one peer; past it new ones fail at once.
const MAX_WAITING_PER_PEER: usize = 256;

/// Peers with requests waiting for a dial; past it, requests their callers gave up on are
/// forgotten.
const MAX_WAITING_PEERS: usize = 1024;

/// Peers whose addresses are remembered; the least recently used is forgotten. Room for the
/// peers one crowd fetch meets and is named (up to 1,024 each), as identify's cache and this one
/// held before they were one (see `crate::swarm`, identify).
const REMEMBERED_PEERS: NonZeroUsize = NonZeroUsize::new(2048).expect("not zero");

/// Why a stream could not be opened.
#[derive(Debug, thiserror::Error)]
pub(crate) enum OpenError {
    /// The peer does not speak the protocol.
    #[error("the peer does not support the protocol")]
    Unsupported,
    /// No connection to the peer could be made, or it closed before the stream was negotiated.
    #[error("cannot reach the peer: {0}")]
    Unreachable(String),
    /// The node is stopping.
    #[error("the node is stopping")]
    Stopped,
}

type Reply = oneshot::Sender<Result<Stream, OpenError>>;

/// Opens streams to peers; cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct Control {
    requests: mpsc::Sender<(PeerId, Reply)>,
}

impl Control {
    /// A negotiated stream to `peer`, dialling it if we are not connected.
    pub(crate) async fn open(&self, peer: PeerId) -> Result<Stream, OpenError> {
        let (tx, rx) = oneshot::channel();
        self.requests.send((peer, tx)).await.map_err(|_| OpenError::Stopped)?;
        rx.await.unwrap_or_else(|_| Err(OpenError::Unreachable("the connection closed".into())))
    }
}

/// Streams peers opened to us, in the order they were negotiated, each with its peer and the
/// address of the connection it came on (the peer's, or the one we dialled it at).
pub(crate) type Incoming = mpsc::Receiver<(PeerId, Multiaddr, Stream)>;

/// The behaviour; see the module documentation.
pub(crate) struct Behaviour {
    protocol: StreamProtocol,
    inbound: mpsc::Sender<(PeerId, Multiaddr, Stream)>,
    dropped: Counter,
    requests: mpsc::Receiver<(PeerId, Reply)>,
    connections: HashMap<PeerId, HashSet<ConnectionId>>,
    /// Requests waiting for a connection to their peer.
    waiting: HashMap<PeerId, Vec<Reply>>,
    /// Addresses given for peers (`Swarm::add_peer_address`).
    addresses: PeerAddresses,
    events: VecDeque<ToSwarm<Infallible, Reply>>,
}

impl Behaviour {
    /// The behaviour for `protocol`, the handle that opens streams, and the queue of inbound
    /// streams. `dropped` counts inbound streams reset because the queue was full.
    pub(crate) fn new(protocol: StreamProtocol, dropped: Counter) -> (Self, Control, Incoming) {
        let (inbound, incoming) = mpsc::channel(INBOUND_QUEUE);
        let (requests_tx, requests) = mpsc::channel(OPEN_QUEUE);
        let behaviour = Self {
            protocol,
            inbound,
            dropped,
            requests,
            connections: HashMap::new(),
            waiting: HashMap::new(),
            addresses: PeerAddresses::new(REMEMBERED_PEERS),
            events: VecDeque::new(),
        };
        (behaviour, Control { requests: requests_tx }, incoming)
    }

    /// Forgets the addresses given for `peer`.
    pub(crate) fn forget(&mut self, peer: &PeerId) {
        let addrs: Vec<Multiaddr> = self.addresses.get(peer).collect();
        for addr in &addrs {
            self.addresses.remove(peer, addr);
        }
    }

    fn handler(&self, peer: PeerId, remote: &Multiaddr) -> Handler {
        Handler {
            peer,
            remote: remote.clone(),
            protocol: self.protocol.clone(),
            inbound: self.inbound.clone(),
            dropped: self.dropped.clone(),
            to_open: VecDeque::new(),
        }
    }

    /// Has `connection` to `peer` open a stream for `reply`, unless its caller gave up.
    fn open_on(&mut self, peer: PeerId, connection: ConnectionId, reply: Reply) {
        if !reply.is_closed() {
            self.events.push_back(ToSwarm::NotifyHandler {
                peer_id: peer,
                handler: NotifyHandler::One(connection),
                event: reply,
            });
        }
    }

    fn open(&mut self, peer: PeerId, reply: Reply) {
        if reply.is_closed() {
            return;
        }
        if let Some(connection) = self.connections.get(&peer).and_then(|c| c.iter().next()).copied() {
            self.open_on(peer, connection, reply);
            return;
        }
        if self.waiting.len() >= MAX_WAITING_PEERS {
            self.waiting.retain(|_, replies| {
                replies.retain(|r| !r.is_closed());
                !replies.is_empty()
            });
        }
        let waiting = self.waiting.entry(peer).or_default();
        waiting.retain(|r| !r.is_closed());
        if waiting.len() >= MAX_WAITING_PER_PEER {
            let _ = reply.send(Err(OpenError::Unreachable("too many streams wait for this peer".into())));
            return;
        }
        let first = waiting.is_empty();
        waiting.push(reply);
        if first {
            self.events.push_back(ToSwarm::Dial { opts: DialOpts::peer_id(peer).build() });
        }
    }
}

impl NetworkBehaviour for Behaviour {
    type ConnectionHandler = Handler;
    type ToSwarm = Infallible;

    fn handle_pending_outbound_connection(
        &mut self,
        _: ConnectionId,
        peer: Option<PeerId>,
        _: &[Multiaddr],
        _: Endpoint,
    ) -> Result<Vec<Multiaddr>, ConnectionDenied> {
        Ok(peer.map(|p| self.addresses.get(&p).collect()).unwrap_or_default())
    }

    fn handle_established_inbound_connection(
        &mut self,
        _: ConnectionId,
        peer: PeerId,
        _: &Multiaddr,
        remote: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(self.handler(peer, remote))
    }

    fn handle_established_outbound_connection(
        &mut self,
        _: ConnectionId,
        peer: PeerId,
        remote: &Multiaddr,
        _: Endpoint,
        _: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(self.handler(peer, remote))
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        // A peer that turned a dial away at its cap keeps the addresses it was named with: it is
        // there, and has room again once it trims.
        if !matches!(&event, FromSwarm::DialFailure(e) if crate::connmgr::turned_away(e.error)) {
            self.addresses.on_swarm_event(&event);
        }
        // An address that answered with another peer's id (ours included) is not the peer's
        // (libp2p forgets only addresses whose dial failed in the transport).
        if let FromSwarm::DialFailure(libp2p::swarm::behaviour::DialFailure {
            peer_id: Some(peer),
            error: DialError::WrongPeerId { address, .. },
            ..
        }) = &event
        {
            self.addresses.remove(peer, address);
        }
        match event {
            FromSwarm::ConnectionEstablished(e) => {
                self.connections.entry(e.peer_id).or_default().insert(e.connection_id);
                for reply in self.waiting.remove(&e.peer_id).unwrap_or_default() {
                    self.open_on(e.peer_id, e.connection_id, reply);
                }
            }
            FromSwarm::ConnectionClosed(e) => {
                if let Some(set) = self.connections.get_mut(&e.peer_id) {
                    set.remove(&e.connection_id);
                    if set.is_empty() {
                        self.connections.remove(&e.peer_id);
                    }
                }
            }
            FromSwarm::DialFailure(e) => {
                // A dial that did not start because another one to the peer is under way is not
                // a failure: that dial's connection, or its failure, answers the waiting requests.
                if matches!(e.error, libp2p::swarm::DialError::DialPeerConditionFalse(_)) {
                    return;
                }
                let Some(peer) = e.peer_id else { return };
                if self.connections.contains_key(&peer) {
                    return;
                }
                for reply in self.waiting.remove(&peer).unwrap_or_default() {
                    let _ = reply.send(Err(OpenError::Unreachable(e.error.to_string())));
                }
            }
            _ => {}
        }
    }

    fn on_connection_handler_event(&mut self, _: PeerId, _: ConnectionId, event: THandlerOutEvent<Self>) {
        match event {}
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        while let Poll::Ready(Some((peer, reply))) = self.requests.poll_recv(cx) {
            self.open(peer, reply);
        }
        match self.events.pop_front() {
            Some(event) => Poll::Ready(event),
            None => Poll::Pending,
        }
    }
}

/// One connection's side of the behaviour.
pub(crate) struct Handler {
    peer: PeerId,
    /// The address the connection's other end is at (the one dialled, or the one it came from).
    remote: Multiaddr,
    protocol: StreamProtocol,
    inbound: mpsc::Sender<(PeerId, Multiaddr, Stream)>,
    dropped: Counter,
    /// Open requests not yet handed to the connection.
    to_open: VecDeque<Reply>,
}

impl ConnectionHandler for Handler {
    type FromBehaviour = Reply;
    type ToBehaviour = Infallible;
    type InboundProtocol = ReadyUpgrade<StreamProtocol>;
    type OutboundProtocol = ReadyUpgrade<StreamProtocol>;
    type InboundOpenInfo = ();
    type OutboundOpenInfo = Reply;

    fn listen_protocol(&self) -> SubstreamProtocol<Self::InboundProtocol, ()> {
        SubstreamProtocol::new(ReadyUpgrade::new(self.protocol.clone()), ())
    }

    fn poll(&mut self, _: &mut Context<'_>) -> Poll<ConnectionHandlerEvent<Self::OutboundProtocol, Reply, Infallible>> {
        while let Some(reply) = self.to_open.pop_front() {
            if reply.is_closed() {
                continue;
            }
            return Poll::Ready(ConnectionHandlerEvent::OutboundSubstreamRequest {
                protocol: SubstreamProtocol::new(ReadyUpgrade::new(self.protocol.clone()), reply),
            });
        }
        Poll::Pending
    }

    fn on_behaviour_event(&mut self, reply: Reply) {
        self.to_open.push_back(reply);
    }

    fn on_connection_event(
        &mut self,
        event: ConnectionEvent<Self::InboundProtocol, Self::OutboundProtocol, (), Reply>,
    ) {
        match event {
            ConnectionEvent::FullyNegotiatedInbound(FullyNegotiatedInbound { protocol: stream, .. }) => {
                // Full (or the node is stopping): the stream is dropped, which resets it.
                let queued = self.inbound.try_send((self.peer, self.remote.clone(), stream));
                self.dropped.inc_by(u64::from(queued.is_err()));
            }
            ConnectionEvent::FullyNegotiatedOutbound(FullyNegotiatedOutbound { protocol: stream, info: reply }) => {
                let _ = reply.send(Ok(stream));
            }
            ConnectionEvent::DialUpgradeError(DialUpgradeError { info: reply, error }) => {
                let error = match error {
                    StreamUpgradeError::NegotiationFailed => OpenError::Unsupported,
                    StreamUpgradeError::Timeout => OpenError::Unreachable("stream negotiation timed out".into()),
                    StreamUpgradeError::Io(e) => OpenError::Unreachable(e.to_string()),
                    StreamUpgradeError::Apply(never) => match never {},
                };
                let _ = reply.send(Err(error));
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
    use libp2p::core::transport::{MemoryTransport, Transport, upgrade::Version};
    use libp2p::swarm::SwarmEvent;
    use libp2p::{Swarm, SwarmBuilder, plaintext, yamux};

    use super::*;

    const PROTOCOL: StreamProtocol = StreamProtocol::new("/shoal/test/1");
    const LIMIT: Duration = Duration::from_secs(20);

    /// A node speaking `protocol` over libp2p's in-memory transport.
    fn node(protocol: StreamProtocol) -> (Swarm<Behaviour>, Control, Incoming, Counter) {
        let dropped = Counter::default();
        let (behaviour, control, incoming) = Behaviour::new(protocol, dropped.clone());
        let swarm = SwarmBuilder::with_new_identity()
            .with_tokio()
            .with_other_transport(|key| {
                MemoryTransport::default()
                    .upgrade(Version::V1)
                    .authenticate(plaintext::Config::new(key))
                    .multiplex(yamux::Config::default())
                    .boxed()
            })
            .expect("transport")
            .with_behaviour(|_| behaviour)
            .expect("behaviour")
            .build();
        (swarm, control, incoming, dropped)
    }

    /// A client of a listening `server`, both driven in the background.
    async fn connect(server: Swarm<Behaviour>, protocol: StreamProtocol) -> (PeerId, Control) {
        let server_id = *server.local_peer_id();
        let addr = listening(server).await;
        let (mut client, control, _, _) = node(protocol);
        client.dial(addr).expect("dial");
        tokio::time::timeout(LIMIT, async {
            while !matches!(client.select_next_some().await, SwarmEvent::ConnectionEstablished { .. }) {}
        })
        .await
        .expect("connected in time");
        tokio::spawn(async move { while client.next().await.is_some() {} });
        (server_id, control)
    }

    /// Starts a listening node and drives it in the background; returns its address.
    async fn listening(mut swarm: Swarm<Behaviour>) -> Multiaddr {
        swarm.listen_on("/memory/0".parse().expect("address")).expect("listen");
        let addr = loop {
            if let SwarmEvent::NewListenAddr { address, .. } = swarm.select_next_some().await {
                break address;
            }
        };
        tokio::spawn(async move { while swarm.next().await.is_some() {} });
        addr
    }

    #[tokio::test]
    async fn a_burst_of_streams_waits_for_the_accepting_task() {
        let (server, _, mut incoming, dropped) = node(PROTOCOL);
        let (server_id, control) = connect(server, PROTOCOL).await;

        // A hundred streams at once, each sending its number; nobody accepts until all are open.
        let opened = futures::future::join_all((0..100u8).map(|i| {
            let control = control.clone();
            async move {
                let mut stream = control.open(server_id).await.expect("stream opens");
                stream.write_all(&[i]).await.expect("write");
                stream.flush().await.expect("flush");
                stream
            }
        }));
        let streams = tokio::time::timeout(LIMIT, opened).await.expect("streams open in time");
        let mut seen = Vec::new();
        for _ in 0..streams.len() {
            let (peer, remote, mut stream) =
                tokio::time::timeout(LIMIT, incoming.recv()).await.expect("in time").expect("a stream");
            assert_ne!(peer, server_id);
            // Where the connection comes from: the client, over the in-memory transport.
            assert!(matches!(remote.iter().next(), Some(libp2p::multiaddr::Protocol::Memory(_))), "{remote}");
            let mut byte = [0u8];
            stream.read_exact(&mut byte).await.expect("its byte");
            seen.push(byte[0]);
        }
        seen.sort_unstable();
        assert_eq!(seen, (0..100).collect::<Vec<u8>>(), "every stream of the burst arrived");
        assert_eq!(dropped.get(), 0);
    }

    #[tokio::test]
    async fn a_peer_is_dialled_at_the_addresses_others_named() {
        let (server, _, mut incoming, _) = node(PROTOCOL);
        let server_id = *server.local_peer_id();
        let addr = listening(server).await;
        let (mut client, control, _, _) = node(PROTOCOL);
        // Not connected, and no other behaviour knows the server: only the named address.
        client.add_peer_address(server_id, addr.clone());
        tokio::spawn(async move { while client.next().await.is_some() {} });
        let mut stream = tokio::time::timeout(LIMIT, control.open(server_id))
            .await
            .expect("in time")
            .expect("dialled at the named address");
        stream.write_all(b"x").await.expect("write");
        stream.flush().await.expect("flush");
        let (_, remote, mut accepted) =
            tokio::time::timeout(LIMIT, incoming.recv()).await.expect("in time").expect("a stream");
        assert_ne!(remote, addr, "the client's address, not ours");
        let mut byte = [0u8];
        accepted.read_exact(&mut byte).await.expect("its byte");
        assert_eq!(&byte, b"x");
    }

    #[tokio::test]
    async fn a_forgotten_peer_is_not_dialled_at_the_addresses_it_was_given() {
        let (server, _, _, _) = node(PROTOCOL);
        let server_id = *server.local_peer_id();
        let addr = listening(server).await;
        let (mut client, control, _, _) = node(PROTOCOL);
        client.add_peer_address(server_id, addr);
        client.behaviour_mut().forget(&server_id);
        tokio::spawn(async move { while client.next().await.is_some() {} });
        let open = tokio::time::timeout(LIMIT, control.open(server_id)).await.expect("an answer in time");
        assert!(matches!(open, Err(OpenError::Unreachable(_))), "{open:?}");
    }

    #[tokio::test]
    async fn opening_to_an_unreachable_peer_fails() {
        let (mut swarm, control, _, _) = node(PROTOCOL);
        tokio::spawn(async move { while swarm.next().await.is_some() {} });
        let open = tokio::time::timeout(LIMIT, control.open(PeerId::random())).await.expect("an answer in time");
        assert!(matches!(open, Err(OpenError::Unreachable(_))), "{open:?}");
    }

    #[tokio::test]
    async fn a_peer_without_the_protocol_is_unsupported() {
        let (server, _, _incoming, _) = node(PROTOCOL);
        let (server_id, control) = connect(server, StreamProtocol::new("/shoal/other/1")).await;
        let open = tokio::time::timeout(LIMIT, control.open(server_id)).await.expect("an answer in time");
        assert!(matches!(open, Err(OpenError::Unsupported)), "{open:?}");
    }
}
