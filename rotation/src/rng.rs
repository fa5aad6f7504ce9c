//! A small, fast per-thread random source for tie-breaking and random picks.
//!
//! Selection needs a few random numbers per request from many threads; a thread-local
//! wyrand state seeded from the OS-randomised `RandomState` costs a few nanoseconds and
//! no lock. It is not cryptographic and does not need to be: it only spreads load.

use std::cell::Cell;
use std::hash::{BuildHasher, RandomState};

thread_local! {
    static STATE: Cell<u64> = Cell::new(seed());
}

fn seed() -> u64 {
    let id = std::thread::current().id();
    RandomState::new().hash_one(id) | 1
}

/// The next 64 random bits of this thread's stream.
pub(crate) fn next_u64() -> u64 {
    STATE.with(|state| {
        let s = state.get().wrapping_add(0xa076_1d64_78bd_642f);
        state.set(s);
        let t = u128::from(s) * u128::from(s ^ 0xe703_7ed1_a0b4_28db);
        // Truncation is the point: fold the 128-bit product into 64 bits.
        ((t >> 64) as u64) ^ (t as u64)
    })
}

/// A uniform index in `0..n` (`n` > 0), by Lemire's multiply-shift (bias below 2^-32
/// for the small `n` used here).
pub(crate) fn below(n: usize) -> usize {
    debug_assert!(n > 0);
    let n = n as u64;
    ((u128::from(next_u64()) * u128::from(n)) >> 64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn below_stays_in_range_and_covers_it() {
        let mut seen = [0u32; 7];
        for _ in 0..7000 {
            let i = below(7);
            seen[i] += 1;
        }
        assert!(seen.iter().all(|&c| c > 700), "{seen:?}");
        assert_eq!(below(1), 0);
    }
}
