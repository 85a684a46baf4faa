//! Dropout (Srivastava et al. 2014) for the fused networks: while training, each unit is kept
//! with probability 1 − p and scaled by 1/(1 − p); evaluation and sampling never drop.
//!
//! A unit's draw is a hash of (the step's seed, the layer, the unit's index in the whole batch),
//! not a stored mask: the backward pass recomputes it instead of keeping a second copy of every
//! activation, and a unit draws the same whether the batch runs as one shard or as several.

use super::shifted::Float;
use crate::rng::hash64;

/// This step's dropout, as the trainer hands it to one shard of the batch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dropout {
    /// Probability of dropping a unit, in [0, 1).
    pub rate: f64,
    /// Seed of this step's masks.
    pub seed: u64,
    /// Index in the whole batch of this shard's first sequence.
    pub first: usize,
}

impl Dropout {
    /// The same dropout for rows `start ..` of this shard.
    pub fn from_sequence(self, start: usize) -> Self {
        Dropout { first: self.first + start, ..self }
    }

    /// Multiplies `x`, layer `layer`'s units (`per_sequence` of them per sequence, the
    /// sequences one after another), by this step's mask, scaled by 1/(1 − p). Used on a layer's
    /// output in the forward pass and on its gradient in the backward pass.
    pub fn apply<T: Float>(&self, x: &mut [T], layer: usize, per_sequence: usize) {
        if self.rate <= 0.0 {
            return;
        }
        let scale = T::from_f64(1.0 / (1.0 - self.rate));
        // Dropped when the hash's top 32 bits fall below p · 2³².
        let threshold = (self.rate * 4_294_967_296.0) as u64;
        let key = hash64(self.seed ^ hash64(layer as u64 + 1));
        let base = (self.first * per_sequence) as u64;
        for (i, v) in x.iter_mut().enumerate() {
            let keep = hash64(key.wrapping_add(base + i as u64)) >> 32 >= threshold;
            *v = if keep { *v * scale } else { T::default() };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_about_p_scales_the_rest_and_does_not_depend_on_the_sharding() {
        let d = Dropout { rate: 0.25, seed: 7, first: 0 };
        let mut x = vec![1.0f64; 40_000];
        d.apply(&mut x, 3, 100);
        let dropped = x.iter().filter(|&&v| v == 0.0).count() as f64 / x.len() as f64;
        assert!((dropped - 0.25).abs() < 0.01, "dropped {dropped}");
        assert!(x.iter().all(|&v| v == 0.0 || (v - 1.0 / 0.75).abs() < 1e-12));
        // The same units, given as two shards of 150 and 250 sequences.
        let (mut a, mut b) = (vec![1.0f64; 15_000], vec![1.0f64; 25_000]);
        d.apply(&mut a, 3, 100);
        d.from_sequence(150).apply(&mut b, 3, 100);
        assert_eq!([a, b].concat(), x);
        // Another layer or another seed draws another mask; rate 0 drops nothing.
        let mut other = vec![1.0f64; 40_000];
        d.apply(&mut other, 4, 100);
        assert_ne!(other, x);
        let mut none = vec![1.0f64; 100];
        Dropout { rate: 0.0, ..d }.apply(&mut none, 3, 100);
        assert!(none.iter().all(|&v| v == 1.0));
    }
}
