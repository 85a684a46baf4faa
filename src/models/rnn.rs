//! Recurrent language models over tokens: the LSTM (Hochreiter & Schmidhuber, 1997) and the GRU
//! (Cho et al., 2014). As image models they read the pixels in raster order, the recurrent
//! baseline of van den Oord et al., 2016, "Pixel Recurrent Neural Networks",
//! <https://arxiv.org/abs/1601.06759>.
//!
//! The token before position t (a start token at t = 0) is embedded, passed through stacked
//! recurrent layers, and the last layer's hidden state gives the logits of token t. Each
//! layer (its input product over all positions and its recurrence) is one hand-written
//! operation (`layers::recurrent`). The stepper carries each layer's state. Both
//! cells share everything but the recurrence: [`Recurrent`] over a [`Cell`].
//!
//! | name | shape | role |
//! |---|---|---|
//! | `embed.weight` | `(V + 1, E)` | token embeddings; row V is the start token |
//! | `layers.{l}.input.weight` | `(E or H, G·H)` | input → gates (LSTM: i, f, g, o; GRU: r, z, n) |
//! | `layers.{l}.input.bias` | `(G·H,)` | gate biases (the LSTM adds 1 to its forget gate's) |
//! | `layers.{l}.recurrent.weight` | `(H, G·H)` | h_{t−1} → gates |
//! | `layers.{l}.recurrent.bias` | `(H,)` | GRU only: b_hn, inside the reset gate's product |
//! | `output.weight` | `(H, V)` | last hidden state → logits |
//! | `output.bias` | `(V,)` | |

use candle_core::{DType, Device, Tensor};
use candle_nn::{Init, VarBuilder};
use serde::{Deserialize, Serialize};

use super::{MAX_HIDDEN, Registered, Settings, within};
use crate::core::Autoregressive;
use crate::layers::recurrent::{Kind, gru_gates, gru_recurrence_reference, lstm_recurrence_reference, recurrent_layer};
use crate::{Error, Result};

/// Hyper-parameters of a recurrent model.
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

/// What distinguishes the LSTM from the GRU.
pub trait Cell: Clone + std::fmt::Debug + Send + Sync + 'static {
    /// The name in messages.
    const NAME: &'static str;
    /// Gate blocks per hidden unit G (LSTM 4, GRU 3).
    const GATES: usize;
    /// Whether the layer has a recurrent bias (the GRU's b_hn).
    const RECURRENT_BIAS: bool;
    /// The hand-written layer's recurrence.
    const KIND: Kind;

    /// Added to every layer's input bias `(G·H,)`: a fixed offset, not a weight.
    fn bias_offset(hidden: usize) -> Vec<f32>;

    /// The hidden states `(B, T, H)` from the input pre-activations `(B, T, G·H)`, in candle's
    /// operations (the reference the hand-written layer is checked against).
    fn reference_recurrence(pre: &Tensor, w_hh: &Tensor, b_hh: Option<&Tensor>) -> Result<Tensor>;

    /// One step in candle's operations: from the input pre-activations `z_in (B, G·H)` and the
    /// state (h, and the LSTM's c), the new state.
    fn step(z_in: &Tensor, w_hh: &Tensor, b_hh: Option<&Tensor>, h: &Tensor, c: &Tensor) -> Result<(Tensor, Tensor)>;
}

/// The LSTM cell (PyTorch's gate order i, f, g, o).
#[derive(Debug, Clone)]
pub struct LstmCell;

impl Cell for LstmCell {
    const NAME: &'static str = "LSTM";
    const GATES: usize = 4;
    const RECURRENT_BIAS: bool = false;
    const KIND: Kind = Kind::Lstm;

    /// 1 at the forget gate: cells keep their content at the start of training (Gers et al.,
    /// 2000), and a checkpoint's biases stay what was learnt.
    fn bias_offset(h: usize) -> Vec<f32> {
        (0..4 * h).map(|k| if (h..2 * h).contains(&k) { 1.0 } else { 0.0 }).collect()
    }

    fn reference_recurrence(pre: &Tensor, w_hh: &Tensor, _b: Option<&Tensor>) -> Result<Tensor> {
        lstm_recurrence_reference(pre, w_hh)
    }

    fn step(z_in: &Tensor, w_hh: &Tensor, _b: Option<&Tensor>, h: &Tensor, c: &Tensor) -> Result<(Tensor, Tensor)> {
        let hid = h.dim(1)?;
        let z = (z_in + h.matmul(w_hh)?)?; // (B, 4H)
        let i = candle_nn::ops::sigmoid(&z.narrow(1, 0, hid)?)?;
        let f = candle_nn::ops::sigmoid(&z.narrow(1, hid, hid)?)?;
        let g = z.narrow(1, 2 * hid, hid)?.tanh()?;
        let o = candle_nn::ops::sigmoid(&z.narrow(1, 3 * hid, hid)?)?;
        let c = ((f * c)? + (i * g)?)?;
        Ok(((o * c.tanh()?)?, c))
    }
}

/// The GRU cell (PyTorch's gate order r, z, n, with b_hn inside the reset gate's product).
#[derive(Debug, Clone)]
pub struct GruCell;

impl Cell for GruCell {
    const NAME: &'static str = "GRU";
    const GATES: usize = 3;
    const RECURRENT_BIAS: bool = true;
    const KIND: Kind = Kind::Gru;

    fn bias_offset(h: usize) -> Vec<f32> {
        vec![0.0; 3 * h]
    }

    fn reference_recurrence(pre: &Tensor, w_hh: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
        gru_recurrence_reference(pre, w_hh, b.expect("invariant: a GRU layer has b_hn"))
    }

    fn step(z_in: &Tensor, w_hh: &Tensor, b: Option<&Tensor>, h: &Tensor, c: &Tensor) -> Result<(Tensor, Tensor)> {
        let b = b.expect("invariant: a GRU layer has b_hn");
        let (_r, z, n) = gru_gates(z_in, &h.matmul(w_hh)?, b, h.dim(1)?)?;
        let h = ((z.affine(-1.0, 1.0)? * &n)? + (&z * h)?)?; // (1 − z) ⊙ n + z ⊙ h
        Ok((h, c.clone()))
    }
}

/// An LSTM model.
pub type Lstm = Recurrent<LstmCell>;
/// A GRU model.
pub type Gru = Recurrent<GruCell>;

/// One layer's weights.
#[derive(Debug, Clone)]
struct Layer {
    w_ih: Tensor,
    bias: Tensor,
    w_hh: Tensor,
    b_hh: Option<Tensor>,
}

/// A recurrent model with cell `C`.
#[derive(Debug, Clone)]
pub struct Recurrent<C: Cell> {
    /// Hyper-parameters.
    pub cfg: Config,
    embed: Tensor,
    layers: Vec<Layer>,
    /// [`Cell::bias_offset`], `(G·H,)`.
    offset: Tensor,
    out_w: Tensor,
    out_b: Tensor,
    cell: std::marker::PhantomData<C>,
}

impl<C: Cell> Recurrent<C> {
    /// Loads or creates the weights under `vb` (uniform in ±1/√H, as PyTorch does).
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        <Self as Registered>::weights(cfg)?;
        let (v, e, h, g) = (cfg.classes, cfg.embedding, cfg.hidden, C::GATES);
        let bound = 1.0 / (h as f64).sqrt();
        let uniform = Init::Uniform { lo: -bound, up: bound };
        let embed = vb.pp("embed").get_with_hints((v + 1, e), "weight", Init::Randn { mean: 0.0, stdev: 1.0 })?;
        let layers = (0..cfg.layers)
            .map(|l| {
                let vb = vb.pp(format!("layers.{l}"));
                let input = if l == 0 { e } else { h };
                Ok(Layer {
                    w_ih: vb.pp("input").get_with_hints((input, g * h), "weight", uniform)?,
                    bias: vb.pp("input").get_with_hints(g * h, "bias", Init::Const(0.0))?,
                    w_hh: vb.pp("recurrent").get_with_hints((h, g * h), "weight", uniform)?,
                    b_hh: if C::RECURRENT_BIAS {
                        Some(vb.pp("recurrent").get_with_hints(h, "bias", Init::Const(0.0))?)
                    } else {
                        None
                    },
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let offset = Tensor::new(C::bias_offset(h).as_slice(), &Device::Cpu)?.to_dtype(embed.dtype())?;
        Ok(Recurrent {
            cfg: cfg.clone(),
            embed,
            layers,
            offset,
            out_w: vb.pp("output").get_with_hints((h, v), "weight", uniform)?,
            out_b: vb.pp("output").get_with_hints(v, "bias", Init::Const(0.0))?,
            cell: std::marker::PhantomData,
        })
    }

    /// Logits `(B, T, V)`, the recurrences by the hand-written ops or (`reference`) by candle's.
    fn logits(&self, tokens: &Tensor, reference: bool) -> Result<Tensor> {
        let (b, len) = tokens.dims2()?;
        if let Some(max) = self.cfg.length.filter(|&m| len > m) {
            return Err(Error::Config(format!("{len} tokens given to a {} of sequences of {max}", C::NAME)));
        }
        let start = Tensor::full(self.cfg.classes as u32, (b, 1), tokens.device())?;
        let shifted = Tensor::cat(&[&start, &tokens.narrow(1, 0, len.saturating_sub(1))?], 1)?; // (B, T)
        let mut x = self.embed.index_select(&shifted.flatten_all()?, 0)?; // (B·T, E)
        let (h, g) = (self.cfg.hidden, C::GATES);
        for layer in &self.layers {
            let bias = (&layer.bias + &self.offset)?;
            let hidden = if reference {
                let pre = affine(&x, &layer.w_ih, &bias, true)?.reshape((b, len, g * h))?; // (B, T, G·H)
                C::reference_recurrence(&pre, &layer.w_hh, layer.b_hh.as_ref())?
            } else {
                let x = x.reshape((b, len, x.dim(1)?))?;
                recurrent_layer(C::KIND, &x, &layer.w_ih, &bias, &layer.w_hh, layer.b_hh.as_ref())?
            };
            x = hidden.reshape((b * len, h))?; // (B·T, H)
        }
        let logits = affine(&x, &self.out_w, &self.out_b, reference)?; // (B·T, V)
        Ok(logits.reshape((b, len, self.cfg.classes))?)
    }
}

/// `x w + b`: by the fused operation (`layers::linear`), or (`reference`) by candle's.
fn affine(x: &Tensor, w: &Tensor, b: &Tensor, reference: bool) -> Result<Tensor> {
    if reference {
        Ok(x.matmul(w)?.broadcast_add(b)?)
    } else {
        crate::layers::linear(x, w, b, crate::layers::shifted::Options::plain())
    }
}

/// The stepper's state: every layer's hidden state (and the LSTM's cell), `(B, H)` each.
pub struct State {
    h: Vec<Tensor>,
    c: Vec<Tensor>,
}

impl<C: Cell> Registered for Recurrent<C> {
    type Config = Config;

    fn build(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        Recurrent::new(cfg, vb)
    }

    fn weights(cfg: &Config) -> Result<usize> {
        let name = C::NAME;
        within(&format!("{name} classes"), cfg.classes, 2, 65_536)?;
        within(&format!("{name} --embedding"), cfg.embedding, 1, MAX_HIDDEN)?;
        within(&format!("{name} --hidden"), cfg.hidden, 1, MAX_HIDDEN)?;
        within(&format!("{name} --layers"), cfg.layers, 1, 64)?;
        if let Some(len) = cfg.length {
            within(&format!("{name} sequence length"), len, 2, 1 << 24)?;
        }
        let (v, e, h, g) = (cfg.classes, cfg.embedding, cfg.hidden, C::GATES);
        let recurrent_bias = if C::RECURRENT_BIAS { h } else { 0 };
        let layer = |input: usize| (input + h + 1) * g * h + recurrent_bias;
        Ok((v + 1) * e + layer(e) + (cfg.layers - 1) * layer(h) + (h + 1) * v)
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

    /// μ-law codes, any length; the image defaults otherwise (embedding 32).
    fn audio_config(_window: usize, s: &Settings) -> Option<Result<Config>> {
        Some(s.single_hidden(256).map(|hidden| Config {
            classes: 256,
            embedding: s.embedding.unwrap_or(32),
            hidden,
            layers: s.layers.unwrap_or(1),
            length: None,
        }))
    }

    fn examples() -> Vec<(&'static str, Config)> {
        let one = Config { classes: 5, embedding: 4, hidden: 6, layers: 1, length: None };
        let two = Config { classes: 2, embedding: 3, hidden: 5, layers: 2, length: Some(12) };
        match C::GATES {
            4 => vec![("lstm 1 layer", one), ("lstm 2 layers, 12 pixels", two)],
            _ => vec![("gru 1 layer", one), ("gru 2 layers, 12 pixels", two)],
        }
    }
}

impl<C: Cell> Autoregressive for Recurrent<C> {
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
        self.logits(tokens, false)
    }

    fn forward_reference(&self, tokens: &Tensor, _labels: Option<&Tensor>) -> Option<Result<Tensor>> {
        Some(self.logits(tokens, true))
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
        let mut x = self.embed.index_select(&token, 0)?; // (B, E)
        for (l, layer) in self.layers.iter().enumerate() {
            let bias = (&layer.bias + &self.offset)?;
            let z_in = x.matmul(&layer.w_ih)?.broadcast_add(&bias)?; // (B, G·H)
            let (h, c) = C::step(&z_in, &layer.w_hh, layer.b_hh.as_ref(), &state.h[l], &state.c[l])?;
            (state.h[l], state.c[l]) = (h, c);
            x = state.h[l].clone();
        }
        Ok(x.matmul(&self.out_w)?.broadcast_add(&self.out_b)?)
    }
}
