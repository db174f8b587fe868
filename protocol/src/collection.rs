//! Collections: a directory as a blob that lists `(path, hash, size)` entries.
//!
//! Encoding: the 16 bytes `shoal-collection`, a format byte (1), then the postcard encoding of the
//! entries, sorted by path. Paths are relative, `/`-separated, and never contain `.`, `..` or empty
//! components, so a collection can never name a file outside the directory it describes.

use serde::{Deserialize, Serialize};

use crate::Hash;
use crate::piece::MAX_BLOB_SIZE;

/// The bytes every collection starts with.
pub const MAGIC: &[u8; 16] = b"shoal-collection";

const FORMAT: u8 = 1;

/// The most entries a collection may hold.
pub const MAX_ENTRIES: usize = 1 << 20;

/// The longest path, in bytes.
pub const MAX_PATH: usize = 4096;

/// The largest encoded collection a decoder accepts.
pub const MAX_ENCODED: usize = 256 << 20;

/// One file of a collection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The path inside the collection, `/`-separated.
    pub path: String,
    /// The file's content id.
    pub hash: Hash,
    /// The file's size in bytes.
    pub size: u64,
}

/// A directory: entries sorted by path, paths unique.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Collection {
    entries: Vec<Entry>,
}

/// Why entries or bytes are not a collection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CollectionError {
    /// The bytes do not start with [`MAGIC`] and a known format.
    #[error("not a Shoal collection")]
    NotACollection,
    /// A path that could escape the directory or is malformed.
    #[error("invalid path {path:?} in collection: {reason}")]
    BadPath {
        /// The path.
        path: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Two entries with one path.
    #[error("path {0:?} appears twice in the collection")]
    Duplicate(String),
    /// Over a bound.
    #[error("collection too large: {0}")]
    TooLarge(String),
    /// The entries do not decode.
    #[error("malformed collection: {0}")]
    Malformed(String),
}

/// Checks that `path` is a relative `/`-separated path with no `.`, `..` or empty components.
pub fn check_path(path: &str) -> Result<(), CollectionError> {
    let bad = |reason| Err(CollectionError::BadPath { path: path.to_string(), reason });
    if path.is_empty() {
        return bad("empty");
    }
    if path.len() > MAX_PATH {
        return bad("longer than 4096 bytes");
    }
    if path.contains('\\') || path.chars().any(|c| c.is_control()) {
        // Control characters would reach a terminal as escapes when the path is printed.
        return bad("contains a backslash or a control character");
    }
    if path.chars().any(is_invisible) {
        // Shown, they would disguise the name: `a\u{202E}txt.exe` prints as `aexe.txt`.
        return bad("contains an invisible or bidirectional formatting character");
    }
    for c in path.split('/') {
        match c {
            "" => return bad("absolute, or has an empty component"),
            "." | ".." => return bad("has a . or .. component"),
            _ => {}
        }
    }
    Ok(())
}

/// The characters that disguise how a name shows without showing themselves: the bidirectional
/// embeddings, overrides and isolates (`a\u{202E}txt.exe` shows as `aexe.txt`), the zero-width
/// space and its kin, the byte-order mark, and the line and paragraph separators. Not the joiners
/// (U+200C, U+200D), which Persian and Indic words and emoji sequences need, nor the left-to-right
/// and right-to-left marks, which Hebrew and Arabic names hold.
fn is_invisible(c: char) -> bool {
    matches!(c, '\u{200b}' | '\u{2028}'..='\u{202e}' | '\u{2060}'..='\u{2064}' | '\u{2066}'..='\u{2069}' | '\u{feff}')
}

/// The most bytes a collection's encoding takes beside its entries: the magic, the format byte,
/// and the entry count as a varint.
pub const MAX_HEADER: usize = MAGIC.len() + 1 + 10;

/// The bytes an entry of `path` and `size` takes in a collection's encoding; with at most
/// [`MAX_HEADER`] bytes beside the entries, what [`MAX_ENCODED`] bounds.
pub fn entry_encoded_len(path: &str, size: u64) -> usize {
    varint_len(path.len() as u64) + path.len() + 32 + varint_len(size)
}

/// The bytes postcard takes for `n` as a varint.
fn varint_len(n: u64) -> usize {
    (64 - n.max(1).leading_zeros() as usize).div_ceil(7)
}

impl Collection {
    /// A collection of `entries` (in any order); checks every path and size, refuses duplicates,
    /// and refuses a collection whose encoding would be larger than [`MAX_ENCODED`]: no decoder
    /// would read it.
    pub fn new(mut entries: Vec<Entry>) -> Result<Self, CollectionError> {
        if entries.len() > MAX_ENTRIES {
            return Err(CollectionError::TooLarge(format!("{} entries, more than {MAX_ENTRIES}", entries.len())));
        }
        let encoded = MAGIC.len()
            + 1
            + varint_len(entries.len() as u64)
            + entries.iter().map(|e| entry_encoded_len(&e.path, e.size)).sum::<usize>();
        if encoded > MAX_ENCODED {
            return Err(CollectionError::TooLarge(format!("a listing of {encoded} bytes, more than {MAX_ENCODED}")));
        }
        for e in &entries {
            check_path(&e.path)?;
            if e.size > MAX_BLOB_SIZE {
                return Err(CollectionError::TooLarge(format!(
                    "{:?} of {} bytes, more than a blob holds",
                    e.path, e.size
                )));
            }
        }
        entries.sort_by(|a, b| a.path.cmp(&b.path));
        if let Some(w) = entries.windows(2).find(|w| w[0].path == w[1].path) {
            return Err(CollectionError::Duplicate(w[0].path.clone()));
        }
        Ok(Self { entries })
    }

    /// The entries, sorted by path.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// The entry at `path`.
    pub fn get(&self, path: &str) -> Option<&Entry> {
        self.entries.binary_search_by(|e| e.path.as_str().cmp(path)).ok().map(|i| &self.entries[i])
    }

    /// The total size of the files (at most 2^20 of 2^41 bytes each: it cannot overflow).
    pub fn total_size(&self) -> u64 {
        self.entries.iter().map(|e| e.size).sum()
    }

    /// The collection's bytes (what is stored and hashed as a blob).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        out.push(FORMAT);
        postcard::to_extend(&self.entries, out).unwrap_or_default()
    }

    /// Whether a blob starting with `prefix` is a collection.
    pub fn is_collection(prefix: &[u8]) -> bool {
        prefix.len() > MAGIC.len() && prefix.starts_with(MAGIC) && prefix[MAGIC.len()] == FORMAT
    }

    /// Reads a collection, checking every bound and path.
    pub fn decode(bytes: &[u8]) -> Result<Self, CollectionError> {
        if !Self::is_collection(bytes) {
            return Err(CollectionError::NotACollection);
        }
        if bytes.len() > MAX_ENCODED {
            return Err(CollectionError::TooLarge(format!("{} bytes", bytes.len())));
        }
        let body = &bytes[MAGIC.len() + 1..];
        // The count first (postcard writes a sequence's length as a varint, as it does a u64):
        // entries past the bound are refused before any is decoded.
        let (count, _): (u64, _) =
            postcard::take_from_bytes(body).map_err(|e| CollectionError::Malformed(e.to_string()))?;
        if count > MAX_ENTRIES as u64 {
            return Err(CollectionError::TooLarge(format!("{count} entries, more than {MAX_ENTRIES}")));
        }
        // Each entry takes at least 34 bytes (path length, hash, size), so the count a peer claims
        // cannot make us allocate more than the bytes it sent justify.
        let (mut entries, rest): (Vec<Entry>, _) =
            postcard::take_from_bytes(body).map_err(|e| CollectionError::Malformed(e.to_string()))?;
        if !rest.is_empty() {
            return Err(CollectionError::Malformed(format!("{} trailing bytes", rest.len())));
        }
        // Grown by doubling as it was decoded: a collection kept decoded takes what it holds.
        entries.shrink_to_fit();
        let c = Self::new(entries)?;
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(path: &str, i: u8) -> Entry {
        Entry { path: path.into(), hash: Hash::from([i; 32]), size: u64::from(i) * 1000 }
    }

    #[test]
    fn round_trips_sorted() {
        let c = Collection::new(vec![entry("b/x.txt", 2), entry("a.html", 1)]).expect("valid");
        assert_eq!(c.entries()[0].path, "a.html");
        let bytes = c.encode();
        assert!(Collection::is_collection(&bytes));
        assert_eq!(Collection::decode(&bytes).expect("decodes"), c);
        assert_eq!(c.get("b/x.txt").map(|e| e.size), Some(2000));
        assert!(c.get("b").is_none());
        assert_eq!(c.total_size(), 3000);
    }

    #[test]
    fn golden_bytes() {
        let c = Collection::new(vec![entry("a", 0xab)]).expect("valid");
        let hex = hex::encode(c.encode());
        let want = [
            "73686f616c2d636f6c6c656374696f6e", // "shoal-collection"
            "01",                               // format 1
            "01",                               // one entry
            "0161",                             // path "a"
            &"ab".repeat(32),                   // hash
            "f8b70a",                           // size 171000, varint
        ]
        .concat();
        assert_eq!(hex, want);
    }

    #[test]
    fn paths_cannot_escape() {
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../../x",
            "a//b",
            "./a",
            "a/.",
            "a\\b",
            "a\0b",
            "a\nb",
            "\u{1b}[2Jx",
            "a\u{202e}txt.exe",
            "in\u{200b}voice.pdf",
            "\u{feff}a",
            "\u{2067}a",
        ] {
            assert!(Collection::new(vec![entry(bad, 1)]).is_err(), "{bad:?} accepted");
        }
        // Names people have: the joiners of Persian and of emoji sequences, a right-to-left mark.
        for good in [
            "\u{645}\u{6cc}\u{200c}\u{62e}\u{648}\u{627}\u{647}\u{645}",
            "\u{1f468}\u{200d}\u{1f467}.png",
            "\u{5e9}\u{5dc}\u{5d5}\u{5dd}\u{200f}.txt",
        ] {
            assert!(Collection::new(vec![entry(good, 1)]).is_ok(), "{good:?} refused");
        }
        assert!(matches!(Collection::new(vec![entry("a", 1), entry("a", 2)]), Err(CollectionError::Duplicate(_))));
        assert_eq!(Collection::decode(b"hello"), Err(CollectionError::NotACollection));
        let mut bytes = Collection::new(vec![entry("a", 1)]).expect("valid").encode();
        bytes.push(0);
        assert!(Collection::decode(&bytes).is_err(), "trailing bytes");
        // A claimed huge entry count with no bytes behind it fails cleanly.
        let mut lie = MAGIC.to_vec();
        lie.extend_from_slice(&[1, 0xff, 0xff, 0xff, 0xff, 0x0f]);
        assert!(Collection::decode(&lie).is_err());
    }

    #[test]
    fn an_entry_count_past_the_bound_is_refused_before_any_entry_is_decoded() {
        // MAX_ENTRIES + 1 as a varint, then bytes enough for that many 35-byte entries: refused
        // for the count, not after decoding a million of them.
        let mut bytes = MAGIC.to_vec();
        bytes.push(FORMAT);
        let mut n = MAX_ENTRIES as u64 + 1;
        while n >= 0x80 {
            bytes.push((n as u8) | 0x80);
            n >>= 7;
        }
        bytes.push(n as u8);
        let one = Entry { path: "a".into(), hash: Hash::from([7; 32]), size: 0 };
        let encoded = postcard::to_stdvec(&one).expect("encode");
        for _ in 0..1000 {
            bytes.extend_from_slice(&encoded);
        }
        assert!(matches!(Collection::decode(&bytes), Err(CollectionError::TooLarge(_))));
    }

    #[test]
    fn the_encoded_length_is_known_before_encoding_and_bounded() {
        let entries = vec![
            Entry { path: "a".into(), hash: Hash::from([1; 32]), size: 0 },
            Entry { path: "é/".repeat(70) + "x", hash: Hash::from([2; 32]), size: 127 },
            Entry { path: "b".repeat(300), hash: Hash::from([3; 32]), size: 128 },
            Entry { path: "c".into(), hash: Hash::from([4; 32]), size: MAX_BLOB_SIZE },
        ];
        let c = Collection::new(entries.clone()).expect("valid");
        let expected =
            MAGIC.len() + 1 + 1 + entries.iter().map(|e| postcard::to_stdvec(e).expect("encode").len()).sum::<usize>();
        assert_eq!(c.encode().len(), expected);
        // One more byte than a blob holds in one entry is refused; and entries whose listing
        // would pass MAX_ENCODED are refused before anything is encoded.
        let mut over = entries;
        over[3].size = MAX_BLOB_SIZE + 1;
        assert!(matches!(Collection::new(over), Err(CollectionError::TooLarge(_))));
        let path_len = MAX_PATH - 10;
        let per_entry = 2 + path_len + 32 + 1;
        let count = MAX_ENCODED / per_entry + 1;
        let many: Vec<Entry> = (0..count)
            .map(|i| Entry {
                path: format!("{i:010}{}", "p".repeat(path_len - 10)),
                hash: Hash::from([5; 32]),
                size: 1,
            })
            .collect();
        assert!(matches!(Collection::new(many), Err(CollectionError::TooLarge(_))));
    }
}
