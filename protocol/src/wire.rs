//! The transfer protocol's messages (`/shoal/transfer/2`).
//!
//! One request per stream. The requester writes one framed [`Request`]; the server answers with one
//! framed [`Response`]. A [`Response::Data`] header is followed by the pieces it names, encoded with
//! their proofs ([`crate::verify::encode_pieces`]); the requester knows their exact length
//! ([`crate::verify::encoded_len`]). A frame is a 4-byte little-endian length and a postcard body.
//!
//! Every decoder is bounded: a frame longer than its limit is refused before it is read, a piece
//! set may not claim more pieces than the largest blob has, nor more runs than [`MAX_RUNS`], and a
//! request's piece sets are runs ([`PieceRuns`]), made a bitmap only for the blob the server holds.
//! Enum variants are never renumbered; new ones go at the end, and a node that meets a variant it
//! does not know answers [`Response::BadRequest`] naming it.

use std::io::Read;

use serde::{Deserialize, Serialize};

use crate::Hash;
use crate::piece::{MAX_BLOB_SIZE, PIECE_SIZE, PieceRuns, PieceSet};

/// The libp2p protocol id of the transfer protocol. The trailing number is the wire version.
pub const PROTOCOL: &str = "/shoal/transfer/2";

/// The longest request frame body a server reads.
pub const MAX_REQUEST_LEN: usize = 64 * 1024;

/// The longest response header frame body a requester reads (the have-map dominates).
pub const MAX_RESPONSE_LEN: usize = 256 * 1024;

/// The most runs of consecutive pieces a [`PieceSet`] (or [`PieceRuns`]) may carry on the wire. A
/// fragmented holder advertises its first `MAX_RUNS` runs ([`PieceSet::first_runs`]).
pub const MAX_RUNS: usize = 4096;

/// The most pieces one `Get` may ask for (8 MiB at 128 KiB pieces).
pub const MAX_PIECES_PER_GET: u32 = 64;

/// The most bytes of a [`Response::BadRequest`] reason.
pub const MAX_REASON_LEN: usize = 512;

const MAX_PIECE_COUNT: u32 = (MAX_BLOB_SIZE / PIECE_SIZE) as u32;

/// A 128-bit id that ties one download's spans together across nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TraceId(pub [u8; 16]);

impl std::fmt::Display for TraceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

/// What a requester asks of a server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Which pieces of `hash` do you hold? Answered with [`Response::Have`].
    Have {
        /// The blob.
        hash: Hash,
        /// The requester's trace, recorded in the server's spans.
        trace: Option<TraceId>,
        /// Send a proof of the blob's size with the answer, if you hold its last piece.
        prove_size: bool,
    },
    /// Send me these pieces of `hash`, with proofs. Answered with [`Response::Data`] and the
    /// encoded pieces the server holds among them.
    Get {
        /// The blob.
        hash: Hash,
        /// The pieces wanted; at most [`MAX_PIECES_PER_GET`].
        pieces: PieceRuns,
        /// The requester's trace, recorded in the server's spans.
        trace: Option<TraceId>,
    },
    /// Answer with [`Response::Have`] once you hold a piece of `hash` in `wanted`, or once
    /// `wait_ms` has passed, whichever comes first; at once if you hold one already. A server may
    /// wait less than asked (it bounds how many requesters wait on it, and for how long), never
    /// more. A requester learns of its sources' new pieces as they arrive instead of polling.
    Watch {
        /// The blob.
        hash: Hash,
        /// The pieces the requester lacks and does not know the server to hold.
        wanted: PieceRuns,
        /// The longest the requester waits for an answer, in milliseconds.
        wait_ms: u32,
        /// The requester's trace, recorded in the server's spans.
        trace: Option<TraceId>,
    },
}

/// Another peer that holds pieces of the blob, as the server knows it (it served that peer
/// pieces, or was served by it): how the peers fetching one blob find each other without asking
/// the DHT (peer exchange).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerHint {
    /// The peer's id as libp2p encodes it: at most [`MAX_HINT_ID_LEN`] bytes.
    pub id: Vec<u8>,
    /// Addresses it listens on, as multiaddr bytes: at most [`MAX_HINT_ADDRS`], each at most
    /// [`MAX_HINT_ADDR_LEN`] bytes.
    pub addrs: Vec<Vec<u8>>,
}

/// What a server answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// The pieces held, and the blob's size as the server claims it. The size is proven only when
    /// the last piece verifies, so a requester fetches that piece first.
    Have {
        /// The blob's size in bytes.
        size: u64,
        /// The pieces it offers this requester: those it holds, less any it asks the requester
        /// to take from the peers in `peers` instead (see [`Response::Data`]).
        pieces: PieceSet,
        /// Other peers holding pieces of the blob: at most [`MAX_HINTS`].
        peers: Vec<PeerHint>,
        /// If asked for and the server holds the last piece: the blob's last chunk with the
        /// chaining values beside the path from the root down to it (`verify::encode_size_proof`), at most
        /// [`MAX_SIZE_PROOF_LEN`] bytes. It proves `size`, so the requester need not fetch the last
        /// piece before any other.
        size_proof: Option<Vec<u8>>,
    },
    /// The named pieces follow, encoded with their proofs: the requested ones the server holds
    /// and serves this requester. A server may serve fewer than it holds: a piece it already
    /// served to a peer that is still online is left to that peer while uploads are contended
    /// (see `peers`), which spreads a crowd's load across the crowd.
    Data {
        /// The pieces that follow.
        pieces: PieceSet,
        /// Other peers holding pieces of the blob: at most [`MAX_HINTS`].
        peers: Vec<PeerHint>,
        /// The pieces the server holds now, as in [`Response::Have`]: a fresh have-map with every
        /// answer, so a requester learns of the pieces its sources gained without asking. A
        /// requested piece in it that was not sent was left to other holders; one not in it is
        /// one the server no longer holds.
        have: Option<PieceSet>,
    },
    /// The server holds no verified piece of the blob.
    NotFound,
    /// The server is at its upload bound; ask again after `retry_after_ms` milliseconds.
    Busy {
        /// How long to wait before asking this server again.
        retry_after_ms: u32,
        /// Other peers holding pieces of the blob, to ask meanwhile: at most [`MAX_HINTS`].
        peers: Vec<PeerHint>,
    },
    /// The server does not serve this peer (a private swarm's allow-list).
    Denied,
    /// The request could not be understood: malformed, too large, or from a newer protocol.
    BadRequest {
        /// What was wrong, for the requester's logs (at most [`MAX_REASON_LEN`] bytes).
        reason: String,
    },
}

/// The longest size proof: a chunk and a hash per tree level (2 KiB for the largest blob), with
/// room to spare.
pub const MAX_SIZE_PROOF_LEN: usize = 4 * 1024;

/// The most peer hints in one response.
pub const MAX_HINTS: usize = 8;

/// The most addresses in one peer hint.
pub const MAX_HINT_ADDRS: usize = 4;

/// The longest peer id in a hint, in bytes.
pub const MAX_HINT_ID_LEN: usize = 64;

/// The longest address in a hint, in bytes.
pub const MAX_HINT_ADDR_LEN: usize = 128;

const REQUEST_VARIANTS: u8 = 3;
const RESPONSE_VARIANTS: u8 = 6;

/// Why bytes from a peer are not a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// The frame's length prefix exceeds the limit for its kind.
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    TooLong {
        /// The announced length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The message kind is not one this version knows: the peer speaks a newer protocol.
    #[error("unknown message kind {tag} on {PROTOCOL}: the peer runs a newer Shoal")]
    UnknownMessage {
        /// The unknown variant index.
        tag: u8,
    },
    /// The bytes do not decode as a message, or break a bound.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// The stream ended inside a frame.
    #[error("stream ended inside a frame")]
    Truncated,
}

/// Encodes a message as a frame: 4-byte little-endian length, then the postcard body.
pub fn encode_frame<T: Serialize>(msg: &T) -> Vec<u8> {
    let mut out = vec![0u8; 4];
    // Serializing into a Vec cannot fail for these types.
    let body = postcard::to_extend(msg, Vec::new()).unwrap_or_default();
    out[..4].copy_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

/// Reads a frame's length prefix and checks it against `max`.
pub fn frame_len(prefix: [u8; 4], max: usize) -> Result<usize, WireError> {
    let len = u32::from_le_bytes(prefix) as usize;
    if len > max {
        return Err(WireError::TooLong { len, max });
    }
    Ok(len)
}

/// Decodes a request frame body.
pub fn decode_request(body: &[u8]) -> Result<Request, WireError> {
    if body.len() > MAX_REQUEST_LEN {
        return Err(WireError::TooLong { len: body.len(), max: MAX_REQUEST_LEN });
    }
    let req: Request = decode(body, REQUEST_VARIANTS)?;
    if let Request::Get { pieces, .. } = &req
        && pieces.count() > u64::from(MAX_PIECES_PER_GET)
    {
        return Err(WireError::Malformed(format!(
            "get asks for {} pieces, more than {MAX_PIECES_PER_GET}",
            pieces.count()
        )));
    }
    Ok(req)
}

/// Decodes a response header frame body.
pub fn decode_response(body: &[u8]) -> Result<Response, WireError> {
    if body.len() > MAX_RESPONSE_LEN {
        return Err(WireError::TooLong { len: body.len(), max: MAX_RESPONSE_LEN });
    }
    let resp: Response = decode(body, RESPONSE_VARIANTS)?;
    match &resp {
        Response::Have { peers, .. } | Response::Data { peers, .. } | Response::Busy { peers, .. } => {
            check_hints(peers)?
        }
        _ => {}
    }
    if let Response::Have { size_proof: Some(proof), .. } = &resp
        && proof.len() > MAX_SIZE_PROOF_LEN
    {
        return Err(WireError::Malformed(format!("size proof of {} bytes", proof.len())));
    }
    match &resp {
        Response::Have { size, pieces, .. } => {
            let count = crate::Geometry::new(*size).map_err(|e| WireError::Malformed(e.to_string()))?.piece_count();
            if pieces.piece_count() != count {
                return Err(WireError::Malformed(format!(
                    "have-map counts {} pieces for a {size}-byte blob of {count}",
                    pieces.piece_count()
                )));
            }
        }
        Response::Data { pieces, have: Some(have), .. } if have.piece_count() != pieces.piece_count() => {
            return Err(WireError::Malformed("the have-map and the pieces sent count different pieces".into()));
        }
        Response::BadRequest { reason } if reason.len() > MAX_REASON_LEN => {
            return Err(WireError::Malformed("reason too long".into()));
        }
        _ => {}
    }
    Ok(resp)
}

fn check_hints(peers: &[PeerHint]) -> Result<(), WireError> {
    if peers.len() > MAX_HINTS {
        return Err(WireError::Malformed(format!("{} peer hints, more than {MAX_HINTS}", peers.len())));
    }
    for hint in peers {
        if hint.id.len() > MAX_HINT_ID_LEN
            || hint.addrs.len() > MAX_HINT_ADDRS
            || hint.addrs.iter().any(|a| a.len() > MAX_HINT_ADDR_LEN)
        {
            return Err(WireError::Malformed("a peer hint breaks its bounds".into()));
        }
    }
    Ok(())
}

/// Reads one frame body of at most `max` bytes from a blocking reader (tests, tools, fuzzing; the
/// node reads frames asynchronously with [`frame_len`]).
pub fn read_frame(mut r: impl Read, max: usize) -> Result<Vec<u8>, WireError> {
    let mut prefix = [0u8; 4];
    r.read_exact(&mut prefix).map_err(|_| WireError::Truncated)?;
    let len = frame_len(prefix, max)?;
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).map_err(|_| WireError::Truncated)?;
    Ok(body)
}

fn decode<'a, T: Deserialize<'a>>(body: &'a [u8], variants: u8) -> Result<T, WireError> {
    // Variant indices are postcard varints; every index we use fits in the first byte.
    match body.first() {
        None => return Err(WireError::Truncated),
        Some(&tag) if tag >= variants => return Err(WireError::UnknownMessage { tag }),
        Some(_) => {}
    }
    let (msg, rest) = postcard::take_from_bytes(body).map_err(|e| WireError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(WireError::Malformed(format!("{} trailing bytes", rest.len())));
    }
    Ok(msg)
}

impl PieceSet {
    /// The set cut to its first `max_runs` runs of consecutive pieces: what a fragmented holder
    /// advertises so that its have-map stays within [`MAX_RUNS`].
    pub fn first_runs(&self, max_runs: usize) -> PieceSet {
        let mut out = PieceSet::empty(self.piece_count());
        for r in self.ranges().take(max_runs) {
            out.insert_range(r);
        }
        out
    }
}

impl Serialize for PieceSet {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        PieceRuns::from(self).serialize(s)
    }
}

impl<'de> Deserialize<'de> for PieceSet {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let runs = PieceRuns::deserialize(d)?;
        Ok(runs.to_set(runs.piece_count()))
    }
}

impl<'de> Deserialize<'de> for PieceRuns {
    /// Runs are `(start, length)`, ascending, non-empty, non-adjacent and within the piece count.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        #[derive(Deserialize)]
        struct Sent {
            piece_count: u32,
            runs: Vec<(u32, u32)>,
        }
        let Sent { piece_count, runs } = Sent::deserialize(d)?;
        if piece_count == 0 || piece_count > MAX_PIECE_COUNT {
            return Err(D::Error::custom(format!("piece count {piece_count} out of range")));
        }
        if runs.len() > MAX_RUNS {
            return Err(D::Error::custom(format!("{} runs, more than {MAX_RUNS}", runs.len())));
        }
        let mut next_free = 0u64;
        for &(start, len) in &runs {
            let end = u64::from(start) + u64::from(len);
            if len == 0 || u64::from(start) < next_free || end > u64::from(piece_count) {
                return Err(D::Error::custom("piece runs must be ascending, disjoint and in range"));
            }
            next_free = end + 1;
        }
        Ok(PieceRuns { piece_count, runs })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash() -> Hash {
        Hash::from([0xab; 32])
    }

    fn hex(bytes: &[u8]) -> String {
        hex::encode(bytes)
    }

    const HASH_HEX: &str = "abababababababababababababababababababababababababababababababab";

    #[test]
    fn golden_have_request() {
        let frame = encode_frame(&Request::Have { hash: hash(), trace: None, prove_size: true });
        let want = [
            "23000000", // frame length 35, u32 LE
            "00",       // Request::Have
            HASH_HEX,   // hash, 32 raw bytes
            "00",       // trace: None
            "01",       // prove_size: true
        ]
        .concat();
        assert_eq!(hex(&frame), want);
    }

    #[test]
    fn golden_get_request() {
        let mut pieces = PieceSet::empty(300);
        pieces.insert_range(0..2);
        pieces.insert(299);
        let frame =
            encode_frame(&Request::Get { hash: hash(), pieces: (&pieces).into(), trace: Some(TraceId([0x11; 16])) });
        let want = [
            "3a000000",                         // frame length 58
            "01",                               // Request::Get
            HASH_HEX,                           // hash
            "ac02",                             // piece count 300, varint
            "02",                               // two runs
            "0002",                             // run: start 0, length 2
            "ab0201",                           // run: start 299, length 1
            "01",                               // trace: Some
            "11111111111111111111111111111111", // trace id
        ]
        .concat();
        assert_eq!(hex(&frame), want);
    }

    #[test]
    fn golden_watch_request() {
        let mut wanted = PieceSet::empty(16);
        wanted.insert_range(3..5);
        let frame =
            encode_frame(&Request::Watch { hash: hash(), wanted: (&wanted).into(), wait_ms: 1000, trace: None });
        let want = [
            "28000000", // frame length 40
            "02",       // Request::Watch
            HASH_HEX,   // hash
            "10",       // piece count 16
            "01",       // one run
            "0302",     // run: start 3, length 2
            "e807",     // wait_ms 1000, varint
            "00",       // trace: None
        ]
        .concat();
        assert_eq!(hex(&frame), want);
    }

    #[test]
    fn golden_responses() {
        let cases: Vec<(Response, String)> = vec![
            (
                Response::Have {
                    size: 131_073,
                    pieces: PieceSet::full(2),
                    peers: vec![],
                    size_proof: Some(vec![0xcd, 0xef]),
                },
                [
                    "0d000000", // frame length 13
                    "00",       // Response::Have
                    "818008",   // size 131073, varint
                    "02",       // piece count 2
                    "01",       // one run
                    "0002",     // start 0, length 2
                    "00",       // no peer hints
                    "01",       // a size proof follows
                    "02",       // proof length 2
                    "cdef",     // proof
                ]
                .concat(),
            ),
            (
                Response::Data {
                    pieces: PieceSet::single(2, 1),
                    peers: vec![PeerHint { id: vec![0xaa, 0xbb], addrs: vec![vec![0x04, 0x7f, 0, 0, 1]] }],
                    have: Some(PieceSet::full(2)),
                },
                [
                    "15000000",   // frame length 21
                    "01",         // Response::Data
                    "02",         // piece count 2
                    "01",         // one run
                    "0101",       // start 1, length 1
                    "01",         // one peer hint
                    "02",         // id length 2
                    "aabb",       // id
                    "01",         // one address
                    "05",         // address length 5
                    "047f000001", // /ip4/127.0.0.1
                    "01",         // a have-map follows
                    "02",         // piece count 2
                    "01",         // one run
                    "0002",       // start 0, length 2
                ]
                .concat(),
            ),
            (Response::NotFound, ["01000000", "02" /* NotFound */].concat()),
            (
                Response::Busy { retry_after_ms: 250, peers: vec![] },
                [
                    "04000000", // frame length 4
                    "03",       // Response::Busy
                    "fa01",     // 250 ms, varint
                    "00",       // no peer hints
                ]
                .concat(),
            ),
            (Response::Denied, ["01000000", "04" /* Denied */].concat()),
            (
                Response::BadRequest { reason: "no".into() },
                [
                    "04000000", // frame length 4
                    "05",       // Response::BadRequest
                    "02",       // string length 2
                    "6e6f",     // "no"
                ]
                .concat(),
            ),
        ];
        for (msg, want) in cases {
            assert_eq!(hex(&encode_frame(&msg)), want, "{msg:?}");
            let body = read_frame(&encode_frame(&msg)[..], MAX_RESPONSE_LEN).expect("frame");
            assert_eq!(decode_response(&body).expect("decodes"), msg);
        }
    }

    #[test]
    fn unknown_kinds_are_named_not_misread() {
        assert_eq!(decode_request(&[7, 1, 2]), Err(WireError::UnknownMessage { tag: 7 }));
        assert_eq!(decode_response(&[6]), Err(WireError::UnknownMessage { tag: 6 }));
        assert!(decode_request(&[]).is_err());
    }

    #[test]
    fn bounds_are_enforced() {
        assert_eq!(
            frame_len((1u32 << 31).to_le_bytes(), MAX_REQUEST_LEN).unwrap_err(),
            WireError::TooLong { len: 1 << 31, max: MAX_REQUEST_LEN }
        );
        let too_many =
            Request::Get { hash: hash(), pieces: (&PieceSet::full(MAX_PIECES_PER_GET + 1)).into(), trace: None };
        let body = &encode_frame(&too_many)[4..];
        assert!(matches!(decode_request(body), Err(WireError::Malformed(_))));
        // A have-map whose piece count disagrees with the size is refused.
        let lie = Response::Have { size: 10, pieces: PieceSet::full(3), peers: vec![], size_proof: None };
        assert!(decode_response(&encode_frame(&lie)[4..]).is_err());
        // A piece count that would make us allocate gigabytes is refused.
        let mut body = vec![0u8]; // Response::Have
        body.extend(postcard::to_stdvec(&(1u64 << 40)).expect("ser"));
        body.extend(postcard::to_stdvec(&PieceRuns { piece_count: u32::MAX, runs: vec![] }).expect("ser"));
        assert!(decode_response(&body).is_err());
        // Too many hints, or a hint too large, are refused.
        let hint = PeerHint { id: vec![1; 38], addrs: vec![vec![2; 20]] };
        let crowd =
            Response::Data { pieces: PieceSet::single(2, 1), peers: vec![hint.clone(); MAX_HINTS + 1], have: None };
        assert!(decode_response(&encode_frame(&crowd)[4..]).is_err());
        let fat = PeerHint { id: vec![1; 38], addrs: vec![vec![2; MAX_HINT_ADDR_LEN + 1]] };
        let fat = Response::Have { size: 10, pieces: PieceSet::full(1), peers: vec![fat], size_proof: None };
        assert!(decode_response(&encode_frame(&fat)[4..]).is_err());
        let proof = Some(vec![0; MAX_SIZE_PROOF_LEN + 1]);
        let long = Response::Have { size: 10, pieces: PieceSet::full(1), peers: vec![], size_proof: proof };
        assert!(decode_response(&encode_frame(&long)[4..]).is_err());
        let fine = Response::Data { pieces: PieceSet::single(2, 1), peers: vec![hint; MAX_HINTS], have: None };
        assert!(decode_response(&encode_frame(&fine)[4..]).is_ok());
        // A have-map for another blob geometry is refused.
        let other = Response::Data { pieces: PieceSet::single(2, 1), peers: vec![], have: Some(PieceSet::full(3)) };
        assert!(decode_response(&encode_frame(&other)[4..]).is_err());
        // Overlapping runs are refused.
        let mut body = vec![1u8]; // Response::Data
        body.extend(postcard::to_stdvec(&PieceRuns { piece_count: 9, runs: vec![(0, 3), (2, 1)] }).expect("ser"));
        assert!(decode_response(&body).is_err());
    }

    mod props {
        use proptest::prelude::*;

        use super::super::*;

        fn piece_set() -> impl Strategy<Value = PieceSet> {
            (1u32..5000).prop_flat_map(|n| {
                proptest::collection::vec(0..n, 0..64).prop_map(move |ix| {
                    let mut s = PieceSet::empty(n);
                    for i in ix {
                        s.insert(i);
                    }
                    s
                })
            })
        }

        fn trace() -> impl Strategy<Value = Option<TraceId>> {
            proptest::option::of(any::<[u8; 16]>().prop_map(TraceId))
        }

        fn request() -> impl Strategy<Value = Request> {
            prop_oneof![
                (any::<[u8; 32]>(), trace(), any::<bool>()).prop_map(|(h, trace, prove_size)| Request::Have {
                    hash: h.into(),
                    trace,
                    prove_size
                }),
                (any::<[u8; 32]>(), piece_set(), trace()).prop_map(|(h, pieces, trace)| Request::Get {
                    hash: h.into(),
                    pieces: (&pieces).into(),
                    trace
                }),
                (any::<[u8; 32]>(), piece_set(), any::<u32>(), trace()).prop_map(|(h, wanted, wait_ms, trace)| {
                    Request::Watch { hash: h.into(), wanted: (&wanted).into(), wait_ms, trace }
                }),
            ]
        }

        fn hints() -> impl Strategy<Value = Vec<PeerHint>> {
            let hint = (
                proptest::collection::vec(any::<u8>(), 0..=MAX_HINT_ID_LEN),
                proptest::collection::vec(
                    proptest::collection::vec(any::<u8>(), 0..=MAX_HINT_ADDR_LEN),
                    0..=MAX_HINT_ADDRS,
                ),
            )
                .prop_map(|(id, addrs)| PeerHint { id, addrs });
            proptest::collection::vec(hint, 0..=MAX_HINTS)
        }

        fn response() -> impl Strategy<Value = Response> {
            prop_oneof![
                (0u64..(1 << 34), hints(), proptest::option::of(proptest::collection::vec(any::<u8>(), 0..64)))
                    .prop_flat_map(|(size, peers, size_proof)| {
                        let n = crate::Geometry::new(size).expect("in range").piece_count();
                        proptest::collection::vec(0..n, 0..64).prop_map(move |ix| {
                            let mut pieces = PieceSet::empty(n);
                            ix.into_iter().for_each(|i| {
                                pieces.insert(i);
                            });
                            Response::Have { size, pieces, peers: peers.clone(), size_proof: size_proof.clone() }
                        })
                    }),
                (piece_set(), hints(), any::<bool>()).prop_map(|(pieces, peers, with_have)| {
                    let have = with_have.then(|| PieceSet::full(pieces.piece_count()));
                    Response::Data { pieces, peers, have }
                }),
                Just(Response::NotFound),
                (any::<u32>(), hints()).prop_map(|(retry_after_ms, peers)| Response::Busy { retry_after_ms, peers }),
                Just(Response::Denied),
                "[a-z ]{0,100}".prop_map(|reason| Response::BadRequest { reason }),
            ]
        }

        proptest! {
            #[test]
            fn requests_round_trip(req in request()) {
                let frame = encode_frame(&req);
                let body = read_frame(&frame[..], MAX_REQUEST_LEN).expect("frame");
                prop_assert_eq!(decode_request(&body).expect("decodes"), req);
            }

            #[test]
            fn responses_round_trip(resp in response()) {
                let frame = encode_frame(&resp);
                let body = read_frame(&frame[..], MAX_RESPONSE_LEN).expect("frame");
                prop_assert_eq!(decode_response(&body).expect("decodes"), resp);
            }

            #[test]
            fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
                let _ = decode_request(&bytes);
                let _ = decode_response(&bytes);
            }
        }
    }
}
