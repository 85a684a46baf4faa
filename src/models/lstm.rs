//! An LSTM language model over tokens (Hochreiter & Schmidhuber, 1997; as an image model it
//! reads the pixels in raster order, the baseline of van den Oord et al., 2016, "Pixel
//! Recurrent Neural Networks", <https://arxiv.org/abs/1601.06759>).
//!
//! The token before position t (a start token at t = 0) is embedded, passed through stacked
//! LSTM layers, and the last layer's hidden state gives the logits of token t. Each layer's
//! input product is a candle matmul over all positions; its recurrence is one hand-written
//! operation (`layers::lstm`). The stepper carries each layer's (h, c).
//!
//! | name | shape | role |
//! |---|---|---|
//! | `embed.weight` | `(V + 1, E)` | token embeddings; row V is the start token |
//! | `layers.{l}.input.weight` | `(E or H, 4H)` | input → gates i, f, g, o (PyTorch's order) |
//! | `layers.{l}.input.bias` | `(4H,)` | gate biases (the model adds 1 to the forget gate's) |
//! | `layers.{l}.recurrent.weight` | `(H, 4H)` | h_{t−1} → gates |
//! | `output.weight` | `(H, V)` | last hidden state → logits |
//! | `output.bias` | `(V,)` | |

use candle_core::{D, DType, Device, Tensor};
use candle_nn::{Init, VarBuilder};
use serde::{Deserialize, Serialize};

use super::{MAX_HIDDEN, Registered, Settings, within};
use crate::core::Autoregressive;
use crate::layers::lstm::{lstm_recurrence, lstm_recurrence_reference};
use crate::{Error, Result};

/// LSTM hyper-parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    /// Token classes V (2 for binary pixels, 256 for μ-law codes).
    pub classes: usize,
    /// Size E of a token's embedding.
    pub embedding: usize,
    /// Hidden units H of each layer.
    pub hidden: usize,
    /// Stacked layers.
    pub layers: usize,
    /// The length of every sequence, when fixed (an image's pixels).
    pub length: Option<usize>,
}

/// One layer's weights.
#[derive(Debug, Clone)]
struct Layer {
    w_ih: Tensor,
    bias: Tensor,
    w_hh: Tensor,
}

/// The model.
#[derive(Debug, Clone)]
pub struct Lstm {
    /// Hyper-parameters.
    pub cfg: Config,
    embed: Tensor,
    layers: Vec<Layer>,
    /// 1 at the forget gate, 0 elsewhere, added to every layer's gate bias: cells keep their
    /// content at the start of training (Gers et al., 2000), and a checkpoint's biases stay
    /// what was learnt.
    forget_offset: Tensor,
    out_w: Tensor,
    out_b: Tensor,
}

impl Lstm {
    /// Loads or creates the weights under `vb` (uniform in ±1/√H, as PyTorch does).
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        <Self as Registered>::weights(cfg)?;
        let (v, e, h) = (cfg.classes, cfg.embedding, cfg.hidden);
        let bound = 1.0 / (h as f64).sqrt();
        let uniform = Init::Uniform { lo: -bound, up: bound };
        let embed = vb.pp("embed").get_with_hints((v + 1, e), "weight", Init::Randn { mean: 0.0, stdev: 1.0 })?;
        let layers = (0..cfg.layers)
            .map(|l| {
                let vb = vb.pp(format!("layers.{l}"));
                let input = if l == 0 { e } else { h };
                Ok(Layer {
                    w_ih: vb.pp("input").get_with_hints((input, 4 * h), "weight", uniform)?,
                    bias: vb.pp("input").get_with_hints(4 * h, "bias", Init::Const(0.0))?,
                    w_hh: vb.pp("recurrent").get_with_hints((h, 4 * h), "weight", uniform)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let forget: Vec<f32> = (0..4 * h).map(|k| if (h..2 * h).contains(&k) { 1.0 } else { 0.0 }).collect();
        let forget_offset = Tensor::new(forget.as_slice(), &Device::Cpu)?.to_dtype(embed.dtype())?;
        Ok(Lstm {
            cfg: cfg.clone(),
            embed,
            layers,
            forget_offset,
            out_w: vb.pp("output").get_with_hints((h, v), "weight", uniform)?,
            out_b: vb.pp("output").get_with_hints(v, "bias", Init::Const(0.0))?,
        })
    }

    /// Logits `(B, T, V)` with the recurrence computed by `recurrence`.
    fn logits_with(&self, tokens: &Tensor, recurrence: fn(&Tensor, &Tensor) -> Result<Tensor>) -> Result<Tensor> {
        let (b, len) = tokens.dims2()?;
        if let Some(max) = self.cfg.length.filter(|&m| len > m) {
            return Err(Error::Config(format!("{len} tokens given to an LSTM of sequences of {max}")));
        }
        let start = Tensor::full(self.cfg.classes as u32, (b, 1), tokens.device())?;
        let shifted = Tensor::cat(&[&start, &tokens.narrow(1, 0, len.saturating_sub(1))?], 1)?; // (B, T)
        let mut x = self.embed.index_select(&shifted.flatten_all()?, 0)?; // (B·T, E)
        let h = self.cfg.hidden;
        for layer in &self.layers {
            let bias = (&layer.bias + &self.forget_offset)?;
            let pre = x.matmul(&layer.w_ih)?.broadcast_add(&bias)?.reshape((b, len, 4 * h))?; // (B, T, 4H)
            x = recurrence(&pre, &layer.w_hh)?.reshape((b * len, h))?; // (B·T, H)
        }
        let logits = x.matmul(&self.out_w)?.broadcast_add(&self.out_b)?; // (B·T, V)
        Ok(logits.reshape((b, len, self.cfg.classes))?)
    }
}

/// The stepper's state: every layer's hidden state and cell, `(B, H)` each.
pub struct State {
    h: Vec<Tensor>,
    c: Vec<Tensor>,
}

impl Registered for Lstm {
    type Config = Config;

    fn build(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        Lstm::new(cfg, vb)
    }

    fn weights(cfg: &Config) -> Result<usize> {
        within("LSTM classes", cfg.classes, 2, 65_536)?;
        within("LSTM --embedding", cfg.embedding, 1, MAX_HIDDEN)?;
        within("LSTM --hidden", cfg.hidden, 1, MAX_HIDDEN)?;
        within("LSTM --layers", cfg.layers, 1, 64)?;
        if let Some(len) = cfg.length {
            within("LSTM sequence length", len, 2, 1 << 24)?;
        }
        let (v, e, h) = (cfg.classes, cfg.embedding, cfg.hidden);
        let layers = (e + h + 1) * 4 * h + (cfg.layers - 1) * (2 * h + 1) * 4 * h;
        Ok((v + 1) * e + layers + (h + 1) * v)
    }

    fn sequence_len(cfg: &Config) -> Option<usize> {
        cfg.length
    }

    /// One layer of 256 hidden units with 16-dimensional embeddings of the two pixel values
    /// by default.
    fn image_config(pixels: usize, s: &Settings) -> Option<Result<Config>> {
        Some(s.single_hidden(256).map(|hidden| Config {
            classes: 2,
            embedding: s.embedding.unwrap_or(16),
            hidden,
            layers: s.layers.unwrap_or(1),
            length: Some(pixels),
        }))
    }

    fn examples() -> Vec<(&'static str, Config)> {
        vec![
            ("lstm 1 layer", Config { classes: 5, embedding: 4, hidden: 6, layers: 1, length: None }),
            ("lstm 2 layers, 12 pixels", Config { classes: 2, embedding: 3, hidden: 5, layers: 2, length: Some(12) }),
        ]
    }
}

impl Autoregressive for Lstm {
    type State = State;

    fn vocab_size(&self) -> usize {
        self.cfg.classes
    }

    fn dependency_window(&self) -> Option<usize> {
        None
    }

    fn max_context(&self) -> Option<usize> {
        self.cfg.length
    }

    fn forward(&self, tokens: &Tensor, _labels: Option<&Tensor>) -> Result<Tensor> {
        self.logits_with(tokens, lstm_recurrence)
    }

    fn forward_reference(&self, tokens: &Tensor, _labels: Option<&Tensor>) -> Option<Result<Tensor>> {
        Some(self.logits_with(tokens, lstm_recurrence_reference))
    }

    fn start(&self, batch: usize, _labels: Option<&Tensor>) -> Result<State> {
        let zeros = Tensor::zeros((batch, self.cfg.hidden), self.out_w.dtype(), &Device::Cpu)?;
        Ok(State { h: vec![zeros.clone(); self.layers.len()], c: vec![zeros; self.layers.len()] })
    }

    fn step(&self, state: &mut State, prev: Option<&Tensor>) -> Result<Tensor> {
        let batch = state.h[0].dim(0)?;
        let token = match prev {
            Some(p) => p.to_dtype(DType::U32)?,
            None => Tensor::full(self.cfg.classes as u32, batch, &Device::Cpu)?,
        };
        let h = self.cfg.hidden;
        let mut x = self.embed.index_select(&token, 0)?; // (B, E)
        for (l, layer) in self.layers.iter().enumerate() {
            let bias = (&layer.bias + &self.forget_offset)?;
            let z = (x.matmul(&layer.w_ih)?.broadcast_add(&bias)? + state.h[l].matmul(&layer.w_hh)?)?; // (B, 4H)
            let i = candle_nn::ops::sigmoid(&z.narrow(D::Minus1, 0, h)?)?;
            let f = candle_nn::ops::sigmoid(&z.narrow(D::Minus1, h, h)?)?;
            let g = z.narrow(D::Minus1, 2 * h, h)?.tanh()?;
            let o = candle_nn::ops::sigmoid(&z.narrow(D::Minus1, 3 * h, h)?)?;
            state.c[l] = ((f * &state.c[l])? + (i * g)?)?;
            state.h[l] = (o * state.c[l].tanh()?)?;
            x = state.h[l].clone();
        }
        Ok(x.matmul(&self.out_w)?.broadcast_add(&self.out_b)?)
    }
}
