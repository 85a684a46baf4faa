//! The models of the core, one file each. [`ModelConfig`] names a model and its settings in a
//! checkpoint's `config.json`; [`Model`] holds any of them behind one [`Autoregressive`]
//! implementation, so that commands and tests handle every model the same way.

use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use crate::core::Autoregressive;
use crate::data::Batch;
use crate::{Error, Result};

pub mod fvsbn;
pub mod made;
pub mod nade;
pub mod rnade;
pub mod wavenet;

/// Which model a checkpoint holds, with its hyper-parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum ModelConfig {
    /// WaveNet over μ-law codes.
    Wavenet(wavenet::Config),
    /// Fully visible sigmoid belief network over binary pixels.
    Fvsbn(fvsbn::Config),
    /// NADE over binary pixels.
    Nade(nade::Config),
    /// MADE over binary pixels.
    Made(made::Config),
    /// RNADE over real values (dequantised grey levels).
    Rnade(rnade::Config),
}

impl ModelConfig {
    /// The model's name as the command line spells it.
    pub fn name(&self) -> &'static str {
        match self {
            ModelConfig::Wavenet(_) => "wavenet",
            ModelConfig::Fvsbn(_) => "fvsbn",
            ModelConfig::Nade(_) => "nade",
            ModelConfig::Made(_) => "made",
            ModelConfig::Rnade(_) => "rnade",
        }
    }

    /// The WaveNet settings, if this is a WaveNet.
    pub fn wavenet(&self) -> Option<&wavenet::Config> {
        match self {
            ModelConfig::Wavenet(c) => Some(c),
            _ => None,
        }
    }

    /// Checks every size against its limit (before anything is allocated: a config.json can
    /// ask for anything).
    pub fn validate(&self) -> Result<()> {
        let params = match self {
            ModelConfig::Wavenet(c) => return c.validate(),
            ModelConfig::Fvsbn(c) => {
                within("pixels", c.pixels, 2, MAX_PIXELS)?;
                c.pixels * c.pixels
            }
            ModelConfig::Nade(c) => {
                within("pixels", c.pixels, 2, MAX_PIXELS)?;
                within("hidden", c.hidden, 1, MAX_HIDDEN)?;
                2 * c.pixels * c.hidden
            }
            ModelConfig::Made(c) => {
                within("pixels", c.pixels, 2, MAX_PIXELS)?;
                within("hidden layers", c.hidden.len(), 1, 8)?;
                for &h in &c.hidden {
                    within("hidden", h, 1, MAX_HIDDEN)?;
                }
                within("masks", c.masks, 1, 1000)?;
                let sizes: Vec<usize> = std::iter::once(c.pixels).chain(c.hidden.iter().copied()).collect();
                let weights: usize = sizes.windows(2).map(|w| w[0] * w[1]).sum::<usize>()
                    + c.hidden.last().copied().unwrap_or(0) * c.pixels
                    + if c.direct { c.pixels * c.pixels } else { 0 };
                // Each connectivity keeps its masks, as large as the weights.
                weights.saturating_mul(c.masks.min(MAX_PARAMETERS) + 1)
            }
            ModelConfig::Rnade(c) => {
                within("pixels", c.pixels, 2, MAX_PIXELS)?;
                within("hidden", c.hidden, 1, MAX_HIDDEN)?;
                within("components", c.components, 1, 1000)?;
                within("levels", c.levels, 2, 65_536)?;
                c.pixels * c.hidden * (1 + 3 * c.components)
            }
        };
        if params > MAX_PARAMETERS {
            return Err(Error::Config(format!(
                "this {} would hold about {params} weights, more than the limit of {MAX_PARAMETERS}: make it smaller",
                self.name()
            )));
        }
        Ok(())
    }

    /// Builds the model, loading or creating its weights under `vb`.
    pub fn build(&self, vb: VarBuilder) -> Result<Model> {
        self.validate()?;
        Ok(match self {
            ModelConfig::Wavenet(c) => Model::Wavenet(wavenet::WaveNet::new(c, vb)?),
            ModelConfig::Fvsbn(c) => Model::Fvsbn(fvsbn::Fvsbn::new(c, vb)?),
            ModelConfig::Nade(c) => Model::Nade(nade::Nade::new(c, vb)?),
            ModelConfig::Made(c) => Model::Made(made::Made::new(c, vb)?),
            ModelConfig::Rnade(c) => Model::Rnade(rnade::Rnade::new(c, vb)?),
        })
    }

    /// Small configurations of every model, for the property tests: registering a model here
    /// is what puts it under causality, stepping, gradient and learning checks.
    pub fn examples() -> Vec<(&'static str, ModelConfig)> {
        let wavenet = wavenet::Config {
            residual_channels: 6,
            gate_channels: 5,
            skip_channels: 7,
            head_channels: 9,
            classes: 16,
            ..wavenet::Config::tiny()
        };
        let made =
            made::Config { pixels: 12, hidden: vec![16], direct: false, masks: 1, orderings: false, mask_seed: 3 };
        vec![
            (
                "wavenet k2, 1 cycle",
                Self::Wavenet(wavenet::Config { layers_per_cycle: 3, kernel_width: 2, ..wavenet.clone() }),
            ),
            (
                "wavenet k2, 3 cycles",
                Self::Wavenet(wavenet::Config { layers_per_cycle: 2, cycles: 3, kernel_width: 2, ..wavenet.clone() }),
            ),
            (
                "wavenet k3, 2 cycles",
                Self::Wavenet(wavenet::Config { layers_per_cycle: 3, cycles: 2, kernel_width: 3, ..wavenet.clone() }),
            ),
            (
                "wavenet k4, labels",
                Self::Wavenet(wavenet::Config { layers_per_cycle: 2, kernel_width: 4, num_labels: 3, ..wavenet }),
            ),
            ("fvsbn", Self::Fvsbn(fvsbn::Config { pixels: 12 })),
            (
                "nade sigmoid",
                Self::Nade(nade::Config {
                    pixels: 12,
                    hidden: 7,
                    activation: crate::layers::nade::Activation::Sigmoid,
                }),
            ),
            (
                "nade relu",
                Self::Nade(nade::Config { pixels: 12, hidden: 7, activation: crate::layers::nade::Activation::Relu }),
            ),
            ("made 1 layer", Self::Made(made.clone())),
            (
                "made 2 layers, direct, 3 orderings",
                Self::Made(made::Config { hidden: vec![16, 13], direct: true, masks: 3, orderings: true, ..made }),
            ),
            (
                "rnade",
                Self::Rnade(rnade::Config {
                    pixels: 12,
                    hidden: 9,
                    components: 3,
                    levels: 16,
                    activation: crate::layers::nade::Activation::Relu,
                }),
            ),
        ]
    }
}

/// Any model of the core.
#[derive(Debug, Clone)]
pub enum Model {
    /// WaveNet.
    Wavenet(wavenet::WaveNet),
    /// FVSBN.
    Fvsbn(fvsbn::Fvsbn),
    /// NADE.
    Nade(nade::Nade),
    /// MADE.
    Made(made::Made),
    /// RNADE.
    Rnade(rnade::Rnade),
}

impl Model {
    /// For each weight matrix that has one, the mask of the weights the model can use (1) or
    /// never uses (0); empty for models without masks. See [`made::Made::weight_masks`].
    pub fn weight_masks(&self) -> Result<Vec<(String, Tensor)>> {
        match self {
            Model::Fvsbn(m) => Ok(m.weight_masks()),
            Model::Made(m) => m.weight_masks(),
            _ => Ok(vec![]),
        }
    }
}

/// The stepper state of any model.
pub enum ModelState {
    /// WaveNet's queues.
    Wavenet(wavenet::State),
    /// FVSBN's running logits.
    Fvsbn(fvsbn::State),
    /// NADE's running hidden pre-activation.
    Nade(nade::State),
    /// MADE's pixels so far.
    Made(made::State),
    /// RNADE's running hidden pre-activation.
    Rnade(rnade::State),
}

/// Runs `$body` with `$m` bound to the inner model, whichever it is.
macro_rules! each_model {
    ($model:expr, $m:ident => $body:expr) => {
        match $model {
            Model::Wavenet($m) => $body,
            Model::Fvsbn($m) => $body,
            Model::Nade($m) => $body,
            Model::Made($m) => $body,
            Model::Rnade($m) => $body,
        }
    };
}

impl Autoregressive for Model {
    type State = ModelState;

    fn vocab_size(&self) -> usize {
        each_model!(self, m => m.vocab_size())
    }

    fn receptive_field(&self) -> Option<usize> {
        each_model!(self, m => m.receptive_field())
    }

    fn num_labels(&self) -> usize {
        each_model!(self, m => m.num_labels())
    }

    fn ordering(&self) -> Option<Vec<usize>> {
        each_model!(self, m => m.ordering())
    }

    fn connectivities(&self) -> usize {
        each_model!(self, m => m.connectivities())
    }

    fn select_connectivity(&self, k: usize) {
        each_model!(self, m => m.select_connectivity(k))
    }

    fn forward(&self, tokens: &Tensor, labels: Option<&Tensor>) -> Result<Tensor> {
        each_model!(self, m => m.forward(tokens, labels))
    }

    fn forward_reference(&self, tokens: &Tensor, labels: Option<&Tensor>) -> Option<Result<Tensor>> {
        each_model!(self, m => m.forward_reference(tokens, labels))
    }

    fn position_nll(&self, batch: &Batch) -> Result<Tensor> {
        each_model!(self, m => m.position_nll(batch))
    }

    fn start(&self, batch: usize, labels: Option<&Tensor>) -> Result<ModelState> {
        Ok(match self {
            Model::Wavenet(m) => ModelState::Wavenet(m.start(batch, labels)?),
            Model::Fvsbn(m) => ModelState::Fvsbn(m.start(batch, labels)?),
            Model::Nade(m) => ModelState::Nade(m.start(batch, labels)?),
            Model::Made(m) => ModelState::Made(m.start(batch, labels)?),
            Model::Rnade(m) => ModelState::Rnade(m.start(batch, labels)?),
        })
    }

    fn step(&self, state: &mut ModelState, prev: Option<&Tensor>) -> Result<Tensor> {
        match (self, state) {
            (Model::Wavenet(m), ModelState::Wavenet(s)) => m.step(s, prev),
            (Model::Fvsbn(m), ModelState::Fvsbn(s)) => m.step(s, prev),
            (Model::Nade(m), ModelState::Nade(s)) => m.step(s, prev),
            (Model::Made(m), ModelState::Made(s)) => m.step(s, prev),
            (Model::Rnade(m), ModelState::Rnade(s)) => m.step(s, prev),
            _ => Err(Error::Config("a stepper state was passed to another kind of model".into())),
        }
    }
}

/// The most weights (and masks) a model may hold: 200 M, 800 MB of f32.
pub const MAX_PARAMETERS: usize = 200_000_000;
const MAX_PIXELS: usize = 1 << 16;
const MAX_HIDDEN: usize = 100_000;

/// Fails unless `lo ≤ value ≤ hi`, naming the setting and its limits.
pub fn within(name: &str, value: usize, lo: usize, hi: usize) -> Result<()> {
    if value < lo || value > hi {
        return Err(Error::Config(format!("{name} is {value}; it must be from {lo} to {hi}")));
    }
    Ok(())
}

/// Checks the sequence length of an image model.
fn require_pixels(pixels: usize) -> Result<usize> {
    if pixels < 2 {
        return Err(Error::Config(format!("an image model needs at least 2 pixels, not {pixels}")));
    }
    Ok(pixels)
}

/// Binary tokens `(B, T)` (T ≤ D) as model inputs `(B, D)` of `dtype`, zero past T (no logit
/// at a position < T may read them), and T.
fn binary_inputs(tokens: &Tensor, pixels: usize, dtype: DType) -> Result<(Tensor, usize)> {
    let (_b, len) = tokens.dims2()?;
    if len > pixels {
        return Err(Error::Config(format!("{len} tokens given to a model of {pixels} pixels")));
    }
    let x = tokens.to_dtype(dtype)?;
    let x = if len < pixels { x.pad_with_zeros(1, 0, pixels - len)? } else { x };
    Ok((x.contiguous()?, len))
}

/// One Bernoulli logit per position `(B, T)` as two-class logits `(B, T, 2)`: [0, s], whose
/// softmax is [1 − σ(s), σ(s)].
fn binary_logits(s: &Tensor) -> Result<Tensor> {
    let s = s.unsqueeze(2)?;
    Ok(Tensor::cat(&[s.zeros_like()?, s], 2)?)
}
