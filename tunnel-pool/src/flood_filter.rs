//! A kernel-side drop for flooding WireGuard peers: a classic BPF socket filter that
//! drops most data datagrams whose receiver index names one of them, before the kernel
//! queues them on the socket (no wake-up, no copy, no system call for them).
//!
//! The filter only thins: one datagram in [`PASS_ONE_IN`] of a filtered peer still
//! passes (the kernel's random number decides), so the exit keeps seeing the flood and
//! keeps the peer behind its own gate. Everything else passes untouched: other message
//! types, other receivers, relayed datagrams (they start with a TURN header, not a
//! WireGuard one). While a filter is attached, datagrams too short to be WireGuard
//! data (empty, or of the data type with no room for a receiver index) are dropped: the
//! program's loads fall outside them, which ends it with a drop.
//!
//! For a UDP socket the program sees the packet from the UDP header on, so the WireGuard
//! message starts at byte 8: its type at 8, the receiver index (little-endian) at 12.

use socket2::SockFilter;

/// One in this many datagrams of a filtered peer passes.
pub const PASS_ONE_IN: u32 = 64;

/// Peers one filter holds at most (jump offsets are a byte); more are left out.
pub const MAX_FILTERED: usize = 64;

// Classic BPF opcodes (linux/filter.h).
const LD_B_ABS: u16 = 0x30; // BPF_LD | BPF_B | BPF_ABS
const LD_W_ABS: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
const JEQ_K: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
const JGT_K: u16 = 0x25; // BPF_JMP | BPF_JGT | BPF_K
const AND_K: u16 = 0x54; // BPF_ALU | BPF_AND | BPF_K
const RET_K: u16 = 0x06; // BPF_RET | BPF_K
/// `SKF_AD_OFF + SKF_AD_RANDOM`: loads a random 32-bit number.
const AD_RANDOM: u32 = 0xFFFF_F000u32.wrapping_add(56);
/// UDP header length: where the WireGuard message starts.
const UDP: u32 = 8;
/// WireGuard's transport data message type.
const DATA: u32 = 4;

/// The program dropping data datagrams to any of `indices` (peer indexes: receiver index
/// `>> shift`) but one in [`PASS_ONE_IN`]; `None` when there is nothing to filter.
pub fn program(indices: &[u32], shift: u32) -> Option<Vec<SockFilter>> {
    let mut indices: Vec<u32> = indices.to_vec();
    indices.sort_unstable();
    indices.dedup();
    indices.truncate(MAX_FILTERED);
    if indices.is_empty() || shift >= 32 {
        return None;
    }
    // `ld [12]` reads the little-endian index as big-endian: compare byte-swapped.
    let mask = (u32::MAX << shift).swap_bytes();
    let n = indices.len() as u8;
    let mut p = vec![
        SockFilter::new(LD_B_ABS, 0, 0, UDP),
        // Not a data message: pass (jump over the loads, the compares and their pass).
        SockFilter::new(JEQ_K, 0, n + 2, DATA),
        SockFilter::new(LD_W_ABS, 0, 0, UDP + 4),
        SockFilter::new(AND_K, 0, 0, mask),
    ];
    for (i, idx) in indices.iter().enumerate() {
        // Matched: jump to the random draw just after the compares' pass.
        let to_draw = n - i as u8; // skips the remaining compares and the pass
        p.push(SockFilter::new(
            JEQ_K,
            to_draw,
            0,
            (idx << shift).swap_bytes(),
        ));
    }
    p.push(SockFilter::new(RET_K, 0, 0, u32::MAX)); // no match: pass
    p.push(SockFilter::new(LD_W_ABS, 0, 0, AD_RANDOM));
    p.push(SockFilter::new(JGT_K, 1, 0, u32::MAX / PASS_ONE_IN));
    p.push(SockFilter::new(RET_K, 0, 0, u32::MAX)); // the one in PASS_ONE_IN
    p.push(SockFilter::new(RET_K, 0, 0, 0)); // dropped
    Some(p)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::nat::NatSocket;
    use std::time::Duration;
    use tokio::net::UdpSocket;

    /// A WireGuard-shaped datagram: `kind`, receiver index `(peer << 8) | 3`, `seq`.
    fn datagram(kind: u8, peer: u32, seq: u32) -> Vec<u8> {
        let mut d = vec![kind, 0, 0, 0];
        d.extend_from_slice(&((peer << 8) | 3).to_le_bytes());
        d.extend_from_slice(&seq.to_le_bytes());
        d.resize(32, 0xAB);
        d
    }

    /// Reads what is queued on `sock` (bounded wait for stragglers); their sequences.
    async fn queued(sock: &NatSocket) -> Vec<u32> {
        let mut reader = sock.batch_reader(64).unwrap();
        let mut got = Vec::new();
        for _ in 0..50 {
            match sock.try_recv_batch(&mut reader).unwrap() {
                Some(_) => {
                    for k in 0..reader.len() {
                        let (d, _) = reader.get(k).unwrap();
                        got.push(u32::from_le_bytes(d[8..12].try_into().unwrap()));
                    }
                }
                None => {
                    if tokio::time::timeout(Duration::from_millis(20), sock.readable())
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
        got
    }

    #[test]
    fn no_index_means_no_program() {
        assert!(program(&[], 8).is_none());
        assert!(program(&[1], 32).is_none());
        let p = program(&[7, 7, 9], 8).unwrap();
        assert_eq!(p.len(), 4 + 2 + 5, "duplicates folded");
        let many: Vec<u32> = (0..1000).collect();
        assert_eq!(program(&many, 8).unwrap().len(), 4 + MAX_FILTERED + 5);
    }

    /// Marks the sequences of the datagrams that must all pass.
    const OTHER: u32 = 1 << 31;

    #[tokio::test]
    async fn the_kernel_thins_a_filtered_peers_data_and_passes_everything_else() {
        let sock = NatSocket::plain(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let to = sock.local_addr().unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        sock.filter_receivers(&[5, 0x12_3456], 8).unwrap();
        let (mut flood_passed, mut other) = (0usize, Vec::new());
        let mut want_other = Vec::new();
        for round in 0..20u32 {
            for i in 0..100u32 {
                let seq = round * 1000 + i;
                // The filtered peers' data: thinned.
                let peer = if i % 2 == 0 { 5 } else { 0x12_3456 };
                tx.send_to(&datagram(4, peer, seq), to).await.unwrap();
                if i % 10 == 0 {
                    // Another peer's data, a filtered peer's handshake messages and a
                    // cookie reply: all pass.
                    for (k, (kind, peer)) in [(4u8, 6u32), (1, 5), (2, 5), (3, 0x12_3456)]
                        .into_iter()
                        .enumerate()
                    {
                        let s = OTHER | (seq * 4 + k as u32);
                        tx.send_to(&datagram(kind, peer, s), to).await.unwrap();
                        want_other.push(s);
                    }
                }
            }
            for s in queued(&sock).await {
                if s & OTHER != 0 {
                    other.push(s);
                } else {
                    flood_passed += 1;
                }
            }
        }
        assert_eq!(other, want_other, "everything else passes, in order");
        // 2,000 sent: one in 64 expected (about 31); the draw is random.
        assert!(
            (1..=120).contains(&flood_passed),
            "{flood_passed} of 2000 passed"
        );

        // Too short to be WireGuard data: dropped while filtering (garbage either way);
        // a short datagram of another type passes.
        for short in [&[][..], &[4u8][..], &[4u8, 0, 0, 0, 1, 2][..]] {
            tx.send_to(short, to).await.unwrap();
        }
        tx.send_to(&[1u8, 0, 0, 0], to).await.unwrap();
        let mut reader = sock.batch_reader(64).unwrap();
        let mut got = Vec::new();
        for _ in 0..20 {
            match sock.try_recv_batch(&mut reader).unwrap() {
                Some(_) => got.extend((0..reader.len()).map(|k| reader.get(k).unwrap().0.to_vec())),
                None => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
        assert_eq!(got, vec![vec![1u8, 0, 0, 0]]);

        // Removed: everything passes again.
        sock.filter_receivers(&[], 8).unwrap();
        sock.filter_receivers(&[], 8).unwrap(); // removing none is fine
        for seq in 0..50u32 {
            tx.send_to(&datagram(4, 5, seq), to).await.unwrap();
        }
        assert_eq!(queued(&sock).await, (0..50).collect::<Vec<_>>());
    }
}
