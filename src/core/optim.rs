//! AdamW (Loshchilov & Hutter, 2019) with global-norm gradient clipping, and optionally an
//! average of the weights it visits (Polyak averaging, as an exponential moving average).
//! Written here rather than taken from candle-nn because exact resume needs the moment
//! estimates saved and loaded, and candle's `AdamW` keeps them private.

use std::cell::Cell;
use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};

use super::params::Params;
use crate::Result;

/// AdamW hyper-parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    /// β₁, the decay of the first moment.
    pub beta1: f64,
    /// β₂, the decay of the second moment.
    pub beta2: f64,
    /// ε added to the root of the second moment.
    pub eps: f64,
    /// Decoupled weight decay, applied to matrices only (not to biases or gains).
    pub weight_decay: f64,
    /// L2 penalty (l2/2)·‖W‖² added to the loss of matrices only, i.e. to their gradients
    /// before the moments: unlike decoupled decay, a Gaussian prior whose optimum Adam finds.
    #[serde(default)]
    pub l2: f64,
    /// L1 penalty l1·‖W‖₁ on matrices, as its subgradient l1·sign(W) (a Laplace prior: most
    /// pixel-to-pixel weights of an image model should be about zero).
    #[serde(default)]
    pub l1: f64,
    /// When positive, the L1 penalty becomes the log-sum penalty l1·s·ln(1 + |W|/s) with this
    /// scale s (reweighted L1, Candès et al. 2008): L1 for |W| ≪ s, only logarithmic above, so
    /// the few strong weights are hardly shrunk while the many weak ones still go to zero.
    #[serde(default)]
    pub l1_log_scale: f64,
    /// Gradients are scaled down so their global L2 norm is at most this (0: no clipping).
    pub grad_clip: f64,
    /// When positive, the optimizer also keeps an exponential moving average of the weights
    /// with this decay per step (0.999 averages over about the last thousand steps): the
    /// average of a noisy descent generalises better than its last point. The trainer
    /// evaluates and saves the average; it trains the raw weights.
    #[serde(default)]
    pub average_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            l2: 0.0,
            l1: 0.0,
            l1_log_scale: 0.0,
            grad_clip: 1.0,
            average_decay: 0.0,
        }
    }
}

struct Slot {
    name: String,
    var: Var,
    m: Tensor,
    v: Tensor,
    /// The average of the weights, when averaging (a `Var` so that it can trade places with
    /// `var` without copying through a `&mut`).
    average: Option<Var>,
}

/// The optimizer and its state.
pub struct AdamW {
    cfg: AdamWConfig,
    slots: Vec<Slot>,
    /// Updates taken so far (for the bias correction).
    pub t: u64,
    /// Whether the parameters hold the average now (inside [`AdamW::averaged`]) and the slots'
    /// `average` the raw weights.
    swapped: Cell<bool>,
}

impl AdamW {
    /// Fresh state (zero moments) for every parameter of `params`.
    pub fn new(params: &Params, cfg: AdamWConfig) -> Result<Self> {
        let slots = params
            .named()
            .into_iter()
            .map(|(name, var)| {
                let m = var.zeros_like()?;
                let v = var.zeros_like()?;
                let average =
                    if cfg.average_decay > 0.0 { Some(Var::from_tensor(&var.as_tensor().copy()?)?) } else { None };
                Ok(Slot { name, var, m, v, average })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(AdamW { cfg, slots, t: 0, swapped: Cell::new(false) })
    }

    /// `f()` with the parameters holding the average of the weights, when averaging (then the
    /// raw weights again, also if `f` fails); just `f()` otherwise. For evaluating and saving.
    pub fn averaged<R>(&self, f: impl FnOnce() -> Result<R>) -> Result<R> {
        if self.cfg.average_decay <= 0.0 || self.swapped.get() {
            return f();
        }
        self.swap()?;
        let result = f();
        self.swap()?;
        result
    }

    /// Trades the parameters and their averages (bit for bit: both are plain copies).
    fn swap(&self) -> Result<()> {
        for s in &self.slots {
            if let Some(average) = &s.average {
                let raw = s.var.as_tensor().copy()?;
                s.var.set(average.as_tensor())?;
                average.set(&raw)?;
            }
        }
        self.swapped.set(!self.swapped.get());
        Ok(())
    }

    /// One update with learning rate `lr`; returns the gradient norm before clipping.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<f64> {
        assert!(!self.swapped.get(), "invariant: no step while the parameters hold the average");
        let mut sq = 0.0;
        for s in &self.slots {
            if let Some(g) = grads.get(&s.var) {
                sq += g.sqr()?.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            }
        }
        let norm = sq.sqrt();
        let scale = if self.cfg.grad_clip > 0.0 && norm > self.cfg.grad_clip { self.cfg.grad_clip / norm } else { 1.0 };
        self.t += 1;
        let c = &self.cfg;
        let (bc1, bc2) = (1.0 - c.beta1.powi(self.t as i32), 1.0 - c.beta2.powi(self.t as i32));
        for s in &mut self.slots {
            let Some(g) = grads.get(&s.var) else { continue };
            // Detached: otherwise each moment would hold the autograd graph of every past step.
            let mut g = (g.detach() * scale)?;
            if s.var.rank() >= 2 {
                let w = s.var.as_tensor().detach();
                if c.l2 > 0.0 {
                    g = (g + (&w * c.l2)?)?;
                }
                if c.l1 > 0.0 {
                    let mut pull = (w.sign()? * c.l1)?;
                    if c.l1_log_scale > 0.0 {
                        pull = (pull / ((w.abs()? / c.l1_log_scale)? + 1.0)?)?;
                    }
                    g = (g + pull)?;
                }
            }
            s.m = ((&s.m * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
            s.v = ((&s.v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let update = ((&s.m / bc1)? / ((&s.v / bc2)?.sqrt()? + c.eps)?)?;
            let decay = if s.var.rank() >= 2 { 1.0 - lr * c.weight_decay } else { 1.0 };
            let next = ((s.var.as_tensor() * decay)? - (update * lr)?)?;
            s.var.set(&next)?;
        }
        let d = c.average_decay;
        for s in &self.slots {
            if let Some(average) = &s.average {
                average.set(&((average.as_tensor() * d)? + (s.var.as_tensor() * (1.0 - d))?)?)?;
            }
        }
        Ok(norm)
    }

    /// The optimizer's state as named tensors, for the checkpoint: the moment estimates
    /// (`m.NAME`, `v.NAME`) and, when averaging, the raw weights (`w.NAME`), because the
    /// checkpoint's weights file holds their average (see [`AdamW::averaged`]).
    pub fn state_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut tensors = vec![];
        for s in &self.slots {
            tensors.push((format!("m.{}", s.name), s.m.clone()));
            tensors.push((format!("v.{}", s.name), s.v.clone()));
            if let Some(average) = &s.average {
                let raw = if self.swapped.get() { average.as_tensor() } else { s.var.as_tensor() };
                // A copy: the swap back writes into this storage.
                tensors.push((format!("w.{}", s.name), raw.copy()?));
            }
        }
        Ok(tensors)
    }

    /// Restores the state saved by [`AdamW::state_tensors`], the parameters holding the
    /// checkpoint's weights; `None` if a moment is missing or has the wrong shape. A checkpoint
    /// saved while averaging holds the average as its weights and the raw weights as `w.NAME`,
    /// which training continues; a new average starts at the checkpoint's weights.
    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>, t: u64) -> Option<()> {
        assert!(!self.swapped.get(), "invariant: loaded outside `averaged`");
        for s in &mut self.slots {
            let m = tensors.get(&format!("m.{}", s.name))?;
            let v = tensors.get(&format!("v.{}", s.name))?;
            if m.shape() != s.var.shape() || v.shape() != s.var.shape() {
                return None;
            }
            s.m = m.to_dtype(s.var.dtype()).ok()?;
            s.v = v.to_dtype(s.var.dtype()).ok()?;
            if let Some(average) = &s.average {
                average.set(s.var.as_tensor()).ok()?;
            }
            // The raw weights continue training (also when averaging has been turned off).
            if let Some(raw) = tensors.get(&format!("w.{}", s.name)) {
                if raw.shape() != s.var.shape() {
                    return None;
                }
                s.var.set(&raw.to_dtype(s.var.dtype()).ok()?).ok()?;
            }
        }
        self.t = t;
        Some(())
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};

    use super::*;

    /// Minimises (w − 3)² for a 1×1 matrix and a bias: with the penalty (λ/2)·w² the matrix
    /// settles at 6 / (2 + λ), the bias (not penalised) at 3.
    #[test]
    fn l2_penalty_moves_the_optimum_of_matrices_only() -> Result<()> {
        let params = Params::new(0);
        let vb = params.var_builder(DType::F32);
        let w = vb.get_with_hints((1, 1), "w", candle_nn::Init::Const(0.0))?;
        let b = vb.get_with_hints(1, "b", candle_nn::Init::Const(0.0))?;
        let mut opt = AdamW::new(&params, AdamWConfig { l2: 1.0, grad_clip: 0.0, ..AdamWConfig::default() })?;
        let three = Tensor::new(3f32, &Device::Cpu)?;
        for _ in 0..3000 {
            let loss = (w.flatten_all()?.broadcast_sub(&three)?.sqr()?.sum_all()?
                + b.broadcast_sub(&three)?.sqr()?.sum_all()?)?;
            opt.step(&loss.backward()?, 0.01)?;
        }
        let (w, b) = (w.flatten_all()?.to_vec1::<f32>()?[0], b.to_vec1::<f32>()?[0]);
        assert!((w - 2.0).abs() < 0.02, "matrix at {w}, want 6/(2+1) = 2");
        assert!((b - 3.0).abs() < 0.02, "bias at {b}, want 3");
        Ok(())
    }

    /// The average follows a_t = d·a_{t−1} + (1 − d)·w_t from the starting weights; `averaged`
    /// puts it in the parameters and restores the raw weights bit for bit; the saved state
    /// (the average as the weights, the raw weights as `w.NAME`) restores both.
    #[test]
    fn the_average_of_the_weights_is_kept_swapped_in_and_restored() -> Result<()> {
        let params = Params::new(0);
        let w = params.var_builder(DType::F32).get_with_hints((1, 2), "w", candle_nn::Init::Const(0.5))?;
        let cfg = AdamWConfig { average_decay: 0.9, grad_clip: 0.0, ..AdamWConfig::default() };
        let mut opt = AdamW::new(&params, cfg.clone())?;
        let mut want = vec![0.5f64; 2];
        let target = Tensor::new(&[[1f32, -1.0]], &Device::Cpu)?;
        for _ in 0..20 {
            let loss = (&w - &target)?.sqr()?.sum_all()?;
            opt.step(&loss.backward()?, 0.05)?;
            for (a, x) in want.iter_mut().zip(w.flatten_all()?.to_vec1::<f32>()?) {
                *a = 0.9 * *a + 0.1 * x as f64;
            }
        }
        let raw = w.flatten_all()?.to_vec1::<f32>()?;
        let average = opt.averaged(|| Ok(w.flatten_all()?.to_vec1::<f32>()?))?;
        for (a, b) in average.iter().zip(&want) {
            assert!((*a as f64 - b).abs() < 1e-6, "average {a}, by hand {b}");
        }
        assert_ne!(average, raw, "the average lags the raw weights");
        assert_eq!(w.flatten_all()?.to_vec1::<f32>()?, raw, "raw weights back after `averaged`");

        // A checkpoint: the weights file gets the average, the optimizer's state the raw weights.
        // (copies: `params.tensors()` shares the storage that the swap back overwrites)
        let copies = || params.tensors().into_iter().map(|(n, t)| Ok((n, t.copy()?))).collect::<Result<Vec<_>>>();
        let (weights, state) = opt.averaged(|| Ok((copies()?, opt.state_tensors()?)))?;
        let state: HashMap<String, Tensor> = state.into_iter().collect();
        assert_eq!(state["w.w"].flatten_all()?.to_vec1::<f32>()?, raw);
        let restored = Params::new(1);
        let w2 = restored.var_builder(DType::F32).get_with_hints((1, 2), "w", candle_nn::Init::Const(0.0))?;
        restored.assign(&weights.into_iter().collect(), std::path::Path::new("test"))?;
        let mut opt2 = AdamW::new(&restored, cfg)?;
        opt2.load_state(&state, opt.t).expect("matching state");
        assert_eq!(w2.flatten_all()?.to_vec1::<f32>()?, raw, "training continues from the raw weights");
        assert_eq!(opt2.averaged(|| Ok(w2.flatten_all()?.to_vec1::<f32>()?))?, average);
        Ok(())
    }

    /// Where AdamW leaves a 1×1 matrix w (from 0.3) minimising (w − 1)² plus the penalty.
    fn minimise_with_l1(l1: f64, l1_log_scale: f64) -> Result<f32> {
        let params = Params::new(0);
        let w = params.var_builder(DType::F32).get_with_hints((1, 1), "w", candle_nn::Init::Const(0.3))?;
        let cfg = AdamWConfig { l1, l1_log_scale, grad_clip: 0.0, ..AdamWConfig::default() };
        let mut opt = AdamW::new(&params, cfg)?;
        for step in 0..3000 {
            let loss = (w.flatten_all()? - 1.0)?.sqr()?.sum_all()?;
            // A decaying rate, so that the subgradient's oscillation about 0 dies down.
            opt.step(&loss.backward()?, 0.02 / (1.0 + step as f64 / 100.0))?;
        }
        Ok(w.flatten_all()?.to_vec1::<f32>()?[0])
    }

    /// (w − 1)² + λ·|w|: with λ = 1 the optimum is w = 1 − λ/2 = 0.5; with λ = 4 it is w = 0
    /// (the penalty's pull exceeds the loss's slope at 0).
    #[test]
    fn l1_penalty_shrinks_and_zeroes() -> Result<()> {
        for (l1, want) in [(1.0, 0.5), (4.0, 0.0)] {
            let w = minimise_with_l1(l1, 0.0)?;
            assert!((w - want).abs() < 0.02, "λ = {l1}: w at {w}, want {want}");
        }
        Ok(())
    }

    /// (w − 1)² + λ·s·ln(1 + |w|/s) with s = 1: with λ = 1, 2(w − 1) + 1/(1 + w) = 0 gives
    /// w = √½ ≈ 0.707, shrunk less than by L1's 0.5; with λ = 4 zero is still the optimum
    /// (the pull at 0 is L1's).
    #[test]
    fn log_sum_penalty_shrinks_large_weights_less_and_still_zeroes() -> Result<()> {
        for (l1, want) in [(1.0, 0.5f32.sqrt()), (4.0, 0.0)] {
            let w = minimise_with_l1(l1, 1.0)?;
            assert!((w - want).abs() < 0.02, "λ = {l1}: w at {w}, want {want}");
        }
        Ok(())
    }
}
