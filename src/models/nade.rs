//! NADE, the neural autoregressive distribution estimator (Larochelle & Murray, 2011,
//! <https://proceedings.mlr.press/v15/larochelle11a.html>), for binary pixels:
//! h_i = act(c + Σ_{j<i} W[j] x_j), p(x_i = 1 | x_<i) = σ(b_i + V[i]·h_i). The weights W are
//! shared by every conditional, and both the parallel pass (training) and the stepper
//! (sampling) use the running update a_{i+1} = a_i + W[i]·x_i: O(D·H) per image.
//!
//! | name | shape | role |
//! |---|---|---|
//! | `input.weight` | `(D, H)` | W: row j is pixel j's contribution to the hidden units |
//! | `input.bias` | `(H,)` | c |
//! | `output.weight` | `(D, H)` | V: row i reads h_i |
//! | `output.bias` | `(D,)` | b (initialised from the data: the log-odds of each pixel) |

use candle_core::Tensor;
use candle_nn::{Init, VarBuilder};
use serde::{Deserialize, Serialize};

use super::{MAX_HIDDEN, MAX_PIXELS, Registered, Settings, binary_inputs, binary_logits, require_pixels, within};
use crate::Result;
use crate::core::Autoregressive;
use crate::layers::nade::{Activation, nade_outputs};

/// NADE hyper-parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    /// Sequence length D (784 for MNIST).
    pub pixels: usize,
    /// Hidden units H.
    pub hidden: usize,
    /// The hidden non-linearity.
    #[serde(default)]
    pub activation: Activation,
}

/// The model.
#[derive(Debug, Clone)]
pub struct Nade {
    /// Hyper-parameters.
    pub cfg: Config,
    w: Tensor,
    c: Tensor,
    v: Tensor,
    b: Tensor,
}

impl Nade {
    /// Loads or creates the weights under `vb`.
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let d = require_pixels(cfg.pixels)?;
        let h = cfg.hidden.max(1);
        let normal = |fan_in: usize| Init::Randn { mean: 0.0, stdev: 1.0 / (fan_in as f64).sqrt() };
        Ok(Nade {
            cfg: cfg.clone(),
            w: vb.pp("input").get_with_hints((d, h), "weight", normal(d))?,
            c: vb.pp("input").get_with_hints(h, "bias", Init::Const(0.0))?,
            v: vb.pp("output").get_with_hints((d, h), "weight", normal(h))?,
            b: vb.pp("output").get_with_hints(d, "bias", Init::Const(0.0))?,
        })
    }
}

/// The stepper's state: the hidden pre-activation a_t of each sequence, `(B, H)`.
pub struct State {
    a: Tensor,
    t: usize,
}

impl Registered for Nade {
    type Config = Config;

    fn build(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        Nade::new(cfg, vb)
    }

    fn weights(cfg: &Config) -> Result<usize> {
        within("pixels", cfg.pixels, 2, MAX_PIXELS)?;
        within("hidden", cfg.hidden, 1, MAX_HIDDEN)?;
        Ok(2 * cfg.pixels * cfg.hidden)
    }

    fn sequence_len(cfg: &Config) -> Option<usize> {
        Some(cfg.pixels)
    }

    /// 500 sigmoid hidden units by default, as in the paper.
    fn image_config(pixels: usize, s: &Settings) -> Option<Result<Config>> {
        Some(s.single_hidden(500).map(|hidden| Config {
            pixels,
            hidden,
            activation: s.activation.unwrap_or(Activation::Sigmoid),
        }))
    }

    fn examples() -> Vec<(&'static str, Config)> {
        vec![
            ("nade sigmoid", Config { pixels: 12, hidden: 7, activation: Activation::Sigmoid }),
            ("nade relu", Config { pixels: 12, hidden: 7, activation: Activation::Relu }),
        ]
    }
}

impl Autoregressive for Nade {
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
        let (x, len) = binary_inputs(tokens, self.cfg.pixels, self.w.dtype())?; // (B, D)
        let (d, h) = self.w.dims2()?;
        let y = nade_outputs(&x, &self.c, &self.w, &self.v.reshape((d, h, 1))?, self.cfg.activation)?; // (B, D, 1)
        let s = y.squeeze(2)?.broadcast_add(&self.b)?;
        binary_logits(&s.narrow(1, 0, len)?)
    }

    fn start(&self, batch: usize, _labels: Option<&Tensor>) -> Result<State> {
        Ok(State { a: self.c.unsqueeze(0)?.broadcast_as((batch, self.cfg.hidden))?.contiguous()?, t: 0 })
    }

    fn step(&self, state: &mut State, prev: Option<&Tensor>) -> Result<Tensor> {
        if let Some(p) = prev {
            // The running update: a_t = a_{t−1} + x_{t−1} · W[t−1].
            let x = p.to_dtype(state.a.dtype())?.unsqueeze(1)?; // (B, 1)
            state.a = (&state.a + x.broadcast_mul(&self.w.narrow(0, state.t - 1, 1)?)?)?;
        }
        let h = self.cfg.activation.apply(&state.a)?; // (B, H)
        let s = h.broadcast_mul(&self.v.narrow(0, state.t, 1)?)?.sum_keepdim(1)?; // (B, 1)
        let s = s.broadcast_add(&self.b.narrow(0, state.t, 1)?)?;
        state.t += 1;
        Ok(binary_logits(&s)?.squeeze(1)?)
    }
}
