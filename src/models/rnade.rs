//! RNADE, the real-valued NADE (Uria, Murray & Larochelle, 2013,
//! <https://arxiv.org/abs/1306.0186>): NADE's shared hidden layer over real inputs, and for each
//! position a mixture of K Gaussians whose weights, means and scales are read from h_i:
//! p(x_i | x_<i) = Σ_k π_ik N(x_i; μ_ik, σ_ik²), (π, μ, log σ)_i = V[i]ᵀ h_i + b_i.
//!
//! Data are levels 0..L (L = 256 grey levels) dequantised to x = (level + u)/L, u ~ U(0, 1), in
//! [0, 1]; [`Autoregressive::position_nll`] scores `batch.values` with the density. For the
//! core's token interface (sampling, the property checks) the model also gives the
//! probability of each level's interval [l/L, (l+1)/L) (the outer two extended to ±∞), with the
//! levels before it fed as their interval centres.
//!
//! | name | shape | role |
//! |---|---|---|
//! | `input.weight` / `input.bias` | `(D, H)` / `(H,)` | W, c as in NADE |
//! | `output.weight` | `(D, H, 3K)` | per position: K mixture logits, K means, K log-scales |
//! | `output.bias` | `(D, 3K)` | |
//!
//! The means start spread over [0, 1] ((k + ½)/K is added to them) and the scales at 1/K
//! (−ln K is added to the log-scales): constant offsets, not parameters.

use candle_core::{D, Device, Tensor};
use candle_nn::{Init, VarBuilder};
use serde::{Deserialize, Serialize};

use super::{MAX_HIDDEN, MAX_PIXELS, Registered, Settings, require_pixels, within};
use crate::core::{Autoregressive, Likelihood, token_nll};
use crate::data::Batch;
use crate::layers::nade::{Activation, nade_outputs};
use crate::{Error, Result};

/// RNADE hyper-parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    /// Sequence length D (784 for MNIST).
    pub pixels: usize,
    /// Hidden units H.
    pub hidden: usize,
    /// Mixture components K.
    pub components: usize,
    /// Quantisation levels L of the data (256 for 8-bit pixels).
    pub levels: usize,
    /// The hidden non-linearity (the paper uses ReLU).
    pub activation: Activation,
}

/// The model.
#[derive(Debug, Clone)]
pub struct Rnade {
    /// Hyper-parameters.
    pub cfg: Config,
    w: Tensor,
    c: Tensor,
    v: Tensor,
    b: Tensor,
    /// Added to the means and log-scales, `(3K,)`: 0 for the logits.
    offsets: Tensor,
    /// The inner interval edges 1/L … (L−1)/L.
    edges: Tensor,
}

const HALF_LN_2PI: f64 = 0.918_938_533_204_672_8;

impl Rnade {
    /// Loads or creates the weights under `vb`.
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let d = require_pixels(cfg.pixels)?;
        let (h, k) = (cfg.hidden, cfg.components);
        if h == 0 || k == 0 || cfg.levels < 2 {
            return Err(Error::Config("RNADE needs --hidden ≥ 1, --components ≥ 1 and at least 2 levels".into()));
        }
        let normal = |fan_in: usize, scale: f64| Init::Randn { mean: 0.0, stdev: scale / (fan_in as f64).sqrt() };
        let w = vb.pp("input").get_with_hints((d, h), "weight", normal(d, 1.0))?;
        let dtype = w.dtype();
        let mut offsets = vec![0f32; 3 * k];
        for j in 0..k {
            offsets[k + j] = (j as f32 + 0.5) / k as f32;
            offsets[2 * k + j] = -(k as f32).ln();
        }
        let edges: Vec<f32> = (1..cfg.levels).map(|l| l as f32 / cfg.levels as f32).collect();
        Ok(Rnade {
            cfg: cfg.clone(),
            w,
            c: vb.pp("input").get_with_hints(h, "bias", Init::Const(0.0))?,
            v: vb.pp("output").get_with_hints((d, h, 3 * k), "weight", normal(h, 0.1))?,
            b: vb.pp("output").get_with_hints((d, 3 * k), "bias", Init::Const(0.0))?,
            offsets: Tensor::from_vec(offsets, 3 * k, &Device::Cpu)?.to_dtype(dtype)?,
            edges: Tensor::from_vec(edges, cfg.levels - 1, &Device::Cpu)?.to_dtype(dtype)?,
        })
    }

    /// Mixture parameters `(log π, μ, log σ)`, each `(B, T, K)`, from raw outputs `(B, T, 3K)`.
    fn mixture(&self, y: &Tensor, b: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let k = self.cfg.components;
        let y = y.broadcast_add(b)?.broadcast_add(&self.offsets)?;
        let log_pi = candle_nn::ops::log_softmax(&y.narrow(D::Minus1, 0, k)?, D::Minus1)?;
        Ok((log_pi, y.narrow(D::Minus1, k, k)?, y.narrow(D::Minus1, 2 * k, k)?))
    }

    /// The parallel outputs for inputs `x (B, D)`, narrowed to the first `len` positions.
    fn outputs(&self, x: &Tensor, len: usize) -> Result<(Tensor, Tensor, Tensor)> {
        let y = nade_outputs(x, &self.c, &self.w, &self.v, self.cfg.activation)?; // (B, D, 3K)
        self.mixture(&y.narrow(1, 0, len)?, &self.b.narrow(0, 0, len)?)
    }

    /// Levels `(B, T)` u32 as the centres of their intervals.
    fn centres(&self, tokens: &Tensor) -> Result<Tensor> {
        let l = self.cfg.levels as f64;
        Ok(tokens.to_dtype(self.w.dtype())?.affine(1.0 / l, 0.5 / l)?)
    }

    /// Log-probabilities of the L intervals, `(B, T, L)`, under mixtures `(B, T, K)`.
    fn level_log_probs(&self, log_pi: &Tensor, mu: &Tensor, log_sigma: &Tensor) -> Result<Tensor> {
        // Φ((e − μ)/σ) at every inner edge e: (B, T, K, L−1).
        let z = self.edges.reshape((1, 1, 1, ()))?.broadcast_sub(&mu.unsqueeze(3)?)?;
        let z = z.broadcast_div(&log_sigma.exp()?.unsqueeze(3)?)?;
        let cdf = ((z * std::f64::consts::FRAC_1_SQRT_2)?.erf()? + 1.0)? * 0.5;
        let mixed = cdf?.broadcast_mul(&log_pi.exp()?.unsqueeze(3)?)?.sum(2)?; // (B, T, L−1)
        let (b, t, _) = mixed.dims3()?;
        let dtype = mixed.dtype();
        let ends = |v: f64| Tensor::full(v, (b, t, 1), &Device::Cpu)?.to_dtype(dtype);
        let cumulative = Tensor::cat(&[ends(0.0)?, mixed, ends(1.0)?], 2)?; // (B, T, L+1)
        let l = self.cfg.levels;
        let mass = (cumulative.narrow(2, 1, l)? - cumulative.narrow(2, 0, l)?)?;
        Ok(mass.clamp(1e-12, 1.0)?.log()?)
    }
}

/// The stepper's state: NADE's running pre-activation, `(B, H)`.
pub struct State {
    a: Tensor,
    t: usize,
}

impl Registered for Rnade {
    type Config = Config;

    fn build(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        Rnade::new(cfg, vb)
    }

    fn weights(cfg: &Config) -> Result<usize> {
        within("pixels", cfg.pixels, 2, MAX_PIXELS)?;
        within("hidden", cfg.hidden, 1, MAX_HIDDEN)?;
        within("components", cfg.components, 1, 1000)?;
        within("levels", cfg.levels, 2, 65_536)?;
        Ok(cfg.pixels * cfg.hidden * (1 + 3 * cfg.components))
    }

    fn sequence_len(cfg: &Config) -> Option<usize> {
        Some(cfg.pixels)
    }

    /// 100 ReLU hidden units and 10 components by default; 8-bit grey levels.
    fn image_config(pixels: usize, s: &Settings) -> Option<Result<Config>> {
        Some(s.single_hidden(100).map(|hidden| Config {
            pixels,
            hidden,
            components: s.components.unwrap_or(10),
            levels: 256,
            activation: s.activation.unwrap_or(Activation::Relu),
        }))
    }

    fn likelihood(cfg: &Config) -> Likelihood {
        Likelihood::Density { levels: cfg.levels }
    }

    fn examples() -> Vec<(&'static str, Config)> {
        vec![("rnade", Config { pixels: 12, hidden: 9, components: 3, levels: 16, activation: Activation::Relu })]
    }
}

impl Autoregressive for Rnade {
    type State = State;

    fn vocab_size(&self) -> usize {
        self.cfg.levels
    }

    fn dependency_window(&self) -> Option<usize> {
        None
    }

    fn max_context(&self) -> Option<usize> {
        Some(self.cfg.pixels)
    }

    fn likelihood(&self) -> Likelihood {
        <Self as Registered>::likelihood(&self.cfg)
    }

    fn forward(&self, tokens: &Tensor, _labels: Option<&Tensor>) -> Result<Tensor> {
        let (_b, len) = tokens.dims2()?;
        let x = pad_to(&self.centres(tokens)?, self.cfg.pixels)?;
        let (log_pi, mu, log_sigma) = self.outputs(&x, len)?;
        self.level_log_probs(&log_pi, &mu, &log_sigma)
    }

    /// With `batch.values`: −log p(x_i | x_<i) under the mixture density; without: the NLL of
    /// the levels (the token interface).
    fn position_nll(&self, batch: &Batch) -> Result<Tensor> {
        let Some(values) = &batch.values else {
            return token_nll(&self.forward(&batch.tokens, None)?, &batch.tokens);
        };
        let (_b, len) = values.dims2()?;
        let x = pad_to(&values.to_dtype(self.w.dtype())?, self.cfg.pixels)?;
        let (log_pi, mu, log_sigma) = self.outputs(&x, len)?;
        let z = x.narrow(1, 0, len)?.unsqueeze(2)?.broadcast_sub(&mu)?.div(&log_sigma.exp()?)?; // (B, T, K)
        let log_density = ((log_pi - log_sigma)? - (z.sqr()? * 0.5)?)?.affine(1.0, -HALF_LN_2PI)?;
        Ok(log_density.log_sum_exp(2)?.neg()?)
    }

    fn start(&self, batch: usize, _labels: Option<&Tensor>) -> Result<State> {
        Ok(State { a: self.c.unsqueeze(0)?.broadcast_as((batch, self.cfg.hidden))?.contiguous()?, t: 0 })
    }

    fn step(&self, state: &mut State, prev: Option<&Tensor>) -> Result<Tensor> {
        if let Some(p) = prev {
            let x = self.centres(&p.unsqueeze(1)?)?; // (B, 1)
            state.a = (&state.a + x.broadcast_mul(&self.w.narrow(0, state.t - 1, 1)?)?)?;
        }
        let h = self.cfg.activation.apply(&state.a)?;
        let v = self.v.narrow(0, state.t, 1)?.squeeze(0)?; // (H, 3K)
        let y = h.matmul(&v)?.unsqueeze(1)?; // (B, 1, 3K)
        let (log_pi, mu, log_sigma) = self.mixture(&y, &self.b.narrow(0, state.t, 1)?)?;
        state.t += 1;
        Ok(self.level_log_probs(&log_pi, &mu, &log_sigma)?.squeeze(1)?)
    }
}

/// `(B, T)` → `(B, D)`, zeros past T.
fn pad_to(x: &Tensor, pixels: usize) -> Result<Tensor> {
    let (_b, len) = x.dims2()?;
    if len > pixels {
        return Err(Error::Config(format!("{len} values given to a model of {pixels} pixels")));
    }
    let x = if len < pixels { x.pad_with_zeros(1, 0, pixels - len)? } else { x.clone() };
    Ok(x.contiguous()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::params::Params;
    use candle_core::DType;

    #[test]
    fn level_probabilities_sum_to_one_and_match_the_density() {
        let cfg = Config { pixels: 5, hidden: 4, components: 3, levels: 64, activation: Activation::Relu };
        let params = Params::new(1);
        let model = Rnade::new(&cfg, params.var_builder(DType::F64)).unwrap();
        let tokens = Tensor::new(&[[3u32, 60, 17, 40, 0], [0, 1, 2, 3, 63]], &Device::Cpu).unwrap();
        let log_p = model.forward(&tokens, None).unwrap(); // (2, 5, 64)
        let total = log_p.exp().unwrap().sum(2).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        assert!(total.iter().all(|t| (t - 1.0).abs() < 1e-9), "{total:?}");
        // The probability of a level is the density integrated over its interval: with the
        // values at the interval centres, −log P ≈ −log p(centre) + ln L for a smooth density.
        let values = model.centres(&tokens).unwrap();
        let batch = Batch {
            tokens: tokens.clone(),
            mask: Tensor::ones((2, 5), DType::F64, &Device::Cpu).unwrap(),
            labels: None,
            values: Some(values),
            features: None,
            dropout: None,
        };
        let density_nll = model.position_nll(&batch).unwrap().to_vec2::<f64>().unwrap();
        let level_nll = token_nll(&log_p, &tokens).unwrap().to_vec2::<f64>().unwrap();
        let ln_l = (cfg.levels as f64).ln();
        for (b, row) in level_nll.iter().enumerate() {
            for (t, &l) in row.iter().enumerate() {
                // the outer levels also hold the tails beyond [0, 1]: only compare inner ones
                let level = tokens.to_vec2::<u32>().unwrap()[b][t];
                if level > 0 && level < 63 {
                    assert!(
                        (l - (density_nll[b][t] + ln_l)).abs() < 0.05,
                        "{b},{t}: {l} vs {}",
                        density_nll[b][t] + ln_l
                    );
                }
            }
        }
    }
}
