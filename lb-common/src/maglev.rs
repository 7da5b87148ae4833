//! Weighted Maglev consistent hashing (Eisenbud et al., NSDI 2016, section 3.4).
//!
//! Each backend walks its own permutation of the table, claiming the next free entry when it
//! is its turn. Weights set how often it is a backend's turn: every round each backend earns
//! its weight in credit and claims one entry per `max_weight` of credit, so shares follow the
//! weights and a weight-0 backend claims nothing. Permutations depend only on the backend's
//! address, the seed and the table size, so removing one backend leaves the others' claims
//! mostly where they were.
use alloc::vec;
use alloc::vec::Vec;

use crate::flow::hash_words;

/// Table sizes chosen when a VIP does not set one: the smallest that is at least
/// 100 x backends. A ladder rather than "next prime above 100 N" so that adding or removing a
/// backend keeps the size, and with it Maglev's minimal disruption.
pub const DEFAULT_TABLE_SIZES: [u32; 8] =
    [65_537, 131_071, 262_147, 524_287, 1_048_573, 2_097_143, 4_194_301, 8_388_617];

/// Minimum entries per backend for the 1% balance guarantee.
pub const ENTRIES_PER_BACKEND: u64 = 100;

const OFFSET_SALT: u32 = 0x6f66_6673; // "offs"
const SKIP_SALT: u32 = 0x736b_6970; // "skip"

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaglevBackend {
    /// The backend's address as the data plane stores it (network-order words).
    pub addr: [u32; 4],
    pub weight: u32,
}

pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    if n.is_multiple_of(2) {
        return n == 2;
    }
    let n = n as u64;
    let mut d = 3u64;
    while d * d <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 2;
    }
    true
}

/// The default table size for `backends` backends, or None past the ladder's end.
pub fn default_table_size(backends: usize) -> Option<u32> {
    let needed = backends as u64 * ENTRIES_PER_BACKEND;
    DEFAULT_TABLE_SIZES.iter().copied().find(|&m| m as u64 >= needed)
}

/// The smallest table size allowed for `backends` backends.
pub fn min_table_size(backends: usize) -> u64 {
    backends as u64 * ENTRIES_PER_BACKEND
}

/// (offset, skip) of a backend's permutation: entry j of it is (offset + j * skip) mod size.
fn permutation(addr: &[u32; 4], seed: u32, size: u32) -> (u64, u64) {
    let offset = hash_words(seed ^ OFFSET_SALT, addr) % size;
    let skip = hash_words(seed ^ SKIP_SALT, addr) % (size - 1) + 1;
    (offset as u64, skip as u64)
}

/// Probe steps [`try_build_table`] may take per table entry. Filling a table costs about
/// `size * ln(size)` steps (the last free entries are the hardest to find): 18 per entry at
/// the largest table a generation holds, 11 at the default size. Backends whose permutations
/// run alike (crafted addresses) cost up to `backends * size`; the budget stops that.
pub const MAX_STEPS_PER_ENTRY: u64 = 64;

/// Why no table was built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TableError {
    /// No backend has a positive weight.
    NoPositiveWeight,
    /// The size is below 2.
    TooSmall,
    /// Filling the table took more than `MAX_STEPS_PER_ENTRY * size` probe steps: the
    /// backends' permutations overlap far more than hashing allows by chance.
    TooManySteps { steps: u64 },
}

/// Builds a table of `size` entries (prime, at least 2), each the index of a backend in
/// `backends`. Returns None when no backend has a positive weight or the size is below 2
/// (or the step budget ran out: [`try_build_table`] says which).
pub fn build_table(backends: &[MaglevBackend], size: u32, seed: u32) -> Option<Vec<u32>> {
    try_build_table(backends, size, seed).ok()
}

/// [`build_table`], bounded in time (at most `MAX_STEPS_PER_ENTRY * size` probe steps) and
/// memory (the table and two words per backend), saying why when it builds nothing.
pub fn try_build_table(backends: &[MaglevBackend], size: u32, seed: u32) -> Result<Vec<u32>, TableError> {
    build_counting(backends, size, seed).map(|(table, _steps)| table)
}

/// The table and the probe steps it took.
fn build_counting(backends: &[MaglevBackend], size: u32, seed: u32) -> Result<(Vec<u32>, u64), TableError> {
    if size < 2 {
        return Err(TableError::TooSmall);
    }
    let max_weight =
        backends.iter().map(|b| b.weight).max().filter(|&w| w > 0).ok_or(TableError::NoPositiveWeight)? as u64;
    let budget = MAX_STEPS_PER_ENTRY * size as u64;
    let mut steps = 0u64;
    // Each backend's position in its permutation, advanced by `skip` modulo `size` with a
    // subtraction rather than a division per probe.
    let mut cursor: Vec<(u32, u32)> =
        backends.iter().map(|b| permutation(&b.addr, seed, size)).map(|(o, s)| (o as u32, s as u32)).collect();
    let mut credit = vec![0u64; backends.len()];
    let mut table = vec![u32::MAX; size as usize];
    let mut filled = 0u32;
    while filled < size {
        for (i, b) in backends.iter().enumerate() {
            credit[i] += b.weight as u64;
            while credit[i] >= max_weight {
                credit[i] -= max_weight;
                // Walk the permutation to this backend's next free entry; the table has one
                // because filled < size, and a permutation of a prime size visits every entry.
                let (slot, skip) = &mut cursor[i];
                while table[*slot as usize] != u32::MAX {
                    *slot = advance(*slot, *skip, size);
                    steps += 1;
                }
                if steps > budget {
                    return Err(TableError::TooManySteps { steps });
                }
                table[*slot as usize] = i as u32;
                *slot = advance(*slot, *skip, size);
                filled += 1;
                if filled == size {
                    return Ok((table, steps));
                }
            }
        }
    }
    Ok((table, steps))
}

/// (slot + skip) mod size, for slot and skip below size.
#[inline]
fn advance(slot: u32, skip: u32, size: u32) -> u32 {
    let next = slot as u64 + skip as u64;
    if next >= size as u64 {
        (next - size as u64) as u32
    } else {
        next as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backends(n: u32, weight: impl Fn(u32) -> u32) -> Vec<MaglevBackend> {
        (0..n).map(|i| MaglevBackend { addr: [u32::from_be(0x0a01_0000 + i), 0, 0, 0], weight: weight(i) }).collect()
    }

    fn shares(table: &[u32], n: usize) -> Vec<f64> {
        let mut counts = vec![0usize; n];
        for &e in table {
            counts[e as usize] += 1;
        }
        counts.iter().map(|&c| c as f64 / table.len() as f64).collect()
    }

    #[test]
    fn deterministic() {
        let b = backends(10, |_| 1);
        assert_eq!(build_table(&b, 65_537, 42), build_table(&b, 65_537, 42));
        assert_ne!(build_table(&b, 65_537, 42), build_table(&b, 65_537, 43));
    }

    #[test]
    fn every_entry_is_a_backend() {
        let b = backends(7, |i| i % 3 + 1);
        let t = build_table(&b, 1021, 1).unwrap_or_default();
        assert_eq!(t.len(), 1021);
        assert!(t.iter().all(|&e| (e as usize) < b.len()));
    }

    #[test]
    fn equal_weights_share_within_one_percent() {
        for n in [2u32, 3, 10, 100, 655] {
            let b = backends(n, |_| 1);
            let t = build_table(&b, 65_537, 5).unwrap_or_default();
            let ideal = 1.0 / n as f64;
            for (i, s) in shares(&t, n as usize).iter().enumerate() {
                assert!((s - ideal).abs() <= 0.01 * ideal, "n={n} backend {i}: share {s}, ideal {ideal}");
            }
        }
    }

    #[test]
    fn weights_are_respected_within_one_percent() {
        let b = backends(20, |i| i % 4 + 1); // weights 1..4
        let total: u32 = b.iter().map(|b| b.weight).sum();
        let t = build_table(&b, 65_537, 9).unwrap_or_default();
        for (i, s) in shares(&t, b.len()).iter().enumerate() {
            let ideal = b[i].weight as f64 / total as f64;
            assert!((s - ideal).abs() <= 0.01 * ideal, "backend {i} weight {}: share {s}, ideal {ideal}", b[i].weight);
        }
    }

    #[test]
    fn zero_weight_gets_nothing_and_all_zero_is_refused() {
        let b = backends(3, |i| if i == 1 { 0 } else { 1 });
        let t = build_table(&b, 1021, 3).unwrap_or_default();
        assert!(!t.contains(&1));
        assert_eq!(build_table(&backends(3, |_| 0), 1021, 3), None);
        assert_eq!(build_table(&backends(3, |_| 1), 0, 3), None);
        assert_eq!(build_table(&backends(3, |_| 1), 1, 3), None);
        assert_eq!(try_build_table(&backends(3, |_| 0), 1021, 3), Err(TableError::NoPositiveWeight));
        assert_eq!(try_build_table(&backends(3, |_| 1), 1, 3), Err(TableError::TooSmall));
    }

    #[test]
    fn removing_a_backend_moves_few_other_entries() {
        let n = 100u32;
        let all = backends(n, |_| 1);
        let before = build_table(&all, 65_537, 11).unwrap_or_default();
        for removed in [0usize, 37, 99] {
            let mut rest = all.clone();
            rest.remove(removed);
            let after = build_table(&rest, 65_537, 11).unwrap_or_default();
            // Map `after` indices back to the original backends.
            let original = |i: u32| if (i as usize) < removed { i } else { i + 1 };
            let mut moved_other = 0usize;
            let mut others = 0usize;
            for (b, a) in before.iter().zip(&after) {
                if *b as usize != removed {
                    others += 1;
                    if original(*a) != *b {
                        moved_other += 1;
                    }
                } else {
                    assert_ne!(original(*a) as usize, removed);
                }
            }
            let fraction = moved_other as f64 / others as f64;
            // The Maglev paper reports a few percent for this case; we hold it under 2%.
            assert!(fraction < 0.02, "removing backend {removed}: {fraction:.4} of other entries moved");
        }
    }

    /// Typical builds take a small fraction of the step budget (about ln(size) per entry).
    #[test]
    fn typical_builds_stay_far_below_the_step_budget() {
        for (n, size) in [(1u32, 101u32), (10, 1021), (100, 65_537), (655, 65_537), (1000, 131_071)] {
            for weighted in [false, true] {
                let b = backends(n, |i| if weighted { i % 7 + 1 } else { 1 });
                let (table, steps) = build_counting(&b, size, 5).expect("built");
                assert_eq!(table.len(), size as usize);
                assert!(
                    steps < MAX_STEPS_PER_ENTRY * size as u64 / 4,
                    "n={n} size={size} weighted={weighted}: {steps} steps"
                );
            }
        }
    }

    /// Backends whose permutations are one and the same (addresses found by search, as a
    /// hostile config could) make every backend walk the whole table: the budget stops it.
    #[test]
    fn crafted_permutations_hit_the_step_budget() {
        let (size, seed) = (211u32, 5u32);
        let target = permutation(&[1, 0, 0, 0], seed, size);
        let alike: Vec<MaglevBackend> = (1u32..)
            .map(|a| [a, 0, 0, 0])
            .filter(|addr| permutation(addr, seed, size) == target)
            .take(200)
            .map(|addr| MaglevBackend { addr, weight: 1 })
            .collect();
        match try_build_table(&alike, size, seed) {
            Err(TableError::TooManySteps { steps }) => assert!(steps > MAX_STEPS_PER_ENTRY * size as u64),
            other => panic!("expected the step budget to run out, got {other:?}"),
        }
        // The same number of ordinary backends builds.
        assert!(try_build_table(&backends(200, |_| 1), size, seed).is_ok());
    }

    #[test]
    fn primes_and_default_sizes() {
        assert!(DEFAULT_TABLE_SIZES.iter().all(|&m| is_prime(m)));
        assert!(!is_prime(65_536) && !is_prime(1) && is_prime(2) && is_prime(655_373));
        assert_eq!(default_table_size(1), Some(65_537));
        assert_eq!(default_table_size(655), Some(65_537));
        assert_eq!(default_table_size(656), Some(131_071));
        assert_eq!(default_table_size(100_000), None);
    }
}
