//! Which of a peer's addresses are worth dialling from here, and which of ours we announce.
//!
//! A node listening on `0.0.0.0` (the default) listens on every interface, loopback included.
//! Announced to everyone, its `127.0.0.1` address reaches peers on other machines, where it names
//! the dialler's own machine: seen between network namespaces, every dial of such a peer also
//! dialled the dialler's own node on the same port, and both ends counted a failed connection (a
//! wrong peer id at one, its own id at the other). So:
//! - we announce loopback addresses only while we have no other (nodes run on one machine);
//! - a loopback address a peer tells us is its own, or another's, is kept only if that peer is
//!   on our machine itself (connected to us over loopback), and only for a peer with no other
//!   address;
//! - the addresses a peer that dialled us announces are kept only if it dialled from one of
//!   them: a peer behind a NAT announces addresses nobody else can reach;
//! - the same holds for the addresses in a provider record a peer sends us (it is the
//!   provider: Kademlia takes no one's record for another), which we would otherwise hand to
//!   everyone who looks the blob up;
//! - we never dial an address we listen on ourselves ([`NotOurs`]): it can only reach us. Every
//!   node listens on UDP 4737 by default, so an address that several machines have, such as
//!   Docker's bridge address `172.17.0.1` present on every Docker host, announced by one node
//!   names every other node's own machine at the same port;
//! - an unspecified address (`0.0.0.0`, `::`) names no one, and an IPv6 link-local one
//!   (`fe80::/10`) no one elsewhere (a multiaddr leaves out its interface): neither is announced
//!   or kept.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet, VecDeque};
use std::net::IpAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use libp2p::core::transport::{DialOpts, ListenerId, Transport, TransportError, TransportEvent};
use libp2p::kad::store::{MemoryStore, RecordStore, Result as StoreResult};
use libp2p::kad::{ProviderRecord, Record, RecordKey};
use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};

/// The IP address `addr` starts with; an IPv4-mapped IPv6 one (`::ffff:a.b.c.d`) as the IPv4
/// address it is.
pub(crate) fn ip(addr: &Multiaddr) -> Option<IpAddr> {
    match addr.iter().next()? {
        Protocol::Ip4(ip) => Some(ip.into()),
        Protocol::Ip6(ip) => Some(IpAddr::V6(ip).to_canonical()),
        _ => None,
    }
}

/// The IPv4 address `addr` starts with (an IPv4-mapped IPv6 one as the IPv4 address it is).
pub(crate) fn ipv4(addr: &Multiaddr) -> Option<std::net::Ipv4Addr> {
    match ip(addr)? {
        IpAddr::V4(v4) => Some(v4),
        IpAddr::V6(_) => None,
    }
}

/// `addr` without a trailing `/p2p/<id>`, and an IPv4-mapped IPv6 address written as IPv4: one
/// form for each socket address.
pub(crate) fn bare(addr: &Multiaddr) -> Multiaddr {
    let mut parts: Vec<Protocol<'_>> = addr.iter().collect();
    if matches!(parts.last(), Some(Protocol::P2p(_))) {
        parts.pop();
    }
    if let Some(IpAddr::V4(v4)) = ip(addr) {
        parts[0] = Protocol::Ip4(v4);
    }
    parts.into_iter().collect()
}

/// Whether `addr` is an IP loopback address (`127.0.0.0/8` or `::1`).
pub(crate) fn is_loopback(addr: &Multiaddr) -> bool {
    ip(addr).is_some_and(|ip| ip.is_loopback())
}

/// Whether `addr` is an unspecified address (`0.0.0.0` or `::`): as a listen address, every
/// interface.
pub(crate) fn is_unspecified(addr: &Multiaddr) -> bool {
    ip(addr).is_some_and(|ip| ip.is_unspecified())
}

/// Whether a node listening on `listen` may sit on a LAN behind a router that forwards ports, or
/// opens its IPv6 firewall, on request (PCP, NAT-PMP, UPnP): it listens on an IPv4 address that
/// is private (`10/8`, `172.16/12`, `192.168/16`), on every interface (`0.0.0.0`, `::`), or on a
/// public IPv6 address. A node on loopback only, or on a public IPv4 address, has no router to
/// ask, and asks none: looking for one sends a multicast query to the LAN.
pub(crate) fn may_be_behind_router(listen: &[Multiaddr]) -> bool {
    listen.iter().any(|a| match ip(a) {
        Some(IpAddr::V4(v4)) => v4.is_unspecified() || v4.is_private(),
        Some(IpAddr::V6(v6)) => v6.is_unspecified() || is_public(v6.into()),
        None => false,
    })
}

/// Whether `addr` names no one anywhere: an unspecified address, or an IPv6 link-local one
/// (`fe80::/10`), which a multiaddr names without the interface it is on.
fn is_nowhere(addr: &Multiaddr) -> bool {
    is_unspecified(addr) || matches!(ip(addr), Some(IpAddr::V6(ip)) if ip.is_unicast_link_local())
}

/// The addresses in `addrs`, all of one peer, worth dialling from here, told by a peer connected
/// to us over loopback (`told_over_loopback`) or not. Loopback addresses are kept only when the
/// peer has no other: one that has another is reached there from this machine too, and a
/// routing table that kept both would hand the loopback one to peers elsewhere. Addresses that
/// are not IP addresses (`/dns`, `/memory`) are kept.
pub(crate) fn dialable(addrs: Vec<Multiaddr>, told_over_loopback: bool) -> Vec<Multiaddr> {
    let (loopback, other): (Vec<Multiaddr>, Vec<Multiaddr>) =
        addrs.into_iter().filter(|a| !is_nowhere(a)).partition(is_loopback);
    match (other.is_empty(), told_over_loopback) {
        (true, true) => loopback,
        _ => other,
    }
}

/// Whether a peer that dialled us from `from` is reachable at `addrs`, the addresses it
/// announced: one of those of the family it dialled from is on the IP it dialled from (libp2p's
/// QUIC dials from its listening socket, so the port matches too, but a NAT that keeps the
/// address may change the port). Believed too: a peer on this machine (`from` is loopback), one
/// that announced no IP address of that family (it dialled from a socket of its own, and its
/// other addresses cannot be checked here), and every peer of a transport without IP
/// addresses. A name (`/dns4/...`) vouches for nothing: a peer announcing one beside other
/// hosts' addresses would have them believed.
pub(crate) fn vouched_for(addrs: &[Multiaddr], from: &Multiaddr) -> bool {
    let Some(from) = ip(from) else { return true };
    if from.is_loopback() {
        return true;
    }
    let mut same_family = addrs.iter().filter_map(ip).filter(|a| a.is_ipv4() == from.is_ipv4()).peekable();
    same_family.peek().is_none() || same_family.any(|a| a == from)
}

/// Of `announced`, the addresses a peer told us over a connection from `from` (`dialled`: we
/// dialled it) that others may dial it at: [`dialable`] ones, and none at all if it dialled us
/// from an address that none of them vouches for (behind a NAT, or announcing what it does not
/// listen on). `None` in that case, so that the caller can say why.
///
/// A peer we reach at a public address is not on our LAN, nor on any other it could be
/// reached from over its private addresses: those it announced too (a node whose router
/// forwards a public address to it announces its LAN address beside it) are left out, since
/// on the dialler's own LAN they name another host. Nor are its addresses of that family on
/// other IPs kept (an IPv6 address's /64 counts as its IP): one IP vouches for itself, not for
/// other hosts a peer names beside it. Those of the other family cannot be checked from here, and
/// only the first public host named of it is kept. The addresses on the IP we reach it at come first: a
/// routing-table entry keeps only the first few.
///
/// Names are left out: they are kept only once checked ([`names`], [`name_is_theirs`]).
pub(crate) fn reachable(announced: Vec<Multiaddr>, from: &Multiaddr, dialled: bool) -> Option<Vec<Multiaddr>> {
    let mut addrs = dialable(announced, is_loopback(from));
    addrs.retain(|a| !is_name(a));
    if !(dialled || vouched_for(&addrs, from)) {
        return None;
    }
    if let Some(from_ip) = ip(from).filter(|a| is_public(*a)) {
        addrs.retain(|a| !ip(a).is_some_and(is_lan_scoped));
        // Of the family it is reached over, only addresses on that IP (an IPv6 one's /64): it
        // vouches for itself, not for other hosts' addresses announced beside it, which the
        // crowds that look its records up would dial. Those of the other family cannot be
        // checked from here: only the first public host named of it is kept (a dual-stack node has
        // one), so that a peer can point the crowds at no more than one host it does not own.
        let host = crate::connmgr::source(from_ip);
        // The first public one: a link-local or private address named first is no host the
        // crowds could reach, and would crowd out the one they can.
        let other = addrs
            .iter()
            .filter_map(ip)
            .find(|a| a.is_ipv4() != from_ip.is_ipv4() && is_public(*a))
            .map(crate::connmgr::source);
        addrs.retain(|a| {
            ip(a).is_none_or(|a| {
                let source = crate::connmgr::source(a);
                if a.is_ipv4() == from_ip.is_ipv4() { source == host } else { Some(source) == other }
            })
        });
    }
    addrs.sort_by_key(|a| ip(a) != ip(from));
    Some(addrs)
}

/// Whether `addr` starts with a name (`/dns`, `/dns4`, `/dns6`, `/dnsaddr`), which the
/// transport resolves as it dials.
pub(crate) fn is_name(addr: &Multiaddr) -> bool {
    matches!(addr.iter().next(), Some(Protocol::Dns(_) | Protocol::Dns4(_) | Protocol::Dns6(_) | Protocol::Dnsaddr(_)))
}

/// The names among the addresses a peer announced that can be checked against where it is
/// connected from ([`name_is_theirs`]), at most `max`. A name costs the peer nothing to announce
/// and may be anyone's: kept unchecked, a peer could have the crowds that look its blobs up
/// dial another host by name. A `/dnsaddr` (TXT records naming further addresses) is not
/// checked, and not kept.
pub(crate) fn names(announced: &[Multiaddr], max: usize) -> Vec<Multiaddr> {
    announced.iter().filter(|a| host_of(a).is_some()).take(max).cloned().collect()
}

/// The host a checkable name (`/dns`, `/dns4`, `/dns6`) starts with, and the family it names
/// (`Some(true)` for IPv4 alone, `Some(false)` for IPv6 alone).
fn host_of(addr: &Multiaddr) -> Option<(Cow<'_, str>, Option<bool>)> {
    match addr.iter().next()? {
        Protocol::Dns(host) => Some((host, None)),
        Protocol::Dns4(host) => Some((host, Some(true))),
        Protocol::Dns6(host) => Some((host, Some(false))),
        _ => None,
    }
}

/// The IP addresses the name `addr` starts with resolves to with the system's resolver, in the
/// family it names; none if it does not resolve, or is no name. Blocking.
pub(crate) fn resolve(addr: &Multiaddr) -> Vec<IpAddr> {
    use std::net::ToSocketAddrs;
    let Some((host, family)) = host_of(addr) else { return Vec::new() };
    let Ok(found) = (host.as_ref(), 0).to_socket_addrs() else { return Vec::new() };
    let mut ips: Vec<IpAddr> =
        found.map(|s| s.ip().to_canonical()).filter(|a| family.is_none_or(|v4| a.is_ipv4() == v4)).collect();
    ips.sort_unstable();
    ips.dedup();
    ips
}

/// Whether a name a peer announced that resolved to `resolved` is that peer's, connected to us
/// from `ips`: every address it resolves to is one of those (a name that also named other hosts
/// would have them dialled too, in turn), and none is loopback (such a name names every
/// machine's own, as `127.0.0.1` does). The check holds for the moment it was made: a name's
/// owner may point it elsewhere later, as it may stop listening on an address.
pub(crate) fn name_is_theirs(resolved: &[IpAddr], ips: &[IpAddr]) -> bool {
    let ips: Vec<IpAddr> = ips.iter().map(IpAddr::to_canonical).collect();
    !resolved.is_empty() && resolved.iter().all(|a| !a.is_loopback() && ips.contains(&a.to_canonical()))
}

/// Whether `addr` is on an IP address anyone may reach (see [`is_public`]).
pub(crate) fn is_public_addr(addr: &Multiaddr) -> bool {
    ip(addr).is_some_and(is_public)
}

/// Whether `ip` is reached only within a site: a private, shared (carrier-grade NAT) or
/// IPv6 unique-local address.
fn is_lan_scoped(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_private() || (v4.octets()[0] == 100 && (64..128).contains(&v4.octets()[1])),
        IpAddr::V6(v6) => (v6.segments()[0] & 0xfe00) == 0xfc00,
    }
}

/// Whether `ip` is an address anyone may reach: neither site-scoped, loopback, link-local nor
/// unspecified.
pub(crate) fn is_public(ip: IpAddr) -> bool {
    let local = match ip {
        IpAddr::V4(v4) => v4.is_loopback() || v4.is_link_local() || v4.is_unspecified(),
        IpAddr::V6(v6) => v6.is_loopback() || v6.is_unicast_link_local() || v6.is_unspecified(),
    };
    !local && !is_lan_scoped(ip)
}

/// Of our listen addresses, those we announce: every one but the loopback ones, or only the
/// loopback ones if there is no other. IPv6 link-local ones never.
pub(crate) fn announced(listen: &[Multiaddr]) -> Vec<Multiaddr> {
    dialable(listen.to_vec(), true)
}

/// A transport that refuses to dial the addresses it listens on: such a dial reaches this node
/// itself, whichever peer it was meant for, and both ends would count a failed connection. It
/// learns them as its listeners report them (every interface's address, for a listener on
/// `0.0.0.0`), so it covers the dials of every behaviour, Kademlia's lookups among them, which
/// dial the addresses other peers answered with. A refused address fails that one attempt at
/// once (as an address the transport does not support); the peer's other addresses are dialled
/// as usual.
pub(crate) struct NotOurs<T> {
    inner: T,
    /// Our listen addresses ([`bare`]), with the listener of each.
    ours: HashMap<Multiaddr, ListenerId>,
}

impl<T> NotOurs<T> {
    pub(crate) fn new(inner: T) -> Self {
        Self { inner, ours: HashMap::new() }
    }
}

impl<T: Transport + Unpin> Transport for NotOurs<T> {
    type Output = T::Output;
    type Error = T::Error;
    type ListenerUpgrade = T::ListenerUpgrade;
    type Dial = T::Dial;

    fn listen_on(&mut self, id: ListenerId, addr: Multiaddr) -> Result<(), TransportError<Self::Error>> {
        self.inner.listen_on(id, addr)
    }

    fn remove_listener(&mut self, id: ListenerId) -> bool {
        self.inner.remove_listener(id)
    }

    fn dial(&mut self, addr: Multiaddr, opts: DialOpts) -> Result<Self::Dial, TransportError<Self::Error>> {
        if self.ours.contains_key(&bare(&addr)) {
            return Err(TransportError::MultiaddrNotSupported(addr));
        }
        self.inner.dial(addr, opts)
    }

    fn poll(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<TransportEvent<Self::ListenerUpgrade, Self::Error>> {
        let event = Pin::new(&mut self.inner).poll(cx);
        match &event {
            Poll::Ready(TransportEvent::NewAddress { listener_id, listen_addr }) => {
                self.ours.insert(bare(listen_addr), *listener_id);
            }
            Poll::Ready(TransportEvent::AddressExpired { listen_addr, .. }) => {
                self.ours.remove(&bare(listen_addr));
            }
            // A listener that closed reports no expiry of its addresses.
            Poll::Ready(TransportEvent::ListenerClosed { listener_id, .. }) => {
                self.ours.retain(|_, l| l != listener_id);
            }
            _ => {}
        }
        event
    }
}

/// Kademlia's record store, answering with the addresses we announce for our own provider
/// records. Kademlia keeps those without addresses and, asked for them, fills in every listen
/// address it saw, loopback included; a record that carries addresses is sent as it is.
pub(crate) struct Records {
    inner: MemoryStore,
    local: PeerId,
    announced: Vec<Multiaddr>,
    /// The keys with a provider other than us, at most `bounds.remote_keys`: peers' records fill
    /// only part of the store, and never the room our own announcements need.
    remote: HashSet<RecordKey>,
    /// Peers' records held, per provider (at most `bounds.per_provider` each, and
    /// `bounds.remote_records` in all): one peer cannot take the share of every other, nor the
    /// keys' bound alone hold the records at gigabytes (64 providers for each of 100,000 keys).
    per_provider: HashMap<PeerId, usize>,
    /// The keys of each provider's records, oldest first: a provider past its share gives up its
    /// oldest record for a new one, so that a publisher's newest blobs stay findable. May name
    /// records gone since; compacted as it grows past twice the provider's count.
    order: HashMap<PeerId, VecDeque<RecordKey>>,
    remote_records: usize,
    bounds: RecordBounds,
}

/// Whether `provider` has a record for `key` in `store`.
fn holds(store: &MemoryStore, key: &RecordKey, provider: &PeerId) -> bool {
    store.providers(key).iter().any(|r| r.provider == *provider)
}

/// What [`Records`] holds of peers' provider records at most.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RecordBounds {
    /// Keys with a provider other than us.
    pub(crate) remote_keys: usize,
    /// Records of any one peer.
    pub(crate) per_provider: usize,
    /// Peers' records in all.
    pub(crate) remote_records: usize,
    /// Providers per key: the `inner` store's own bound.
    pub(crate) providers_per_key: usize,
}

impl Records {
    /// Over `inner`, a store within `bounds`.
    pub(crate) fn new(local: PeerId, inner: MemoryStore, bounds: RecordBounds) -> Self {
        Self {
            inner,
            local,
            announced: Vec::new(),
            remote: HashSet::new(),
            per_provider: HashMap::new(),
            order: HashMap::new(),
            remote_records: 0,
            bounds,
        }
    }

    /// Whether `provider` has a record for `key` here.
    fn holds(&self, key: &RecordKey, provider: &PeerId) -> bool {
        holds(&self.inner, key, provider)
    }

    /// Counts down a peer's record that went.
    fn forget(&mut self, provider: &PeerId) {
        crate::count_down(&mut self.per_provider, provider);
        self.remote_records = self.remote_records.saturating_sub(1);
        if !self.per_provider.contains_key(provider) {
            self.order.remove(provider);
        }
    }

    /// Removes `provider`'s oldest record still held; whether there was one.
    fn drop_oldest(&mut self, provider: &PeerId) -> bool {
        while let Some(key) = self.order.get_mut(provider).and_then(VecDeque::pop_front) {
            if self.holds(&key, provider) {
                self.remove_provider(&key, provider);
                return true;
            }
        }
        false
    }

    /// Notes whether `key` still has a provider other than us.
    fn recount(&mut self, key: &RecordKey) {
        if self.inner.providers(key).iter().any(|p| p.provider != self.local) {
            self.remote.insert(key.clone());
        } else {
            self.remote.remove(key);
        }
    }

    /// Removes the peers' records that expired. Kademlia drops one only when its key is looked
    /// up again, so a record for a key nobody asks about would stay for good.
    pub(crate) fn remove_expired(&mut self, now: std::time::Instant) {
        let keys: Vec<RecordKey> = self.remote.iter().cloned().collect();
        for key in keys {
            for record in self.inner.providers(&key) {
                if record.provider != self.local && record.expires.is_some_and(|t| t <= now) {
                    // A peer's record, held: counted, so counted down here.
                    self.inner.remove_provider(&key, &record.provider);
                    self.forget(&record.provider);
                }
            }
            self.recount(&key);
        }
    }

    /// The addresses our own provider records carry from now on; none leaves it to Kademlia.
    pub(crate) fn set_announced(&mut self, addrs: Vec<Multiaddr>) {
        self.announced = addrs;
    }
}

impl RecordStore for Records {
    type RecordsIter<'a> = <MemoryStore as RecordStore>::RecordsIter<'a>;
    type ProvidedIter<'a> = <MemoryStore as RecordStore>::ProvidedIter<'a>;

    fn get(&self, k: &RecordKey) -> Option<Cow<'_, Record>> {
        self.inner.get(k)
    }

    fn put(&mut self, r: Record) -> StoreResult<()> {
        self.inner.put(r)
    }

    fn remove(&mut self, k: &RecordKey) {
        self.inner.remove(k)
    }

    fn records(&self) -> Self::RecordsIter<'_> {
        self.inner.records()
    }

    fn add_provider(&mut self, record: ProviderRecord) -> StoreResult<()> {
        let remote = record.provider != self.local;
        if remote && !self.remote.contains(&record.key) && self.remote.len() >= self.bounds.remote_keys {
            return Err(libp2p::kad::store::Error::MaxProvidedKeys);
        }
        let key = record.key.clone();
        let provider = record.provider;
        // A peer's record renewed takes no more room; a new one must fit its share and the whole.
        let new = remote && !self.holds(&key, &provider);
        // Past its share, a provider's oldest record makes room for its newest.
        if new
            && self.per_provider.get(&provider).is_some_and(|n| *n >= self.bounds.per_provider)
            && !self.drop_oldest(&provider)
        {
            return Err(libp2p::kad::store::Error::MaxRecords);
        }
        if new && self.remote_records >= self.bounds.remote_records {
            return Err(libp2p::kad::store::Error::MaxRecords);
        }
        if !remote {
            // A key's list full of peers' records would take ours without a word and keep it
            // out: the peers that asked us for providers would never be told of our copy.
            let held = self.inner.providers(&key);
            if held.len() >= self.bounds.providers_per_key
                && !held.iter().any(|r| r.provider == self.local)
                && let Some(last) = held.last().map(|r| r.provider)
            {
                self.remove_provider(&key, &last);
            }
        }
        self.inner.add_provider(record)?;
        // A key's full list takes no new provider, without a word.
        if new && self.holds(&key, &provider) {
            let n = self.per_provider.entry(provider).or_insert(0);
            *n += 1;
            let n = *n;
            self.remote_records += 1;
            let order = self.order.entry(provider).or_default();
            order.push_back(key.clone());
            if order.len() > 2 * n {
                order.retain(|k| holds(&self.inner, k, &provider));
            }
        }
        // Ours leaves a key as it was; a peer's, stored, makes it one of the peers' keys.
        if remote {
            self.recount(&key);
        }
        Ok(())
    }

    fn providers(&self, key: &RecordKey) -> Vec<ProviderRecord> {
        let mut records = self.inner.providers(key);
        for r in records.iter_mut().filter(|r| r.provider == self.local && r.addresses.is_empty()) {
            r.addresses = self.announced.clone();
        }
        records
    }

    fn provided(&self) -> Self::ProvidedIter<'_> {
        self.inner.provided()
    }

    fn remove_provider(&mut self, k: &RecordKey, p: &PeerId) {
        let counted = *p != self.local && self.holds(k, p);
        self.inner.remove_provider(k, p);
        if counted {
            self.forget(p);
        }
        self.recount(k);
    }
}

#[cfg(test)]
mod tests {
    use libp2p::kad::store::MemoryStoreConfig;

    use super::*;

    fn a(s: &str) -> Multiaddr {
        s.parse().expect("multiaddr")
    }

    fn bounds(remote_keys: usize, per_provider: usize, remote_records: usize) -> RecordBounds {
        let providers_per_key = MemoryStoreConfig::default().max_providers_per_key;
        RecordBounds { remote_keys, per_provider, remote_records, providers_per_key }
    }

    #[test]
    fn one_peer_takes_only_its_share_of_the_peers_records_and_all_of_them_a_bound() {
        let us = PeerId::random();
        let mut records = Records::new(us, MemoryStore::new(us), bounds(10, 3, 5));
        let record = |key: u8, provider: PeerId| ProviderRecord::new(RecordKey::new(&[key; 32]), provider, Vec::new());
        let (x, honest) = (PeerId::random(), PeerId::random());
        for k in 0..3 {
            records.add_provider(record(k, x)).expect("within its share");
        }
        records.add_provider(record(1, x)).expect("a record renewed takes no more room");
        // Past its share, its oldest record gives way to its newest: its newest blob stays findable.
        records.add_provider(record(3, x)).expect("its newest");
        assert!(records.providers(&RecordKey::new(&[0; 32])).is_empty(), "its oldest went");
        assert_eq!(records.per_provider[&x], 3);
        records.add_provider(record(9, honest)).expect("another peer's record still fits");
        records.add_provider(record(8, PeerId::random())).expect("five in all");
        assert!(records.add_provider(record(7, PeerId::random())).is_err(), "past the records' bound");
        // Ours always fit; a record gone makes room again.
        records.add_provider(record(7, us)).expect("ours");
        records.remove_provider(&RecordKey::new(&[9; 32]), &honest);
        records.add_provider(record(6, PeerId::random())).expect("room again in the whole");
        assert_eq!(records.remote_records, 5);
    }

    #[test]
    fn peers_records_take_only_their_share_of_the_store_and_go_once_expired() {
        let (us, them) = (PeerId::random(), PeerId::random());
        let mut records = Records::new(us, MemoryStore::new(us), bounds(2, 2, 100));
        let record = |key: u8, provider: PeerId, expires: Option<std::time::Instant>| ProviderRecord {
            key: RecordKey::new(&[key; 32]),
            provider,
            expires,
            addresses: Vec::new(),
        };
        let now = std::time::Instant::now();
        let later = now + std::time::Duration::from_secs(3600);
        assert!(records.add_provider(record(1, them, Some(now))).is_ok());
        assert!(records.add_provider(record(2, them, Some(later))).is_ok());
        assert!(records.add_provider(record(3, them, Some(later))).is_err(), "past the peers' share");
        // Another provider of a key already held takes no more room; our own always fit.
        assert!(records.add_provider(record(2, PeerId::random(), Some(later))).is_ok());
        assert!(records.add_provider(record(3, us, None)).is_ok());
        assert!(records.add_provider(record(4, us, None)).is_ok());
        // The expired one goes, and makes room.
        records.remove_expired(now);
        assert!(records.providers(&RecordKey::new(&[1; 32])).is_empty());
        assert_eq!(records.providers(&RecordKey::new(&[2; 32])).len(), 2);
        assert!(records.add_provider(record(5, them, Some(later))).is_ok());
        // A key whose only peer provider left frees its room too; ours stays.
        records.add_provider(record(3, them, Some(later))).expect_err("full again");
        records.remove_provider(&RecordKey::new(&[5; 32]), &them);
        assert!(records.add_provider(record(3, them, Some(later))).is_ok());
        assert_eq!(records.providers(&RecordKey::new(&[3; 32])).len(), 2);

        // A key whose providers' list peers filled still takes our record: one of theirs gives
        // way (the store keeps the list's first and drops newcomers silently).
        let full = MemoryStoreConfig::default().max_providers_per_key;
        for _ in 0..full {
            records.add_provider(record(2, PeerId::random(), Some(later))).expect("a known key");
        }
        assert_eq!(records.providers(&RecordKey::new(&[2; 32])).len(), full);
        records.add_provider(record(2, us, None)).expect("ours");
        let listed = records.providers(&RecordKey::new(&[2; 32]));
        assert_eq!(listed.len(), full);
        assert!(listed.iter().any(|r| r.provider == us), "ours is listed");
        assert!(records.provided().any(|r| r.key == RecordKey::new(&[2; 32])));
    }

    #[test]
    fn loopback_addresses_are_announced_only_when_there_is_no_other() {
        let lo = a("/ip4/127.0.0.1/udp/4737/quic-v1");
        let lan = a("/ip4/10.77.0.1/udp/4737/quic-v1");
        let lo6 = a("/ip6/::1/udp/4737/quic-v1");
        assert_eq!(announced(&[lo.clone(), lan.clone(), lo6.clone()]), vec![lan.clone()]);
        assert_eq!(announced(&[lo.clone(), lo6.clone()]), vec![lo.clone(), lo6]);
        assert_eq!(announced(&[]), Vec::<Multiaddr>::new());
        let mem = a("/memory/7");
        assert_eq!(announced(std::slice::from_ref(&mem)), vec![mem]);
        let link = a("/ip6/fe80::d8a5:9ff:fe8f:b5a3/udp/4737/quic-v1");
        let ula = a("/ip6/fd77::1/udp/4737/quic-v1");
        assert_eq!(announced(&[lo.clone(), link.clone(), ula.clone()]), vec![ula]);
        assert_eq!(announced(&[lo.clone(), link]), vec![lo]);
    }

    #[test]
    fn only_a_node_on_a_private_or_every_ipv4_interface_asks_a_router_for_a_port() {
        let every = a("/ip4/0.0.0.0/udp/4737/quic-v1");
        let every6 = a("/ip6/::/udp/4737/quic-v1");
        assert!(may_be_behind_router(&[every, every6.clone()]));
        assert!(may_be_behind_router(&[a("/ip4/192.168.1.20/udp/4737/quic-v1")]));
        assert!(may_be_behind_router(&[a("/ip4/172.20.0.5/udp/4737/quic-v1")]));
        assert!(!may_be_behind_router(&[a("/ip4/127.0.0.1/udp/0/quic-v1")]), "loopback: tests, one machine");
        assert!(!may_be_behind_router(&[a("/ip4/198.51.100.20/udp/4737/quic-v1")]), "a public address");
        assert!(may_be_behind_router(&[every6]), "a pinhole in the router's IPv6 firewall");
        assert!(may_be_behind_router(&[a("/ip6/2001:db8:1::20/udp/4737/quic-v1")]));
        assert!(!may_be_behind_router(&[a("/ip6/::1/udp/0/quic-v1")]), "loopback");
        assert!(!may_be_behind_router(&[a("/ip6/fd00::2/udp/4737/quic-v1")]), "unique-local: no one outside");
        assert!(!may_be_behind_router(&[a("/memory/7")]));
    }

    #[test]
    fn a_peer_elsewhere_cannot_hand_us_a_loopback_address() {
        let told = vec![
            a("/ip4/127.0.0.1/udp/4737/quic-v1"),
            a("/ip4/127.8.9.1/udp/4737/quic-v1"),
            a("/ip6/::1/udp/4737/quic-v1"),
            a("/ip4/0.0.0.0/udp/4737/quic-v1"),
            a("/ip6/::/udp/4737/quic-v1"),
            a("/ip6/fe80::1/udp/4737/quic-v1"),
            a("/ip4/192.0.2.1/udp/4737/quic-v1"),
            a("/dns4/example.org/udp/4737/quic-v1"),
            a("/memory/7"),
        ];
        let elsewhere = told[6..].to_vec();
        assert_eq!(dialable(told.clone(), false), elsewhere);
        assert_eq!(dialable(told.clone(), true), elsewhere, "its other addresses reach it from here too");
        assert_eq!(dialable(told[..6].to_vec(), true), told[..3].to_vec(), "a peer on loopback only");
        assert_eq!(dialable(told[..6].to_vec(), false), Vec::<Multiaddr>::new());
    }

    #[test]
    fn a_peer_that_dialled_us_is_believed_only_from_an_address_it_announced() {
        let announced = vec![a("/ip4/192.168.50.2/udp/4737/quic-v1"), a("/ip6/2001:db8::2/udp/4737/quic-v1")];
        assert!(vouched_for(&announced, &a("/ip4/192.168.50.2/udp/4737/quic-v1")));
        assert!(vouched_for(&announced, &a("/ip4/192.168.50.2/udp/50123/quic-v1")), "a NAT that kept the address");
        assert!(vouched_for(&announced, &a("/ip6/2001:db8::2/udp/4737/quic-v1")));
        assert!(!vouched_for(&announced, &a("/ip4/203.0.113.50/udp/4737/quic-v1")), "behind a NAT");
        assert!(!vouched_for(&announced, &a("/ip6/2001:db8::99/udp/4737/quic-v1")), "another IPv6 address");
        assert!(vouched_for(&announced, &a("/ip4/127.0.0.1/udp/4737/quic-v1")), "on this machine");
        assert!(vouched_for(&[], &a("/memory/5")));
        let v4 = vec![a("/ip4/192.168.50.2/udp/4737/quic-v1")];
        assert!(vouched_for(&v4, &a("/ip6/2001:db8::7/udp/50123/quic-v1")), "no IPv6 address to check");
        assert!(vouched_for(&[], &a("/ip4/203.0.113.50/udp/4737/quic-v1")), "nothing to check");
        let named = vec![a("/dns4/node.example.org/udp/4737/quic-v1")];
        assert!(vouched_for(&named, &a("/ip4/203.0.113.50/udp/4737/quic-v1")), "a name, nothing to check");
        // A name beside other hosts' addresses vouches for none of them, and is not kept
        // unchecked.
        let mut with_victims = named.clone();
        with_victims.extend([a("/ip4/198.51.100.7/udp/4737/quic-v1"), a("/ip4/198.51.100.8/udp/4737/quic-v1")]);
        let from = a("/ip4/203.0.113.50/udp/4737/quic-v1");
        assert!(!vouched_for(&with_victims, &from));
        assert_eq!(reachable(with_victims.clone(), &from, false), None);
        assert_eq!(reachable(named.clone(), &from, false), Some(Vec::new()), "believed, its name to be checked");
        assert_eq!(names(&with_victims, 8), named);
    }

    #[test]
    fn a_name_is_the_peers_only_if_it_resolves_to_where_the_peer_is_connected_from_alone() {
        let ip = |s: &str| -> IpAddr { s.parse().expect("an address") };
        let lo = ip("127.0.0.1");
        assert!(resolve(&a("/dns4/localhost/udp/4737/quic-v1")).contains(&lo), "localhost is in every hosts file");
        assert!(resolve(&a("/dns6/localhost/udp/4737/quic-v1")).iter().all(IpAddr::is_ipv6), "the family named");
        assert!(resolve(&a("/dnsaddr/localhost")).is_empty(), "not resolved here");
        assert!(resolve(&a("/ip4/127.0.0.1/udp/1/quic-v1")).is_empty(), "no name");
        let (peer, victim) = (ip("203.0.113.50"), ip("198.51.100.7"));
        assert!(name_is_theirs(&[peer], &[peer]));
        assert!(name_is_theirs(&[peer], &[victim, peer]), "one connection of several");
        assert!(name_is_theirs(&[peer], &[ip("::ffff:203.0.113.50")]), "a dual-stack socket's view of it");
        assert!(!name_is_theirs(&[victim], &[peer]));
        assert!(!name_is_theirs(&[victim, peer], &[peer]), "a name that also names another host");
        assert!(!name_is_theirs(&[], &[peer]), "a name that does not resolve");
        assert!(!name_is_theirs(&[lo], &[lo]), "a name of every machine's own");
        assert!(names(&[a("/dnsaddr/localhost"), a("/ip4/127.0.0.1/udp/1/quic-v1")], 8).is_empty());
    }

    #[test]
    fn a_peer_is_reachable_at_the_dialable_addresses_it_announced_if_believed() {
        let lan = a("/ip4/10.77.0.4/udp/4737/quic-v1");
        let told = vec![a("/ip4/127.0.0.1/udp/4737/quic-v1"), lan.clone(), a("/ip6/fe80::4/udp/4737/quic-v1")];
        let from_lan = a("/ip4/10.77.0.4/udp/4737/quic-v1");
        assert_eq!(reachable(told.clone(), &from_lan, false), Some(vec![lan.clone()]));
        let from_nat = a("/ip4/203.0.113.50/udp/61000/quic-v1");
        assert_eq!(reachable(told.clone(), &from_nat, false), None, "it dialled from another address");
        let from_lan_nat = a("/ip4/10.77.0.254/udp/61000/quic-v1");
        assert_eq!(reachable(told.clone(), &from_lan_nat, true), Some(vec![lan]), "we dialled it there");
        assert_eq!(reachable(told.clone(), &from_nat, true), Some(Vec::new()), "its LAN is not ours");
        let lo = a("/ip4/127.0.0.1/udp/4737/quic-v1");
        let on_loopback = vec![lo.clone()];
        assert_eq!(reachable(on_loopback.clone(), &from_lan, true), Some(Vec::new()), "its loopback is not ours");
        assert_eq!(reachable(on_loopback, &lo, false), Some(vec![lo]));
    }

    #[test]
    fn a_peer_reached_at_a_public_address_is_not_named_at_its_private_ones() {
        // A node whose router forwards a public address to it announces its LAN addresses too.
        let home = a("/ip4/192.168.1.20/udp/4737/quic-v1");
        let forwarded = a("/ip4/198.51.100.7/udp/4737/quic-v1");
        let v6 = a("/ip6/2001:db8::20/udp/4737/quic-v1");
        let ula = a("/ip6/fd00::20/udp/4737/quic-v1");
        let told = vec![home.clone(), v6.clone(), ula.clone(), forwarded.clone()];
        let from_router = a("/ip4/198.51.100.7/udp/4737/quic-v1");
        let expected = Some(vec![forwarded.clone(), v6.clone()]);
        assert_eq!(reachable(told.clone(), &from_router, false), expected, "the vouching address first");
        // On its LAN it is reached at its LAN address, and every address is kept.
        assert_eq!(reachable(told.clone(), &home, false), Some(vec![home.clone(), v6.clone(), ula, forwarded.clone()]));
        // Reached at a public address, it vouches for no other host of that family.
        let victim = a("/ip4/203.0.113.50/udp/53/quic-v1");
        let v6_same_64 = a("/ip6/2001:db8:1:2::99/udp/4737/quic-v1");
        let told = vec![forwarded.clone(), victim.clone(), v6_same_64.clone()];
        assert_eq!(reachable(told.clone(), &from_router, false), Some(vec![forwarded.clone(), v6_same_64.clone()]));
        let from_v6 = a("/ip6/2001:db8:1:2::1/udp/4737/quic-v1");
        let other_64 = a("/ip6/2001:db8:9:9::1/udp/4737/quic-v1");
        let told = vec![v6_same_64.clone(), other_64, forwarded.clone()];
        assert_eq!(
            reachable(told, &from_v6, true),
            Some(vec![v6_same_64.clone(), forwarded.clone()]),
            "its /64, and IPv4 unchecked"
        );
        // Of the family it cannot be checked in, one host: the first public one it names.
        let link_local = a("/ip4/169.254.3.4/udp/4737/quic-v1");
        let told = vec![v6_same_64.clone(), link_local, forwarded.clone()];
        assert_eq!(reachable(told, &from_v6, true), Some(vec![v6_same_64.clone(), forwarded.clone()]));
        let forwarded_other_port = a("/ip4/198.51.100.7/udp/4738/quic-v1");
        let told = vec![v6_same_64.clone(), forwarded.clone(), victim.clone(), forwarded_other_port.clone()];
        assert_eq!(
            reachable(told, &from_v6, true),
            Some(vec![v6_same_64.clone(), forwarded.clone(), forwarded_other_port])
        );
        let told = vec![forwarded.clone(), v6.clone(), v6_same_64.clone(), a("/ip6/2001:db8::21/udp/4737/quic-v1")];
        assert_eq!(
            reachable(told, &from_router, true),
            Some(vec![forwarded.clone(), v6.clone(), a("/ip6/2001:db8::21/udp/4737/quic-v1")]),
            "an IPv6 host is its /64"
        );
        let shared = a("/ip4/100.64.3.2/udp/4737/quic-v1");
        assert_eq!(reachable(vec![shared, home], &from_router, true), Some(Vec::new()), "CGNAT and LAN alike");
    }

    #[test]
    fn an_ipv4_mapped_address_is_its_ipv4_one() {
        let mapped =
            a("/ip6/::ffff:172.17.0.1/udp/4737/quic-v1/p2p/12D3KooWRzCVDwHUkgdK7eRgnoXbjDAELhxPErjHzbRLguSV1aRt");
        assert_eq!(bare(&mapped), a("/ip4/172.17.0.1/udp/4737/quic-v1"));
        assert!(is_loopback(&a("/ip6/::ffff:127.0.0.1/udp/4737/quic-v1")));
        assert_eq!(bare(&a("/ip6/fd77::1/udp/4737/quic-v1")), a("/ip6/fd77::1/udp/4737/quic-v1"));
    }

    #[tokio::test]
    async fn an_address_we_listen_on_is_not_dialled() {
        use futures::StreamExt;
        use libp2p::core::transport::{MemoryTransport, PortUse};
        use libp2p::core::{Endpoint, transport::ListenerId};

        let mut ours = NotOurs::new(MemoryTransport::default());
        let listener = ListenerId::next();
        ours.listen_on(listener, a("/memory/0")).expect("listen");
        let mut events = futures::stream::poll_fn(|cx| Pin::new(&mut ours).poll(cx).map(Some));
        let Some(TransportEvent::NewAddress { listen_addr, .. }) = events.next().await else { panic!("no address") };
        drop(events);
        let mut theirs = MemoryTransport::default();
        theirs.listen_on(ListenerId::next(), a("/memory/0")).expect("listen");
        let their_addr = match futures::stream::poll_fn(|cx| Pin::new(&mut theirs).poll(cx).map(Some)).next().await {
            Some(TransportEvent::NewAddress { listen_addr, .. }) => listen_addr,
            _ => panic!("no address"),
        };
        let opts = DialOpts { role: Endpoint::Dialer, port_use: PortUse::New };
        let with_id = listen_addr.clone().with(Protocol::P2p(PeerId::random()));
        for addr in [listen_addr.clone(), with_id] {
            assert!(matches!(ours.dial(addr, opts), Err(TransportError::MultiaddrNotSupported(_))));
        }
        assert!(ours.dial(their_addr, opts).is_ok(), "another address is dialled");
        // Once its listener closed, the address is no longer ours.
        assert!(ours.remove_listener(listener));
        let closed = futures::stream::poll_fn(|cx| Pin::new(&mut ours).poll(cx).map(Some)).next().await;
        assert!(matches!(closed, Some(TransportEvent::ListenerClosed { .. })));
        assert!(!matches!(ours.dial(listen_addr, opts), Err(TransportError::MultiaddrNotSupported(_))));
    }

    #[test]
    fn our_own_provider_records_carry_the_announced_addresses() {
        let me = PeerId::random();
        let other = PeerId::random();
        let mut store = Records::new(me, MemoryStore::new(me), bounds(16, 16, 1000));
        let key = RecordKey::new(&b"blob");
        store.add_provider(ProviderRecord::new(key.clone(), me, Vec::new())).unwrap();
        let theirs = vec![a("/ip4/192.0.2.9/udp/4737/quic-v1")];
        store.add_provider(ProviderRecord::new(key.clone(), other, theirs.clone())).unwrap();
        let addrs = |s: &Records| -> Vec<(PeerId, Vec<Multiaddr>)> {
            let mut v: Vec<_> = s.providers(&key).into_iter().map(|r| (r.provider, r.addresses)).collect();
            v.sort();
            v
        };
        let mut expect = vec![(me, Vec::new()), (other, theirs.clone())];
        expect.sort();
        assert_eq!(addrs(&store), expect, "nothing announced yet: Kademlia fills ours in");
        let lan = vec![a("/ip4/10.77.0.1/udp/4737/quic-v1")];
        store.set_announced(lan.clone());
        let mut expect = vec![(me, lan), (other, theirs)];
        expect.sort();
        assert_eq!(addrs(&store), expect);
        assert_eq!(store.provided().count(), 1);
    }
}
