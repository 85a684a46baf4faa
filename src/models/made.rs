//! MADE, the masked autoencoder for distribution estimation (Germain, Gregor, Murray &
//! Larochelle, 2015, <https://arxiv.org/abs/1502.03509>): an MLP whose weight matrices are
//! multiplied by binary masks so that output d sees only the inputs before d in an ordering.
//!
//! Masks from degrees (section 4 of the paper): input d has degree m⁰(d) ∈ 1..D, its rank in
//! the ordering; hidden unit k of layer l draws m^l(k) uniformly from [min m^{l−1}, D − 1];
//! a hidden weight exists where m^l(out) ≥ m^{l−1}(in), an output weight where
//! m⁰(d) > m^L(k), a direct input→output weight where m⁰(d) > m⁰(j). Several connectivities
//! (orderings and degrees) are drawn from `mask_seed`; training cycles through them and the
//! test likelihood of the ensemble is the mean of their probabilities (log-mean-exp).
//! Connectivity 0 always has the left-to-right ordering, so that a prefix (the top half of an
//! image) can be given to the sampler.
//!
//! | name | shape | role |
//! |---|---|---|
//! | `layers.{l}.weight` / `.bias` | `(in, out)` / `(out,)` | hidden layer l, ReLU |
//! | `output.weight` / `.bias` | `(H_L, D)` / `(D,)` | logits of each pixel |
//! | `direct.weight` | `(D, D)` | only with `direct`: input → output |

use candle_core::{Device, Tensor};
use candle_nn::{Init, VarBuilder};
use serde::{Deserialize, Serialize};

use super::{MAX_HIDDEN, MAX_PIXELS, Registered, Settings, binary_inputs, binary_logits, require_pixels, within};
use crate::core::Autoregressive;
use crate::rng::Rng;
use crate::{Error, Result};

/// MADE hyper-parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    /// Sequence length D (784 for MNIST).
    pub pixels: usize,
    /// Units of each hidden layer.
    pub hidden: Vec<usize>,
    /// Direct input → output connections.
    pub direct: bool,
    /// Number of connectivities (masks) trained and averaged.
    pub masks: usize,
    /// Whether connectivities after the first also draw a random ordering (otherwise only the
    /// hidden degrees differ).
    pub orderings: bool,
    /// The seed the connectivities are drawn from.
    pub mask_seed: u64,
}

/// One connectivity: an ordering and the masks it gives.
#[derive(Debug, Clone)]
struct Connectivity {
    order: Vec<usize>,
    hidden: Vec<Tensor>,
    output: Tensor,
    direct: Tensor,
}

/// The model.
#[derive(Debug, Clone)]
pub struct Made {
    /// Hyper-parameters.
    pub cfg: Config,
    layers: Vec<(Tensor, Tensor)>,
    output: (Tensor, Tensor),
    direct: Option<Tensor>,
    connectivities: Vec<Connectivity>,
    /// The connectivity in use (atomic, so that threads training shards of a batch can share the model).
    selected: usize,
}

fn mask(rows: usize, cols: usize, keep: impl Fn(usize, usize) -> bool, like: &Tensor) -> Result<Tensor> {
    let m: Vec<f32> = (0..rows * cols).map(|k| if keep(k / cols, k % cols) { 1.0 } else { 0.0 }).collect();
    Ok(Tensor::from_vec(m, (rows, cols), &Device::Cpu)?.to_dtype(like.dtype())?)
}

impl Made {
    /// Loads or creates the weights under `vb` and draws the connectivities.
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let d = require_pixels(cfg.pixels)?;
        if cfg.hidden.is_empty() || cfg.hidden.contains(&0) || cfg.masks == 0 {
            return Err(Error::Config("MADE needs at least one hidden layer, no empty layer, and --masks ≥ 1".into()));
        }
        let normal = |fan_in: usize| Init::Randn { mean: 0.0, stdev: (2.0 / fan_in as f64).sqrt() }; // He, for ReLU
        let mut layers = Vec::new();
        let mut fan_in = d;
        for (l, &units) in cfg.hidden.iter().enumerate() {
            let lv = vb.pp(format!("layers.{l}"));
            layers.push((
                lv.get_with_hints((fan_in, units), "weight", normal(fan_in))?,
                lv.get_with_hints(units, "bias", Init::Const(0.0))?,
            ));
            fan_in = units;
        }
        let ov = vb.pp("output");
        let output = (
            ov.get_with_hints((fan_in, d), "weight", Init::Randn { mean: 0.0, stdev: 1.0 / (fan_in as f64).sqrt() })?,
            ov.get_with_hints(d, "bias", Init::Const(0.0))?,
        );
        let direct =
            cfg.direct.then(|| vb.pp("direct").get_with_hints((d, d), "weight", Init::Const(0.0))).transpose()?;
        let like = &output.0;
        let connectivities = (0..cfg.masks)
            .map(|k| {
                let mut rng = Rng::derived(cfg.mask_seed, &format!("made connectivity {k}"));
                let mut order: Vec<usize> = (0..d).collect();
                if k > 0 && cfg.orderings {
                    for i in (1..d).rev() {
                        order.swap(i, rng.below(i + 1));
                    }
                }
                let mut degree_in = vec![0usize; d]; // m⁰: rank in the ordering, 1..=D
                for (rank, &pixel) in order.iter().enumerate() {
                    degree_in[pixel] = rank + 1;
                }
                let mut prev = degree_in.clone();
                let mut hidden = Vec::new();
                for &units in &cfg.hidden {
                    let low = prev.iter().copied().min().unwrap_or(1).min(d - 1);
                    let degrees: Vec<usize> = (0..units).map(|_| low + rng.below(d - low)).collect(); // low..=D−1
                    hidden.push(mask(prev.len(), units, |i, o| degrees[o] >= prev[i], like)?);
                    prev = degrees;
                }
                let output = mask(prev.len(), d, |k, o| degree_in[o] > prev[k], like)?;
                let direct = mask(d, d, |j, o| degree_in[o] > degree_in[j], like)?;
                Ok(Connectivity { order, hidden, output, direct })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Made { cfg: cfg.clone(), layers, output, direct, connectivities, selected: 0 })
    }

    /// The logits of every pixel (`(B, D)`) from inputs `x (B, D)` under the selected masks.
    fn scores(&self, x: &Tensor) -> Result<Tensor> {
        let conn = &self.connectivities[self.selected];
        let mut h = x.clone();
        for ((w, b), m) in self.layers.iter().zip(&conn.hidden) {
            h = h.matmul(&(w * m)?)?.broadcast_add(b)?.relu()?;
        }
        let mut s = h.matmul(&(&self.output.0 * &conn.output)?)?.broadcast_add(&self.output.1)?;
        if let Some(a) = &self.direct {
            s = (s + x.matmul(&(a * &conn.direct)?)?)?;
        }
        Ok(s)
    }

    /// For each weight matrix (by parameter name), the union of its masks over all
    /// connectivities: 1 where some connectivity uses the weight, 0 where none does. The
    /// weights under a 0 never reach an output, so they may be zeroed (see `mnist compact`).
    fn union_masks(&self) -> Result<Vec<(String, Tensor)>> {
        let union = |pick: &dyn Fn(&Connectivity) -> &Tensor| -> Result<Tensor> {
            let mut all = self.connectivities.iter().map(pick);
            let first = all.next().expect("invariant: at least one connectivity").clone();
            all.try_fold(first, |acc, m| Ok(acc.maximum(m)?))
        };
        let mut masks = Vec::new();
        for l in 0..self.layers.len() {
            masks.push((format!("layers.{l}.weight"), union(&|c| &c.hidden[l])?));
        }
        masks.push(("output.weight".into(), union(&|c| &c.output)?));
        if self.direct.is_some() {
            masks.push(("direct.weight".into(), union(&|c| &c.direct)?));
        }
        Ok(masks)
    }
}

/// The stepper's state: the pixels generated so far (zeros elsewhere); each step runs the
/// network once and reads the next pixel's logit.
pub struct State {
    x: Vec<Vec<f32>>,
    t: usize,
}

impl Registered for Made {
    type Config = Config;

    fn build(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        Made::new(cfg, vb)
    }

    fn weights(cfg: &Config) -> Result<usize> {
        within("pixels", cfg.pixels, 2, MAX_PIXELS)?;
        within("hidden layers", cfg.hidden.len(), 1, 8)?;
        for &h in &cfg.hidden {
            within("hidden", h, 1, MAX_HIDDEN)?;
        }
        within("masks", cfg.masks, 1, 1000)?;
        let sizes: Vec<usize> = std::iter::once(cfg.pixels).chain(cfg.hidden.iter().copied()).collect();
        let weights: usize = sizes.windows(2).map(|w| w[0] * w[1]).sum::<usize>()
            + cfg.hidden.last().copied().unwrap_or(0) * cfg.pixels
            + if cfg.direct { cfg.pixels * cfg.pixels } else { 0 };
        // Each connectivity keeps its masks, as large as the weights.
        Ok(weights.saturating_mul(cfg.masks.min(super::MAX_PARAMETERS) + 1))
    }

    fn sequence_len(cfg: &Config) -> Option<usize> {
        Some(cfg.pixels)
    }

    /// One hidden layer of 500 units and one connectivity by default.
    fn image_config(pixels: usize, s: &Settings) -> Option<Result<Config>> {
        Some(Ok(Config {
            pixels,
            hidden: if s.hidden.is_empty() { vec![500] } else { s.hidden.clone() },
            direct: s.direct,
            masks: s.masks.unwrap_or(1),
            orderings: s.orderings,
            mask_seed: s.seed,
        }))
    }

    fn examples() -> Vec<(&'static str, Config)> {
        let one = Config { pixels: 12, hidden: vec![16], direct: false, masks: 1, orderings: false, mask_seed: 3 };
        let two = Config { hidden: vec![16, 13], direct: true, masks: 3, orderings: true, ..one.clone() };
        vec![("made 1 layer", one), ("made 2 layers, direct, 3 orderings", two)]
    }

    fn weight_masks(&self) -> Result<Vec<(String, Tensor)>> {
        self.union_masks()
    }
}

impl Autoregressive for Made {
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

    fn ordering(&self) -> Option<Vec<usize>> {
        let order = &self.connectivities[self.selected].order;
        order.iter().enumerate().any(|(i, &p)| i != p).then(|| order.clone())
    }

    fn connectivities(&self) -> usize {
        self.connectivities.len()
    }

    fn select_connectivity(&mut self, k: usize) {
        self.selected = k % self.connectivities.len();
    }

    fn forward(&self, tokens: &Tensor, _labels: Option<&Tensor>) -> Result<Tensor> {
        let (x, len) = binary_inputs(tokens, self.cfg.pixels, self.output.0.dtype())?;
        binary_logits(&self.scores(&x)?.narrow(1, 0, len)?)
    }

    fn start(&self, batch: usize, _labels: Option<&Tensor>) -> Result<State> {
        Ok(State { x: vec![vec![0.0; self.cfg.pixels]; batch], t: 0 })
    }

    fn step(&self, state: &mut State, prev: Option<&Tensor>) -> Result<Tensor> {
        let order = &self.connectivities[self.selected].order;
        if let Some(p) = prev {
            for (row, v) in state.x.iter_mut().zip(p.to_vec1::<u32>()?) {
                row[order[state.t - 1]] = v as f32;
            }
        }
        let flat: Vec<f32> = state.x.concat();
        let x =
            Tensor::from_vec(flat, (state.x.len(), self.cfg.pixels), &Device::Cpu)?.to_dtype(self.output.0.dtype())?;
        let s = self.scores(&x)?.narrow(1, order[state.t], 1)?;
        state.t += 1;
        Ok(binary_logits(&s)?.squeeze(1)?)
    }
}
