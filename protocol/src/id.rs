//! Content ids: the BLAKE3 hash of a blob's bytes, printed exactly as `b3sum` prints it.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The number of hex digits in a printed [`Hash`].
pub const HASH_HEX_LEN: usize = 64;

/// The id of a blob: the BLAKE3 hash of its bytes.
///
/// `Display` and `FromStr` use the 64 lowercase hex digits that `b3sum` prints, so any download can
/// be checked with `b3sum`. On the wire it is the 32 raw bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Hash(#[serde(with = "hash_bytes")] blake3::Hash);

impl Hash {
    /// Hashes `bytes` in memory. For files and streams, use the cache's import, which also
    /// computes the outboard.
    pub fn of(bytes: &[u8]) -> Self {
        Self(blake3::hash(bytes))
    }

    /// The 32 raw bytes of the hash.
    pub fn as_bytes(&self) -> &[u8; 32] {
        self.0.as_bytes()
    }

    /// The 64 lowercase hex digits, as `b3sum` prints them.
    pub fn to_hex(&self) -> String {
        self.0.to_hex().to_string()
    }

    /// The first 10 hex digits, enough to tell blobs apart in logs.
    pub fn short(&self) -> String {
        let mut s = self.to_hex();
        s.truncate(10);
        s
    }

    /// The hash as `bao-tree` and `blake3` know it.
    pub fn as_blake3(&self) -> blake3::Hash {
        self.0
    }
}

impl PartialOrd for Hash {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Hash {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.as_bytes().cmp(other.as_bytes())
    }
}

impl From<blake3::Hash> for Hash {
    fn from(h: blake3::Hash) -> Self {
        Self(h)
    }
}

impl From<[u8; 32]> for Hash {
    fn from(b: [u8; 32]) -> Self {
        Self(blake3::Hash::from_bytes(b))
    }
}

impl fmt::Display for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.to_hex().as_str())
    }
}

impl fmt::Debug for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hash({})", self.short())
    }
}

/// Why a string is not a content id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ParseHashError {
    /// The string was empty.
    #[error("empty content id: expected {HASH_HEX_LEN} hex digits, as b3sum prints them")]
    Empty,
    /// The string had the wrong number of characters.
    #[error("content id has {len} characters: expected {HASH_HEX_LEN} hex digits, as b3sum prints them")]
    WrongLength {
        /// The number of characters given.
        len: usize,
    },
    /// A character was not a hex digit.
    #[error(
        "content id has {character:?} at position {position}: expected {HASH_HEX_LEN} hex digits (0-9, a-f), as b3sum prints them"
    )]
    NotHex {
        /// The offending character.
        character: char,
        /// Its zero-based position in the string.
        position: usize,
    },
}

impl FromStr for Hash {
    type Err = ParseHashError;

    /// Parses the 64 hex digits `b3sum` prints. Upper-case digits are accepted; nothing else is
    /// (no `0x` prefix, no whitespace, no file name).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err(ParseHashError::Empty);
        }
        if let Some((position, character)) = s.chars().enumerate().find(|(_, c)| !c.is_ascii_hexdigit()) {
            return Err(ParseHashError::NotHex { character, position });
        }
        if s.len() != HASH_HEX_LEN {
            return Err(ParseHashError::WrongLength { len: s.len() });
        }
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(s, &mut bytes).map_err(|_| ParseHashError::WrongLength { len: s.len() })?;
        Ok(Self::from(bytes))
    }
}

mod hash_bytes {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub(super) fn serialize<S: Serializer>(h: &blake3::Hash, s: S) -> Result<S::Ok, S::Error> {
        h.as_bytes().serialize(s)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<blake3::Hash, D::Error> {
        <[u8; 32]>::deserialize(d).map(blake3::Hash::from_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `printf 'abc' | b3sum`
    const ABC: &str = "6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85";

    #[test]
    fn prints_what_b3sum_prints() {
        assert_eq!(Hash::of(b"abc").to_string(), ABC);
        // `b3sum </dev/null`
        assert_eq!(Hash::of(b"").to_string(), "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262");
    }

    #[test]
    fn parses_what_it_prints() {
        let h: Hash = ABC.parse().expect("valid id");
        assert_eq!(h, Hash::of(b"abc"));
        assert_eq!(ABC.to_uppercase().parse::<Hash>(), Ok(h));
    }

    #[test]
    fn rejects_malformed_ids_with_a_reason() {
        assert_eq!("".parse::<Hash>(), Err(ParseHashError::Empty));
        assert_eq!(ABC[..63].parse::<Hash>(), Err(ParseHashError::WrongLength { len: 63 }));
        assert_eq!(format!("{ABC}0").parse::<Hash>(), Err(ParseHashError::WrongLength { len: 65 }));
        let bad = format!("{}g{}", &ABC[..10], &ABC[11..]);
        assert_eq!(bad.parse::<Hash>(), Err(ParseHashError::NotHex { character: 'g', position: 10 }));
        assert!(matches!(format!("0x{}", &ABC[2..]).parse::<Hash>(), Err(ParseHashError::NotHex { position: 1, .. })));
        assert!(matches!(format!(" {}", &ABC[1..]).parse::<Hash>(), Err(ParseHashError::NotHex { position: 0, .. })));
        // a multi-byte character must not be mistaken for a hex digit or panic on slicing
        let uni = format!("é{}", &ABC[2..]);
        assert!(matches!(uni.parse::<Hash>(), Err(ParseHashError::NotHex { character: 'é', .. })));
    }

    #[test]
    fn error_messages_say_what_is_expected() {
        let msg = "abc".parse::<Hash>().unwrap_err().to_string();
        assert!(msg.contains("64 hex digits"), "{msg}");
    }
}
