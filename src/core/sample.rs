//! Drawing tokens from logits (temperature, top-k, top-p) and driving any model's stepper to
//! generate sequences. All randomness comes from one seeded [`Rng`], so a seed reproduces
//! the output exactly.

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use super::{Autoregressive, naive_next_logits};
use crate::fastmath::fast_exp;
use crate::rng::Rng;
use crate::{Error, Result};

/// How a token is drawn from the model's distribution.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamplerConfig {
    /// Divides the logits: below 1 sharpens, above 1 flattens; 0 takes the most likely token.
    pub temperature: f32,
    /// Keep only the k most likely tokens.
    pub top_k: Option<usize>,
    /// Keep the smallest set of most likely tokens whose probability reaches p.
    pub top_p: Option<f32>,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        SamplerConfig { temperature: 1.0, top_k: None, top_p: None }
    }
}

impl SamplerConfig {
    /// Checks the ranges.
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(Error::Config(format!(
                "--temperature must be a finite number ≥ 0 (0 always takes the likeliest code), got {}",
                self.temperature
            )));
        }
        if self.top_k == Some(0) {
            return Err(Error::Config("--top-k must be at least 1".into()));
        }
        if let Some(p) = self.top_p
            && !(p > 0.0 && p <= 1.0)
        {
            return Err(Error::Config(format!("--top-p must be in (0, 1], got {p}")));
        }
        Ok(())
    }

    /// The probabilities the sampler draws from (after temperature, top-k and top-p).
    pub fn distribution(&self, logits: &[f32]) -> Vec<f64> {
        let n = logits.len();
        let best = (0..n).max_by(|&a, &b| logits[a].total_cmp(&logits[b])).unwrap_or(0);
        if self.temperature == 0.0 {
            let mut p = vec![0.0; n];
            p[best] = 1.0;
            return p;
        }
        let t = self.temperature as f64;
        let max = logits[best] as f64;
        let mut p: Vec<f64> = logits.iter().map(|&l| ((l as f64 - max) / t).exp()).collect();
        if self.top_k.is_some() || self.top_p.is_some() {
            let mut order: Vec<usize> = (0..n).collect();
            order.sort_by(|&a, &b| p[b].total_cmp(&p[a]));
            let total: f64 = p.iter().sum();
            let mut keep = self.top_k.unwrap_or(n).min(n);
            if let Some(top_p) = self.top_p {
                let mut mass = 0.0;
                for (i, &k) in order.iter().enumerate().take(keep) {
                    mass += p[k] / total;
                    if mass >= top_p as f64 {
                        keep = i + 1;
                        break;
                    }
                }
            }
            for &k in &order[keep..] {
                p[k] = 0.0;
            }
        }
        let total: f64 = p.iter().sum();
        p.iter_mut().for_each(|x| *x /= total);
        p
    }

    /// Draws one token. Without top-k and top-p, and for up to 256 tokens (μ-law audio), this
    /// allocates nothing: it runs once per audio sample in real time. One vectorisable pass
    /// finds the maximum, a second stores the weights e^((l − max)/T) and their sum, and the
    /// draw scans the stored weights eight at a time.
    pub fn sample(&self, logits: &[f32], rng: &mut Rng) -> u32 {
        const MAX_FAST: usize = 256;
        if self.top_k.is_some() || self.top_p.is_some() || logits.len() > MAX_FAST {
            return draw_from(&self.distribution(logits), rng);
        }
        let max = lane_fold(logits, f32::NEG_INFINITY, f32::max);
        if self.temperature == 0.0 || !max.is_finite() {
            let best = (0..logits.len()).max_by(|&a, &b| logits[a].total_cmp(&logits[b])).unwrap_or(0);
            return best as u32;
        }
        let inv_t = 1.0 / self.temperature;
        let mut weights = [0f32; MAX_FAST];
        let weights = &mut weights[..logits.len()];
        for (w, &l) in weights.iter_mut().zip(logits) {
            *w = fast_exp((l - max) * inv_t);
        }
        let total = lane_fold(weights, 0.0, |a, b| a + b);
        let target = rng.uniform() as f32 * total;
        let mut acc = 0.0f32;
        for (c, chunk) in weights.chunks(8).enumerate() {
            let sum: f32 = chunk.iter().sum();
            if target < acc + sum {
                for (i, &w) in chunk.iter().enumerate() {
                    acc += w;
                    if target < acc {
                        return (c * 8 + i) as u32;
                    }
                }
            }
            acc += sum;
        }
        // Only reachable through rounding at the very top of the range: the last token with weight.
        weights.iter().rposition(|&w| w > 0.0).unwrap_or(0) as u32
    }
}

/// Folds `xs` with `f` in eight independent lanes (so that the loop vectorises), then the lanes.
#[inline(always)]
fn lane_fold(xs: &[f32], init: f32, f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut lanes = [init; 8];
    let mut chunks = xs.chunks_exact(8);
    for chunk in &mut chunks {
        for k in 0..8 {
            lanes[k] = f(lanes[k], chunk[k]);
        }
    }
    chunks.remainder().iter().fold(lanes.into_iter().fold(init, &f), |a, &b| f(a, b))
}

fn draw_from(p: &[f64], rng: &mut Rng) -> u32 {
    let u = rng.uniform();
    let mut acc = 0.0;
    for (i, &pi) in p.iter().enumerate() {
        acc += pi;
        if u < acc {
            return i as u32;
        }
    }
    // Rounding left u above the last partial sum: take the last token with mass.
    p.iter().rposition(|&x| x > 0.0).unwrap_or(0) as u32
}

/// How the next logits are computed during generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// The model's incremental state: O(1) work per token in the sequence length.
    Cached,
    /// The parallel pass over the whole receptive field for every token (the reference).
    Naive,
}

/// Generates `steps` tokens for each of `prime.len()` sequences, after feeding each its prime
/// (all primes of the same length). Returns only the new tokens. `progress(done)` is called
/// with 0 once the prime is fed, then every few hundred tokens.
#[allow(clippy::too_many_arguments)] // each is a different collaborator; a struct would only rename them
pub fn generate<M: Autoregressive + Sync>(
    model: &M,
    prime: &[Vec<u32>],
    labels: Option<&Tensor>,
    steps: usize,
    sampler: &SamplerConfig,
    rng: &mut Rng,
    method: Method,
    progress: &mut dyn FnMut(usize),
) -> Result<Vec<Vec<u32>>> {
    let batch = prime.len();
    let mut out = vec![Vec::with_capacity(steps); batch];
    match method {
        Method::Cached => {
            let mut state = model.start(batch, labels)?;
            let mut logits = model.step(&mut state, None)?;
            for t in 0..prime.first().map_or(0, |p| p.len()) {
                let prev: Vec<u32> = prime.iter().map(|p| p[t]).collect();
                logits = model.step(&mut state, Some(&Tensor::new(prev, &candle_core::Device::Cpu)?))?;
            }
            progress(0);
            for i in 0..steps {
                let next = draw(&logits, sampler, rng)?;
                for (o, &n) in out.iter_mut().zip(&next) {
                    o.push(n);
                }
                if i + 1 < steps {
                    logits = model.step(&mut state, Some(&Tensor::new(next, &candle_core::Device::Cpu)?))?;
                }
                if i % 256 == 255 {
                    progress(i + 1);
                }
            }
        }
        Method::Naive => {
            let mut histories: Vec<Vec<u32>> = prime.to_vec();
            progress(0);
            for i in 0..steps {
                let next = draw(&naive_next_logits(model, &histories, labels)?, sampler, rng)?;
                for ((o, h), &n) in out.iter_mut().zip(histories.iter_mut()).zip(&next) {
                    o.push(n);
                    h.push(n);
                }
                if i % 16 == 15 {
                    progress(i + 1);
                }
            }
        }
    }
    progress(steps);
    Ok(out)
}

/// One token per row of `logits (B, V)`, drawn in row order from the shared generator.
fn draw(logits: &Tensor, sampler: &SamplerConfig, rng: &mut Rng) -> Result<Vec<u32>> {
    let rows = logits.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    Ok(rows.iter().map(|row| sampler.sample(row, rng)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temperature_zero_is_argmax_and_top_k_top_p_cut_the_tail() {
        let logits = [0.0f32, 3.0, 1.0, 2.0];
        let greedy = SamplerConfig { temperature: 0.0, ..Default::default() };
        assert_eq!(greedy.distribution(&logits), vec![0.0, 1.0, 0.0, 0.0]);
        let top2 = SamplerConfig { top_k: Some(2), ..Default::default() };
        let p = top2.distribution(&logits);
        assert_eq!((p[0], p[2]), (0.0, 0.0));
        assert!((p[1] + p[3] - 1.0).abs() < 1e-12 && p[1] > p[3]);
        let nucleus = SamplerConfig { top_p: Some(0.5), ..Default::default() };
        assert_eq!(nucleus.distribution(&logits).iter().filter(|&&x| x > 0.0).count(), 1);
    }

    #[test]
    fn sampled_frequencies_match_the_distribution() {
        let logits = [0.0f32, 1.0, 2.0];
        let cfg = SamplerConfig::default();
        let p = cfg.distribution(&logits);
        let mut rng = Rng::new(11);
        let mut counts = [0usize; 3];
        let n = 60_000;
        for _ in 0..n {
            counts[cfg.sample(&logits, &mut rng) as usize] += 1;
        }
        for i in 0..3 {
            let f = counts[i] as f64 / n as f64;
            assert!((f - p[i]).abs() < 0.01, "token {i}: {f} vs {}", p[i]);
        }
    }

    #[test]
    fn bad_settings_are_rejected() {
        assert!(SamplerConfig { temperature: -1.0, ..Default::default() }.validate().is_err());
        assert!(SamplerConfig { top_k: Some(0), ..Default::default() }.validate().is_err());
        assert!(SamplerConfig { top_p: Some(1.5), ..Default::default() }.validate().is_err());
    }
}
