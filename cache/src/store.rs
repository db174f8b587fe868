//! The piece store on disk.
//!
//! ```text
//! <root>/blobs/<hash>/data       the blob's bytes (sparse while partial)
//! <root>/blobs/<hash>/outboard   the bao-tree post-order outboard (hash pairs of 16 KiB groups)
//! <root>/blobs/<hash>/meta       size, pinned flag, bitmap of durable verified pieces (postcard)
//! <root>/tmp/                    imports in progress and directories being deleted
//! <root>/aside/                  blob directories this version could not use, moved at open
//! ```
//!
//! Invariants:
//! - Only bytes that passed BLAKE3 verification are written to `data` (the decoder writes a chunk
//!   group after checking it), and only verified bytes are served (the encoder re-checks them).
//! - `meta` is replaced atomically (temp file, fsync, rename, fsync directory), and names a piece
//!   only after `data` and `outboard` were fsynced with that piece in them. A crash loses at most
//!   the pieces verified since the last flush; it never leaves an unverified piece marked verified.
//! - A blob directory appears under `blobs/` by rename, complete (imports) or with a meta that
//!   describes it (network fetches); it leaves by rename into `tmp/` before it is deleted.
//! - Unpinned blobs are bounded by the LRU's capacity, counting each blob's footprint on disk
//!   (data, outboard, its meta's bitmap, and 16 KiB for its directory, meta and files' last
//!   blocks): a whole blob's in full, a partial one's for the pieces verified ([`charge`]; its
//!   files are sparse), grown as they are; pinned blobs are the user's own and are not counted.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use shoal_protocol::piece::{CHUNK_GROUP_SIZE, PIECE_SIZE};
use shoal_protocol::verify::{self, DecodeError, EncodeError};
use shoal_protocol::{Geometry, Hash, PieceIndex, PieceSet};
use tracing::{debug, info, warn};

use crate::hot::HotPieces;
use crate::lru::ByteLru;

/// How a [`Store`] is sized.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// The most bytes of unpinned (cached) blobs kept on disk, data and outboards together, and
    /// each blob's bitmap of pieces and 16 KiB for its directory and meta (a partial blob is
    /// counted for the pieces it holds). The default is 10 GiB.
    pub cache_bytes: u64,
    /// The most bytes of hot pieces kept in memory, counting 256 bytes for each piece's entry
    /// besides its bytes. The default is 64 MiB.
    pub hot_bytes: usize,
    /// Verified bytes written to a blob before they are made durable and marked in its meta.
    /// Larger batches mean fewer fsyncs and more re-fetching after a crash. The default is 32 MiB.
    pub flush_bytes: u64,
    /// Whether writes are made durable (fsync) before they are marked in a blob's meta. Turn it
    /// off only for stores that may be lost whole (tests, simulations). The default is `true`.
    pub durable: bool,
    /// The most blobs whose files (two each) are held open between reads and writes; a blob
    /// used least recently gives its files back, and opens them again when next used. An answer
    /// being sent keeps its blob's files open until it ends, so a node's uploads add to this.
    /// The default is 1,024 (2,048 file descriptors); at least 1.
    pub open_blobs: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self { cache_bytes: 10 << 30, hot_bytes: 64 << 20, flush_bytes: 32 << 20, durable: true, open_blobs: 1024 }
    }
}

/// What went wrong in the store. Failures of the local disk, never of a peer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// An operating-system call failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The blob is not in the store.
    #[error("blob {hash} is not in the store")]
    NotFound {
        /// The blob.
        hash: Hash,
    },
    /// An unpinned blob larger than the whole cache.
    #[error("blob {hash} needs {bytes} bytes, more than the {capacity}-byte cache; raise --cache-size")]
    TooLarge {
        /// The blob.
        hash: Hash,
        /// Its footprint on disk.
        bytes: u64,
        /// The cache bound.
        capacity: u64,
    },
    /// A blob larger than Shoal handles at all.
    #[error(transparent)]
    BlobTooLarge(#[from] shoal_protocol::piece::TooLarge),
    /// A blob of a size no proof backs yet that would need other blobs evicted to fit (see
    /// [`Store::begin_unproven`]).
    #[error("blob {hash} would need {bytes} bytes, more than the {free} the cache has free, for a size not yet proven")]
    NoRoom {
        /// The blob.
        hash: Hash,
        /// Its footprint on disk.
        bytes: u64,
        /// What the cache has free.
        free: u64,
    },
    /// A size that disagrees with the size already known for the blob.
    #[error("blob {hash} has {known} bytes, not {claimed}")]
    SizeMismatch {
        /// The blob.
        hash: Hash,
        /// The size the store holds.
        known: u64,
        /// The size given.
        claimed: u64,
    },
    /// The operation needs the whole blob.
    #[error("blob {hash} is incomplete: {have} of {total} pieces are verified")]
    Incomplete {
        /// The blob.
        hash: Hash,
        /// Verified pieces.
        have: u32,
        /// All pieces.
        total: u32,
    },
    /// Bytes on disk no longer match their hash (bit rot, or someone edited the files). The bad
    /// pieces were unmarked and will be fetched again.
    #[error("stored bytes of {hash} failed verification in piece {piece}; the piece was dropped")]
    Corrupt {
        /// The blob.
        hash: Hash,
        /// The first bad piece.
        piece: PieceIndex,
    },
    /// What was given to import is not a regular file (a pipe, a socket, a device).
    #[error("{path} is not a regular file; shoal adds files and directories")]
    NotAFile {
        /// The path given.
        path: PathBuf,
    },
    /// A file being imported was written while it was read.
    #[error("{path} changed while it was being imported; try again")]
    ChangedDuringImport {
        /// The file.
        path: PathBuf,
    },
    /// An import was told to stop before it was read whole (its node is stopping): nothing of it
    /// was kept.
    #[error("the import of {path} was stopped before it was read whole")]
    ImportStopped {
        /// The file.
        path: PathBuf,
    },
    /// Another process has the store open (another node on the same data directory).
    #[error("the store at {path} is in use by another process: is a node already running on this data directory?")]
    InUse {
        /// The store's directory.
        path: PathBuf,
    },
}

type Result<T, E = StoreError> = std::result::Result<T, E>;

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |source| StoreError::Io { op, path: path.to_owned(), source }
}

/// The result of an import.
#[derive(Debug, Clone)]
pub struct Imported {
    /// The blob's content id.
    pub hash: Hash,
    /// Its size in bytes.
    pub size: u64,
    /// Blobs the cache evicted to make room: withdraw their provider records.
    pub evicted: Vec<Hash>,
    /// Whether this import pinned a blob the store did not hold pinned before (decided under
    /// the store's lock, with the pin).
    pub newly_pinned: bool,
}

/// The result of [`Store::begin`].
#[derive(Debug, Clone)]
pub struct Begun {
    /// Pieces already verified (a resumed fetch skips them).
    pub have: PieceSet,
    /// Blobs the cache evicted to make room: withdraw their provider records.
    pub evicted: Vec<Hash>,
}

/// The result of [`Store::write_pieces`].
#[derive(Debug)]
pub struct Written {
    /// Pieces of the response that verified and are now in the store.
    pub verified: PieceSet,
    /// Why the response stopped early: [`DecodeError::is_peer_fault`] tells whether the sender
    /// is to blame.
    pub error: Option<DecodeError>,
    /// Blobs the cache evicted to make room for the pieces: withdraw their provider records.
    pub evicted: Vec<Hash>,
}

/// The result of [`Store::store_pieces`].
#[derive(Debug)]
pub struct Stored {
    /// The pieces stored, and those of them held already.
    pub pieces: PieceSet,
    /// Blobs the cache evicted to make room for them: withdraw their provider records.
    pub evicted: Vec<Hash>,
}

/// A blob as the store holds it.
#[derive(Debug, Clone)]
pub struct BlobInfo {
    /// The content id.
    pub hash: Hash,
    /// The size in bytes.
    pub size: u64,
    /// Verified pieces (durable or about to be).
    pub pieces: PieceSet,
    /// Whether the user pinned it (never evicted).
    pub pinned: bool,
}

impl BlobInfo {
    /// Whether every piece is verified.
    pub fn is_complete(&self) -> bool {
        self.pieces.is_complete()
    }
}

/// Bytes in use, for status and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreStats {
    /// Blobs held.
    pub blobs: usize,
    /// Bytes of unpinned blobs (bounded by `cache_capacity`).
    pub cache_bytes: u64,
    /// The cache bound.
    pub cache_capacity: u64,
    /// Bytes of pinned blobs.
    pub pinned_bytes: u64,
    /// Bytes in the hot-piece memory tier.
    pub hot_bytes: usize,
    /// Blobs evicted since the store opened.
    pub evictions: u64,
}

/// The on-disk piece store. Cheap to clone; all clones share one store. Methods block on disk
/// I/O: call them from a blocking thread in async code.
#[derive(Debug, Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    root: PathBuf,
    /// Locked while the store is open: two processes on one store would clear each other's
    /// imports from `tmp/` and write each other's metas. `None` once [`Store::close`]d, or where
    /// the file system has no locks.
    lock: Mutex<Option<File>>,
    config: StoreConfig,
    state: Mutex<State>,
    hot: Mutex<HotPieces>,
    evictions: AtomicU64,
    /// Directories moved out of `blobs/` under the state's lock, deleted once it is let go.
    trash: Mutex<Vec<PathBuf>>,
    /// Set by [`Store::close`]: metas are no longer written.
    closed: std::sync::atomic::AtomicBool,
    /// The files held open, by [`Blob::id`], least recently used first; at most
    /// [`StoreConfig::open_blobs`]. A blob's files close when its entry leaves and the last
    /// reader still holding them is done.
    open: Mutex<::lru::LruCache<u64, Arc<Files>>>,
}

#[derive(Debug)]
struct State {
    blobs: HashMap<Hash, Arc<Blob>>,
    lru: ByteLru,
    pinned_bytes: u64,
    /// Pins made by an import of many files still under way, by its token
    /// ([`Store::import_opened_tentatively`]): undone if it fails, unless another pin (the
    /// user's, another import's) came since, which takes the mark away. One per blob held.
    tentative: HashMap<Hash, u64>,
}

impl State {
    /// Records who relies on `hash`'s pin once a pin took effect: a pin that `token`'s import
    /// newly made is marked as that import's; any other (the user's, a plain import's, another
    /// import's) takes the mark away. The same import again leaves it.
    fn note_pin(&mut self, hash: Hash, newly: bool, token: Option<u64>) {
        match token {
            Some(t) if newly => {
                self.tentative.insert(hash, t);
            }
            Some(t) if self.tentative.get(&hash) == Some(&t) => {}
            _ => {
                self.tentative.remove(&hash);
            }
        }
    }
}

#[derive(Debug)]
struct Blob {
    hash: Hash,
    geometry: Geometry,
    dir: PathBuf,
    /// Keys the blob's files in [`Inner::open`]: unique in the process, where a hash is not (a
    /// blob evicted and begun again is another entry).
    id: u64,
    /// Its files while anyone holds them open (see [`Store::files`]). Read and set under
    /// [`Inner::open`]'s lock.
    files: Mutex<std::sync::Weak<Files>>,
    /// Set, under [`Inner::open`]'s lock, once the entry left the store: its files are not held
    /// open for it again.
    removed: std::sync::atomic::AtomicBool,
    status: Mutex<Status>,
    /// Serialises meta rewrites of this blob.
    commit: Mutex<()>,
}

/// A blob's two files, open for reading and writing.
#[derive(Debug)]
struct Files {
    data: File,
    outboard: File,
}

impl Files {
    /// Opens them for reading and writing, or for reading alone where writing is not allowed (a
    /// store restored read-only still serves what it holds; a write to it fails).
    fn open(dir: &Path) -> Result<Self> {
        let open = |name: &str| {
            let p = dir.join(name);
            match OpenOptions::new().read(true).write(true).open(&p) {
                Err(e) if e.kind() == io::ErrorKind::PermissionDenied => File::open(&p),
                opened => opened,
            }
            .map_err(io_err("open", &p))
        };
        Ok(Self { data: open("data")?, outboard: open("outboard")? })
    }
}

/// Where [`Blob::id`]s come from.
static NEXT_BLOB_ID: AtomicU64 = AtomicU64::new(0);

/// Numbers the temporary names of every store in the process: a store closed and opened again in
/// one process (a node netsim restarts) must not take a name the closed one still uses.
static NEXT_TMP: AtomicU64 = AtomicU64::new(0);

#[derive(Debug)]
struct Status {
    verified: PieceSet,
    durable: PieceSet,
    pinned: bool,
    unflushed_bytes: u64,
    /// The files written through since the last commit, held open until it syncs them: a
    /// write-back error is reported to the descriptors open when it happened, and a descriptor
    /// opened afterwards could sync clean over it. Kept only for a durable store.
    dirty: Option<Arc<Files>>,
    /// Changes to what the meta records (pieces verified or dropped, the pin), counted, and the
    /// count the meta on disk was last written at: a flush with nothing new to write skips.
    changes: u64,
    committed: u64,
}

impl Blob {
    fn footprint(&self) -> u64 {
        footprint(self.geometry)
    }

    /// What it is charged in the cache now ([`charge`]).
    fn charge(&self) -> u64 {
        charge(self.geometry, &lock(&self.status).verified)
    }

    fn info(&self) -> BlobInfo {
        let st = lock(&self.status);
        BlobInfo { hash: self.hash, size: self.geometry.size(), pieces: st.verified.clone(), pinned: st.pinned }
    }
}

/// What a blob takes on disk: its data and outboard, its meta's bitmap, and [`BLOB_OVERHEAD`].
fn footprint(g: Geometry) -> u64 {
    g.size() + g.outboard_size() + bitmap_bytes(g) + BLOB_OVERHEAD
}

/// What a blob of `verified` pieces is charged in the cache: its [`footprint`] once whole; while
/// partial, [`BLOB_OVERHEAD`], its meta's bitmap, and for each piece verified its bytes and a
/// 4 KiB block of outboard per level of the tree (a piece's proof spans every level, and the
/// files are sparse: a block takes room once written), the outboard at most whole. So a begun blob
/// evicts others only for bytes that arrived and verified: a size proof costs nothing to make
/// for a hash nobody holds the bytes of (its sibling hashes may be anything), and charging the
/// proven size at once let anyone who asks a public gateway for such a hash empty its cache.
/// On a file system without sparse files a partial blob takes more room than it is charged.
fn charge(g: Geometry, verified: &PieceSet) -> u64 {
    if verified.is_complete() {
        return footprint(g);
    }
    let n = u64::from(verified.count());
    let levels = u64::from(u64::BITS - (g.outboard_size() / 64).leading_zeros());
    let outboard = n.saturating_mul(levels * 4096).min(g.outboard_size());
    let partial = BLOB_OVERHEAD + bitmap_bytes(g) + n.saturating_mul(PIECE_SIZE).min(g.size()) + outboard;
    partial.min(footprint(g))
}

/// Admits an unpinned `blob` to the cache at its [`charge`]: the blobs evicted for it, or `None`
/// if it is too large. Judged by its whole footprint, though charged less while partial: such a
/// blob could never be completed within the bound, and growing, it would evict every other.
fn admit_unpinned(lru: &mut ByteLru, blob: &Blob) -> Option<Vec<Hash>> {
    (blob.footprint() <= lru.capacity()).then(|| lru.admit(blob.hash, blob.charge()).ok()).flatten()
}

/// The bytes of a blob's bitmap of pieces, as its meta holds it.
fn bitmap_bytes(g: Geometry) -> u64 {
    u64::from(g.piece_count()).div_ceil(8)
}

/// What a blob takes on disk besides its bytes, about: its directory, its meta, and the last,
/// partly used block of each of its two files, at 4 KiB a block. Counting the bytes alone, a cache
/// bound of 10 GiB held ten billion one-byte blobs, each costing the disk a directory and three
/// files, and the node an entry in memory.
const BLOB_OVERHEAD: u64 = 4 * 4096;

/// The format of `meta`. Format 2 counts pieces of [`PIECE_SIZE`]; format 1 counted pieces of
/// [`V1_PIECE_SIZE`] and is read by mapping each of its pieces onto the ones it covers.
const META_FORMAT: u8 = 2;

/// The piece size of format 1 (until pieces became 128 KiB).
const V1_PIECE_SIZE: u64 = 256 * 1024;
const _: () = assert!(V1_PIECE_SIZE.is_multiple_of(PIECE_SIZE), "a format-1 piece covers whole pieces");

/// The persistent record of a blob. Replaced atomically.
#[derive(Debug, Serialize, Deserialize)]
struct Meta {
    format: u8,
    size: u64,
    pinned: bool,
    bitmap: Vec<u8>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a store lock is a bug; the state it guards is updated in single steps,
    // so carrying on with it is sound.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A file read and written at offsets through a shared reference.
#[derive(Debug, Clone, Copy)]
struct FileAt<'a>(&'a File);

impl bao_tree_io::ReadAt for FileAt<'_> {
    fn read_at(&self, pos: u64, buf: &mut [u8]) -> io::Result<usize> {
        FileExt::read_at(self.0, buf, pos)
    }
}

impl bao_tree_io::WriteAt for FileAt<'_> {
    fn write_at(&mut self, pos: u64, buf: &[u8]) -> io::Result<usize> {
        FileExt::write_at(self.0, buf, pos)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Verified pieces held in memory, read at blob offsets.
struct PiecesAt<'a> {
    geometry: Geometry,
    pieces: &'a HashMap<PieceIndex, Bytes>,
}

impl bao_tree_io::ReadAt for PiecesAt<'_> {
    fn read_at(&self, pos: u64, buf: &mut [u8]) -> io::Result<usize> {
        let piece = self.geometry.piece_of(pos);
        let Some(bytes) = self.pieces.get(&piece) else {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "piece not loaded"));
        };
        let start = (pos - self.geometry.piece_bytes(piece).start) as usize;
        let n = buf.len().min(bytes.len().saturating_sub(start));
        buf[..n].copy_from_slice(&bytes[start..start + n]);
        Ok(n)
    }
}

/// A blob read piece by piece (see [`Store::reader`]), each piece checked against the hash as it
/// is read.
pub struct BlobReader {
    store: Store,
    blob: Arc<Blob>,
    /// Held open until the reader is dropped, whatever the bound on open blobs does meanwhile.
    files: Arc<Files>,
}

impl std::fmt::Debug for BlobReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobReader").field("hash", &self.blob.hash).finish_non_exhaustive()
    }
}

impl BlobReader {
    /// The blob as this reader holds it: its size and the pieces verified.
    pub fn info(&self) -> BlobInfo {
        self.blob.info()
    }

    /// The blob's size as this reader holds it; unlike [`BlobReader::info`], copies no bitmap
    /// (a gateway asks at every piece).
    pub fn size(&self) -> u64 {
        self.blob.geometry.size()
    }

    /// Whether the store still holds this reader's entry. One evicted or removed is read from
    /// files whose room the store no longer counts.
    /// Takes no lock the store holds across file-system work: a gateway asks at every piece.
    pub fn is_current(&self) -> bool {
        !self.blob.removed.load(Ordering::Relaxed)
    }

    /// Whether the blob, as this reader holds it, has `piece` verified. A blob evicted and begun
    /// again is another entry, which a new reader reads.
    pub fn holds(&self, piece: PieceIndex) -> bool {
        lock(&self.blob.status).verified.contains(piece)
    }

    /// The bytes of one verified piece, checked against the hash as they are read. A piece that
    /// fails is dropped from the store and reported as [`StoreError::Corrupt`]. Marks the blob
    /// used, as a read of it.
    pub fn read_piece(&self, piece: PieceIndex) -> Result<Bytes> {
        let Self { store, blob, files } = self;
        let hash = blob.hash;
        let (have, total) = {
            let st = lock(&blob.status);
            (st.verified.contains(piece), st.verified.count())
        };
        if !have {
            return Err(StoreError::Incomplete { hash, have: total, total: blob.geometry.piece_count() });
        }
        let one = PieceSet::single(blob.geometry.piece_count(), piece);
        let loaded = store.load_pieces(blob, files, &one)?;
        let data = PiecesAt { geometry: blob.geometry, pieces: &loaded };
        let outboard = verify::post_order_outboard(hash, blob.geometry, FileAt(&files.outboard));
        match verify::encode_pieces(data, outboard, &one, io::sink()) {
            Ok(()) => {
                let bytes = loaded.get(&piece).cloned().unwrap_or_default();
                // An entry that left the store meanwhile is not brought back into its memory tier.
                let mut st = lock(&store.inner.state);
                if st.blobs.get(&hash).is_some_and(|b| Arc::ptr_eq(b, blob)) {
                    lock(&store.inner.hot).insert(hash, piece, bytes.clone());
                    st.lru.touch(&hash);
                }
                Ok(bytes)
            }
            Err(EncodeError::Io(e)) => Err(StoreError::Io { op: "read", path: blob.dir.clone(), source: e }),
            Err(_) => {
                warn!(blob = %hash, piece, "stored bytes failed verification; dropping the piece");
                store.unmark(blob, &one)?;
                Err(StoreError::Corrupt { hash, piece })
            }
        }
    }
}

/// Pieces of a blob being encoded for sending, a step at a time (see [`Store::stream_pieces`]).
/// It reads the pieces the memory tier holds from there and the rest from the data file as it
/// goes; with a memory tier, a piece read from the file joins it once all of it was checked.
pub struct PieceStream {
    store: Store,
    blob: Arc<Blob>,
    /// Held open until the answer ends, whatever the bound on open blobs does meanwhile.
    files: Arc<Files>,
    pieces: PieceSet,
    /// Pieces the memory tier held when the stream opened.
    hot: HashMap<PieceIndex, Bytes>,
    /// With a memory tier: the pieces read from the file, in order; all but the last are whole.
    read: Option<RefCell<ReadPieces>>,
    encoder: verify::PieceEncoder,
    /// The step encoded when the stream was opened, not yet taken.
    first: Option<Vec<u8>>,
    /// The length of the whole encoding.
    encoded_len: usize,
    ended: bool,
}

impl fmt::Debug for PieceStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PieceStream")
            .field("blob", &self.blob.hash)
            .field("pieces", &self.pieces)
            .field("ended", &self.ended)
            .finish_non_exhaustive()
    }
}

impl PieceStream {
    /// The pieces sent, unless a later step fails.
    pub fn pieces(&self) -> &PieceSet {
        &self.pieces
    }

    /// The length of the whole encoding, as the pieces were when the stream opened.
    pub fn encoded_len(&self) -> usize {
        self.encoded_len
    }

    /// The next bytes of the encoding, at least `step` of them unless it ends with them; `None`
    /// once it ended. A piece that fails its check is dropped from the store and the step fails
    /// with [`StoreError::Corrupt`]; the stream then stays failed.
    pub fn next_step(&mut self, step: usize) -> Result<Option<Vec<u8>>> {
        if let Some(first) = self.first.take() {
            return Ok(Some(first));
        }
        self.encode(step)
    }

    fn encode(&mut self, step: usize) -> Result<Option<Vec<u8>>> {
        if self.ended {
            return Ok(None);
        }
        let blob = &self.blob;
        let data =
            StoredAt { geometry: blob.geometry, hot: &self.hot, file: &self.files.data, read: self.read.as_ref() };
        let outboard = verify::post_order_outboard(blob.hash, blob.geometry, FileAt(&self.files.outboard));
        // A step overshoots by less than a chunk group, and the whole encoding is shorter still.
        let mut out = Vec::with_capacity(step.saturating_add(CHUNK_GROUP_SIZE as usize).min(self.encoded_len));
        match self.encoder.encode_some(data, outboard, &mut out, step) {
            Ok(ended) => {
                self.ended = ended;
                // Every byte read so far was checked: whole pieces join the memory tier.
                if let Some(read) = &self.read {
                    let mut read = read.borrow_mut();
                    let whole = read.iter().take_while(|(p, b)| b.len() as u64 == blob.geometry.piece_len(*p)).count();
                    // Not for an entry that left the store meanwhile (evicted, deleted): it
                    // would fill the tier with pieces nobody can ask for. Checked under the lock
                    // that taking an entry out holds, as `BlobReader::read_piece` checks it.
                    if whole > 0 {
                        let st = lock(&self.store.inner.state);
                        let read = read.drain(..whole);
                        if st.blobs.get(&blob.hash).is_some_and(|b| Arc::ptr_eq(b, blob)) {
                            let mut hot = lock(&self.store.inner.hot);
                            for (piece, bytes) in read {
                                hot.insert(blob.hash, piece, Bytes::from(bytes));
                            }
                        }
                    }
                }
                Ok(Some(out))
            }
            Err(e) => {
                // The encoder stays failed: so do later steps.
                let bad = self.store.bad_pieces(blob, &self.pieces, &e);
                let Some(piece) = bad.iter().next() else {
                    return Err(StoreError::Io { op: "encode", path: blob.dir.clone(), source: encode_io(e) });
                };
                warn!(blob = %blob.hash, pieces = ?bad, "stored bytes failed verification; dropping them");
                self.store.unmark(blob, &bad)?;
                Err(StoreError::Corrupt { hash: blob.hash, piece })
            }
        }
    }
}

/// Pieces read from a data file for the memory tier, in the order read, with their bytes so far.
type ReadPieces = Vec<(PieceIndex, Vec<u8>)>;

/// A blob's verified bytes, at blob offsets: from pieces held in memory, else from its data file,
/// keeping what it read from the file in `read` if given.
struct StoredAt<'a> {
    geometry: Geometry,
    hot: &'a HashMap<PieceIndex, Bytes>,
    file: &'a File,
    read: Option<&'a RefCell<ReadPieces>>,
}

impl bao_tree_io::ReadAt for StoredAt<'_> {
    fn read_at(&self, pos: u64, buf: &mut [u8]) -> io::Result<usize> {
        let piece = self.geometry.piece_of(pos);
        if self.hot.contains_key(&piece) {
            return PiecesAt { geometry: self.geometry, pieces: self.hot }.read_at(pos, buf);
        }
        let n = FileExt::read_at(self.file, buf, pos)?;
        if let Some(read) = self.read {
            let mut read = read.borrow_mut();
            match read.last_mut() {
                Some((p, bytes)) if *p == piece => bytes.extend_from_slice(&buf[..n]),
                _ => {
                    let mut bytes = Vec::with_capacity(self.geometry.piece_len(piece) as usize);
                    bytes.extend_from_slice(&buf[..n]);
                    read.push((piece, bytes));
                }
            }
        }
        Ok(n)
    }
}

mod bao_tree_io {
    pub(super) use shoal_protocol::verify::{ReadAt, WriteAt};
}

impl Store {
    /// Whether a process (this one included) has the store at `root` open. A store that was never
    /// created is not.
    pub fn in_use(root: &Path) -> Result<bool> {
        if !root.join("lock").exists() {
            return Ok(false);
        }
        match lock_store(root) {
            Ok(Some(_)) => Ok(false),
            // Where the file system has no locks we cannot tell: say it may be.
            Ok(None) | Err(StoreError::InUse { .. }) => Ok(true),
            Err(e) => Err(e),
        }
    }

    /// Lets another opener have the store, as a process that exits or dies does: a node that
    /// stopped, or one crashed in an emulator that restarts it in the same process. Clones still
    /// held keep working, and a later [`Store::open`] must be the only writer from then on: a
    /// closed store writes no meta (what it verifies after is not marked, as a crash leaves it),
    /// and moves no blob directory in or out (what it evicts after stays on disk).
    pub fn close(&self) {
        // Set under the state's lock, under which every rename into or out of `blobs/` checks
        // it: none is under way once this returns.
        let st = lock(&self.inner.state);
        self.inner.closed.store(true, Ordering::Relaxed);
        drop(st);
        lock(&self.inner.lock).take();
    }

    /// Opens (or creates) the store at `root`. Recovers from a crash: half-finished imports and
    /// deletions are removed, and partial blobs keep exactly the pieces their meta names. Fails
    /// with [`StoreError::InUse`] while another process has it open.
    pub fn open(root: impl Into<PathBuf>, config: StoreConfig) -> Result<Self> {
        let root = root.into();
        let blobs_dir = root.join("blobs");
        let tmp_dir = root.join("tmp");
        fs::create_dir_all(&blobs_dir).map_err(io_err("create", &blobs_dir))?;
        let held = lock_store_waiting(&root)?;
        if held.is_none() {
            warn!(path = %root.display(), "the file system has no locks: nothing stops a second node on this store");
        }
        if tmp_dir.exists() {
            fs::remove_dir_all(&tmp_dir).map_err(io_err("clear", &tmp_dir))?;
        }
        fs::create_dir_all(&tmp_dir).map_err(io_err("create", &tmp_dir))?;

        let inner = Arc::new(Inner {
            state: Mutex::new(State {
                blobs: HashMap::new(),
                lru: ByteLru::new(config.cache_bytes),
                pinned_bytes: 0,
                tentative: HashMap::new(),
            }),
            hot: Mutex::new(HotPieces::new(config.hot_bytes)),
            root,
            lock: Mutex::new(held),
            config,
            evictions: AtomicU64::new(0),
            trash: Mutex::new(Vec::new()),
            closed: std::sync::atomic::AtomicBool::new(false),
            open: Mutex::new(::lru::LruCache::unbounded()),
        });
        let store = Self { inner };

        let mut found = Vec::new();
        for entry in fs::read_dir(&blobs_dir).map_err(io_err("list", &blobs_dir))? {
            let entry = entry.map_err(io_err("list", &blobs_dir))?;
            let dir = entry.path();
            // A meta being written when the last process stopped never took its place: it goes.
            for stale in fs::read_dir(&dir).into_iter().flatten().flatten() {
                if stale.file_name().to_str().is_some_and(|n| n.starts_with("meta.tmp.")) {
                    let _ = fs::remove_file(stale.path());
                }
            }
            match load_blob(&dir) {
                Ok(Some(Loaded::Blob(blob))) => {
                    let blob = *blob;
                    let mtime =
                        fs::metadata(dir.join("meta")).and_then(|m| m.modified()).unwrap_or(SystemTime::UNIX_EPOCH);
                    found.push((mtime, blob));
                }
                Ok(Some(Loaded::Leftover)) => {
                    debug!(dir = %dir.display(), "removing what a crash left of a blob moved out");
                    store.discard_dir(&dir)?;
                }
                // Not ours to delete: a newer version's meta, or files someone changed. Kept
                // where the user can look, outside the store's count.
                Ok(None) => {
                    let aside = store.set_aside(&dir)?;
                    warn!(dir = %dir.display(), to = %aside.display(), "a blob directory this version cannot use was set aside");
                }
                Err(e) => {
                    let aside = store.set_aside(&dir)?;
                    warn!(dir = %dir.display(), to = %aside.display(), error = %e, "an unreadable blob directory was set aside");
                }
            }
        }
        // Oldest first, so the most recently written end up most recently used.
        found.sort_by_key(|(mtime, _)| *mtime);
        let mut st = lock(&store.inner.state);
        for (_, blob) in found {
            let blob = Arc::new(blob);
            if lock(&blob.status).pinned {
                st.pinned_bytes += blob.footprint();
            } else {
                match admit_unpinned(&mut st.lru, &blob) {
                    Some(evicted) => {
                        for hash in evicted {
                            if let Some(old) = st.blobs.remove(&hash) {
                                info!(blob = %hash, "evicted at open: the cache bound shrank");
                                store.discard_dir(&old.dir)?;
                            }
                        }
                    }
                    None => {
                        info!(blob = %blob.hash, "dropped at open: larger than the cache bound");
                        store.discard_dir(&blob.dir)?;
                        continue;
                    }
                }
            }
            st.blobs.insert(blob.hash, blob);
        }
        drop(st);
        Ok(store)
    }

    /// The store's directory.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// Imports the file at `path` in one pass: its bytes are copied into the store while the
    /// hash and outboard are computed, never held in memory. `pin` keeps it from eviction.
    pub fn import_file(&self, path: &Path, pin: bool) -> Result<Imported> {
        self.import_file_unless(path, pin, &|| false)
    }

    /// [`Store::import_file`], stopped with [`StoreError::ImportStopped`] once `stop` says so:
    /// it is asked before each MiB is read, so that a node stopping need not wait for a large
    /// file to be read whole, nor leave its import running after it.
    pub fn import_file_unless(&self, path: &Path, pin: bool, stop: &(dyn Fn() -> bool + Sync)) -> Result<Imported> {
        // Opened without waiting, and checked once open: a named pipe (put where a file was, say)
        // would wait for a writer, and a device may never end, holding this thread for good. A
        // regular file reads as it would.
        use std::os::unix::fs::OpenOptionsExt;
        let file =
            OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path).map_err(io_err("open", path))?;
        self.import_opened_as(&file, path, pin, None, stop)
    }

    /// [`Store::import_file`] for a file the caller opened (named `path` in errors): one that
    /// checked, say, that it is the file a directory listing named. It must be a regular file.
    ///
    /// A file written while it is read fails with [`StoreError::ChangedDuringImport`], whether
    /// or not its size changed: what would be published is a hash of bytes that were never in
    /// the file together. The write is seen by its change time, which every write moves.
    pub fn import_opened(&self, file: &File, path: &Path, pin: bool) -> Result<Imported> {
        self.import_opened_as(file, path, pin, None, &|| false)
    }

    /// [`Store::import_opened`], pinned, for an import of many files (a directory) that undoes
    /// its pins if it fails: a pin this makes is marked `token`'s until
    /// [`Store::settle_tentative_pin`] or [`Store::undo_tentative_pin`], unless another pin of
    /// the blob (the user's, another import's) comes first. `token` is the import's own number.
    /// Stopped as [`Store::import_file_unless`] is.
    pub fn import_opened_tentatively(
        &self,
        file: &File,
        path: &Path,
        token: u64,
        stop: &(dyn Fn() -> bool + Sync),
    ) -> Result<Imported> {
        self.import_opened_as(file, path, true, Some(token), stop)
    }

    /// The import of many files numbered `token` succeeded: its pin of `hash` is no longer
    /// tentative.
    pub fn settle_tentative_pin(&self, hash: Hash, token: u64) {
        let mut st = lock(&self.inner.state);
        if st.tentative.get(&hash) == Some(&token) {
            st.tentative.remove(&hash);
        }
    }

    /// The import of many files numbered `token` failed: unpins `hash` if its pin is still that
    /// import's alone, in the same step as the check. Returns what the cache evicted.
    pub fn undo_tentative_pin(&self, hash: Hash, token: u64) -> Result<Vec<Hash>> {
        Ok(self.set_pinned_as(hash, false, None, Some(token))?.1)
    }

    fn import_opened_as(
        &self,
        file: &File,
        path: &Path,
        pin: bool,
        token: Option<u64>,
        stop: &(dyn Fn() -> bool + Sync),
    ) -> Result<Imported> {
        use std::os::unix::fs::MetadataExt;
        let meta = file.metadata().map_err(io_err("stat", path))?;
        if !meta.is_file() {
            return Err(StoreError::NotAFile { path: path.to_owned() });
        }
        let stamp = |m: &fs::Metadata| (m.len(), m.mtime(), m.mtime_nsec(), m.ctime(), m.ctime_nsec());
        let size = meta.len();
        let geometry = Geometry::new(size)?;
        let staged = self.stage(geometry, file, path, stop)?;
        let after = file.metadata().map_err(io_err("stat", path))?;
        if stamp(&after) != stamp(&meta) {
            self.discard_dir(&staged.dir)?;
            return Err(StoreError::ChangedDuringImport { path: path.to_owned() });
        }
        self.install(staged, pin, token)
    }

    /// Imports a stream of unknown length. The stream is read once and spooled to the store's
    /// disk; the hash and outboard are then computed from the spooled copy (page cache).
    pub fn import_reader(&self, mut reader: impl Read, pin: bool) -> Result<Imported> {
        let dir = self.tmp_path("import");
        fs::create_dir(&dir).map_err(io_err("create", &dir))?;
        let data_path = dir.join("data");
        let spooled = (|| {
            let mut data = File::create(&data_path).map_err(io_err("create", &data_path))?;
            let size = io::copy(&mut reader, &mut data).map_err(io_err("spool into", &data_path))?;
            // Durable before the meta that marks every piece verified, as `stage` makes it.
            if self.inner.config.durable {
                data.sync_data().map_err(io_err("sync", &data_path))?;
            }
            Geometry::new(size).map_err(StoreError::from)
        })();
        let geometry = match spooled {
            Ok(g) => g,
            Err(e) => {
                self.discard_dir(&dir)?;
                return Err(e);
            }
        };
        let staged = File::open(&data_path)
            .map_err(io_err("open", &data_path))
            .and_then(|data| self.stage_outboard(dir.clone(), geometry, BufReader::with_capacity(1 << 20, data)));
        match staged {
            Ok(staged) => self.install(staged, pin, None),
            Err(e) => {
                let _ = self.discard_dir(&dir);
                Err(e)
            }
        }
    }

    /// Copies `source` into a new temporary directory while the hash and outboard are computed:
    /// one thread reads and writes the bytes, the calling thread hashes them, so the copy costs
    /// little beyond the hashing. Memory is bounded by a few 1 MiB buffers in flight. Once `stop`
    /// says so, before a buffer is read, the copy ends and nothing is kept.
    fn stage(
        &self,
        geometry: Geometry,
        mut source: impl Read + Send,
        origin: &Path,
        stop: &(dyn Fn() -> bool + Sync),
    ) -> Result<Staged> {
        const BUF: usize = 1 << 20;
        const IN_FLIGHT: usize = 4;
        let dir = self.tmp_path("import");
        fs::create_dir(&dir).map_err(io_err("create", &dir))?;
        let data_path = dir.join("data");
        let result = (|| {
            let mut data = File::create(&data_path).map_err(io_err("create", &data_path))?;
            let (to_hash, chunks) = std::sync::mpsc::sync_channel::<Vec<u8>>(IN_FLIGHT);
            // Buffers come back from the hasher, so the copier never faults in fresh pages.
            let (recycle, recycled) = std::sync::mpsc::sync_channel::<Vec<u8>>(IN_FLIGHT + 2);
            let staged = std::thread::scope(|scope| {
                let copier = scope.spawn(move || -> io::Result<Option<u64>> {
                    let mut total = 0u64;
                    let mut allocated = 0;
                    loop {
                        let mut buf = match recycled.try_recv() {
                            Ok(buf) => buf,
                            Err(_) if allocated <= IN_FLIGHT => {
                                allocated += 1;
                                Vec::new()
                            }
                            Err(_) => match recycled.recv() {
                                Ok(buf) => buf,
                                // The hasher stopped (it read all `size` bytes, or failed).
                                Err(_) => return Ok(Some(total)),
                            },
                        };
                        // Stopped: the hasher, its channel closed, fails short of the size.
                        if stop() {
                            return Ok(None);
                        }
                        buf.resize(BUF, 0);
                        let n = read_full(&mut source, &mut buf)?;
                        if n == 0 {
                            return Ok(Some(total));
                        }
                        buf.truncate(n);
                        data.write_all(&buf)?;
                        total += n as u64;
                        if to_hash.send(buf).is_err() {
                            return Ok(Some(total));
                        }
                    }
                });
                let reader = ChunkReader { chunks, recycle, current: Vec::new(), pos: 0 };
                let staged = self.stage_outboard(dir.clone(), geometry, reader);
                let copied = copier.join().unwrap_or_else(|_| Err(io::Error::other("import copier panicked")));
                (staged, copied)
            });
            let (staged, copied) = staged;
            let copied = copied.map_err(io_err("copy into", &data_path))?;
            let Some(copied) = copied else {
                return Err(StoreError::ImportStopped { path: origin.to_owned() });
            };
            let staged = staged.map_err(|e| match e {
                StoreError::Io { source, .. } if source.kind() == io::ErrorKind::UnexpectedEof => {
                    StoreError::ChangedDuringImport { path: origin.to_owned() }
                }
                e => e,
            })?;
            if copied != geometry.size() {
                return Err(StoreError::ChangedDuringImport { path: origin.to_owned() });
            }
            if self.inner.config.durable {
                File::open(&data_path).and_then(|f| f.sync_data()).map_err(io_err("sync", &data_path))?;
            }
            Ok(staged)
        })();
        if result.is_err() {
            let _ = fs::remove_dir_all(&dir);
        }
        result
    }

    /// Computes the outboard of `data` into `dir/outboard` and writes the blob's meta.
    fn stage_outboard(&self, dir: PathBuf, geometry: Geometry, data: impl Read) -> Result<Staged> {
        let ob_path = dir.join("outboard");
        let ob = File::create(&ob_path).map_err(io_err("create", &ob_path))?;
        let mut ob = BufWriter::with_capacity(256 << 10, ob);
        let hash = verify::outboard(data, geometry.size(), &mut ob).map_err(io_err("read", &dir))?;
        let ob = ob.into_inner().map_err(|e| io_err("write", &ob_path)(e.into_error()))?;
        if self.inner.config.durable {
            ob.sync_data().map_err(io_err("sync", &ob_path))?;
        }
        Ok(Staged { dir, hash, geometry })
    }

    /// Moves a staged, complete blob into `blobs/`.
    fn install(&self, staged: Staged, pin: bool, token: Option<u64>) -> Result<Imported> {
        let dir = staged.dir.clone();
        let installed = self.install_entry(staged, pin, token);
        // Whatever failed, the staged copy is not needed (renamed into place, it was trashed
        // already): left in `tmp/`, each failed attempt kept a copy of the file until the next
        // open (a full disk failing the meta's write, say).
        if installed.is_err() {
            let _ = self.discard_dir(&dir);
        }
        self.empty_trash();
        installed
    }

    fn install_entry(&self, staged: Staged, pin: bool, token: Option<u64>) -> Result<Imported> {
        let Staged { dir, hash, geometry } = staged;
        let full = PieceSet::full(geometry.piece_count());
        // A partial copy the user pinned gives its pin to the complete one (see below): known
        // before the meta is written, which is not done under the store's lock.
        let pinned_partial = |st: &State| st.blobs.get(&hash).is_some_and(|b| lock(&b.status).pinned);
        let pin_written = pin || pinned_partial(&lock(&self.inner.state));
        write_meta(
            &dir,
            &Meta { format: META_FORMAT, size: geometry.size(), pinned: pin_written, bitmap: full.to_bitmap() },
            self.inner.config.durable,
        )?;

        let mut st = lock(&self.inner.state);
        let mut pinned_before = false;
        if let Some(existing) = st.blobs.get(&hash).cloned() {
            if existing.info().is_complete() {
                // Pinned (or touched) under the hold that found it complete: let go in between,
                // it could be evicted, and the import fail for a blob it had just read whole.
                let (was, evicted) = match pin {
                    true => self.pin_entry(&mut st, hash, &existing, true, token),
                    false => {
                        st.lru.touch(&hash);
                        (false, Vec::new())
                    }
                };
                drop(st);
                // The copy is not needed: what is left of it in `tmp/` goes at the next open.
                if let Err(e) = self.discard_dir(&dir) {
                    warn!(blob = %hash, error = %e, "cannot delete an import's copy of a blob held already");
                }
                return match self.finish_pin(hash, &existing, pin && !was, evicted) {
                    Ok(evicted) => Ok(Imported { hash, size: geometry.size(), evicted, newly_pinned: pin && !was }),
                    Err(e) => {
                        // Pinned in memory, its meta not written: an import that fails cannot
                        // say it made the pin, so a tentative one is taken back.
                        if let Some(t) = token {
                            let _ = self.set_pinned_as(hash, false, None, Some(t));
                        }
                        Err(e)
                    }
                };
            }
            // A partial copy: the complete one replaces it, pinned if the user pinned that. Decided
            // before it is admitted: counted as cache, it would evict blobs for room it does not
            // take, or be refused as too large after the pinned copy went, or be evicted before
            // it is pinned.
            pinned_before = existing.info().pinned;
            self.take_entry(&mut st, &hash);
            self.trash(&existing.dir)?;
        }
        // Pinned if the importer pins it or the user pinned the partial copy it replaces, as
        // this lock sees it. The meta written above says what was known then; if a pin or an
        // unpin of the partial copy came in between, it is written again below.
        let pin = pin || pinned_before;
        // Written again before it takes its place, under the lock: a crash right after must not
        // find the blob unpinned that the user pinned (and drop it at open, were it larger than
        // the cache). Before anything is evicted for it: a failure here loses nothing.
        if pin != pin_written {
            let meta = Meta { format: META_FORMAT, size: geometry.size(), pinned: pin, bitmap: full.to_bitmap() };
            // On any failure from here, `install` discards the staged copy.
            write_meta(&dir, &meta, self.inner.config.durable)?;
        }
        let evicted = if pin {
            st.pinned_bytes += footprint(geometry);
            Vec::new()
        } else {
            match st.lru.admit(hash, footprint(geometry)) {
                Ok(evicted) => evicted,
                Err(o) => return Err(StoreError::TooLarge { hash, bytes: o.bytes, capacity: o.capacity }),
            }
        };
        // The blobs evicted for it leave now, whatever happens to it: they are out of the count.
        let evicted = self.remove_evicted(&mut st, evicted);
        match self.place(&dir, hash) {
            Ok(blob) => {
                st.blobs.insert(hash, Arc::new(blob));
                if pin {
                    st.note_pin(hash, !pinned_before, token);
                }
                drop(st);
                Ok(Imported { hash, size: geometry.size(), evicted, newly_pinned: pin && !pinned_before })
            }
            Err(e) => {
                // Its room is given back; what reached the disk goes.
                if pin {
                    st.pinned_bytes -= footprint(geometry);
                } else {
                    st.lru.remove(&hash);
                }
                // What `place` renamed into place it took away itself, and `install` discards
                // the staged copy; what was there before is not ours to delete.
                Err(e)
            }
        }
    }

    /// Prepares to receive pieces of `hash`, a blob of `size` bytes, from the network. A blob
    /// whose footprint is larger than the cache is refused; otherwise it is charged only what its
    /// directory costs, and then each piece as it is stored ([`charge`]), evicting others as it
    /// grows. Returns the pieces already verified (a resumed fetch) and the blobs evicted to make
    /// room. An entry of another size with no piece verified gives way: it proves no size, and is
    /// what a fetch that ended on a claim that did not hold leaves behind.
    pub fn begin(&self, hash: Hash, size: u64) -> Result<Begun> {
        self.begin_with(hash, size, true)
    }

    /// [`Store::begin`] for a size no proof backs yet (a peer's claim): it evicts nothing as it
    /// begins, and fails with [`StoreError::NoRoom`] if the blob does not fit beside what the
    /// cache holds; its pieces, once verified, are charged as any blob's.
    pub fn begin_unproven(&self, hash: Hash, size: u64) -> Result<Begun> {
        self.begin_with(hash, size, false)
    }

    fn begin_with(&self, hash: Hash, size: u64, evict: bool) -> Result<Begun> {
        let begun = self.begin_entry(hash, size, evict);
        self.empty_trash();
        begun
    }

    fn begin_entry(&self, hash: Hash, size: u64, evict: bool) -> Result<Begun> {
        let geometry = Geometry::new(size)?;
        // A blob held at this size, or a begin refused, needs no files: looked at first.
        let pinned = match self.plan_begin(&mut lock(&self.inner.state), hash, geometry, evict)? {
            BeginPlan::Held(have) => return Ok(Begun { have, evicted: Vec::new() }),
            BeginPlan::New { pinned, .. } => pinned,
        };
        // The files are made, sized and synced in `tmp/` without the store's lock: five syncs,
        // which every reader and writer of the store waited on while a fetch began. The look
        // under the lock is taken again before the copy takes its place, and decides.
        let dir = self.tmp_path("partial");
        let placed = self.stage_partial(&dir, geometry, pinned).and_then(|()| {
            let mut st = lock(&self.inner.state);
            self.place_partial(&mut st, &dir, hash, geometry, evict, pinned)
        });
        // Not placed (an entry came in between, or a failure), it is not needed.
        if !matches!(placed, Ok(Placed::Staged(_))) {
            let _ = self.discard_dir(&dir);
        }
        placed.map(Placed::begun)
    }

    /// What a begin of `hash` at `geometry`'s size finds under the store's lock: the blob held
    /// at this size, or a new entry to make (taking the place of an empty entry of another size),
    /// or a refusal.
    fn plan_begin(&self, st: &mut State, hash: Hash, geometry: Geometry, evict: bool) -> Result<BeginPlan> {
        let size = geometry.size();
        let (mut pinned, mut giving_way) = (false, None);
        if let Some(blob) = st.blobs.get(&hash).cloned() {
            let info = blob.info();
            if blob.geometry.size() == size {
                st.lru.touch(&hash);
                return Ok(BeginPlan::Held(info.pieces));
            }
            // One the user pinned gives way to a proven size only (and the pin goes with it): a
            // claim no proof backs may not have the pin hold room for it outside the cache.
            if !info.pieces.is_empty() || (info.pinned && !evict) {
                return Err(StoreError::SizeMismatch { hash, known: blob.geometry.size(), claimed: size });
            }
            pinned = info.pinned;
            giving_way = Some(blob);
        }
        // Refused before the entry it would replace goes: a refusal changes nothing.
        let bytes = footprint(geometry);
        let freed = giving_way.as_ref().filter(|_| !pinned).map_or(0, |b| b.charge());
        if !evict && !st.lru.fits(bytes.saturating_sub(freed)) {
            let free = (st.lru.capacity() + freed).saturating_sub(st.lru.used());
            return Err(StoreError::NoRoom { hash, bytes, free });
        }
        if !pinned && bytes > st.lru.capacity() {
            return Err(StoreError::TooLarge { hash, bytes, capacity: st.lru.capacity() });
        }
        Ok(BeginPlan::New { giving_way, pinned })
    }

    /// Makes an empty blob's files in `dir` (under `tmp/`), their lengths and meta durable.
    fn stage_partial(&self, dir: &Path, geometry: Geometry, pinned: bool) -> Result<()> {
        fs::create_dir(dir).map_err(io_err("create", dir))?;
        // Their lengths made durable before the meta that names them: a power loss between
        // the two would leave files shorter than the meta says, and the blob set aside.
        let durable = self.inner.config.durable;
        let sized = |f: File, len: u64| f.set_len(len).and_then(|()| if durable { f.sync_all() } else { Ok(()) });
        let data = dir.join("data");
        File::create(&data).and_then(|f| sized(f, geometry.size())).map_err(io_err("create", &data))?;
        let ob = dir.join("outboard");
        File::create(&ob).and_then(|f| sized(f, geometry.outboard_size())).map_err(io_err("create", &ob))?;
        let empty = PieceSet::empty(geometry.piece_count());
        write_meta(
            dir,
            &Meta { format: META_FORMAT, size: geometry.size(), pinned, bitmap: empty.to_bitmap() },
            durable,
        )
    }

    /// Places the empty blob staged in `dir` as `hash`'s entry, under the store's lock, as
    /// [`Store::plan_begin`] finds things now: what came in between the two looks (the blob
    /// begun or imported by another, an entry gone, a pin made or undone, the room taken) is
    /// answered as if the begin had come after it.
    fn place_partial(
        &self,
        st: &mut State,
        dir: &Path,
        hash: Hash,
        geometry: Geometry,
        evict: bool,
        pinned_staged: bool,
    ) -> Result<Placed> {
        let (giving_way, pinned) = match self.plan_begin(st, hash, geometry, evict)? {
            BeginPlan::Held(have) => return Ok(Placed::Held(Begun { have, evicted: Vec::new() })),
            BeginPlan::New { giving_way, pinned } => (giving_way, pinned),
        };
        if pinned != pinned_staged {
            // Rare (a pin of the entry it replaces came or went in between): written again
            // under the lock, before anything changes.
            let empty = PieceSet::empty(geometry.piece_count());
            let meta = Meta { format: META_FORMAT, size: geometry.size(), pinned, bitmap: empty.to_bitmap() };
            write_meta(dir, &meta, self.inner.config.durable)?;
        }
        if let Some(blob) = giving_way {
            debug!(blob = %hash, stale = blob.geometry.size(), size = geometry.size(), "an empty entry of another size gives way");
            self.take_entry(st, &hash);
            self.trash(&blob.dir)?;
        }
        let bytes = footprint(geometry);
        let evicted = match pinned {
            true => {
                st.pinned_bytes += bytes;
                Vec::new()
            }
            false => st
                .lru
                .admit(hash, charge(geometry, &PieceSet::empty(geometry.piece_count())))
                .map_err(|o| StoreError::TooLarge { hash, bytes: o.bytes, capacity: o.capacity })?,
        };
        let evicted = self.remove_evicted(st, evicted);
        match self.place(dir, hash) {
            Ok(blob) => {
                st.blobs.insert(hash, Arc::new(blob));
                Ok(Placed::Staged(Begun { have: PieceSet::empty(geometry.piece_count()), evicted }))
            }
            Err(e) => {
                if pinned {
                    st.pinned_bytes -= bytes;
                } else {
                    st.lru.remove(&hash);
                }
                // What `place` renamed into place it took away itself, and the caller discards
                // the staged copy; what was there before it is not ours to delete.
                Err(e)
            }
        }
    }

    /// Verifies the encoded `pieces` read from `encoded` (a peer's response) and stores the
    /// chunk groups that pass. Bytes that fail are never written. Pieces become durable, and are
    /// marked in the blob's meta, at the next flush (every `flush_bytes`, or [`Store::flush`]).
    pub fn write_pieces(&self, hash: Hash, pieces: &PieceSet, encoded: impl Read) -> Result<Written> {
        let blob = self.blob(hash)?;
        let files = self.files(&blob)?;
        let outboard = verify::post_order_outboard(hash, blob.geometry, FileAt(&files.outboard));
        let decoded = verify::decode_pieces(encoded, pieces, FileAt(&files.data), outboard);
        let evicted = self.mark_verified(&blob, &files, &decoded.verified)?;
        Ok(Written { verified: decoded.verified, error: decoded.error, evicted })
    }

    /// Stores pieces a [`verify::PieceDecoder`] verified as they arrived, with their proofs, and
    /// returns them, those held already included (they are not written again). Durable and
    /// marked in the meta at the next flush, as with [`Store::write_pieces`].
    pub fn store_pieces(&self, hash: Hash, pieces: &[verify::VerifiedPiece]) -> Result<Stored> {
        let blob = self.blob(hash)?;
        let mut stored = PieceSet::empty(blob.geometry.piece_count());
        let mut held = PieceSet::empty(blob.geometry.piece_count());
        let files = self.files(&blob)?;
        let mut outboard = verify::post_order_outboard(hash, blob.geometry, FileAt(&files.outboard));
        // A piece held already is not written again: a late duplicate of a request the end game
        // made would otherwise rewrite bytes a reader, an upload, or (once the blob is complete
        // and moved out) a user's file has. It is still the sender's, verified: returned with the
        // rest, so that the fetch does not take it for a piece the sender left out.
        for piece in pieces {
            if lock(&blob.status).verified.contains(piece.piece()) {
                held.insert(piece.piece());
                continue;
            }
            // Verified against this hash; but a decoder made for another size still verifies the
            // pieces below the real tree's right edge (the hash chain proves them), so only a
            // piece that fits this blob's geometry goes in.
            if piece.bytes() != blob.geometry.piece_bytes(piece.piece()) {
                warn!(blob = %hash, piece = piece.piece(), "a verified piece does not fit the blob; not stored");
                continue;
            }
            piece.write_to(FileAt(&files.data), &mut outboard).map_err(io_err("write", &blob.dir))?;
            stored.insert(piece.piece());
        }
        let evicted = self.mark_verified(&blob, &files, &stored)?;
        stored.union_with(&held);
        Ok(Stored { pieces: stored, evicted })
    }

    /// Marks pieces just written and verified, charges the blob for them in the cache (evicting
    /// others for the room), and commits them once enough are unflushed. Returns the blobs
    /// evicted.
    fn mark_verified(&self, blob: &Blob, files: &Arc<Files>, pieces: &PieceSet) -> Result<Vec<Hash>> {
        let (flush, charged) = {
            let mut st = lock(&blob.status);
            if !pieces.is_empty() {
                st.changes += 1;
                if self.inner.config.durable {
                    st.dirty.get_or_insert_with(|| files.clone());
                }
            }
            for p in pieces.iter() {
                if st.verified.insert(p) {
                    st.unflushed_bytes += blob.geometry.piece_len(p);
                }
            }
            (
                st.unflushed_bytes >= self.inner.config.flush_bytes || st.verified.is_complete(),
                charge(blob.geometry, &st.verified),
            )
        };
        let evicted = {
            let mut st = lock(&self.inner.state);
            // Not if the entry left meanwhile (under this lock): a new entry of the hash is
            // charged for its own pieces.
            let evicted = match blob.removed.load(Ordering::Relaxed) {
                true => Vec::new(),
                false => st.lru.grow(blob.hash, charged),
            };
            self.remove_evicted(&mut st, evicted)
        };
        if !evicted.is_empty() {
            self.empty_trash();
            if evicted.contains(&blob.hash) {
                return Ok(evicted);
            }
        }
        // Not when nothing changed: pieces held already (a late duplicate of a complete blob)
        // would cost a meta write and its syncs each time.
        if flush {
            self.flush_blob(blob)?;
        }
        Ok(evicted)
    }

    /// Makes every verified piece of `hash` durable and marks it in the blob's meta.
    pub fn flush(&self, hash: Hash) -> Result<()> {
        let blob = self.blob(hash)?;
        self.flush_blob(&blob)
    }

    /// Commits `blob` unless its meta already records all there is.
    fn flush_blob(&self, blob: &Blob) -> Result<()> {
        let st = lock(&blob.status);
        if st.dirty.is_none() && st.committed == st.changes {
            return Ok(());
        }
        drop(st);
        self.commit(blob)
    }

    /// Flushes every blob (at shutdown).
    pub fn flush_all(&self) -> Result<()> {
        let blobs: Vec<_> = lock(&self.inner.state).blobs.values().cloned().collect();
        // Every blob, whatever one of them does: a failure of one (a disk error in its
        // directory) left the rest unflushed. The first failure is returned.
        let mut first = None;
        for blob in blobs {
            if let Err(e) = self.flush_blob(&blob) {
                warn!(blob = %blob.hash, error = %e, "cannot flush a blob");
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }

    fn commit(&self, blob: &Blob) -> Result<()> {
        let _serial = lock(&blob.commit);
        // A closed store is no longer ours to write (another opener may have it): a crashed
        // node's tasks still winding down leave its metas as the crash did.
        if self.inner.closed.load(Ordering::Relaxed) {
            return Ok(());
        }
        let (snapshot, pinned, unflushed, dirty, changes) = {
            let mut st = lock(&blob.status);
            (st.verified.clone(), st.pinned, st.unflushed_bytes, st.dirty.take(), st.changes)
        };
        // A blob evicted or deleted since (a write or an answer streaming from it holds it for a
        // while) may have been begun or added again under the same directory: its meta is not
        // this one's to write. Checked again where the meta takes its place, under the lock that
        // eviction and removal take, so that none can come in between.
        if !self.is_current(blob) {
            return Ok(());
        }
        // Synced through the descriptors the pieces were written with (see `Status::dirty`).
        if let Some(files) = dirty {
            let data_path = blob.dir.join("data");
            let synced = files.data.sync_data().map_err(io_err("sync", &data_path));
            let synced = synced.and_then(|()| files.outboard.sync_data().map_err(io_err("sync", &blob.dir)));
            if let Err(e) = synced {
                // Not tried again: Linux reports a failed write-back once per descriptor and
                // may mark the pages clean, so a second sync would succeed over bytes that never
                // reached the disk, and the meta would then name them. The pieces not durable
                // are taken back instead (those marked since the snapshot too: their writes may
                // have been in the write-back that failed): not served, not named in a have-map
                // or a meta, and fetched again.
                let mut st = lock(&blob.status);
                let lost = st.verified.difference(&st.durable);
                for piece in lost.iter() {
                    if st.verified.remove(piece) {
                        st.unflushed_bytes = st.unflushed_bytes.saturating_sub(blob.geometry.piece_len(piece));
                    }
                }
                // The memory tier may keep their bytes: they were verified, and what serves
                // a piece asks `verified` first.
                return Err(e);
            }
        }
        let meta = Meta { format: META_FORMAT, size: blob.geometry.size(), pinned, bitmap: snapshot.to_bitmap() };
        let durable = self.inner.config.durable;
        let n = NEXT_TMP.fetch_add(1, Ordering::Relaxed);
        let tmp = blob.dir.join(format!("meta.tmp.{n}"));
        if let Err(e) = write_file(&tmp, &meta, durable) {
            // Each attempt takes a new name: what a failed one left would pile up until the
            // next open.
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        {
            let state = lock(&self.inner.state);
            if !state.blobs.get(&blob.hash).is_some_and(|b| std::ptr::eq(b.as_ref(), blob)) {
                drop(state);
                let _ = fs::remove_file(&tmp);
                return Ok(());
            }
            // Checked again under the lock `close` sets it under.
            if self.inner.closed.load(Ordering::Relaxed) {
                drop(state);
                let _ = fs::remove_file(&tmp);
                return Ok(());
            }
            let path = blob.dir.join("meta");
            if let Err(e) = fs::rename(&tmp, &path) {
                let _ = fs::remove_file(&tmp);
                return Err(io_err("rename", &path)(e));
            }
        }
        // A blob evicted since the rename took its directory away: nothing left to make durable.
        if durable && let Err(e) = sync_dir(&blob.dir) {
            if self.is_current(blob) {
                return Err(e);
            }
            return Ok(());
        }
        let mut st = lock(&blob.status);
        st.committed = st.committed.max(changes);
        // Pieces found corrupt meanwhile stay unmarked in memory; the next commit drops them.
        st.durable = snapshot.intersection(&st.verified);
        // Pieces marked while this commit ran wait for the next one, and count towards it.
        st.unflushed_bytes -= unflushed.min(st.unflushed_bytes);
        Ok(())
    }

    /// Whether the store holds a piece of `hash` that is in `wanted`, or holds it counted for
    /// another number of pieces than `wanted` is (its have-map is news to whoever counts
    /// otherwise); `None` if it holds no entry of `hash`. Copies nothing, as a watch woken at
    /// every piece stored asks it.
    pub fn has_news(&self, hash: Hash, wanted: &PieceSet) -> Option<bool> {
        let blob = self.blob(hash).ok()?;
        let st = lock(&blob.status);
        Some(st.verified.piece_count() != wanted.piece_count() || st.verified.intersects(wanted))
    }

    /// Whether the store holds `piece` of `hash` verified, and how many of its pieces it holds;
    /// `None` if it holds no entry of `hash`. Copies nothing, as a reader waiting for a piece
    /// asks it every few milliseconds.
    pub fn holds(&self, hash: Hash, piece: PieceIndex) -> Option<(bool, u32)> {
        let blob = self.blob(hash).ok()?;
        let st = lock(&blob.status);
        Some((st.verified.contains(piece), st.verified.count()))
    }

    /// The size of `hash` as the store holds it, if it holds an entry of it. Copies nothing.
    pub fn size(&self, hash: Hash) -> Option<u64> {
        self.blob(hash).ok().map(|b| b.geometry.size())
    }

    /// Whether `blob` is the one the store holds under its hash.
    fn is_current(&self, blob: &Blob) -> bool {
        lock(&self.inner.state).blobs.get(&blob.hash).is_some_and(|b| std::ptr::eq(b.as_ref(), blob))
    }

    /// Marks `hash` used, as a read of it does: the cache lets the least recently used go
    /// first. For a blob whose bytes the caller keeps in another form (a collection decoded).
    pub fn touch(&self, hash: Hash) {
        lock(&self.inner.state).lru.touch(&hash);
    }

    /// The verified pieces of `hash` and its size, if the store holds any of it.
    pub fn info(&self, hash: Hash) -> Option<BlobInfo> {
        lock(&self.inner.state).blobs.get(&hash).map(|b| b.info())
    }

    /// Every blob held.
    pub fn list(&self) -> Vec<BlobInfo> {
        lock(&self.inner.state).blobs.values().map(|b| b.info()).collect()
    }

    /// Encodes the requested pieces of `hash` that the store holds, with their proofs, ready to
    /// send. Every chunk group is checked against the hash first; pieces whose bytes no longer
    /// verify are dropped from the store and left out of the answer. Returns the pieces encoded
    /// (possibly none) and the encoding. [`Store::stream_pieces`] encodes a step at a time.
    pub fn encode_pieces(&self, hash: Hash, wanted: &PieceSet) -> Result<(PieceSet, Vec<u8>)> {
        // One step, encoded as the stream opens: every piece is checked before the answer is
        // settled, so a bad one is left out of it.
        let mut stream = self.stream_pieces(hash, wanted, usize::MAX)?;
        let encoded = stream.next_step(usize::MAX)?.unwrap_or_default();
        Ok((stream.pieces, encoded))
    }

    /// The requested pieces of `hash` that the store holds, encoded with their proofs a step at a
    /// time ([`PieceStream::next_step`]), each step at least `step` bytes: a server sending an
    /// answer holds a step of it rather than all of it. The first step is encoded here, and
    /// pieces found bad by then are dropped from the store and left out, as
    /// [`Store::encode_pieces`] leaves them out; [`PieceStream::pieces`] says what is sent. A
    /// piece found bad in a later step is dropped from the store too, and the step fails with
    /// [`StoreError::Corrupt`]: what was sent of it was checked, but the answer cannot be
    /// finished.
    pub fn stream_pieces(&self, hash: Hash, wanted: &PieceSet, step: usize) -> Result<PieceStream> {
        let blob = self.blob(hash)?;
        lock(&self.inner.state).lru.touch(&hash);
        loop {
            let pieces = wanted.intersection(&lock(&blob.status).verified);
            // Pieces the memory tier holds are read from there; with a tier, the rest join it.
            let (hot, tier) = {
                let mut tier = lock(&self.inner.hot);
                let hot: HashMap<_, _> = pieces.iter().filter_map(|p| Some((p, tier.get(hash, p)?))).collect();
                (hot, tier.capacity() > 0)
            };
            let mut stream = PieceStream {
                store: self.clone(),
                files: self.files(&blob)?,
                encoder: verify::PieceEncoder::new(hash, blob.geometry, &pieces),
                encoded_len: verify::encoded_len(blob.geometry, &pieces) as usize,
                blob: blob.clone(),
                ended: pieces.is_empty(),
                pieces,
                hot,
                read: tier.then(|| RefCell::new(Vec::new())),
                first: None,
            };
            match stream.encode(step) {
                Ok(first) => {
                    stream.first = first;
                    return Ok(stream);
                }
                Err(StoreError::Corrupt { .. }) => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// A proof of the blob's size (see `shoal_protocol::verify::encode_size_proof`), or `None`
    /// when the last piece is not held verified. A last piece whose bytes no longer verify is
    /// dropped from the store, as when serving it.
    pub fn size_proof(&self, hash: Hash) -> Result<Option<Vec<u8>>> {
        let blob = self.blob(hash)?;
        let last = PieceSet::single(blob.geometry.piece_count(), blob.geometry.last_piece());
        if !lock(&blob.status).verified.contains(blob.geometry.last_piece()) {
            return Ok(None);
        }
        let files = self.files(&blob)?;
        let loaded = self.load_pieces(&blob, &files, &last)?;
        let data = PiecesAt { geometry: blob.geometry, pieces: &loaded };
        let outboard = verify::post_order_outboard(hash, blob.geometry, FileAt(&files.outboard));
        let mut proof = Vec::new();
        match verify::encode_size_proof(data, outboard, &mut proof) {
            Ok(()) => Ok(Some(proof)),
            Err(EncodeError::Io(e)) => Err(StoreError::Io { op: "read", path: blob.dir.clone(), source: e }),
            Err(_) => {
                warn!(blob = %hash, "stored bytes of the last piece failed verification; dropping it");
                self.unmark(&blob, &last)?;
                Ok(None)
            }
        }
    }

    /// The bytes of one verified piece, checked against the hash as they are read. A piece that
    /// fails is dropped from the store and reported as [`StoreError::Corrupt`]. A caller reading
    /// a blob piece by piece takes a [`Store::reader`] instead, which an eviction cannot cut short.
    pub fn read_piece(&self, hash: Hash, piece: PieceIndex) -> Result<Bytes> {
        self.reader(hash)?.read_piece(piece)
    }

    /// A reader of `hash`, piece by piece. It holds the blob's files open, as an upload does
    /// ([`PieceStream`]): an eviction or a removal while it reads takes the entry out of the
    /// store and its room out of the count, not the bytes out from under the reader.
    pub fn reader(&self, hash: Hash) -> Result<BlobReader> {
        let blob = self.blob(hash)?;
        let files = self.files(&blob)?;
        Ok(BlobReader { store: self.clone(), blob, files })
    }

    /// Reads pieces from the memory tier or the data file.
    fn load_pieces(&self, blob: &Blob, files: &Files, pieces: &PieceSet) -> Result<HashMap<PieceIndex, Bytes>> {
        let mut out = HashMap::with_capacity(pieces.count() as usize);
        for p in pieces.iter() {
            if let Some(b) = lock(&self.inner.hot).get(blob.hash, p) {
                out.insert(p, b);
                continue;
            }
            let range = blob.geometry.piece_bytes(p);
            let mut buf = vec![0u8; (range.end - range.start) as usize];
            files.data.read_exact_at(&mut buf, range.start).map_err(io_err("read", &blob.dir))?;
            out.insert(p, Bytes::from(buf));
        }
        Ok(out)
    }

    /// The pieces an encode error points at.
    fn bad_pieces(&self, blob: &Blob, serving: &PieceSet, e: &EncodeError) -> PieceSet {
        let g = blob.geometry;
        let mut bad = PieceSet::empty(g.piece_count());
        match e {
            EncodeError::LeafHashMismatch(chunk) => {
                bad.insert(g.piece_of(chunk.to_bytes()));
            }
            EncodeError::ParentHashMismatch(node) => {
                // A bad hash pair condemns every piece below it.
                let r = node.chunk_range();
                let (start, end) = (r.start.to_bytes(), r.end.to_bytes().min(g.size()));
                for p in serving.iter() {
                    let pr = g.piece_bytes(p);
                    if pr.start < end.max(start + 1) && pr.end.max(pr.start + 1) > start {
                        bad.insert(p);
                    }
                }
            }
            _ => {}
        }
        bad
    }

    /// Drops pieces that no longer verify, in memory and in the meta.
    fn unmark(&self, blob: &Blob, bad: &PieceSet) -> Result<()> {
        {
            let mut st = lock(&blob.status);
            for p in bad.iter() {
                st.verified.remove(p);
            }
            st.changes += 1;
        }
        // See `commit`: a blob no longer current leaves the memory tier and the meta alone.
        if !self.is_current(blob) {
            return Ok(());
        }
        let mut hot = lock(&self.inner.hot);
        hot.forget_blob(blob.hash);
        drop(hot);
        self.commit(blob)
    }

    /// Checks every verified piece of `hash` against its hash, dropping any that fail. Returns
    /// the pieces dropped.
    pub fn check(&self, hash: Hash) -> Result<PieceSet> {
        let blob = self.blob(hash)?;
        let verified = lock(&blob.status).verified.clone();
        let mut bad = PieceSet::empty(blob.geometry.piece_count());
        let files = self.files(&blob)?;
        for p in verified.iter() {
            let one = PieceSet::single(blob.geometry.piece_count(), p);
            let outboard = verify::post_order_outboard(hash, blob.geometry, FileAt(&files.outboard));
            if verify::encode_pieces(FileAt(&files.data), outboard, &one, io::sink()).is_err() {
                bad.insert(p);
            }
        }
        if !bad.is_empty() {
            self.unmark(&blob, &bad)?;
        }
        Ok(bad)
    }

    /// Copies the complete blob `hash` to `dest`, verifying every byte on the way: `dest` appears
    /// (by rename) only if the copy's BLAKE3 hash equals `hash`. Returns the size.
    pub fn export(&self, hash: Hash, dest: &Path) -> Result<u64> {
        let blob = self.complete_blob(hash)?;
        let partial = partial_path(dest);
        // A name of this copy's own, made with `create_new`: never a file that is there already
        // (a user's, another copy's, a symbolic link planted there), which this would empty and
        // then remove.
        let created =
            OpenOptions::new().write(true).create_new(true).open(&partial).map_err(io_err("create", &partial))?;
        let copied = (|| {
            let mut out = BufWriter::with_capacity(1 << 20, created);
            let got = self.hash_data(&blob, &mut out, &partial)?;
            let out = out.into_inner().map_err(|e| io_err("write", &partial)(e.into_error()))?;
            out.sync_all().map_err(io_err("sync", &partial))?;
            Ok(got)
        })();
        match copied {
            Ok(got) if got == hash => {
                fs::rename(&partial, dest).map_err(io_err("rename into place", dest))?;
                Ok(blob.geometry.size())
            }
            Ok(_) => {
                let _ = fs::remove_file(&partial);
                Err(self.corrupt(hash))
            }
            Err(e) => {
                let _ = fs::remove_file(&partial);
                Err(e)
            }
        }
    }

    /// Moves the complete blob `hash` out of the store to `dest`, without copying it: its data
    /// file is renamed into place once its BLAKE3 hash is checked equal to `hash`, and the blob
    /// leaves the store. So `dest` must be on the store's file system: if the rename fails (an
    /// `Io` error), the blob stays, and [`Store::export`] can copy it instead. Returns the size.
    pub fn move_out(&self, hash: Hash, dest: &Path) -> Result<u64> {
        self.move_out_as(hash, dest, |_| {})
    }

    /// [`Store::move_out`], with `prepare` given the data file, once checked and right before it
    /// is renamed into place: to set its mode or owner through the descriptor, so that it appears
    /// at `dest` as it should be, and nothing else named there can be changed instead. If the
    /// rename fails, the file's mode and owner are put back. It runs under the store's locks: a
    /// few calls on the descriptor, never a call into the store.
    pub fn move_out_as(&self, hash: Hash, dest: &Path, prepare: impl FnOnce(&File)) -> Result<u64> {
        let blob = self.complete_blob(hash)?;
        let data_path = blob.dir.join("data");
        if self.hash_data(&blob, io::sink(), dest)? != hash {
            return Err(self.corrupt(hash));
        }
        let files = self.files(&blob)?;
        files.data.sync_all().map_err(io_err("sync", &data_path))?;
        // A commit under way finishes first, and one after finds the blob gone and writes no meta
        // into the directory being discarded.
        let _serial = lock(&blob.commit);
        // Under the state's lock, so that no eviction or delete takes the directory away between
        // the check that the entry is this one and the rename.
        let mut st = lock(&self.inner.state);
        if !st.blobs.get(&hash).is_some_and(|b| Arc::ptr_eq(b, &blob)) {
            return Err(StoreError::NotFound { hash });
        }
        // A closed store's `blobs/` is the next opener's: the caller copies instead.
        if self.inner.closed.load(Ordering::Relaxed) {
            return Err(io_err("move out", &data_path)(io::Error::other("the store was closed")));
        }
        // Last, under the locks: a move refused above leaves the store's file as it was, and one
        // the rename refuses (another file system) has it put back, the store's to read again.
        let before = files.data.metadata().ok();
        prepare(&files.data);
        if let Err(e) = fs::rename(&data_path, dest) {
            if let Some(before) = before {
                use std::os::unix::fs::MetadataExt;
                let _ = std::os::unix::fs::fchown(&files.data, Some(before.uid()), Some(before.gid()));
                let _ = files.data.set_permissions(before.permissions());
            }
            return Err(io_err("rename into place", dest)(e));
        }
        drop(files);
        self.take_entry(&mut st, &hash);
        let trashed = self.trash(&blob.dir);
        drop(st);
        self.empty_trash();
        if let Err(e) = trashed {
            warn!(blob = %hash, error = %e, "cannot remove a blob moved out of the store");
        }
        Ok(blob.geometry.size())
    }

    fn complete_blob(&self, hash: Hash) -> Result<Arc<Blob>> {
        let blob = self.blob(hash)?;
        let info = blob.info();
        if !info.is_complete() {
            return Err(StoreError::Incomplete { hash, have: info.pieces.count(), total: blob.geometry.piece_count() });
        }
        Ok(blob)
    }

    /// The BLAKE3 hash of `blob`'s data file, read whole and written to `out` (named `out_path`
    /// in errors) on the way.
    fn hash_data(&self, blob: &Blob, mut out: impl Write, out_path: &Path) -> Result<Hash> {
        let files = self.files(blob)?;
        let mut hasher = blake3::Hasher::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut offset = 0u64;
        while offset < blob.geometry.size() {
            let n = (blob.geometry.size() - offset).min(buf.len() as u64) as usize;
            files.data.read_exact_at(&mut buf[..n], offset).map_err(io_err("read", &blob.dir))?;
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n]).map_err(io_err("write", out_path))?;
            offset += n as u64;
        }
        Ok(Hash::from(hasher.finalize()))
    }

    /// The error for a complete blob whose data did not hash to `hash`, once its pieces were
    /// checked and the bad ones dropped.
    fn corrupt(&self, hash: Hash) -> StoreError {
        match self.check(hash) {
            Ok(bad) => StoreError::Corrupt { hash, piece: bad.iter().next().unwrap_or(0) },
            Err(e) => e,
        }
    }

    /// Keeps `hash` out of eviction. Returns nothing evicted (pinning only frees cache room).
    pub fn pin(&self, hash: Hash) -> Result<Vec<Hash>> {
        self.set_pinned(hash, true)
    }

    /// Returns `hash` to the cache's eviction order; reports what that evicted (possibly `hash`
    /// itself, if it is larger than the cache).
    pub fn unpin(&self, hash: Hash) -> Result<Vec<Hash>> {
        self.set_pinned(hash, false)
    }

    fn set_pinned(&self, hash: Hash, pinned: bool) -> Result<Vec<Hash>> {
        Ok(self.set_pinned_as(hash, pinned, None, None)?.1)
    }

    /// Pins or unpins `hash`; returns whether it was pinned, and what the cache evicted. A pin
    /// for `token`'s import is marked tentative if it is new (see [`State::note_pin`]); an unpin
    /// with `only_if` happens only while the pin is that import's tentative one.
    fn set_pinned_as(
        &self,
        hash: Hash,
        pinned: bool,
        token: Option<u64>,
        only_if: Option<u64>,
    ) -> Result<(bool, Vec<Hash>)> {
        let mut st = lock(&self.inner.state);
        if let Some(t) = only_if
            && st.tentative.get(&hash) != Some(&t)
        {
            return Ok((true, Vec::new()));
        }
        // Looked up under the lock that eviction and removal take: an entry evicted, removed or
        // replaced a moment before would have its bytes counted again (or twice taken off).
        let blob = st.blobs.get(&hash).cloned().ok_or(StoreError::NotFound { hash })?;
        let (was, evicted) = self.pin_entry(&mut st, hash, &blob, pinned, token);
        drop(st);
        Ok((was, self.finish_pin(hash, &blob, was != pinned, evicted)?))
    }

    /// The part of [`Store::set_pinned_as`] done under the state lock, for an entry the caller
    /// found there under this same hold: returns whether it was pinned, and what was evicted
    /// (taken out of the store already; their files go with [`Store::finish_pin`]).
    fn pin_entry(
        &self,
        st: &mut State,
        hash: Hash,
        blob: &Blob,
        pinned: bool,
        token: Option<u64>,
    ) -> (bool, Vec<Hash>) {
        let was = {
            let mut status = lock(&blob.status);
            status.changes += u64::from(status.pinned != pinned);
            std::mem::replace(&mut status.pinned, pinned)
        };
        if pinned {
            st.note_pin(hash, !was, token);
        } else {
            st.tentative.remove(&hash);
        }
        if was == pinned {
            return (was, Vec::new());
        }
        let evicted = if pinned {
            st.lru.remove(&hash);
            st.pinned_bytes += blob.footprint();
            Vec::new()
        } else {
            st.pinned_bytes -= blob.footprint();
            admit_unpinned(&mut st.lru, blob).unwrap_or_else(|| vec![hash])
        };
        (was, self.remove_evicted(st, evicted))
    }

    /// The rest of a pin or unpin, out of the state lock: deletes what was evicted and writes
    /// the blob's meta if its pin `changed` and it is still held.
    fn finish_pin(&self, hash: Hash, blob: &Blob, changed: bool, evicted: Vec<Hash>) -> Result<Vec<Hash>> {
        self.empty_trash();
        if changed && !evicted.contains(&hash) {
            self.commit(blob)?;
        }
        Ok(evicted)
    }

    /// Removes `hash` from the store if it holds no verified piece of it and the user did not pin
    /// it, checked and removed at once: what a fetch that failed leaves. Returns whether it did.
    pub fn delete_if_empty(&self, hash: Hash) -> Result<bool> {
        let mut st = lock(&self.inner.state);
        let empty = st.blobs.get(&hash).is_some_and(|b| {
            let status = lock(&b.status);
            status.verified.is_empty() && !status.pinned
        });
        if !empty {
            return Ok(false);
        }
        let blob = self.take_entry(&mut st, &hash).ok_or(StoreError::NotFound { hash })?;
        // Moved aside under the lock, as the closed check must be; deleted after.
        let trashed = self.trash(&blob.dir);
        drop(st);
        self.empty_trash();
        trashed.map(|()| true)
    }

    /// Removes `hash` from the store.
    pub fn delete(&self, hash: Hash) -> Result<()> {
        let mut st = lock(&self.inner.state);
        let blob = self.take_entry(&mut st, &hash).ok_or(StoreError::NotFound { hash })?;
        let trashed = self.trash(&blob.dir);
        drop(st);
        self.empty_trash();
        trashed
    }

    /// Changes the cache bound; reports what was evicted.
    pub fn set_cache_bytes(&self, bytes: u64) -> Result<Vec<Hash>> {
        let mut st = lock(&self.inner.state);
        // Partial blobs that could never be completed within the new bound go first: growing,
        // they would evict every other blob; and counted while the bound shrinks, they would
        // have whole blobs evicted for room they then give back.
        let mut evicted: Vec<Hash> =
            st.blobs.values().filter(|b| b.footprint() > bytes && !lock(&b.status).pinned).map(|b| b.hash).collect();
        for hash in &evicted {
            st.lru.remove(hash);
        }
        evicted.extend(st.lru.set_capacity(bytes));
        let evicted = self.remove_evicted(&mut st, evicted);
        drop(st);
        self.empty_trash();
        Ok(evicted)
    }

    /// Bytes in use.
    pub fn stats(&self) -> StoreStats {
        let st = lock(&self.inner.state);
        StoreStats {
            blobs: st.blobs.len(),
            cache_bytes: st.lru.used(),
            cache_capacity: st.lru.capacity(),
            pinned_bytes: st.pinned_bytes,
            hot_bytes: lock(&self.inner.hot).used(),
            evictions: self.inner.evictions.load(Ordering::Relaxed),
        }
    }

    fn blob(&self, hash: Hash) -> Result<Arc<Blob>> {
        lock(&self.inner.state).blobs.get(&hash).cloned().ok_or(StoreError::NotFound { hash })
    }

    /// Takes `hash`'s entry out of the store: out of its map, out of what it counts (the cache's
    /// bytes, or the pinned bytes) and out of the memory tier. Its directory is the caller's to
    /// discard.
    fn take_entry(&self, st: &mut State, hash: &Hash) -> Option<Arc<Blob>> {
        let blob = st.blobs.remove(hash)?;
        st.tentative.remove(hash);
        if st.lru.remove(hash).is_none() && lock(&blob.status).pinned {
            st.pinned_bytes -= blob.footprint();
        }
        lock(&self.inner.hot).forget_blob(*hash);
        // Its files close once the readers still holding them are done.
        let mut open = lock(&self.inner.open);
        blob.removed.store(true, Ordering::Relaxed);
        open.pop(&blob.id);
        drop(open);
        Some(blob)
    }

    /// The blob's files, opened if nobody holds them, counted in the bound on open blobs
    /// ([`StoreConfig::open_blobs`]) as used now.
    /// An entry that left the store is [`StoreError::NotFound`] once nobody holds its files: its
    /// directory is gone, or is another entry's by now.
    fn files(&self, blob: &Blob) -> Result<Arc<Files>> {
        let gone = || StoreError::NotFound { hash: blob.hash };
        {
            let mut open = lock(&self.inner.open);
            if let Some(files) = open.get(&blob.id) {
                return Ok(files.clone());
            }
            // Pushed out of the bound while a reader held them: shared until the readers are done.
            if let Some(files) = lock(&blob.files).upgrade() {
                return Ok(files);
            }
            if blob.removed.load(Ordering::Relaxed) {
                return Err(gone());
            }
        }
        // Opened outside the lock: a slow disk holds up this blob's users alone.
        let files = Arc::new(Files::open(&blob.dir)?);
        let mut open = lock(&self.inner.open);
        if let Some(theirs) = open.get(&blob.id) {
            return Ok(theirs.clone());
        }
        // Still in the store now, so it was when the files were opened (it leaves under this
        // lock, before its directory moves): they are its own.
        if blob.removed.load(Ordering::Relaxed) {
            return Err(gone());
        }
        *lock(&blob.files) = Arc::downgrade(&files);
        open.put(blob.id, files.clone());
        // The blob used least recently gives its files back (once its readers are done).
        while open.len() > self.inner.config.open_blobs.max(1) {
            open.pop_lru();
        }
        Ok(files)
    }

    /// Takes the blobs the cache evicted out of the store. Every one leaves the store's count
    /// whatever the disk does: one whose directory cannot be removed is logged, and found again
    /// (and counted) when the store next opens.
    fn remove_evicted(&self, st: &mut State, evicted: Vec<Hash>) -> Vec<Hash> {
        for hash in &evicted {
            if let Some(blob) = self.take_entry(st, hash) {
                debug!(blob = %hash, "evicted");
                self.inner.evictions.fetch_add(1, Ordering::Relaxed);
                if let Err(e) = self.trash(&blob.dir) {
                    warn!(blob = %hash, error = %e, "cannot remove an evicted blob");
                }
            }
        }
        evicted
    }

    /// Renames a blob directory made under `tmp/` into its place under `blobs/`, durably, and
    /// reads it back. Called under the store's lock, with no entry for `hash`.
    fn place(&self, dir: &Path, hash: Hash) -> Result<Blob> {
        let final_dir = self.blob_dir(hash);
        // A closed store's `blobs/` is the next opener's.
        if self.inner.closed.load(Ordering::Relaxed) {
            return Err(io_err("place", &final_dir)(io::Error::other("the store was closed")));
        }
        let placed = match fs::rename(dir, &final_dir) {
            // Something no entry names (callers hold the store's lock, with no entry for the
            // hash): most often what a removal that failed half-way left. Kept, it failed every
            // later begin or import of the blob until the next open. As `open` does, a blob
            // directory of ours goes, and anything else is set aside for the user to look at.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::DirectoryNotEmpty | io::ErrorKind::AlreadyExists | io::ErrorKind::NotADirectory
                ) =>
            {
                match load_blob(&final_dir) {
                    Ok(Some(_)) => {
                        warn!(blob = %hash, "a blob directory no entry names was in the blob's place; removed");
                        self.trash(&final_dir)?;
                    }
                    _ => {
                        let aside = self.set_aside(&final_dir)?;
                        warn!(blob = %hash, to = %aside.display(), "what was in the blob's place was set aside");
                    }
                }
                fs::rename(dir, &final_dir)
            }
            placed => placed,
        };
        placed.map_err(io_err("rename into place", &final_dir))?;
        // In place, it is ours: one that cannot be read back goes, or it would fail every later
        // begin or import of the blob.
        let loaded = sync_dir(&self.inner.root.join("blobs")).and_then(|()| load_blob(&final_dir));
        match loaded {
            Ok(Some(Loaded::Blob(blob))) => Ok(*blob),
            failed => {
                let _ = self.trash(&final_dir);
                let unreadable = || io_err("read back", &final_dir)(io::Error::from(io::ErrorKind::InvalidData));
                Err(failed.err().unwrap_or_else(unreadable))
            }
        }
    }

    fn blob_dir(&self, hash: Hash) -> PathBuf {
        self.inner.root.join("blobs").join(hash.to_hex())
    }

    fn tmp_path(&self, what: &str) -> PathBuf {
        let n = NEXT_TMP.fetch_add(1, Ordering::Relaxed);
        self.inner.root.join("tmp").join(format!("{what}-{}-{n}", std::process::id()))
    }

    /// Moves a directory out of `blobs/` into `aside/`, under a name not yet taken there; returns
    /// where it went.
    fn set_aside(&self, dir: &Path) -> Result<PathBuf> {
        let aside = self.inner.root.join("aside");
        fs::create_dir_all(&aside).map_err(io_err("create", &aside))?;
        let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        for n in 0..1000 {
            let to = if n == 0 { aside.join(&name) } else { aside.join(format!("{name}.{n}")) };
            if to.symlink_metadata().is_err() {
                fs::rename(dir, &to).map_err(io_err("set aside", dir))?;
                return Ok(to);
            }
        }
        Err(io_err("set aside", dir)(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "1,000 copies are set aside already",
        )))
    }

    /// Moves a directory out of `blobs/` atomically, to be deleted by [`Store::empty_trash`]
    /// once the caller let go of the store's lock: deleting a large blob's files takes a while,
    /// and every user of the store would wait on it.
    fn trash(&self, dir: &Path) -> Result<()> {
        if let Some(moved) = self.move_to_tmp(dir)? {
            lock(&self.inner.trash).push(moved);
        }
        Ok(())
    }

    /// Moves a directory out of `blobs/` (or one of our own in `tmp/`) into `tmp/` atomically;
    /// where it went, or `None` if it was not there, or if it is in `blobs/` and the store is
    /// closed: those are the next opener's then, and an eviction in a closed store's tasks still
    /// winding down took away the new opener's blob.
    fn move_to_tmp(&self, dir: &Path) -> Result<Option<PathBuf>> {
        if self.inner.closed.load(Ordering::Relaxed) && dir.starts_with(self.inner.root.join("blobs")) {
            return Ok(None);
        }
        let moved = self.tmp_path("trash");
        match fs::rename(dir, &moved) {
            Ok(()) => Ok(Some(moved)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err("move aside", dir)(e)),
        }
    }

    /// Deletes what [`Store::trash`] moved aside. Called without the store's lock held, by each
    /// public method that may have trashed something; what a failure leaves goes when `tmp/` is
    /// cleared at the next open.
    fn empty_trash(&self) {
        let trash = std::mem::take(&mut *lock(&self.inner.trash));
        for dir in trash {
            if let Err(e) = fs::remove_dir_all(&dir) {
                warn!(dir = %dir.display(), error = %e, "cannot delete a removed blob's files");
            }
        }
    }

    /// Moves a directory out of `blobs/` atomically, then deletes it.
    fn discard_dir(&self, dir: &Path) -> Result<()> {
        match self.move_to_tmp(dir)? {
            Some(moved) => fs::remove_dir_all(&moved).map_err(io_err("delete", &moved)),
            None => Ok(()),
        }
    }
}

struct Staged {
    dir: PathBuf,
    hash: Hash,
    geometry: Geometry,
}

/// What placing a staged partial blob came to ([`Store::place_partial`]): its directory moved
/// into `blobs/`, or the blob held already (another begin or an import came first).
enum Placed {
    Staged(Begun),
    Held(Begun),
}

impl Placed {
    fn begun(self) -> Begun {
        match self {
            Placed::Staged(begun) | Placed::Held(begun) => begun,
        }
    }
}

/// What a begin finds under the store's lock ([`Store::plan_begin`]).
enum BeginPlan {
    /// The blob held at this size, with these pieces verified.
    Held(PieceSet),
    /// A new entry to make, pinned if the entry it replaces (`giving_way`) was.
    New { giving_way: Option<Arc<Blob>>, pinned: bool },
}

/// Reads the chunks the import's copier hands over, in order, and hands each buffer back.
struct ChunkReader {
    chunks: std::sync::mpsc::Receiver<Vec<u8>>,
    recycle: std::sync::mpsc::SyncSender<Vec<u8>>,
    current: Vec<u8>,
    pos: usize,
}

impl Read for ChunkReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.current.len() {
            match self.chunks.recv() {
                Ok(chunk) => {
                    let done = std::mem::replace(&mut self.current, chunk);
                    self.pos = 0;
                    if done.capacity() > 0 {
                        // The copier may have finished; then the buffer is simply dropped.
                        let _ = self.recycle.try_send(done);
                    }
                }
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len() - self.pos);
        buf[..n].copy_from_slice(&self.current[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Fills `buf` unless the source ends first; returns the bytes read.
fn read_full(source: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match source.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

fn encode_io(e: EncodeError) -> io::Error {
    match e {
        EncodeError::Io(e) => e,
        e => io::Error::other(e.to_string()),
    }
}

/// Where [`Store::export`] copies to before the copy is checked: beside `dest` (so that the rename
/// stays on one file system), under a name of this copy's own.
fn partial_path(dest: &Path) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    // The time too: a process restarted under the same id (PID 1 in a container) would meet the
    // names a crash left.
    let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    let mut name = dest.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(format!(".shoal-partial-{}-{nanos:08x}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed)));
    dest.with_file_name(name)
}

/// What a blob directory holds, for [`load_blob`].
enum Loaded {
    Blob(Box<Blob>),
    /// What a crash left half-way through taking a blob out of the store.
    Leftover,
}

/// Reads a blob directory; `None` if this version cannot use it (no meta, one it cannot read,
/// or files that disagree with it).
fn load_blob(dir: &Path) -> Result<Option<Loaded>> {
    // Named as the store names it: the parse takes either case, and a second directory of one
    // hash (a copy named in capitals) would be loaded over the first, which the cache's count
    // would go on counting, and evicting, under the one hash.
    let Some(hash) =
        dir.file_name().and_then(|n| n.to_str()).and_then(|n| n.parse::<Hash>().ok().filter(|h| h.to_hex() == n))
    else {
        return Ok(None);
    };
    let meta_path = dir.join("meta");
    let bytes = match fs::read(&meta_path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err("read", &meta_path)(e)),
    };
    let Ok(meta) = postcard::from_bytes::<Meta>(&bytes) else { return Ok(None) };
    let Ok(geometry) = Geometry::new(meta.size) else { return Ok(None) };
    let verified = match meta.format {
        META_FORMAT => PieceSet::from_bitmap(geometry.piece_count(), &meta.bitmap),
        1 => from_v1_bitmap(geometry, &meta.bitmap),
        _ => return Ok(None),
    };
    // Its files are opened when first used (see `Store::files`): a store holds more blobs than a
    // process may open files.
    let len = |name: &str| {
        let p = dir.join(name);
        fs::metadata(&p).map(|m| m.len()).map_err(io_err("stat", &p))
    };
    // A blob moved out (`Store::move_out`) takes its data file first: a crash before the rest
    // went leaves a directory with nothing in it worth keeping.
    // Only a data file known to be absent: one that cannot be looked at (a disk error, no
    // permission) is no sign of a move-out, and what it holds is not deleted for it.
    let data = dir.join("data");
    match fs::symlink_metadata(&data) {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Some(Loaded::Leftover)),
        Err(e) => return Err(io_err("stat", &data)(e)),
    }
    if len("data")? != meta.size || len("outboard")? != geometry.outboard_size() {
        return Ok(None);
    }
    Ok(Some(Loaded::Blob(Box::new(Blob {
        hash,
        geometry,
        dir: dir.to_owned(),
        id: NEXT_BLOB_ID.fetch_add(1, Ordering::Relaxed),
        files: Mutex::new(std::sync::Weak::new()),
        removed: std::sync::atomic::AtomicBool::new(false),
        status: Mutex::new(Status {
            durable: verified.clone(),
            verified,
            pinned: meta.pinned,
            unflushed_bytes: 0,
            dirty: None,
            changes: 0,
            committed: 0,
        }),
        commit: Mutex::new(()),
    }))))
}

/// The verified pieces a format-1 bitmap (pieces of [`V1_PIECE_SIZE`]) records: a piece is verified
/// if the format-1 piece around it was. The next flush of the blob writes the current format.
fn from_v1_bitmap(geometry: Geometry, bitmap: &[u8]) -> PieceSet {
    let v1_count = geometry.size().div_ceil(V1_PIECE_SIZE).max(1) as u32;
    let v1 = PieceSet::from_bitmap(v1_count, bitmap);
    let mut verified = PieceSet::empty(geometry.piece_count());
    for piece in 0..geometry.piece_count() {
        if v1.contains((geometry.piece_bytes(piece).start / V1_PIECE_SIZE) as u32) {
            verified.insert(piece);
        }
    }
    verified
}

/// Replaces `dir/meta` atomically and durably.
fn write_meta(dir: &Path, meta: &Meta, durable: bool) -> Result<()> {
    let tmp = dir.join("meta.tmp");
    let path = dir.join("meta");
    write_file(&tmp, meta, durable)?;
    fs::rename(&tmp, &path).map_err(io_err("rename", &path))?;
    if durable {
        sync_dir(dir)?;
    }
    Ok(())
}

/// Writes `meta` to the file `path` (made or emptied), synced if `durable`.
fn write_file(path: &Path, meta: &Meta, durable: bool) -> Result<()> {
    let bytes = postcard::to_stdvec(meta).map_err(|e| io_err("encode", path)(io::Error::other(e)))?;
    let mut f = File::create(path).map_err(io_err("create", path))?;
    f.write_all(&bytes).map_err(io_err("write", path))?;
    if durable {
        f.sync_all().map_err(io_err("sync", path))?;
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_err("sync", dir))
}

/// Takes the lock of the store at `root` (its `lock` file, made if missing), held until the file
/// is closed; `None` where the file system has no locks (some network and FUSE ones), where the
/// store works as it did without one.
fn lock_store(root: &Path) -> Result<Option<File>> {
    let path = root.join("lock");
    let file =
        OpenOptions::new().create(true).truncate(false).write(true).open(&path).map_err(io_err("open", &path))?;
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(fs::TryLockError::WouldBlock) => Err(StoreError::InUse { path: root.to_owned() }),
        Err(fs::TryLockError::Error(e)) => {
            debug!(path = %path.display(), error = %e, "cannot lock the store");
            Ok(None)
        }
    }
}

/// [`lock_store`] for a store being opened: a lock held for a moment (by [`Store::in_use`], the
/// command asking whether a node runs) is waited for, up to a second.
fn lock_store_waiting(root: &Path) -> Result<Option<File>> {
    for _ in 0..20 {
        match lock_store(root) {
            Err(StoreError::InUse { .. }) => std::thread::sleep(std::time::Duration::from_millis(50)),
            other => return other,
        }
    }
    lock_store(root)
}
