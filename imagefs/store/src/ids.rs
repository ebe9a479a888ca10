//! Identifier newtypes: block hashes, version ids, image names and tags. Every value of these
//! types is valid by construction (names match `[A-Za-z0-9][A-Za-z0-9._-]{0,127}`).

use std::fmt;
use std::str::FromStr;

use thiserror::Error;

/// Why a name, tag or id was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum IdError {
    /// not a valid name (want `[A-Za-z0-9][A-Za-z0-9._-]{0,127}`)
    #[error("{0:?} is not a valid name (want [A-Za-z0-9][A-Za-z0-9._-]{{0,127}})")]
    BadName(String),
    /// not a 64-digit hex id
    #[error("{0:?} is not a 64-digit hex id")]
    BadHex(String),
}

fn parse_hex32(s: &str) -> Result<[u8; 32], IdError> {
    let bytes = s.as_bytes();
    if bytes.len() != 64 {
        return Err(IdError::BadHex(s.to_string()));
    }
    let mut out = [0u8; 32];
    for (i, pair) in bytes.chunks_exact(2).enumerate() {
        let hi = hex_val(pair[0]).ok_or_else(|| IdError::BadHex(s.to_string()))?;
        let lo = hex_val(pair[1]).ok_or_else(|| IdError::BadHex(s.to_string()))?;
        if let Some(slot) = out.get_mut(i) {
            *slot = hi << 4 | lo;
        }
    }
    Ok(out)
}

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

pub(crate) fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

macro_rules! hash_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub [u8; 32]);

        impl $name {
            /// The raw 32 bytes.
            pub fn as_bytes(&self) -> &[u8; 32] {
                &self.0
            }
            /// The first 12 hex digits, for humans.
            pub fn short(&self) -> String {
                to_hex(&self.0[..6])
            }
            /// Full lowercase hex.
            pub fn to_hex(&self) -> String {
                to_hex(&self.0)
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&to_hex(&self.0))
            }
        }
        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.short())
            }
        }
        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                parse_hex32(s).map($name)
            }
        }
    };
}

hash_id!(
    /// blake3 of a block's bytes (always a full block; the image tail is zero-padded).
    BlockHash
);
hash_id!(
    /// A version: hash of its image name, size, block size and block-map root.
    VersionId
);

fn valid_name(s: &str) -> bool {
    let b = s.as_bytes();
    match b.first() {
        Some(c) if c.is_ascii_alphanumeric() => {}
        _ => return false,
    }
    b.len() <= 128
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
}

macro_rules! name_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
        pub struct $name(String);

        impl $name {
            /// Validates `s` against `[A-Za-z0-9][A-Za-z0-9._-]{0,127}`.
            pub fn new(s: &str) -> Result<Self, IdError> {
                if valid_name(s) {
                    Ok($name(s.to_string()))
                } else {
                    Err(IdError::BadName(s.to_string()))
                }
            }
            /// The name as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                $name::new(s)
            }
        }
    };
}

name_id!(
    /// An image name (all versions of one image share a block size).
    ImageName
);
name_id!(
    /// A tag naming one version of an image.
    Tag
);

/// Splits `NAME:TAG` into its validated parts.
pub fn parse_name_tag(s: &str) -> Result<(ImageName, Tag), IdError> {
    let (name, tag) = s
        .split_once(':')
        .ok_or_else(|| IdError::BadName(s.to_string()))?;
    Ok((ImageName::new(name)?, Tag::new(tag)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_validated() {
        assert!(ImageName::new("web").is_ok());
        assert!(ImageName::new("a.b_c-9").is_ok());
        assert!(ImageName::new("").is_err());
        assert!(ImageName::new(".hidden").is_err());
        assert!(ImageName::new("a/b").is_err());
        assert!(ImageName::new(&"a".repeat(128)).is_ok());
        assert!(ImageName::new(&"a".repeat(129)).is_err());
        assert!(parse_name_tag("web:v1").is_ok());
        assert!(parse_name_tag("web").is_err());
        assert!(parse_name_tag("web:v1:x").is_err());
    }

    #[test]
    fn hex_round_trips() {
        let id = VersionId([0xab; 32]);
        let s = id.to_string();
        assert_eq!(s.parse::<VersionId>().unwrap(), id);
        assert!("zz".parse::<VersionId>().is_err());
        assert_eq!(id.short().len(), 12);
    }
}
