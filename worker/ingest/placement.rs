//! Which replica polls which pilot: rendezvous (highest-random-weight) hashing over the live
//! replicas, with bounded loads.
//!
//! Every replica computes the same answer from the same lists of live replicas and pilots,
//! without talking to the others: each (replica, pilot) pair gets a pseudo-random score, and
//! each pilot goes to the best-scoring replica that has not yet taken its even share
//! ([`Replicas::assign`]). So the pilots spread within one of even, and when a replica joins or
//! leaves mostly the pilots it gains or loses move (about 1/n of them, a little more through
//! the caps), never a reshuffle of the rest. Leases (`store::leases`) make the answer safe
//! while replicas disagree for a moment: a pilot is polled only under its lease.

use sha2::{Digest, Sha256};

/// A replica's seed: the first 8 bytes of the SHA-256 of its id (stable across versions and
/// machines, unlike the standard library's hasher).
fn seed(replica: &str) -> u64 {
    let digest = Sha256::digest(replica.as_bytes());
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(bytes)
}

/// SplitMix64's finaliser: a bijective mix, so distinct inputs never share a score.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The live replicas, each with its seed, ready for many placements.
#[derive(Debug, Clone)]
pub struct Replicas {
    seeds: Vec<(u64, String)>,
}

impl Replicas {
    pub fn new<S: AsRef<str>>(ids: &[S]) -> Replicas {
        let mut seeds: Vec<(u64, String)> = ids
            .iter()
            .map(|id| (seed(id.as_ref()), id.as_ref().to_owned()))
            .collect();
        seeds.sort();
        seeds.dedup();
        Replicas { seeds }
    }

    /// The score of replica `i` for `pilot`: the higher, the more `pilot` belongs there.
    /// Ties (equal scores of distinct seeds cannot happen: `mix` is a bijection) fall to the
    /// id, so every replica breaks them the same way.
    fn score(&self, i: usize, pilot: i64) -> (u64, &str) {
        let (seed, id) = &self.seeds[i];
        (mix(seed ^ (pilot as u64)), id.as_str())
    }

    /// The replica with the highest score for `pilot` (pure rendezvous, the order `assign`
    /// bounds; the tests measure the hashing with it); none when no replica is live.
    #[cfg(test)]
    pub fn owner(&self, pilot: i64) -> Option<&str> {
        (0..self.seeds.len())
            .max_by_key(|&i| self.score(i, pilot))
            .map(|i| self.seeds[i].1.as_str())
    }

    /// Of `pilots`, those whose highest score is `me`'s.
    #[cfg(test)]
    pub fn mine<'p>(&self, me: &str, pilots: impl IntoIterator<Item = &'p i64>) -> Vec<i64> {
        pilots
            .into_iter()
            .copied()
            .filter(|p| self.owner(*p) == Some(me))
            .collect()
    }

    /// Every pilot of `pilots` with the replica that polls it, no replica taking more than
    /// its even share (`ceil(pilots / replicas)`): rendezvous order with bounded loads. Pilots
    /// are placed in id order, each with the first replica in its own score order that still
    /// has room, so every replica computes the same answer from the same two lists; a small
    /// pool of pilots spreads within one of even, where pure hashing would leave a few
    /// replicas a fifth over. A replica joining or leaving moves its share and, through the
    /// caps, a little more.
    pub fn assign(&self, pilots: &[i64]) -> std::collections::HashMap<i64, &str> {
        let mut sorted: Vec<i64> = pilots.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        let mut placed = std::collections::HashMap::with_capacity(sorted.len());
        if self.seeds.is_empty() {
            return placed;
        }
        let cap = sorted.len().div_ceil(self.seeds.len());
        let mut load = vec![0usize; self.seeds.len()];
        let mut order: Vec<usize> = (0..self.seeds.len()).collect();
        for pilot in sorted {
            order.sort_unstable_by_key(|&i| std::cmp::Reverse(self.score(i, pilot)));
            if let Some(&i) = order.iter().find(|&&i| load[i] < cap) {
                load[i] += 1;
                placed.insert(pilot, self.seeds[i].1.as_str());
            }
        }
        placed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn spread(replicas: &Replicas, pilots: i64) -> HashMap<String, usize> {
        let mut counts = HashMap::new();
        for p in 1..=pilots {
            *counts
                .entry(replicas.owner(p).unwrap_or("").to_owned())
                .or_default() += 1;
        }
        counts
    }

    #[test]
    fn five_thousand_pilots_spread_over_three_replicas_within_ten_percent() {
        let r = Replicas::new(&["ccmail-a-1234", "ccmail-b-5678", "ccmail-c-9012"]);
        let counts = spread(&r, 5000);
        assert_eq!(counts.len(), 3);
        let even = 5000.0 / 3.0;
        for (id, n) in &counts {
            let off = (*n as f64 - even).abs() / even;
            assert!(off <= 0.10, "{id}: {n} pilots, {:.1} % off", off * 100.0);
        }
    }

    #[test]
    fn a_replica_joining_or_leaving_moves_only_its_own_share() {
        let three = Replicas::new(&["a", "b", "c"]);
        let four = Replicas::new(&["a", "b", "c", "d"]);
        let (mut moved, mut to_new) = (0, 0);
        for p in 1..=6000 {
            let (before, after) = (three.owner(p), four.owner(p));
            if before != after {
                moved += 1;
                if after == Some("d") {
                    to_new += 1;
                }
            }
        }
        assert_eq!(
            moved, to_new,
            "a pilot moves only to the replica that joined"
        );
        assert!(
            (1200..=1800).contains(&moved),
            "about a quarter moves: {moved}"
        );
        let two = Replicas::new(&["a", "c"]);
        for p in 1..=6000 {
            if three.owner(p) != Some("b") {
                assert_eq!(
                    three.owner(p),
                    two.owner(p),
                    "pilot {p} moved though its replica stayed"
                );
            }
        }
    }

    #[test]
    fn three_hundred_pilots_are_assigned_evenly_and_a_join_moves_little() {
        let pilots: Vec<i64> = (1..=300).collect();
        let three = Replicas::new(&["host-1-aa", "host-2-bb", "host-3-cc"]);
        let placed = three.assign(&pilots);
        assert_eq!(placed.len(), 300);
        let mut counts: HashMap<&str, usize> = HashMap::new();
        for r in placed.values() {
            *counts.entry(r).or_default() += 1;
        }
        assert_eq!(counts.len(), 3);
        assert!(counts.values().all(|n| *n == 100), "{counts:?}");
        let four = Replicas::new(&["host-1-aa", "host-2-bb", "host-3-cc", "host-4-dd"]);
        let after = four.assign(&pilots);
        let moved = pilots.iter().filter(|p| placed[p] != after[p]).count();
        assert!(
            (75..=120).contains(&moved),
            "a quarter (75) should move, a little more through the caps: {moved}"
        );
        let shuffled: Vec<i64> = pilots.iter().rev().copied().collect();
        assert_eq!(
            three.assign(&shuffled),
            placed,
            "the answer ignores list order"
        );
        assert!(Replicas::new::<&str>(&[]).assign(&pilots).is_empty());
    }

    #[test]
    fn every_replica_agrees_whatever_order_it_lists_the_others_in() {
        let x = Replicas::new(&["c", "a", "b"]);
        let y = Replicas::new(&["b", "c", "a", "a"]);
        for p in 1..=1000 {
            assert_eq!(x.owner(p), y.owner(p));
        }
        assert_eq!(Replicas::new::<&str>(&[]).owner(1), None);
        let mine = x.mine("a", &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
        assert!(mine.iter().all(|p| x.owner(*p) == Some("a")));
    }
}
