//! Rendezvous (highest-random-weight) hashing: which node owns a key.
//!
//! Every node ranks the live nodes by a hash of (node, key) and the highest wins, so all nodes
//! agree on an owner without talking, a node that leaves moves only the keys it owned, and one
//! that joins takes about its share. The rest of the ranking is the order of fallbacks. The hash
//! is SHA-256 (truncated): stable across builds and platforms, so nodes of different versions
//! still agree, and cheap next to the request it routes.

use sha2::{Digest as _, Sha256};

/// The weight of `node` for `key`.
fn weight(node: &str, key: &str) -> u64 {
    let mut h = Sha256::new();
    h.update(node.as_bytes());
    h.update([0]);
    h.update(key.as_bytes());
    let out = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&out[..8]);
    u64::from_be_bytes(first)
}

/// `nodes` in the order in which they own `key`: owner first, then its fallbacks.
pub(crate) fn rank<'a>(key: &str, nodes: impl IntoIterator<Item = &'a str>) -> Vec<&'a str> {
    let mut ranked: Vec<(u64, &str)> = nodes.into_iter().map(|n| (weight(n, key), n)).collect();
    // Ties (practically never) broken by name, so every node still agrees.
    ranked.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(b.1)));
    ranked.dedup_by(|a, b| a.1 == b.1);
    ranked.into_iter().map(|(_, n)| n).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> Vec<String> {
        (0..3000).map(|i| format!("sha256:{i:064x}")).collect()
    }

    #[test]
    fn every_node_agrees_whatever_the_order() {
        let a = ["http://a:5000", "http://b:5000", "http://c:5000"];
        let b = ["http://c:5000", "http://a:5000", "http://b:5000"];
        for k in keys().iter().take(100) {
            assert_eq!(rank(k, a), rank(k, b));
        }
    }

    #[test]
    fn keys_spread_and_a_leaving_node_moves_only_its_own() {
        let three = ["n1", "n2", "n3"];
        let keys = keys();
        let owners: Vec<&str> = keys.iter().map(|k| rank(k, three)[0]).collect();
        for n in three {
            let share = owners.iter().filter(|o| **o == n).count();
            assert!((800..1200).contains(&share), "{n} owns {share} of 3000");
        }
        // n3 leaves: keys of n1 and n2 stay where they were; n3's go to its fallback.
        for (k, before) in keys.iter().zip(&owners) {
            let after = rank(k, ["n1", "n2"])[0];
            if *before != "n3" {
                assert_eq!(after, *before, "{k} moved");
            } else {
                assert_eq!(after, rank(k, three)[1]);
            }
        }
    }

    #[test]
    fn a_joining_node_takes_about_its_share() {
        let keys = keys();
        let moved = keys
            .iter()
            .filter(|k| rank(k, ["n1", "n2", "n3"])[0] != rank(k, ["n1", "n2", "n3", "n4"])[0])
            .count();
        // About a quarter, and every moved key went to the newcomer.
        assert!((600..900).contains(&moved), "{moved} of 3000 moved");
        for k in &keys {
            let before = rank(k, ["n1", "n2", "n3"])[0];
            let after = rank(k, ["n1", "n2", "n3", "n4"])[0];
            assert!(after == before || after == "n4");
        }
    }
}
