//! BLAKE3 hash trees cut at pieces, so each piece of a download can be checked on its own.
//!
//! A piece is a power-of-two number of BLAKE3 chunks (1 MiB by default), which makes every
//! piece a complete subtree of the file's BLAKE3 tree. A manifest lists each piece's
//! chaining value; merging them the way BLAKE3 does gives the file's ordinary BLAKE3 hash,
//! so a manifest from an untrusted source is checked against the hash the index gave, and
//! then each piece against its own chaining value. A bad piece is caught when it arrives,
//! not after the whole file, and a file whose every piece passed needs no second hashing:
//! the pieces determine the chaining values, which determine the hash.

use std::io::Read;

use blake3::hazmat::{HasherExt, Mode, merge_subtrees_non_root, merge_subtrees_root};
use peerbus_proto::Manifest;

/// Default piece length: 1 MiB (1024 BLAKE3 chunks).
pub const PIECE_LEN: u32 = 1 << 20;

/// Why a manifest or a piece was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TreeError {
    /// The manifest's shape does not fit its size and piece length.
    #[error("manifest for {hash} is malformed: {why}")]
    Malformed {
        /// The file hash.
        hash: String,
        /// What does not fit.
        why: String,
    },
    /// The piece chaining values do not merge into the file's hash.
    #[error("manifest for {0} does not match the file's BLAKE3 hash")]
    WrongRoot(String),
}

/// Number of pieces of a file of `size` bytes (an empty file has none).
pub fn piece_count(size: u64, piece_len: u32) -> u64 {
    size.div_ceil(u64::from(piece_len))
}

/// Length of piece `index` of a file of `size` bytes.
pub fn piece_size(size: u64, piece_len: u32, index: u64) -> usize {
    let start = index * u64::from(piece_len);
    (size.saturating_sub(start)).min(u64::from(piece_len)) as usize
}

fn piece_cv(data: &[u8], index: u64, piece_len: u32) -> [u8; 32] {
    blake3::Hasher::new()
        .set_input_offset(index * u64::from(piece_len))
        .update(data)
        .finalize_non_root()
}

/// BLAKE3 puts the largest power of two strictly below the count in the left subtree.
fn split(n: usize) -> usize {
    debug_assert!(n >= 2);
    1 << (usize::BITS - 1 - (n - 1).leading_zeros())
}

fn merge_non_root(cvs: &[[u8; 32]]) -> [u8; 32] {
    if cvs.len() == 1 {
        return cvs[0];
    }
    let mid = split(cvs.len());
    merge_subtrees_non_root(
        &merge_non_root(&cvs[..mid]),
        &merge_non_root(&cvs[mid..]),
        Mode::Hash,
    )
}

/// The file hash that piece chaining values merge into (files of two pieces or more).
fn root(cvs: &[[u8; 32]]) -> blake3::Hash {
    let mid = split(cvs.len());
    merge_subtrees_root(
        &merge_non_root(&cvs[..mid]),
        &merge_non_root(&cvs[mid..]),
        Mode::Hash,
    )
}

/// Builds the manifest of everything `reader` yields, reading it once.
pub fn manifest(mut reader: impl Read, piece_len: u32) -> std::io::Result<Manifest> {
    assert!(piece_len.is_power_of_two() && piece_len as usize >= blake3::CHUNK_LEN);
    let mut buf = vec![0u8; piece_len as usize];
    let mut pieces = Vec::new();
    let mut size = 0u64;
    let mut single = None;
    loop {
        let mut filled = 0;
        while filled < buf.len() {
            let n = reader.read(&mut buf[filled..])?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        if filled == 0 {
            break;
        }
        if pieces.is_empty() {
            single = Some(blake3::hash(&buf[..filled]));
        }
        pieces.push(piece_cv(&buf[..filled], pieces.len() as u64, piece_len));
        size += filled as u64;
        if filled < buf.len() {
            break;
        }
    }
    let hash = match pieces.len() {
        0 => blake3::hash(b""),
        1 => single.expect("one piece was hashed"),
        _ => root(&pieces),
    };
    Ok(Manifest {
        hash: hash.to_hex().to_string(),
        size,
        piece_len,
        pieces,
    })
}

/// Checks that a manifest is well formed and merges into its hash. `expected` is the hash
/// the index (or the user) named, which the manifest must carry.
pub fn verify_manifest(m: &Manifest, expected: &str) -> Result<(), TreeError> {
    let bad = |why: String| TreeError::Malformed {
        hash: expected.to_string(),
        why,
    };
    if !expected.eq_ignore_ascii_case(&m.hash) {
        return Err(bad(format!("it describes {} instead", m.hash)));
    }
    if !m.piece_len.is_power_of_two() || (m.piece_len as usize) < blake3::CHUNK_LEN {
        return Err(bad(format!(
            "piece length {} is not a power of two of at least 1024",
            m.piece_len
        )));
    }
    let want = piece_count(m.size, m.piece_len);
    if m.pieces.len() as u64 != want {
        return Err(bad(format!(
            "{} pieces listed for {} bytes in pieces of {}; expected {want}",
            m.pieces.len(),
            m.size,
            m.piece_len
        )));
    }
    let expected_hash = blake3::Hash::from_hex(expected)
        .map_err(|e| bad(format!("hash is not BLAKE3 hex: {e}")))?;
    match m.pieces.len() {
        // With no pieces nothing else is checked later, so the hash must be the empty one.
        0 if expected_hash == blake3::hash(b"") => Ok(()),
        0 => Err(TreeError::WrongRoot(expected.to_string())),
        // The single piece's check is the file hash itself (see `verify_piece`).
        1 => Ok(()),
        _ if root(&m.pieces) == expected_hash => Ok(()),
        _ => Err(TreeError::WrongRoot(expected.to_string())),
    }
}

/// True when `data` is piece `index` of the (verified) manifest's file.
pub fn verify_piece(m: &Manifest, index: u64, data: &[u8]) -> bool {
    if data.len() != piece_size(m.size, m.piece_len, index) {
        return false;
    }
    if m.pieces.len() == 1 {
        return blake3::hash(data).to_hex().eq_ignore_ascii_case(&m.hash);
    }
    m.pieces.get(index as usize) == Some(&piece_cv(data, index, m.piece_len))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 31 % 251) as u8).collect()
    }

    #[test]
    fn manifests_merge_into_the_plain_blake3_hash() {
        let pl = 1024u32;
        for n in [
            0,
            1,
            1023,
            1024,
            1025,
            2048,
            3 * 1024 + 7,
            4096,
            5 * 1024,
            7 * 1024 + 1,
            33 * 1024,
        ] {
            let d = data(n);
            let m = manifest(&d[..], pl).unwrap();
            assert_eq!(m.hash, blake3::hash(&d).to_hex().to_string(), "size {n}");
            assert_eq!(m.size, n as u64);
            verify_manifest(&m, &m.hash).unwrap();
            for i in 0..m.pieces.len() {
                let s = i * pl as usize;
                let piece = &d[s..(s + pl as usize).min(n)];
                assert!(verify_piece(&m, i as u64, piece), "size {n} piece {i}");
            }
        }
    }

    #[test]
    fn larger_pieces_work_too() {
        let d = data(5 * 4096 + 100);
        let m = manifest(&d[..], 4096).unwrap();
        assert_eq!(m.hash, blake3::hash(&d).to_hex().to_string());
        assert_eq!(m.pieces.len(), 6);
    }

    #[test]
    fn a_flipped_byte_fails_only_its_piece() {
        let d = data(4 * 1024);
        let m = manifest(&d[..], 1024).unwrap();
        let mut bad = d[1024..2048].to_vec();
        bad[10] ^= 1;
        assert!(!verify_piece(&m, 1, &bad));
        assert!(verify_piece(&m, 2, &d[2048..3072]));
        assert!(
            !verify_piece(&m, 2, &d[1024..2048]),
            "a piece in the wrong place fails"
        );
        assert!(!verify_piece(&m, 3, &d[3072..4000]), "a short piece fails");
    }

    #[test]
    fn forged_manifests_are_refused() {
        let d = data(3 * 1024);
        let mut m = manifest(&d[..], 1024).unwrap();
        let hash = m.hash.clone();
        m.pieces[1][0] ^= 1;
        assert_eq!(
            verify_manifest(&m, &hash),
            Err(TreeError::WrongRoot(hash.clone()))
        );
        m.pieces.pop();
        assert!(matches!(
            verify_manifest(&m, &hash),
            Err(TreeError::Malformed { .. })
        ));
        let other = blake3::hash(b"other").to_hex().to_string();
        assert!(verify_manifest(&manifest(&d[..], 1024).unwrap(), &other).is_err());
        // A manifest claiming an empty file cannot stand in for a non-empty one.
        let empty = Manifest {
            hash: hash.clone(),
            size: 0,
            piece_len: 1024,
            pieces: Vec::new(),
        };
        assert_eq!(
            verify_manifest(&empty, &hash),
            Err(TreeError::WrongRoot(hash))
        );
    }
}
