//! The first bytes each ring connection carries: who the peer is (rank, world, generation tag) and a
//! proof that it holds this generation's ring secret, which the coordinator hands every rank of the
//! generation in its Start command. A process that is not one of the generation's ranks, such as a
//! trainer of an older generation still running or anything else that reaches the port, is refused
//! before any tensor data is exchanged.
//!
//! The proof is SHA-256 of the secret and the header, so it binds the secret to this rank, world and
//! tag and never shows the secret itself. Without a challenge it can be replayed by someone who sees
//! the traffic, but only as the same rank of the same generation; the ring carries gradients in the
//! clear anyway and is meant for a trusted cluster network.

use sha2::{Digest, Sha256};

const MAGIC: u32 = 0x5856_4c4d; // "XVLM"
const HEADER: usize = 24;
/// Bytes of a hello: the header and the 32-byte proof.
pub const HELLO_LEN: usize = HEADER + 32;

/// Why a hello was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Not an xvlm ring peer at all.
    NotXvlm,
    /// An xvlm peer, but another rank, world or generation than the one expected.
    OtherPeer {
        /// Its rank.
        rank: usize,
        /// Its world size.
        world: usize,
        /// Its tag (generation).
        tag: u64,
    },
    /// The right rank, world and tag, but not this generation's ring secret.
    WrongSecret,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::NotXvlm => write!(f, "not an xvlm ring peer"),
            Refusal::OtherPeer { rank, world, tag } => {
                write!(
                    f,
                    "a peer of another ring (rank {rank}, world {world}, tag {tag})"
                )
            }
            Refusal::WrongSecret => write!(f, "a peer with a wrong ring secret"),
        }
    }
}

fn header(rank: usize, world: usize, tag: u64) -> [u8; HEADER] {
    let mut b = [0u8; HEADER];
    b[..4].copy_from_slice(&MAGIC.to_le_bytes());
    b[4..8].copy_from_slice(&(rank as u32).to_le_bytes());
    b[8..16].copy_from_slice(&(world as u64).to_le_bytes());
    b[16..24].copy_from_slice(&tag.to_le_bytes());
    b
}

fn proof(secret: &[u8], header: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update((secret.len() as u64).to_le_bytes());
    h.update(secret);
    h.update(header);
    h.finalize().into()
}

/// The hello rank `rank` sends to the next rank.
pub fn encode(rank: usize, world: usize, tag: u64, secret: &[u8]) -> [u8; HELLO_LEN] {
    let mut b = [0u8; HELLO_LEN];
    let h = header(rank, world, tag);
    b[..HEADER].copy_from_slice(&h);
    b[HEADER..].copy_from_slice(&proof(secret, &h));
    b
}

/// Checks a received hello against the expected previous rank, world, tag and secret.
pub fn check(
    b: &[u8; HELLO_LEN],
    from: usize,
    world: usize,
    tag: u64,
    secret: &[u8],
) -> Result<(), Refusal> {
    let u64_at = |i: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[i..i + 8]);
        u64::from_le_bytes(a)
    };
    if u32::from_le_bytes([b[0], b[1], b[2], b[3]]) != MAGIC {
        return Err(Refusal::NotXvlm);
    }
    let (their_rank, their_world, their_tag) = (
        u32::from_le_bytes([b[4], b[5], b[6], b[7]]) as usize,
        u64_at(8) as usize,
        u64_at(16),
    );
    if (their_rank, their_world, their_tag) != (from, world, tag) {
        return Err(Refusal::OtherPeer {
            rank: their_rank,
            world: their_world,
            tag: their_tag,
        });
    }
    // Constant time: the proof must not be guessable byte by byte from response timing.
    let expected = proof(secret, &b[..HEADER]);
    let diff = expected
        .iter()
        .zip(&b[HEADER..])
        .fold(0u8, |acc, (x, y)| acc | (x ^ y));
    if diff != 0 {
        return Err(Refusal::WrongSecret);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The right peer passes; another secret, rank or tag, or foreign bytes are refused as such.
    #[test]
    fn hello_binds_rank_world_tag_and_secret() {
        let hello = encode(1, 4, 9, b"gen-9");
        assert_eq!(check(&hello, 1, 4, 9, b"gen-9"), Ok(()));
        assert_eq!(check(&hello, 1, 4, 9, b"gen-8"), Err(Refusal::WrongSecret));
        assert_eq!(
            check(&hello, 2, 4, 9, b"gen-9"),
            Err(Refusal::OtherPeer {
                rank: 1,
                world: 4,
                tag: 9
            })
        );
        assert_eq!(
            check(&[0u8; HELLO_LEN], 1, 4, 9, b""),
            Err(Refusal::NotXvlm)
        );
    }
}
