//! Serving blobs over HTTP to browsers and curl: `GET|HEAD` with `Range`, `ETag` = the hash,
//! `If-None-Match`, immutable caching, and bytes that stream out as soon as they are verified, even
//! while the fetch from peers is still running.
//!
//! A body is never presented as complete when a piece fails verification: the stream ends with an
//! error, which aborts the HTTP connection before `Content-Length` bytes were sent.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use shoal_protocol::collection::{Collection, CollectionError};
use shoal_protocol::{Geometry, Hash};
use tokio::sync::mpsc;

use crate::fetch::Reading;
use crate::node::NodeHandle;

/// How often a streaming response checks for newly verified pieces.
const PIECE_POLL: Duration = Duration::from_millis(20);

fn error(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], format!("{}\n", msg.into())).into_response()
}

/// Parses a single `bytes=` range against `size`: `Ok(None)` for a header to ignore (none, a
/// unit other than bytes, which RFC 9110 says to ignore, or several ranges, which we do not
/// serve as one multipart body and answer with the whole blob), `Err(())` for an unsatisfiable or
/// malformed one.
pub(crate) fn parse_range(value: Option<&HeaderValue>, size: u64) -> Result<Option<(u64, u64)>, ()> {
    let Some(v) = value else { return Ok(None) };
    let v = v.to_str().map_err(|_| ())?.trim();
    // Range units are case-insensitive.
    let Some(spec) = v.get(..6).filter(|unit| unit.eq_ignore_ascii_case("bytes=")).map(|_| &v[6..]) else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let (a, b) = spec.split_once('-').ok_or(())?;
    let (a, b) = (a.trim(), b.trim());
    let (start, end) = if a.is_empty() {
        let n: u64 = b.parse().map_err(|_| ())?;
        if n == 0 {
            return Err(());
        }
        (size.saturating_sub(n), size.checked_sub(1).ok_or(())?)
    } else {
        let start: u64 = a.parse().map_err(|_| ())?;
        let end = if b.is_empty() {
            size.saturating_sub(1)
        } else {
            b.parse::<u64>().map_err(|_| ())?.min(size.saturating_sub(1))
        };
        (start, end)
    };
    if size == 0 || start > end || start >= size {
        return Err(());
    }
    Ok(Some((start, end)))
}

/// How many of a blob's first bytes its content type is sniffed from.
const SNIFF_LEN: usize = 512;

/// A content type from the first bytes of a blob (at most [`SNIFF_LEN`]).
pub(crate) fn sniff(head: &[u8]) -> &'static str {
    const MAGIC: &[(&[u8], &str)] = &[
        (b"\x89PNG\r\n\x1a\n", "image/png"),
        (b"\xff\xd8\xff", "image/jpeg"),
        (b"GIF87a", "image/gif"),
        (b"GIF89a", "image/gif"),
        (b"%PDF-", "application/pdf"),
        (b"PK\x03\x04", "application/zip"),
        (b"\x1f\x8b", "application/gzip"),
        (b"RIFF", "application/octet-stream"),
        (b"<!DOCTYPE html", "text/html; charset=utf-8"),
        (b"<html", "text/html; charset=utf-8"),
        (b"{", "application/json"),
    ];
    for (magic, ty) in MAGIC {
        if head.starts_with(magic) {
            return ty;
        }
    }
    if head.len() >= 12 && &head[4..8] == b"ftyp" {
        return "video/mp4";
    }
    // Text is UTF-8 without NULs.
    let text = match std::str::from_utf8(head) {
        Ok(s) => Some(s),
        // A head cut at `SNIFF_LEN` may end inside a character; a shorter one is the whole blob.
        Err(e) if e.error_len().is_none() && head.len() == SNIFF_LEN => {
            std::str::from_utf8(&head[..e.valid_up_to()]).ok()
        }
        Err(_) => None,
    };
    if !head.is_empty() && text.is_some_and(|s| !s.contains('\0')) {
        return "text/plain; charset=utf-8";
    }
    "application/octet-stream"
}

/// The policy for content a browser would run: anyone may publish a blob, and a page served from
/// this origin could otherwise act as it (read what it serves, send requests with its cookies).
/// In a sandbox of its own origin a published site still runs its scripts and forms.
const SANDBOX: &str = "sandbox allow-scripts allow-forms allow-popups allow-downloads";

/// Whether a browser would run content of this type as a page of the origin serving it.
fn runs_in_browser(content_type: &str) -> bool {
    let essence = content_type.split(';').next().unwrap_or_default().trim();
    matches!(essence, "text/html" | "application/xhtml+xml" | "image/svg+xml" | "text/xml" | "application/xml")
}

/// A client that accepts only `application/octet-stream` asks for a collection's own bytes (what
/// `shoal get` writes out as a directory), not its listing.
fn wants_raw(headers: &HeaderMap) -> bool {
    headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).is_some_and(|a| a.trim() == "application/octet-stream")
}

/// A content type from a file name's extension (collection entries).
fn by_extension(path: &str) -> Option<&'static str> {
    let ext = path.rsplit_once('.')?.1.to_ascii_lowercase();
    Some(match ext.as_str() {
        "html" | "htm" => "text/html; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "json" => "application/json",
        "txt" | "md" => "text/plain; charset=utf-8",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "svg" => "image/svg+xml",
        "webp" => "image/webp",
        "ico" => "image/x-icon",
        "mp4" => "video/mp4",
        "webm" => "video/webm",
        "mp3" => "audio/mpeg",
        "wasm" => "application/wasm",
        "pdf" => "application/pdf",
        "zip" => "application/zip",
        "gz" => "application/gzip",
        _ => return None,
    })
}

/// Starts fetching `hash` unless it is held whole; counts the cache hit or miss if told to.
fn ensure_fetching(
    node: &NodeHandle,
    hash: Hash,
    public: bool,
    count: bool,
) -> Option<tokio::task::JoinHandle<Result<shoal_cache::BlobInfo, crate::NodeError>>> {
    let metrics = &node.inner.metrics;
    if node.store().info(hash).is_some_and(|i| i.is_complete()) {
        if count {
            metrics.cache_hits.inc();
        }
        None
    } else {
        if count {
            metrics.cache_misses.inc();
        }
        let n = node.clone();
        Some(tokio::spawn(async move { crate::fetch::fetch_for(&n, hash, None, public).await }))
    }
}

/// What a fetch that failed tells an HTTP client: not found when no provider answered, no room
/// when this node's cache cannot hold the blob, the swarm's failure otherwise, with the reason.
fn fetch_failed(hash: Hash, e: crate::NodeError) -> Response {
    use crate::NodeError;
    let status = match &e {
        NodeError::Fetch(crate::fetch::FetchError::NotFound { .. }) => StatusCode::NOT_FOUND,
        NodeError::Store(shoal_cache::StoreError::TooLarge { .. } | shoal_cache::StoreError::BlobTooLarge(_)) => {
            StatusCode::INSUFFICIENT_STORAGE
        }
        NodeError::Busy(_) => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::BAD_GATEWAY,
    };
    error(status, format!("blob {hash} could not be fetched: {e}"))
}

/// A task (the `what`) that did not return: cancelled as the node stops, or a bug.
fn task_ended(e: tokio::task::JoinError, what: &str) -> Response {
    match e.is_cancelled() {
        true => error(StatusCode::SERVICE_UNAVAILABLE, "the node is stopping"),
        false => error(StatusCode::INTERNAL_SERVER_ERROR, format!("the {what} failed unexpectedly")),
    }
}

/// The largest collection the gateway reads whole, to list it or to look a path up in it: a
/// listing of about 100,000 files. A larger one is answered 502, saying so (its own bytes are
/// still served on `Accept: application/octet-stream`, and `shoal get` writes it).
const MAX_LISTED: u64 = 16 << 20;

/// Collections read whole at once, and decoded and listed: each takes its size in memory, and
/// several times that to decode and list.
static READING_WHOLE: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(4);

/// A place to read a collection whole, decode or list it ([`READING_WHOLE`]), waited for within
/// the lookup deadline.
async fn reading_place(node: &NodeHandle) -> Result<Permit, Box<Response>> {
    wait_place(node, "listings are being made").await.map_err(|(status, say)| Box::new(error(status, say)))
}

/// [`reading_place`], its refusal said as the status and reason to answer with: past the
/// deadline, that too many of `what` are under way.
async fn wait_place(node: &NodeHandle, what: &str) -> Result<Permit, (StatusCode, String)> {
    match tokio::time::timeout(node.config().lookup_wait(), READING_WHOLE.acquire()).await {
        Ok(Ok(reading)) => Ok(reading),
        Ok(Err(_)) => Err((StatusCode::SERVICE_UNAVAILABLE, "the node is stopping".into())),
        Err(_) => Err((StatusCode::SERVICE_UNAVAILABLE, format!("too many {what}; ask again"))),
    }
}

/// Runs `work` on a blocking thread that holds `reading`, a place of [`READING_WHOLE`]: a
/// client that leaves drops the future awaiting it, and the work it started goes on in its place.
async fn in_place<T: Send + 'static>(
    reading: Permit,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Box<Response>> {
    tokio::task::spawn_blocking(move || {
        let _reading = reading;
        work()
    })
    .await
    .map_err(|e| Box::new(task_ended(e, "listing")))
}

/// What the collections kept decoded ([`Collections`]) may take in memory, as
/// [`decoded_cost`] estimates it: one or two of the largest the gateway reads ([`MAX_LISTED`]
/// of encoding), or many small ones.
const COLLECTIONS_KEPT: usize = 64 << 20;

/// Collections the gateway decoded lately, kept decoded (a content id names the same entries
/// for good): a site published as a collection is browsed a path at a time, and every path was
/// looked up by reading the collection whole and decoding it again, half a second for 100,000
/// entries and four at a time. Least recently used first to go, bounded by what their entries
/// take in memory. A collection the user removes (`shoal rm`) is forgotten with it.
///
/// Also the decodes under way ([`UnderWay`]): a request for a collection being decoded waits
/// for that decode rather than making its own (a site's first visitors arrive together).
pub(crate) struct Collections {
    held: std::sync::Mutex<Held>,
    bound: usize,
}

struct Held {
    /// The collections kept, each with what it takes ([`decoded_cost`]), and the blobs found
    /// not to decode as one (verified bytes decode the same way every time).
    kept: lru::LruCache<Hash, (Entries, usize)>,
    /// What the kept take in all.
    bytes: usize,
    /// The decodes under way, each by its number and with the channel it answers on: one per
    /// collection held whole and asked for, each in a place of [`READING_WHOLE`] or waiting for
    /// one within the lookup deadline.
    under_way: std::collections::HashMap<Hash, (u64, Answer)>,
    /// The number of the next decode begun.
    next: u64,
}

/// What a collection's bytes decode to: its entries, or why they are none.
type Entries = Result<Arc<Collection>, CollectionError>;

/// What reading and decoding a collection came to, shared by the requests that waited for it:
/// what its bytes decode to, or why they could not be read, as the status and reason to answer
/// with.
type Decoded = Result<Entries, (StatusCode, String)>;

/// Where the requests waiting for a decode ([`UnderWay`]) are told what it came to.
type Answer = tokio::sync::watch::Receiver<Option<Decoded>>;

/// A collection that [`Collections`] holds: kept (or found to be none), or being decoded.
enum Found {
    Kept(Entries),
    Decoding(Answer),
}

impl Default for Collections {
    fn default() -> Self {
        Self::new(COLLECTIONS_KEPT)
    }
}

impl Collections {
    fn new(bound: usize) -> Self {
        let held = Held { kept: lru::LruCache::unbounded(), bytes: 0, under_way: Default::default(), next: 0 };
        Self { held: std::sync::Mutex::new(held), bound }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn find(&self, hash: Hash) -> Option<Found> {
        Self::found(&mut self.lock(), hash)
    }

    fn found(held: &mut Held, hash: Hash) -> Option<Found> {
        if let Some((c, _)) = held.kept.get(&hash) {
            return Some(Found::Kept(c.clone()));
        }
        held.under_way.get(&hash).map(|(_, answer)| Found::Decoding(answer.clone()))
    }

    /// Begins a decode of `hash`, unless it is kept or being decoded already (said as `Err`).
    fn begin(self: &Arc<Self>, hash: Hash) -> Result<UnderWay, Found> {
        let mut held = self.lock();
        if let Some(found) = Self::found(&mut held, hash) {
            return Err(found);
        }
        let (tell, answer) = tokio::sync::watch::channel(None);
        let number = held.next;
        held.next += 1;
        held.under_way.insert(hash, (number, answer));
        Ok(UnderWay { collections: self.clone(), hash, number, tell, outcome: None, cost: 0 })
    }

    /// Ends the decode `number` of `hash` if nobody is left to answer, and says so: a request
    /// takes its answer's channel under this lock ([`Collections::found`]), so none comes to
    /// wait for it after.
    fn abandon(&self, hash: Hash, number: u64, tell: &tokio::sync::watch::Sender<Option<Decoded>>) -> bool {
        let mut held = self.lock();
        let marked = held.under_way.get(&hash).is_some_and(|(n, _)| *n == number);
        // The mark holds a receiver of its own.
        if tell.receiver_count() > usize::from(marked) {
            return false;
        }
        if marked {
            held.under_way.remove(&hash);
        }
        true
    }

    /// Ends the decode `number` of `hash`, keeping what it decoded (`c`, with what it takes),
    /// unless the user removed the collection meanwhile ([`Collections::forget`]).
    fn finish(&self, hash: Hash, number: u64, c: Option<(Entries, usize)>) {
        let mut held = self.lock();
        if held.under_way.get(&hash).is_none_or(|(n, _)| *n != number) {
            return;
        }
        held.under_way.remove(&hash);
        let gone = c.map(|(c, cost)| self.keep(&mut held, hash, c, cost)).unwrap_or_default();
        drop(held);
        drop(gone);
    }

    /// Keeps `c`, which takes `cost`, letting the least recently used go until the kept are
    /// within the bound; what went is returned, to be freed once the lock is let go (a large
    /// collection is many small allocations). One larger than the bound is not kept.
    fn keep(&self, held: &mut Held, hash: Hash, c: Entries, cost: usize) -> Vec<(Entries, usize)> {
        let mut gone = Vec::new();
        if cost > self.bound {
            return gone;
        }
        // One decode of a hash is under way at a time, so none is kept already; were it, it
        // would go, counted.
        if let Some(was) = held.kept.put(hash, (c, cost)) {
            held.bytes -= was.1;
            gone.push(was);
        }
        held.bytes += cost;
        while held.bytes > self.bound {
            match held.kept.pop_lru() {
                Some((_, was)) => {
                    held.bytes -= was.1;
                    gone.push(was);
                }
                None => break,
            }
        }
        gone
    }

    /// Forgets `hash` (the user removed it), and what a decode of it under way would keep.
    pub(crate) fn forget(&self, hash: Hash) {
        let mut held = self.lock();
        held.under_way.remove(&hash);
        let gone = held.kept.pop(&hash);
        if let Some((_, cost)) = &gone {
            held.bytes -= cost;
        }
        drop(held);
        drop(gone);
    }
}

/// A decode under way ([`Collections::begin`]): waiting for a place of [`READING_WHOLE`], then
/// reading and decoding on a blocking thread in it. However it ends (with its `outcome`, or
/// without one: its task dropped as the runtime stops, a panic, or nobody left to answer), it
/// is no longer under way, what it decoded is kept, and the requests waiting for it are
/// answered.
struct UnderWay {
    collections: Arc<Collections>,
    hash: Hash,
    number: u64,
    tell: tokio::sync::watch::Sender<Option<Decoded>>,
    outcome: Option<Decoded>,
    /// What the collection decoded takes in memory ([`decoded_cost`]).
    cost: usize,
}

impl UnderWay {
    /// Where what the decode came to is told.
    fn answer(&self) -> Answer {
        self.tell.subscribe()
    }

    /// Ends once nobody has been left to answer for a second, and the decode is no longer under
    /// way: the request that began it went (with its client) and none waits for it. A client
    /// that timed out and asks again at once finds the decode still waiting for its place.
    /// Looked at every 100 ms.
    async fn unwanted(&self) {
        const LOOKS: u32 = 10;
        let mut unwanted_for = 0;
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            // At most the mark's own receiver: nobody waits, as far as can be told without the
            // lock, under which `abandon` decides.
            unwanted_for = if self.tell.receiver_count() <= 1 { unwanted_for + 1 } else { 0 };
            if unwanted_for >= LOOKS && self.collections.abandon(self.hash, self.number, &self.tell) {
                return;
            }
        }
    }

    /// What the decode came to, told (and the collection kept) once this is dropped. What the
    /// collection takes is estimated here, on the decode's thread: not under the lock, and not
    /// in `drop`, which is to answer however the decode ends.
    fn end(&mut self, outcome: Decoded) {
        self.cost = match &outcome {
            Ok(Ok(c)) => decoded_cost(c),
            Ok(Err(e)) => KEEPING + e.to_string().len(),
            Err(_) => 0,
        };
        self.outcome = Some(outcome);
    }
}

impl Drop for UnderWay {
    fn drop(&mut self) {
        let outcome = self.outcome.take().unwrap_or_else(|| match std::thread::panicking() {
            true => {
                tracing::error!(collection = %self.hash, "the decode of a collection panicked");
                Err((StatusCode::INTERNAL_SERVER_ERROR, "the collection's decode failed unexpectedly".into()))
            }
            false => Err((StatusCode::SERVICE_UNAVAILABLE, "the node is stopping".into())),
        });
        let c = outcome.as_ref().ok().map(|c| (c.clone(), self.cost));
        self.collections.finish(self.hash, self.number, c);
        self.tell.send_replace(Some(outcome));
    }
}

/// What keeping a collection costs besides its entries (the `Arc`, the LRU's node and slot).
const KEEPING: usize = 512;

/// What a decoded collection takes in memory, estimated: its entries (decoded into a vector of
/// their exact number), each path an allocation of its own, rounded up as an allocator does and
/// with its header, and what keeping it costs ([`KEEPING`]).
fn decoded_cost(c: &Collection) -> usize {
    const ALLOCATION: usize = 16;
    let entry = |e: &shoal_protocol::collection::Entry| {
        std::mem::size_of_val(e) + e.path.len().next_multiple_of(ALLOCATION) + ALLOCATION
    };
    KEEPING + c.entries().iter().map(entry).sum::<usize>()
}

/// The collection `hash`, decoded (`Err` inside for a blob that starts as a collection and does
/// not decode as one): kept from an earlier request ([`Collections`]), being decoded by another
/// request, or read whole ([`held_whole`]) and decoded ([`read_and_decode`]) by this one, which
/// is then handed the place it decoded in too, for what it does with the collection (a listing,
/// built where the collection was read). A request is counted as a cache hit or miss if `count`.
async fn decoded(
    node: &NodeHandle,
    hash: Hash,
    public: bool,
    count: bool,
) -> Result<(Entries, Option<Permit>), Box<Response>> {
    let collections = &node.inner.collections;
    if let Some(found) = collections.find(hash) {
        if count {
            node.inner.metrics.cache_hits.inc();
        }
        return Ok((found_collection(node, hash, found).await?, None));
    }
    let size = held_whole(node, hash, public, count).await?;
    // Looked at again once the collection is held (a decode may have begun or ended meanwhile),
    // and marked under way before a place is waited for: the requests after this one wait for
    // the decode, not for places.
    let mut under_way = match collections.begin(hash) {
        Ok(under_way) => under_way,
        Err(found) => return Ok((found_collection(node, hash, found).await?, None)),
    };
    let answer = under_way.answer();
    let (give_back, place) = tokio::sync::oneshot::channel();
    let handle = node.clone();
    // Not awaited: the decode, its wait for a place included, ends and answers the requests
    // waiting for it though this request's client leaves.
    drop(tokio::spawn(async move {
        let reading = tokio::select! {
            placed = wait_place(&handle, "collections are being read") => match placed {
                Ok(reading) => reading,
                Err(refused) => return under_way.end(Err(refused)),
            },
            // Nobody to answer (this request's client left, and no request waits): a place is
            // not waited for, and the next request for the collection begins again.
            () = under_way.unwanted() => return,
        };
        drop(tokio::task::spawn_blocking(move || {
            under_way.end(read_and_decode(&handle, hash, size));
            drop(under_way);
            // Given back to the semaphore if this request is gone.
            let _ = give_back.send(reading);
        }));
    }));
    let place = place.await.ok();
    Ok((answered(answer).await?, place))
}

/// A place of [`READING_WHOLE`].
type Permit = tokio::sync::SemaphorePermit<'static>;

/// The collection found in [`Collections`]: a kept one is marked used in the store, as a read of
/// it would be (a site browsed through the gateway keeps its collection cached).
async fn found_collection(node: &NodeHandle, hash: Hash, found: Found) -> Result<Entries, Box<Response>> {
    match found {
        Found::Kept(c) => {
            node.inner.store.touch(hash);
            Ok(c)
        }
        Found::Decoding(answer) => answered(answer).await,
    }
}

/// What the decode that tells `answer` came to ([`UnderWay`]).
async fn answered(mut answer: Answer) -> Result<Entries, Box<Response>> {
    let outcome = match answer.wait_for(Option::is_some).await {
        Ok(outcome) => outcome.clone(),
        Err(_) => None,
    };
    match outcome {
        Some(Ok(decoded)) => Ok(decoded),
        Some(Err((status, say))) => Err(Box::new(error(status, say))),
        None => {
            Err(Box::new(error(StatusCode::INTERNAL_SERVER_ERROR, "the collection's decode ended without an answer")))
        }
    }
}

/// Reads the collection `hash`, held whole at `size`, each piece verified, and decodes it; on a
/// blocking thread.
fn read_and_decode(node: &NodeHandle, hash: Hash, size: u64) -> Decoded {
    let store = node.store();
    let reader = store.reader(hash).map_err(|e| read_failed(hash, 0, e))?;
    // A size no proof backed may have given way to the true one since its pieces were waited for.
    if reader.size() != size {
        return Err((StatusCode::BAD_GATEWAY, format!("{hash}: its size changed as it was read")));
    }
    let geometry = Geometry::new(size).map_err(|_| (StatusCode::BAD_GATEWAY, "blob too large".to_owned()))?;
    let mut bytes = Vec::with_capacity(size as usize);
    for piece in 0..geometry.piece_count() {
        bytes.extend_from_slice(&reader.read_piece(piece).map_err(|e| read_failed(hash, piece, e))?);
    }
    drop(reader);
    let c = Collection::decode(&bytes).map(Arc::new);
    if c.is_ok() {
        node.inner.metrics.collections_decoded.inc();
    }
    Ok(c)
}

/// Follows the fetch of a collection until every piece of it is verified in the store (its size
/// is checked before any more of it is fetched), and answers its size. A blob that is no
/// collection (its first piece tells) is not waited for on: 404. Counted as a cache hit or miss
/// if `count`.
///
/// Reading it and decoding it ([`read_and_decode`]) takes seconds and several times its size in memory
/// for a collection of 16 MiB: they take a place of [`READING_WHOLE`]. A place is taken only
/// once every piece is held, and waited for within the lookup deadline: a peer that sends a
/// collection slowly, or clients that ask for listings faster than they are made, hold no place
/// that the others wait on without end.
async fn held_whole(node: &NodeHandle, hash: Hash, public: bool, count: bool) -> Result<u64, Box<Response>> {
    let leads = !crate::fetch::is_under_way(node, hash);
    let mut fetching = ensure_fetching(node, hash, public, count);
    let size = known_size(node, hash, &mut fetching, (public, leads)).await?;
    if size > MAX_LISTED {
        let say = format!(
            "{hash} is a collection of {size} bytes, more than the {MAX_LISTED} a gateway lists; fetch it with shoal get"
        );
        return Err(Box::new(error(StatusCode::BAD_GATEWAY, say)));
    }
    let geometry = Geometry::new(size).map_err(|_| Box::new(error(StatusCode::BAD_GATEWAY, "blob too large")))?;
    let first = match size {
        0 => Bytes::new(),
        _ => wait_piece(node, hash, 0, &fetching, &mut None).await?,
    };
    if !Collection::is_collection(&first) {
        return Err(Box::new(error(StatusCode::NOT_FOUND, format!("{hash} is not a collection"))));
    }
    for piece in 1..geometry.piece_count() {
        wait_held(node, hash, piece, &fetching, None).await?;
    }
    Ok(size)
}

/// The size of `hash` once the store knows one (a fetch under way found it), within the lookup
/// deadline. Past it, for the `public` gateway, the fetch it started is stopped with the answer
/// (one that other callers follow goes on for them; one it only followed, it stops following):
/// it holds one of the few fetches the gateway may run, and anyone may ask it for hashes nobody
/// has. `leads`: no fetch of `hash` was under way when this answer's began.
async fn known_size(
    node: &NodeHandle,
    hash: Hash,
    fetching: &mut Option<tokio::task::JoinHandle<Result<shoal_cache::BlobInfo, crate::NodeError>>>,
    (public, leads): (bool, bool),
) -> Result<u64, Box<Response>> {
    let deadline = tokio::time::Instant::now() + node.config().lookup_wait();
    // Armed until the size is known: at the deadline, and as well if the client leaves before
    // (this future dropped), which would otherwise leave the fetch holding its place for as long
    // as the fetch itself waits.
    let mut stop =
        StopFetch { node, hash, leads, fetch: fetching.as_ref().filter(|_| public).map(|f| f.abort_handle()) };
    loop {
        if let Some(info) = node.store().info(hash) {
            stop.fetch = None;
            return Ok(info.size);
        }
        if let Some(f) = fetching.take_if(|f| f.is_finished()) {
            return Err(Box::new(match f.await {
                Ok(Err(e)) => fetch_failed(hash, e),
                Ok(Ok(_)) => error(StatusCode::NOT_FOUND, format!("blob {hash} was fetched but is gone again")),
                Err(e) => task_ended(e, "fetch"),
            }));
        }
        if tokio::time::Instant::now() > deadline {
            *fetching = None;
            return Err(Box::new(error(StatusCode::NOT_FOUND, format!("no provider of {hash} answered in time"))));
        }
        tokio::time::sleep(PIECE_POLL).await;
    }
}

/// Stops the public gateway's fetch of `hash` when dropped, unless it leads a fetch that others
/// follow (see [`known_size`]).
struct StopFetch<'a> {
    node: &'a NodeHandle,
    hash: Hash,
    leads: bool,
    fetch: Option<tokio::task::AbortHandle>,
}

impl Drop for StopFetch<'_> {
    fn drop(&mut self) {
        if let Some(f) = self.fetch.take()
            && !(self.leads && crate::fetch::is_followed(self.node, self.hash))
        {
            f.abort();
        }
    }
}

/// Whether a listing asked for is in JSON rather than HTML.
fn wants_json(headers: &HeaderMap) -> bool {
    headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).is_some_and(|a| a.contains("json"))
}

/// The `ETag` of the listing of the collection `hash` that `headers` ask for (by `Accept`).
fn listing_etag(hash: Hash, headers: &HeaderMap) -> String {
    if wants_json(headers) { format!("\"{hash}.json\"") } else { format!("\"{hash}.html\"") }
}

fn listing(hash: Hash, c: &Collection, headers: &HeaderMap) -> Response {
    let etag = listing_etag(hash, headers);
    if wants_json(headers) {
        let entries: Vec<_> = c
            .entries()
            .iter()
            .map(|e| serde_json::json!({ "path": e.path, "hash": e.hash.to_string(), "size": e.size }))
            .collect();
        let body = serde_json::json!({ "collection": hash.to_string(), "entries": entries }).to_string();
        return ([(header::CONTENT_TYPE, "application/json".to_string()), (header::ETAG, etag)], LISTING, body)
            .into_response();
    }
    let esc = |s: &str| s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;");
    let mut html = format!(
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{hash}</title></head><body>\n<h1>Collection {}</h1>\n<ul>\n",
        hash.short()
    );
    for e in c.entries() {
        // Relative links work under both /<hash> and /v1/blobs/<hash>.
        let href: String = e.path.split('/').map(percent_encode).collect::<Vec<_>>().join("/");
        html.push_str(&format!("<li><a href=\"{hash}/{}\">{}</a> {} bytes</li>\n", esc(&href), esc(&e.path), e.size));
    }
    html.push_str("</ul></body></html>\n");
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8".to_string()), (header::ETAG, etag)], LISTING, html)
        .into_response()
}

/// The listing of the collection `hash`, built on a blocking thread in a place of
/// [`READING_WHOLE`] (that of a large collection takes a while, and many times the collection's
/// memory): the place it was decoded in, if this request decoded it. Counted as a cache hit or a
/// miss already, as the blob `serve` looked at.
async fn list(node: &NodeHandle, hash: Hash, public: bool, headers: HeaderMap) -> Result<Response, Box<Response>> {
    match decoded(node, hash, public, false).await? {
        (Ok(c), place) => list_in(node, hash, c, headers, place).await,
        (Err(e), _) => Err(Box::new(error(StatusCode::BAD_GATEWAY, format!("{hash}: {e}")))),
    }
}

/// The listing of `c`, the collection `hash`, built in `place`, or in a place waited for.
async fn list_in(
    node: &NodeHandle,
    hash: Hash,
    c: Arc<Collection>,
    headers: HeaderMap,
    place: Option<Permit>,
) -> Result<Response, Box<Response>> {
    let place = match place {
        Some(place) => place,
        None => reading_place(node).await?,
    };
    in_place(place, move || listing(hash, &c, &headers)).await
}

/// Headers of a collection's listing, and of its own bytes: the same URL answers either by
/// `Accept`, and a shared cache must keep them apart.
const LISTING: [(header::HeaderName, &str); 1] = [(header::VARY, "Accept")];

/// Every answer of the API and the gateway (a layer on both): a browser takes the content type
/// given, and does not guess one that runs.
pub(crate) async fn nosniff(mut response: Response) -> Response {
    response.headers_mut().insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    response
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Answers `GET` or `HEAD` for `hash_str`, or for the entry at `path` of that collection.
///
/// A blob not held is fetched whole however the answer ends, as a CDN edge's miss fills its
/// cache, unless `while_read`: then a fetch the answer started stops when the answer ends (its
/// reader went away, or read all it asked for), as `shoal get -o -` stopped by its user expects.
pub(crate) async fn serve(
    node: NodeHandle,
    method: Method,
    hash_str: &str,
    path: Option<&str>,
    headers: &HeaderMap,
    (while_read, public): (bool, bool),
) -> Response {
    let hash: Hash = match hash_str.parse() {
        Ok(h) => h,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("{hash_str:?} is not a content id: {e}")),
    };
    let mut type_from_entry = None;
    let hash = match path {
        None => hash,
        Some(p) => {
            let p = p.trim_end_matches('/');
            match decoded(&node, hash, public, true).await.map(|(c, _place)| c) {
                Ok(Ok(c)) => match c.get(p) {
                    Some(entry) => {
                        type_from_entry = by_extension(p);
                        entry.hash
                    }
                    None => return error(StatusCode::NOT_FOUND, format!("collection {hash} has no entry {p:?}")),
                },
                Ok(Err(e)) => return error(StatusCode::NOT_FOUND, format!("{hash} is not a collection: {e}")),
                Err(resp) => return *resp,
            }
        }
    };
    let etag = format!("\"{hash}\"");
    // The listing asked for: a client holding the HTML one is not told its JSON one is unchanged.
    let listed = (path.is_none() && !wants_raw(headers)).then(|| listing_etag(hash, headers));
    if let Some(inm) = headers.get(header::IF_NONE_MATCH).and_then(|v| v.to_str().ok())
        && let Some(matched) = not_modified(&node, hash, inm, &etag, listed.as_deref()).await
    {
        return (StatusCode::NOT_MODIFIED, [(header::ETAG, matched)]).into_response();
    }
    // A collection kept decoded is listed from what was kept: its bytes may have left the cache,
    // and its providers the swarm, while its paths still answer.
    if listed.is_some()
        && let Some(Found::Kept(Ok(c))) = node.inner.collections.find(hash)
    {
        node.inner.metrics.cache_hits.inc();
        node.inner.store.touch(hash);
        return list_in(&node, hash, c, headers.clone(), None).await.unwrap_or_else(|resp| *resp);
    }
    // Held (even partly)? Otherwise start fetching and wait for the size, within the lookup deadline.
    let leads = !crate::fetch::is_under_way(&node, hash);
    let mut fetching = ensure_fetching(&node, hash, public, true);
    let stop_with_answer = fetching.as_ref().filter(|_| while_read).map(|f| crate::node::Aborted(f.abort_handle()));
    let size = match known_size(&node, hash, &mut fetching, (public, leads)).await {
        Ok(size) => size,
        Err(resp) => return *resp,
    };
    let Ok(geometry) = Geometry::new(size) else {
        return error(StatusCode::INTERNAL_SERVER_ERROR, "blob too large");
    };
    let range = match parse_range(headers.get(header::RANGE), size) {
        Ok(r) => r,
        Err(()) => {
            return (StatusCode::RANGE_NOT_SATISFIABLE, [(header::CONTENT_RANGE, format!("bytes */{size}"))])
                .into_response();
        }
    };
    let (start, end_inclusive) = range.unwrap_or((0, size.saturating_sub(1)));
    let len = if size == 0 { 0 } else { end_inclusive - start + 1 };
    // A blob still arriving is fetched from where this answer reads on first (and its first
    // piece, for the content type), not in the fetch's rarest-first order: a range asked for
    // near a large blob's end (a player seeking) waits for its own pieces, not the blob's.
    let (first, last) = (geometry.piece_of(start), geometry.piece_of(end_inclusive));
    let sniffing = fetching.as_ref().map(|_| Reading::new(&node, hash));
    if let Some(sniffing) = &sniffing {
        sniffing.wants(0..1);
    }
    let reading = (fetching.is_some() && method != Method::HEAD && len > 0).then(|| Reading::new(&node, hash));
    if let Some(reading) = &reading {
        reading.wants(first..last + 1);
    }
    // A `HEAD` of a blob still arriving answers with a size a cache may keep for good (it is
    // `immutable`): one the last piece proves, not a peer's claim. So does an answer of no bytes
    // (a claim of an empty blob proves nothing either). A body is cut short if the claim fails.
    let proving = (fetching.is_some() && (method == Method::HEAD || len == 0)).then(|| Reading::new(&node, hash));
    if let Some(proving) = &proving {
        proving.wants(geometry.last_piece()..geometry.last_piece() + 1);
    }

    // The content type comes from the collection entry, or from the first piece once verified.
    let mut is_collection = false;
    let content_type = if size == 0 {
        "application/octet-stream"
    } else {
        match wait_piece(&node, hash, 0, &fetching, &mut None).await {
            Ok(first) => {
                is_collection = path.is_none() && Collection::is_collection(&first);
                if is_collection && !wants_raw(headers) {
                    return list(&node, hash, public, headers.clone()).await.unwrap_or_else(|resp| *resp);
                }
                type_from_entry.unwrap_or_else(|| sniff(&first[..first.len().min(SNIFF_LEN)]))
            }
            Err(resp) => return *resp,
        }
    };
    drop(sniffing);
    if proving.is_some() {
        if let Err(resp) = wait_held(&node, hash, geometry.last_piece(), &fetching, Some(size)).await {
            return *resp;
        }
        drop(proving);
    }
    let mut out = Response::builder()
        .status(if range.is_some() { StatusCode::PARTIAL_CONTENT } else { StatusCode::OK })
        .header(header::ETAG, etag)
        .header(header::CACHE_CONTROL, "public, max-age=31536000, immutable")
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::CONTENT_TYPE, content_type)
        .header(header::CONTENT_LENGTH, len.to_string());
    if runs_in_browser(content_type) {
        out = out.header(header::CONTENT_SECURITY_POLICY, SANDBOX);
    }
    if is_collection {
        out = out.header(header::VARY, "Accept");
    }
    if range.is_some() {
        out = out.header(header::CONTENT_RANGE, format!("bytes {start}-{end_inclusive}/{size}"));
    }
    if method == Method::HEAD || len == 0 {
        return out.body(Body::empty()).unwrap_or_else(|_| error(StatusCode::INTERNAL_SERVER_ERROR, "response"));
    }
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    tokio::spawn(async move {
        let _stop_with_answer = stop_with_answer;
        let mut reader: Option<shoal_cache::BlobReader> = None;
        // When the store let go of the blob this answer reads (an eviction): its files, and their
        // room on disk, are held for a while only.
        let mut left_at: Option<tokio::time::Instant> = None;
        for piece in first..=last {
            if let Some(reading) = &reading {
                reading.wants(piece..last + 1);
            }
            // A client that went while the piece is awaited ends the answer now, not at the next
            // send: the fetch serves its readers first, and `while-read` stops it with the answer.
            let waited = tokio::select! {
                waited = wait_piece(&node, hash, piece, &fetching, &mut reader) => waited,
                () = tx.closed() => return,
            };
            let item = match waited {
                // The size the answer announced may have been a peer's claim that did not hold,
                // and the entry given way to the blob's true size: a piece of that one is cut
                // from another geometry, and the answer would end early yet look whole. The piece
                // is the reader's entry's (the store's may have left since).
                Ok(_) if reader.as_ref().map(|r: &shoal_cache::BlobReader| r.size()) != Some(size) => {
                    Err(std::io::Error::other("the blob's size changed; aborting the body"))
                }
                Ok(bytes) => {
                    let pr = geometry.piece_bytes(piece);
                    let from = (start.max(pr.start) - pr.start) as usize;
                    let to = ((end_inclusive + 1).min(pr.end) - pr.start) as usize;
                    match bytes.get(from..to) {
                        Some(_) => Ok(bytes.slice(from..to)),
                        None => Err(std::io::Error::other("a piece shorter than its place; aborting the body")),
                    }
                }
                Err(_) => Err(std::io::Error::other("piece could not be verified; aborting the body")),
            };
            match reader.as_ref().map(|r| r.is_current()) {
                Some(false) if left_at.get_or_insert_with(tokio::time::Instant::now).elapsed() > HOLD_EVICTED => {
                    reader = None;
                }
                Some(true) => left_at = None,
                _ => {}
            }
            let failed = item.is_err();
            // A client that stops reading holds the blob's files (and, once it is evicted, its
            // room on disk) for a while only: then the reader goes, and the next piece opens them
            // again (from the store, if it still holds the blob).
            let mut send = std::pin::pin!(tx.send(item));
            match tokio::time::timeout(HOLD_FOR_A_CLIENT, &mut send).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return,
                Err(_) => {
                    reader = None;
                    if send.await.is_err() {
                        return;
                    }
                }
            }
            if failed {
                return;
            }
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) });
    out.body(Body::from_stream(stream)).unwrap_or_else(|_| error(StatusCode::INTERNAL_SERVER_ERROR, "response"))
}

/// The tag an `If-None-Match` of `inm` matches, if it matches one: the blob's own `etag`, or the
/// `listed` one of the listing a collection would be answered with. Where the listing would be
/// the answer (`listed`), the blob's own tag, or `*`, stands for the blob's own bytes only if its
/// first piece, held, shows it is no collection: a shared cache holding a collection's own bytes
/// must not be told they are what a browser gets. Without the first piece, no 304.
async fn not_modified(node: &NodeHandle, hash: Hash, inm: &str, etag: &str, listed: Option<&str>) -> Option<String> {
    let tags: Vec<&str> = inm.split(',').map(str::trim).collect();
    let names = |wanted: &str| tags.iter().any(|t| t.trim_start_matches("W/") == wanted);
    // A listing's tag names a collection, whose listing never changes: no need to read it.
    if let Some(listed) = listed.filter(|l| names(l)) {
        return Some(listed.to_owned());
    }
    // `*` matches any representation there is: only a blob held whole is surely there.
    let any = tags.contains(&"*") && node.store().info(hash).is_some_and(|i| i.is_complete());
    if !names(etag) && !any {
        return None;
    }
    let Some(listed) = listed else { return Some(etag.to_owned()) };
    match first_piece_is_collection(node, hash).await {
        Some(true) => any.then(|| listed.to_owned()),
        Some(false) => Some(etag.to_owned()),
        // Not known without the first piece (not held, or gone as it was read): answered in
        // full, which reads it.
        None => None,
    }
}

/// Whether the blob's first piece, if the store holds it verified, starts a collection.
async fn first_piece_is_collection(node: &NodeHandle, hash: Hash) -> Option<bool> {
    if !node.store().holds(hash, 0)?.0 {
        return None;
    }
    let store = node.store().clone();
    let first = tokio::task::spawn_blocking(move || store.reader(hash)?.read_piece(0)).await.ok()?.ok()?;
    Some(Collection::is_collection(&first))
}

/// How long an answer keeps the blob's files open while its client takes no bytes.
const HOLD_FOR_A_CLIENT: Duration = Duration::from_secs(10);

/// How long an answer reads on from the files of a blob the store let go of (evicted, or
/// removed), from when it first finds it gone: their room on disk, which the store no longer
/// counts, is held as long, and a send its client is slow to take ([`HOLD_FOR_A_CLIENT`]) more.
/// A body still going then is cut short, as when the blob is gone.
const HOLD_EVICTED: Duration = Duration::from_secs(30);

/// Waits until `piece` is verified in the store (the fetch may still be running), then reads it,
/// re-verified. Fails if the fetch ends without it or the read fails verification. An answer
/// keeps its `reader` from piece to piece: it holds the blob's files, so that an eviction meanwhile
/// (the cache making room for another blob) does not cut the body short at once (see
/// [`HOLD_EVICTED`]).
async fn wait_piece(
    node: &NodeHandle,
    hash: Hash,
    piece: u32,
    fetching: &Option<tokio::task::JoinHandle<Result<shoal_cache::BlobInfo, crate::NodeError>>>,
    reader: &mut Option<shoal_cache::BlobReader>,
) -> Result<Bytes, Box<Response>> {
    // A blob this answer reads already: read on from the files it holds, evicted or not (the
    // answer lets go of an evicted blob's in time). A reader that lacks the piece (not verified
    // yet, or its entry left the store) is not held while the piece is waited for.
    let held = reader.take().filter(|r| r.holds(piece));
    if held.is_none() {
        wait_held(node, hash, piece, fetching, None).await?;
    }
    let s = node.store().clone();
    let read = tokio::task::spawn_blocking(move || {
        let r = match held {
            Some(r) => r,
            None => s.reader(hash)?,
        };
        r.read_piece(piece).map(|bytes| (r, bytes))
    });
    match read.await {
        Ok(Ok((r, bytes))) => {
            *reader = Some(r);
            Ok(bytes)
        }
        Ok(Err(e)) => {
            let (status, say) = read_failed(hash, piece, e);
            Err(Box::new(error(status, say)))
        }
        Err(e) => Err(Box::new(task_ended(e, "read"))),
    }
}

/// What a client is told of a read of `piece` of `hash`, held, that failed.
fn read_failed(hash: Hash, piece: u32, e: shoal_cache::StoreError) -> (StatusCode, String) {
    use shoal_cache::StoreError;
    match e {
        // Dropped from the store, and fetched again by the next request for it.
        StoreError::Corrupt { .. } => (StatusCode::BAD_GATEWAY, format!("piece {piece} of {hash} failed verification")),
        StoreError::NotFound { .. } | StoreError::Incomplete { .. } => {
            (StatusCode::SERVICE_UNAVAILABLE, format!("{hash} left the cache as it was read; ask again"))
        }
        e => (StatusCode::INTERNAL_SERVER_ERROR, format!("cannot read {hash}: {e}")),
    }
}

/// Waits until the store holds `piece` of `hash` verified (the fetch may still be running).
/// Fails if the fetch ends without it, or if no piece of the blob arrives for the lookup deadline;
/// with a `size`, also once the store holds the blob at another size (a claim that failed) or not
/// at all, and the piece held must be of a blob of that size.
async fn wait_held(
    node: &NodeHandle,
    hash: Hash,
    piece: u32,
    fetching: &Option<tokio::task::JoinHandle<Result<shoal_cache::BlobInfo, crate::NodeError>>>,
    size: Option<u64>,
) -> Result<(), Box<Response>> {
    let store = node.store();
    let stall = node.config().lookup_wait();
    let mut last_change = tokio::time::Instant::now();
    let mut last_count = 0;
    loop {
        let holds = store.holds(hash, piece);
        // Checked after `holds`: an entry that gave way meanwhile is of another size, seen here.
        if let Some(size) = size {
            match store.size(hash) {
                Some(held) if held == size => {}
                Some(_) => {
                    let say = format!("{hash}: the size a peer claimed did not hold; ask again");
                    return Err(Box::new(error(StatusCode::BAD_GATEWAY, say)));
                }
                // A claim that failed leaves no entry (the fetch removes an empty one), as does
                // an eviction.
                None => {
                    let say = format!("{hash}: the size claimed did not hold, or the blob left the cache; ask again");
                    return Err(Box::new(error(StatusCode::SERVICE_UNAVAILABLE, say)));
                }
            }
        }
        if holds.is_some_and(|(has, _)| has) {
            return Ok(());
        }
        if let Some((_, count)) = holds
            && count != last_count
        {
            last_count = count;
            last_change = tokio::time::Instant::now();
        }
        let fetch_over = fetching.as_ref().is_none_or(|f| f.is_finished());
        if (fetch_over && store.holds(hash, piece).is_none_or(|(has, _)| !has)) || last_change.elapsed() > stall {
            return Err(Box::new(error(
                StatusCode::BAD_GATEWAY,
                format!("the fetch of {hash} stopped before piece {piece}"),
            )));
        }
        tokio::time::sleep(PIECE_POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hv(s: &str) -> HeaderValue {
        HeaderValue::from_str(s).expect("header")
    }

    #[test]
    fn collections_kept_decoded_stay_within_their_bound_the_least_used_going_first() {
        let collection = |n: usize| {
            let entries = (0..n)
                .map(|i| shoal_protocol::collection::Entry {
                    path: format!("file-{i:04}"),
                    hash: Hash::of(&i.to_le_bytes()),
                    size: i as u64,
                })
                .collect();
            let c = Collection::new(entries).expect("collection");
            let cost = decoded_cost(&c);
            (Hash::of(&c.encode()), Arc::new(c), cost)
        };
        let (a, b, c, big) = (collection(100), collection(200), collection(300), collection(2_000));
        // Room for a and b, or for a and c, not for all three.
        let kept = Arc::new(Collections::new(a.2 + c.2));
        let bytes = || kept.lock().bytes;
        let get = |hash| match kept.find(hash) {
            Some(Found::Kept(Ok(c))) => Some(c),
            _ => None,
        };
        let begin = |hash| kept.begin(hash).map_err(|_| "kept or being decoded").expect("begin");
        // Kept as a request keeps it: a decode begun, and ended with it.
        let keep = |hash, c: &Arc<Collection>| begin(hash).end(Ok(Ok(c.clone())));
        assert!(a.2 + b.2 <= kept.bound && a.2 + b.2 + c.2 > kept.bound);
        keep(a.0, &a.1);
        keep(b.0, &b.1);
        assert_eq!(get(a.0).as_deref(), Some(&*a.1), "a, used last, stays");
        keep(c.0, &c.1);
        assert!(get(b.0).is_none(), "b, the least recently used, went");
        assert!(get(a.0).is_some() && get(c.0).is_some());
        assert!(bytes() <= kept.bound);
        // Kept, a collection is not decoded again.
        assert!(matches!(kept.begin(a.0), Err(Found::Kept(_))));
        // One larger than the bound is not kept, and takes nothing from the rest.
        assert!(big.2 > kept.bound);
        keep(big.0, &big.1);
        assert!(get(big.0).is_none() && get(a.0).is_some() && get(c.0).is_some());
        assert_eq!(bytes(), a.2 + c.2);
        // One the user removed is forgotten, and its room given back.
        kept.forget(a.0);
        assert!(get(a.0).is_none() && get(c.0).is_some());
        assert_eq!(bytes(), c.2);
        // Removed by the user while it is decoded, it is not kept when the decode ends; a decode
        // begun after it is.
        let mut first = begin(b.0);
        kept.forget(b.0);
        let mut again = begin(b.0);
        first.end(Ok(Ok(b.1.clone())));
        drop(first);
        assert!(matches!(kept.find(b.0), Some(Found::Decoding(_))), "the later decode is still under way");
        again.end(Ok(Ok(b.1.clone())));
        drop(again);
        assert!(get(b.0).is_some());
        assert!(kept.lock().under_way.is_empty());
    }

    /// A request waiting for the decode of `hash` under way, parked on it.
    async fn waiting(collections: &Collections, hash: Hash) -> tokio::task::JoinHandle<Result<Entries, Box<Response>>> {
        let Some(Found::Decoding(answer)) = collections.find(hash) else { panic!("no decode under way") };
        let waiting = tokio::spawn(answered(answer));
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "answered before the decode ended");
        waiting
    }

    #[tokio::test]
    async fn a_decode_under_way_answers_every_request_waiting_for_it_however_it_ends() {
        let c = Arc::new(Collection::new(Vec::new()).expect("collection"));
        let hash = Hash::of(&c.encode());
        let collections = Arc::new(Collections::new(COLLECTIONS_KEPT));
        let status = |answer: Result<_, Box<Response>>| answer.err().map(|r| r.status());

        // Decoded: the requests waiting are told, and the collection is kept.
        let mut under_way = collections.begin(hash).map_err(|_| "found").expect("begin");
        assert!(matches!(collections.begin(hash), Err(Found::Decoding(_))), "one decode at a time");
        let (first, second) = (waiting(&collections, hash).await, waiting(&collections, hash).await);
        under_way.end(Ok(Ok(c.clone())));
        drop(under_way);
        for w in [first, second] {
            assert_eq!(w.await.expect("waiter").expect("answered").expect("decoded"), c);
        }
        assert!(matches!(collections.find(hash), Some(Found::Kept(_))));
        collections.forget(hash);

        // Not a collection after all: told so, and kept so (its bytes decode the same way every
        // time); or not read (no place in time, or gone from the cache): told why, nothing kept.
        for outcome in [Ok(Err(CollectionError::NotACollection)), Err((StatusCode::SERVICE_UNAVAILABLE, "left".into()))]
        {
            let mut under_way = collections.begin(hash).map_err(|_| "found").expect("begin");
            let w = waiting(&collections, hash).await;
            under_way.end(outcome.clone());
            drop(under_way);
            match (w.await.expect("waiter"), outcome) {
                (Ok(told), Ok(decoded)) => {
                    assert_eq!(told, decoded);
                    let Some(Found::Kept(kept)) = collections.find(hash) else { panic!("not kept") };
                    assert_eq!(kept, decoded);
                    assert!(matches!(collections.begin(hash), Err(Found::Kept(Err(_)))), "not read again");
                    collections.forget(hash);
                }
                (Err(told), Err((status, _))) => assert_eq!(told.status(), status),
                _ => panic!("told otherwise than what the decode came to"),
            }
            assert!(collections.find(hash).is_none());
        }

        // Its task dropped before it ended (as the node stops): 503.
        let under_way = collections.begin(hash).map_err(|_| "found").expect("begin");
        let w = waiting(&collections, hash).await;
        let task = tokio::spawn(async move {
            let _under_way = under_way;
            std::future::pending::<()>().await
        });
        tokio::task::yield_now().await;
        task.abort();
        assert_eq!(status(w.await.expect("waiter").map(|_| ())), Some(StatusCode::SERVICE_UNAVAILABLE));
        assert!(collections.find(hash).is_none());

        // A decode that panics: 500, and no longer under way.
        let under_way = collections.begin(hash).map_err(|_| "found").expect("begin");
        let w = waiting(&collections, hash).await;
        let panicked = std::thread::spawn(move || {
            let _under_way = under_way;
            panic!("a decode that panics (expected by the test)");
        })
        .join();
        assert!(panicked.is_err());
        assert_eq!(status(w.await.expect("waiter").map(|_| ())), Some(StatusCode::INTERNAL_SERVER_ERROR));
        assert!(collections.find(hash).is_none() && collections.lock().under_way.is_empty());
    }

    /// Waits (within 10 s) until `hash` is being decoded, or no longer is.
    async fn until_decoding(collections: &Collections, hash: Hash, decoding: bool) {
        let looked = async {
            while matches!(collections.find(hash), Some(Found::Decoding(_))) != decoding {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), looked).await.expect("the decode began, or ended");
    }

    /// Takes and counts the places of [`READING_WHOLE`], a static: no other test in this binary
    /// may read a collection through the gateway.
    #[tokio::test]
    async fn a_decode_waits_for_a_place_while_someone_wants_it_and_hands_its_place_to_its_request() {
        let tmp = tempfile::tempdir().expect("tempdir");
        // Lookups (and waits for a place) that do not end within the test.
        let node = crate::lone_node(&tmp.path().join("node"), Duration::from_secs(600)).await;
        let handle = node.handle();
        let entry = shoal_protocol::collection::Entry { path: "a.txt".into(), hash: Hash::of(b"a"), size: 1 };
        let c = Collection::new(vec![entry]).expect("collection");
        std::fs::write(tmp.path().join("collection"), c.encode()).expect("write");
        let hash = handle.add_path(&tmp.path().join("collection")).await.expect("add").hash;
        let collections = &handle.inner.collections;
        let decode = |handle: &NodeHandle| {
            let handle = handle.clone();
            tokio::spawn(
                async move { decoded(&handle, hash, false, true).await.map(|(c, place)| (c, place.is_some())) },
            )
        };

        // Every place taken (as by other collections being read): the decode waits for one.
        let taken: Vec<_> = (0..4).map(|_| READING_WHOLE.try_acquire().expect("a place")).collect();
        let first = decode(&handle);
        until_decoding(collections, hash, true).await;
        let second = decode(&handle);
        tokio::time::sleep(Duration::from_millis(50)).await;
        // The request that began it leaves; the one waiting still wants it.
        first.abort();
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        assert!(matches!(collections.find(hash), Some(Found::Decoding(_))), "a request still waits for it");
        drop(taken);
        let (got, place) = second.await.expect("request").expect("answered");
        assert_eq!(got.expect("decoded").as_ref(), &c);
        assert!(!place, "a request that waited is handed no place");
        assert!(matches!(collections.find(hash), Some(Found::Kept(_))));

        // Nobody left to answer: the decode is no longer under way, though no place came.
        collections.forget(hash);
        // (The decode gives its place back just after it answered.)
        let places_back = async {
            while READING_WHOLE.available_permits() < 4 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), places_back).await.expect("places given back");
        let taken: Vec<_> = (0..4).map(|_| READING_WHOLE.try_acquire().expect("a place")).collect();
        let alone = decode(&handle);
        until_decoding(collections, hash, true).await;
        alone.abort();
        until_decoding(collections, hash, false).await;
        assert!(collections.find(hash).is_none() && collections.lock().under_way.is_empty());
        drop(taken);

        // The request that decodes is handed the place it decoded in (for its listing).
        let (got, place) = decode(&handle).await.expect("request").expect("answered");
        assert!(got.is_ok() && place, "the place it decoded in");
        assert_eq!(READING_WHOLE.available_permits(), 4, "given back with the request");
        node.shutdown().await.expect("shutdown");
    }

    #[test]
    fn ranges_at_the_edges() {
        assert_eq!(parse_range(None, 10), Ok(None));
        assert_eq!(parse_range(Some(&hv("bytes=0-0")), 10), Ok(Some((0, 0))));
        assert_eq!(parse_range(Some(&hv("bytes=0-")), 10), Ok(Some((0, 9))));
        assert_eq!(parse_range(Some(&hv("bytes=9-")), 10), Ok(Some((9, 9))));
        assert_eq!(parse_range(Some(&hv("bytes=5-100")), 10), Ok(Some((5, 9))));
        assert_eq!(parse_range(Some(&hv("bytes=-3")), 10), Ok(Some((7, 9))));
        assert_eq!(parse_range(Some(&hv("bytes=-30")), 10), Ok(Some((0, 9))));
        assert_eq!(parse_range(Some(&hv("bytes=10-")), 10), Err(()));
        assert_eq!(parse_range(Some(&hv("bytes=5-4")), 10), Err(()));
        assert_eq!(parse_range(Some(&hv("bytes=-0")), 10), Err(()));
        assert_eq!(parse_range(Some(&hv("bytes=0-1,3-4")), 10), Ok(None), "several ranges: the whole blob");
        assert_eq!(parse_range(Some(&hv("items=0-1")), 10), Ok(None), "another unit: ignored");
        assert_eq!(parse_range(Some(&hv("bytes=abc")), 10), Err(()));
        assert_eq!(parse_range(Some(&hv("bytes=0-")), 0), Err(()));
        // An empty blob has no byte to give, whichever way the range is put.
        assert_eq!(parse_range(Some(&hv("bytes=0-0")), 0), Err(()));
        assert_eq!(parse_range(Some(&hv("bytes=-1")), 0), Err(()));
    }

    /// A gateway client that leaves before the blob's size is known stops the fetch its request
    /// started, as the lookup deadline would: it holds one of the few the gateway may run.
    #[tokio::test]
    async fn a_fetch_for_a_client_that_left_before_the_size_was_known_stops() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let node = crate::lone_node(tmp.path(), Duration::from_secs(600)).await;
        let handle = node.handle();
        let hash = Hash::of(b"nobody has this");
        for public in [false, true] {
            // A fetch that finds nothing for as long as it runs.
            let mut fetching = Some(tokio::spawn(std::future::pending()));
            let answer = known_size(&handle, hash, &mut fetching, (public, true));
            assert!(tokio::time::timeout(Duration::from_millis(200), answer).await.is_err(), "the client left");
            let fetch = fetching.take().expect("still the caller's");
            let ended = tokio::time::timeout(Duration::from_secs(if public { 10 } else { 1 }), fetch).await;
            match public {
                true => assert!(ended.expect("stopped").expect_err("aborted").is_cancelled()),
                // The owner's own fetches (the API's) go on.
                false => assert!(ended.is_err(), "{ended:?}"),
            }
        }
        node.shutdown().await.expect("shutdown");
    }

    #[test]
    fn sniffs_common_types() {
        assert_eq!(sniff(b"\x89PNG\r\n\x1a\n...."), "image/png");
        assert_eq!(sniff(b"hello"), "text/plain; charset=utf-8");
        assert_eq!(sniff(&[0, 1, 2, 0xff]), "application/octet-stream");
        // The first 512 bytes of a text may end inside a character.
        let text = "é".repeat(300);
        assert_eq!(sniff(&text.as_bytes()[..SNIFF_LEN - 1]), "application/octet-stream", "the whole blob, cut short");
        let cut = format!("a{text}");
        assert_eq!(sniff(&cut.as_bytes()[..SNIFF_LEN]), "text/plain; charset=utf-8", "cut by the sniffer");
        assert_eq!(sniff(b"ok\xff and then more"), "application/octet-stream", "not UTF-8 before its end");
    }
}
