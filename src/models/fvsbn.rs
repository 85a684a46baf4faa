//! FVSBN, the fully visible sigmoid belief network (Frey, 1998; the baseline of Larochelle &
//! Murray, 2011): each binary pixel is a logistic regression on the pixels before it,
//! p(x_i = 1 | x_<i) = σ(b_i + Σ_{j<i} W[j, i] x_j).
//!
//! | name | shape | role |
//! |---|---|---|
//! | `weight` | `(D, D)` | `[j, i]`: pixel j → logit of pixel i; only the strictly upper triangle (j < i) is used |
//! | `output.bias` | `(D,)` | b |

use candle_core::{Device, Tensor};
use candle_nn::{Init, VarBuilder};
use serde::{Deserialize, Serialize};

use super::{MAX_PIXELS, Registered, Settings, binary_inputs, binary_logits, require_pixels, within};
use crate::Result;
use crate::core::Autoregressive;

/// FVSBN hyper-parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    /// Sequence length D (784 for MNIST).
    pub pixels: usize,
}

/// The model.
#[derive(Debug, Clone)]
pub struct Fvsbn {
    /// Hyper-parameters.
    pub cfg: Config,
    weight: Tensor,
    /// `[j, i] = 1` where j < i.
    mask: Tensor,
    bias: Tensor,
}

impl Fvsbn {
    /// Loads or creates the weights under `vb` (small random weights: the log-likelihood is
    /// concave in them, so any start will do).
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let d = require_pixels(cfg.pixels)?;
        let weight = vb.get_with_hints((d, d), "weight", Init::Randn { mean: 0.0, stdev: 0.01 })?;
        let bias = vb.get_with_hints(d, "output.bias", Init::Const(0.0))?;
        let upper: Vec<f32> = (0..d * d).map(|k| if k / d < k % d { 1.0 } else { 0.0 }).collect();
        let mask = Tensor::from_vec(upper, (d, d), &Device::Cpu)?.to_dtype(weight.dtype())?;
        Ok(Fvsbn { cfg: cfg.clone(), weight, mask, bias })
    }

    fn masked_weight(&self) -> Result<Tensor> {
        Ok((&self.weight * &self.mask)?)
    }
}

/// The stepper's state: the logits of every pixel given the pixels seen so far.
pub struct State {
    acc: Tensor,
    weight: Tensor,
    t: usize,
}

impl Registered for Fvsbn {
    type Config = Config;

    fn build(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        Fvsbn::new(cfg, vb)
    }

    fn weights(cfg: &Config) -> Result<usize> {
        within("pixels", cfg.pixels, 2, MAX_PIXELS)?;
        Ok(cfg.pixels * cfg.pixels)
    }

    fn sequence_len(cfg: &Config) -> Option<usize> {
        Some(cfg.pixels)
    }

    fn image_config(pixels: usize, _settings: &Settings) -> Option<Result<Config>> {
        Some(Ok(Config { pixels }))
    }

    fn examples() -> Vec<(&'static str, Config)> {
        vec![("fvsbn", Config { pixels: 12 })]
    }

    fn weight_masks(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(vec![("weight".into(), self.mask.clone())])
    }
}

impl Autoregressive for Fvsbn {
    type State = State;

    fn vocab_size(&self) -> usize {
        2
    }

    fn dependency_window(&self) -> Option<usize> {
        None
    }

    fn max_context(&self) -> Option<usize> {
        Some(self.cfg.pixels)
    }

    fn forward(&self, tokens: &Tensor, _labels: Option<&Tensor>) -> Result<Tensor> {
        let (x, len) = binary_inputs(tokens, self.cfg.pixels, self.weight.dtype())?; // (B, D)
        let s = x.matmul(&self.masked_weight()?)?.broadcast_add(&self.bias)?; // (B, D)
        binary_logits(&s.narrow(1, 0, len)?)
    }

    fn start(&self, batch: usize, _labels: Option<&Tensor>) -> Result<State> {
        let acc = self.bias.unsqueeze(0)?.broadcast_as((batch, self.cfg.pixels))?.contiguous()?;
        Ok(State { acc, weight: self.masked_weight()?, t: 0 })
    }

    fn step(&self, state: &mut State, prev: Option<&Tensor>) -> Result<Tensor> {
        if let Some(p) = prev {
            // The running update: acc += x_{t−1} · W[t−1, :].
            let x = p.to_dtype(state.acc.dtype())?.unsqueeze(1)?; // (B, 1)
            state.acc = (&state.acc + x.broadcast_mul(&state.weight.narrow(0, state.t - 1, 1)?)?)?;
        }
        let logits = binary_logits(&state.acc.narrow(1, state.t, 1)?)?.squeeze(1)?;
        state.t += 1;
        Ok(logits)
    }
}
