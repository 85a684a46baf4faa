//! The models of the core, one file each, and the registry that lists them.
//!
//! Adding a model is its own file (a `Config`, the model, `impl Autoregressive` and
//! `impl Registered`) plus one line in `registry!` below. From that list the macro generates
//! [`ModelConfig`] (which model a checkpoint holds, tagged by name in `config.json`), [`Model`]
//! and [`ModelState`] (any model and its stepper state behind one [`Autoregressive`]
//! implementation), [`ModelConfig::image_models`] (the names and summaries `mnist train
//! --model` offers), [`ModelConfig::audio_models`] (those `train --model` offers beside
//! WaveNet) and [`ModelConfig::examples`] (what the property tests run over). A macro
//! rather than trait objects: `Autoregressive` has an associated `State` type, and an enum
//! keeps `Model` a plain value that clones and matches.

use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::core::train::Precision;
use crate::core::{Autoregressive, Likelihood};
use crate::data::Batch;
use crate::layers::nade::Activation;
use crate::{Error, Result};

#[cfg(test)]
mod fused_check;
pub mod fvsbn;
pub mod made;
pub mod nade;
pub mod pixelcnn;
pub mod rnade;
pub mod rnn;
pub mod transformer;
pub mod wavenet;

/// What the registry needs of a model beside [`Autoregressive`].
pub trait Registered: Autoregressive + Clone + std::fmt::Debug + Sized {
    /// Its hyper-parameters, as stored in a checkpoint's `config.json`.
    type Config: Clone + std::fmt::Debug + PartialEq + Serialize + DeserializeOwned;

    /// Loads or creates the weights under `vb`.
    fn build(cfg: &Self::Config, vb: VarBuilder) -> Result<Self>;

    /// Checks every size against its limit (before anything is allocated: a `config.json` can
    /// ask for anything) and returns about how many weights (and masks) the model will hold.
    fn weights(cfg: &Self::Config) -> Result<usize>;

    /// The length of every sequence, when the model fixes it (an image model's pixels).
    fn sequence_len(cfg: &Self::Config) -> Option<usize>;

    /// A configuration for images of `pixels` from the command line's `settings`, or `None`
    /// when this is not an image model.
    fn image_config(pixels: usize, settings: &Settings) -> Option<Result<Self::Config>>;

    /// A configuration for sequences of μ-law codes (256 classes) trained in windows of
    /// `window` samples, from the command line's `settings`, or `None` when this is not a
    /// sequence model for audio. (WaveNet has its own presets and flags.)
    fn audio_config(_window: usize, _settings: &Settings) -> Option<Result<Self::Config>> {
        None
    }

    /// Small configurations for the property tests: listing one here is what puts the model
    /// under the causality, stepping, gradient and learning checks.
    fn examples() -> Vec<(&'static str, Self::Config)>;

    /// What the likelihood of a model of `cfg` is (see [`Autoregressive::likelihood`]), known
    /// before the model is built.
    fn likelihood(_cfg: &Self::Config) -> Likelihood {
        Likelihood::Categorical
    }

    /// The same model with its training products in `precision`, for a model whose
    /// hand-written products can run in bf16 (others ignore it).
    fn with_precision(self, _precision: Precision) -> Self {
        self
    }

    /// Whether [`Registered::with_precision`] changes anything for this model.
    fn has_precision(_cfg: &Self::Config) -> bool {
        false
    }

    /// For each weight matrix that has one, the mask of the weights the model can use (1) or
    /// never uses (0); empty for models without masks.
    fn weight_masks(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(vec![])
    }
}

/// Hyper-parameters of an image model as the command line gives them; each model reads the
/// ones it has and takes its own defaults for what is not given.
#[derive(Debug, Clone, Default)]
pub struct Settings {
    /// Hidden units, one size per hidden layer.
    pub hidden: Vec<usize>,
    /// The hidden non-linearity.
    pub activation: Option<Activation>,
    /// Stacked layers (LSTM, GRU).
    pub layers: Option<usize>,
    /// Size of a token's embedding (LSTM, GRU).
    pub embedding: Option<usize>,
    /// Attention heads (transformer).
    pub heads: Option<usize>,
    /// Channels of each convolution (PixelCNN).
    pub channels: Option<usize>,
    /// Hidden units of the output head (PixelCNN).
    pub head: Option<usize>,
    /// Side of the first layer's kernel (PixelCNN's mask A, Gated PixelCNN's first layer).
    pub first_kernel: Option<usize>,
    /// RNADE's Gaussian components per pixel.
    pub components: Option<usize>,
    /// MADE's number of connectivities.
    pub masks: Option<usize>,
    /// MADE: connectivities after the first also draw a pixel ordering.
    pub orderings: bool,
    /// MADE: direct input → output connections.
    pub direct: bool,
    /// Seed of anything a configuration draws (MADE's masks).
    pub seed: u64,
}

impl Settings {
    /// The one hidden size of a single-layer model, `default` when none is given.
    pub fn single_hidden(&self, default: usize) -> Result<usize> {
        match self.hidden[..] {
            [] => Ok(default),
            [h] => Ok(h),
            _ => Err(Error::Config("--hidden takes one size for this model (several are for MADE)".into())),
        }
    }
}

/// Runs `$body` with `$m` bound to the model inside `$value`, a [`Model`] of one of `$variant`.
macro_rules! dispatch {
    ($value:expr, [$($variant:ident),*], $m:ident => $body:expr) => {
        match $value {
            $(Model::$variant($m) => $body,)*
        }
    };
}

/// Generates the registry from one line per model: `/// summary` `"name" => Variant(Type)`.
macro_rules! registry {
    ($($(#[doc = $doc:literal])+ $name:literal => $variant:ident($model:ty),)+) => {
        /// Which model a checkpoint holds, with its hyper-parameters.
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
        #[serde(tag = "kind")]
        pub enum ModelConfig {
            $($(#[doc = $doc])+ #[serde(rename = $name)] $variant(<$model as Registered>::Config),)+
        }

        /// Any model of the core.
        // Variants differ in size (WaveNet's handles are the most), but a process holds one or
        // two models: boxing them would only add an indirection.
        #[allow(clippy::large_enum_variant)]
        #[derive(Debug, Clone)]
        pub enum Model {
            $($(#[doc = $doc])+ $variant($model),)+
        }

        /// The stepper state of any model.
        pub enum ModelState {
            $($(#[doc = $doc])+ $variant(<$model as Autoregressive>::State),)+
        }

        impl ModelConfig {
            /// The model's name as the command line spells it.
            pub fn name(&self) -> &'static str {
                match self {
                    $(ModelConfig::$variant(_) => $name,)+
                }
            }

            /// The length of every sequence, when the model fixes it (an image model's pixels).
            pub fn sequence_len(&self) -> Option<usize> {
                match self {
                    $(ModelConfig::$variant(c) => <$model as Registered>::sequence_len(c),)+
                }
            }

            /// See [`Registered::likelihood`].
            pub fn likelihood(&self) -> Likelihood {
                match self {
                    $(ModelConfig::$variant(c) => <$model as Registered>::likelihood(c),)+
                }
            }

            /// See [`Registered::has_precision`].
            pub fn has_precision(&self) -> bool {
                match self {
                    $(ModelConfig::$variant(c) => <$model as Registered>::has_precision(c),)+
                }
            }

            fn weights(&self) -> Result<usize> {
                match self {
                    $(ModelConfig::$variant(c) => <$model as Registered>::weights(c),)+
                }
            }

            /// Builds the model, loading or creating its weights under `vb`.
            pub fn build(&self, vb: VarBuilder) -> Result<Model> {
                self.validate()?;
                Ok(match self {
                    $(ModelConfig::$variant(c) => Model::$variant(<$model as Registered>::build(c, vb)?),)+
                })
            }

            /// The image model `name` for images of `pixels`, configured from `settings`.
            pub fn image(name: &str, pixels: usize, settings: &Settings) -> Result<ModelConfig> {
                $(if name == $name {
                    return match <$model as Registered>::image_config(pixels, settings) {
                        Some(c) => Ok(ModelConfig::$variant(c?)),
                        None => Err(Error::Config(format!("{name} is not an image model"))),
                    };
                })+
                Err(Error::Config(format!("no model is called {name:?}")))
            }

            /// The sequence model `name` for audio in windows of `window` samples, configured
            /// from `settings`.
            pub fn audio(name: &str, window: usize, settings: &Settings) -> Result<ModelConfig> {
                $(if name == $name {
                    return match <$model as Registered>::audio_config(window, settings) {
                        Some(c) => Ok(ModelConfig::$variant(c?)),
                        None => Err(Error::Config(format!("{name} is not a sequence model for audio"))),
                    };
                })+
                Err(Error::Config(format!("no model is called {name:?}")))
            }

            /// The names of the sequence models for audio besides WaveNet.
            pub fn audio_models() -> Vec<(&'static str, &'static str)> {
                let mut all = Vec::new();
                $(if <$model as Registered>::audio_config(2, &Settings::default()).is_some() {
                    all.push(($name, concat!($($doc),+).trim()));
                })+
                all
            }

            /// The name and summary of every model that models images.
            pub fn image_models() -> Vec<(&'static str, &'static str)> {
                let mut all = Vec::new();
                $(if <$model as Registered>::image_config(2, &Settings::default()).is_some() {
                    all.push(($name, concat!($($doc),+).trim()));
                })+
                all
            }

            /// Small configurations of every model, for the property tests.
            pub fn examples() -> Vec<(&'static str, ModelConfig)> {
                let mut all = Vec::new();
                $(all.extend(<$model as Registered>::examples().into_iter().map(|(n, c)| (n, ModelConfig::$variant(c))));)+
                all
            }
        }

        impl Model {
            /// See [`Registered::weight_masks`].
            pub fn weight_masks(&self) -> Result<Vec<(String, Tensor)>> {
                dispatch!(self, [$($variant),+], m => m.weight_masks())
            }

            /// See [`Registered::with_precision`].
            pub fn with_precision(self, precision: Precision) -> Model {
                match self {
                    $(Model::$variant(m) => Model::$variant(m.with_precision(precision)),)+
                }
            }
        }

        impl Autoregressive for Model {
            type State = ModelState;

            fn vocab_size(&self) -> usize {
                dispatch!(self, [$($variant),+], m => m.vocab_size())
            }

            fn dependency_window(&self) -> Option<usize> {
                dispatch!(self, [$($variant),+], m => m.dependency_window())
            }

            fn max_context(&self) -> Option<usize> {
                dispatch!(self, [$($variant),+], m => m.max_context())
            }

            fn likelihood(&self) -> Likelihood {
                dispatch!(self, [$($variant),+], m => m.likelihood())
            }

            fn num_labels(&self) -> usize {
                dispatch!(self, [$($variant),+], m => m.num_labels())
            }

            fn ordering(&self) -> Option<Vec<usize>> {
                dispatch!(self, [$($variant),+], m => m.ordering())
            }

            fn connectivities(&self) -> usize {
                dispatch!(self, [$($variant),+], m => m.connectivities())
            }

            fn select_connectivity(&mut self, k: usize) {
                dispatch!(self, [$($variant),+], m => m.select_connectivity(k))
            }

            fn forward(&self, tokens: &Tensor, labels: Option<&Tensor>) -> Result<Tensor> {
                dispatch!(self, [$($variant),+], m => m.forward(tokens, labels))
            }

            fn forward_reference(&self, tokens: &Tensor, labels: Option<&Tensor>) -> Option<Result<Tensor>> {
                dispatch!(self, [$($variant),+], m => m.forward_reference(tokens, labels))
            }

            fn has_dropout(&self) -> bool {
                dispatch!(self, [$($variant),+], m => m.has_dropout())
            }

            fn position_nll(&self, batch: &Batch) -> Result<Tensor> {
                dispatch!(self, [$($variant),+], m => m.position_nll(batch))
            }

            fn start(&self, batch: usize, labels: Option<&Tensor>) -> Result<ModelState> {
                Ok(match self {
                    $(Model::$variant(m) => ModelState::$variant(m.start(batch, labels)?),)+
                })
            }

            fn step(&self, state: &mut ModelState, prev: Option<&Tensor>) -> Result<Tensor> {
                match (self, state) {
                    $((Model::$variant(m), ModelState::$variant(s)) => m.step(s, prev),)+
                    #[allow(unreachable_patterns)]
                    _ => Err(Error::Config("a stepper state was passed to another kind of model".into())),
                }
            }

            fn prefill(&self, state: &mut ModelState, tokens: &Tensor) -> Result<Tensor> {
                match (self, state) {
                    $((Model::$variant(m), ModelState::$variant(s)) => m.prefill(s, tokens),)+
                    #[allow(unreachable_patterns)]
                    _ => Err(Error::Config("a stepper state was passed to another kind of model".into())),
                }
            }
        }
    };
}

registry! {
    /// WaveNet over μ-law codes (audio).
    "wavenet" => Wavenet(wavenet::WaveNet),
    /// Fully visible sigmoid belief network: a logistic regression per pixel.
    "fvsbn" => Fvsbn(fvsbn::Fvsbn),
    /// NADE: shared hidden weights with the O(D·H) running update.
    "nade" => Nade(nade::Nade),
    /// MADE: a masked MLP; several masks make an ensemble.
    "made" => Made(made::Made),
    /// RNADE: NADE for real values, a mixture of Gaussians per pixel (dequantised grey levels).
    "rnade" => Rnade(rnade::Rnade),
    /// LSTM: stacked recurrent layers (images: the pixels in raster order).
    "lstm" => Lstm(rnn::Lstm),
    /// GRU: the LSTM's lighter cousin (three gates, no cell).
    "gru" => Gru(rnn::Gru),
    /// Transformer: causal self-attention with a KV cache (images: pixels in raster order).
    "transformer" => Transformer(transformer::Transformer),
    /// PixelCNN: masked convolutions, mask A and then residual blocks of mask B.
    "pixelcnn" => PixelCnn(pixelcnn::PixelCnn),
    /// Gated PixelCNN: vertical and horizontal stacks of tanh·σ gates, with no blind spot.
    "gated-pixelcnn" => GatedPixelCnn(pixelcnn::GatedPixelCnn),
}

impl ModelConfig {
    /// The WaveNet settings, if this is a WaveNet.
    pub fn wavenet(&self) -> Option<&wavenet::Config> {
        match self {
            ModelConfig::Wavenet(c) => Some(c),
            _ => None,
        }
    }

    /// Checks every size against its limit (before anything is allocated).
    pub fn validate(&self) -> Result<()> {
        let weights = self.weights()?;
        if weights > MAX_PARAMETERS {
            return Err(Error::Config(format!(
                "this {} would hold about {weights} weights, more than the limit of {MAX_PARAMETERS}: make it smaller",
                self.name()
            )));
        }
        Ok(())
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
