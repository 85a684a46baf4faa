//! WaveNet: "WaveNet: A Generative Model for Raw Audio", van den Oord et al., 2016,
//! <https://arxiv.org/abs/1609.03499>; incremental generation after "Fast Wavenet Generation
//! Algorithm", Paine et al., 2016, <https://arxiv.org/abs/1611.09482>.
//!
//! A stack of causal dilated convolutions (dilations 1, 2, 4, … per cycle), each followed by
//! the gated unit z = tanh(W_f ∗ x + V_f h) ⊙ σ(W_g ∗ x + V_g h) (eq. 2 and 3, h the optional
//! global label), a 1×1 residual connection back into the stack and a 1×1 skip connection to
//! the head: ReLU → 1×1 → ReLU → 1×1 → logits over the 256 μ-law codes.
//!
//! Tensor names and shapes (weights are stored `(in, out)`; `k` kernel width, `C` residual,
//! `G` gate, `S` skip, `H` head channels, `L` labels, `i` the layer):
//!
//! | name | shape | role |
//! |---|---|---|
//! | `embed.weight` | `(256, C)` | input code → residual channels (a 1×1 conv of the one-hot input) |
//! | `layers.{i}.dilated.weight` | `(k, C, 2G)` | tap `j` multiplies `x[t − (k−1−j)·d]`; columns `..G` filter, `G..` gate |
//! | `layers.{i}.dilated.bias` | `(2G,)` | |
//! | `layers.{i}.label.weight` | `(L, 2G)` | only with labels: `V_f h`, `V_g h` |
//! | `layers.{i}.residual.weight` / `.bias` | `(G, C)` / `(C,)` | |
//! | `layers.{i}.skip.weight` / `.bias` | `(G, S)` / `(S,)` | |
//! | `head.0.weight` / `.bias` | `(S, H)` / `(H,)` | |
//! | `head.1.weight` / `.bias` | `(H, 256)` / `(256,)` | |
//! | `frames.weight` / `.bias` | `((2c+1)·M, K·R)` / `(K·R,)` | only as a vocoder: the frame network (`(…, N)` with a hidden layer) |
//! | `frames.out.weight` / `.bias` | `(N, K·R)` / `(K·R,)` | only with a hidden layer of `N` channels |
//! | `layers.{i}.local.weight` | `(R, 2G)` | only as a vocoder: `V_f y`, `V_g y` per frame |
//!
//! The input is shifted right by one position (zeros first), so the logits at t see x_<t.
//!
//! **Local conditioning** (the vocoder, section 2.5 of the paper): log-mel features `(frames,
//! M)` at one frame per `hop` samples ([`crate::audio::mel`]). The frame network standardises
//! each band (with the training corpus's mean and deviation, stored in [`LocalConfig`]) and
//! reads 2c + 1 frames at once (c, the context, is 1 unless set): y_f = tanh(W·[x_{f−c} …
//! x_{f+c}] + b) (`R` channels), or with a hidden layer of N channels y_f = tanh(W'·h_f + b')
//! with h_f = tanh(W·[…] + b). Each layer adds its projection `V y_f` to the pre-activation of
//! every sample of frame f, the samples `f·hop … (f+1)·hop − 1`: the upsampling is a repeat
//! after the frame-rate convolution, so the projection is computed once per frame, in training
//! as in the engine. With `K` sub-frames the frame network gives each frame K rows of R
//! channels instead (a learned upsampling by K, like a transposed convolution of stride K over
//! the 2c + 1 frames), row k for the samples `f·hop + k·hop/K …`, and the repeat covers hop/K
//! samples.
//! Sample t therefore sees the features up to frame ⌊t / hop⌋ + c (c frames of look-ahead;
//! the last one's analysis window reaches n_fft/2 samples past its centre), and the audio
//! before t only.

use std::collections::VecDeque;

use candle_core::{Module, Tensor};
use candle_nn::{Embedding, Init, VarBuilder};
use serde::{Deserialize, Serialize};

use super::{Registered, Settings};
use crate::audio::mel::MelConfig;
use crate::core::Autoregressive;
use crate::core::train::Precision;
use crate::layers::wavenet_stack::{FrameConditioning, ParamLayout, wavenet_logits, wavenet_nll};
use crate::layers::{ChannelLinear, causal_taps, gated_unit};
use crate::{Error, Result};

/// WaveNet hyper-parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    /// Layers per dilation cycle; dilations run 1, 2, 4, …, 2^(layers_per_cycle − 1).
    pub layers_per_cycle: usize,
    /// Number of dilation cycles.
    pub cycles: usize,
    /// Width of the dilated convolutions.
    pub kernel_width: usize,
    /// Channels of the residual stream (C).
    pub residual_channels: usize,
    /// Channels of the gated unit (G).
    pub gate_channels: usize,
    /// Channels of the skip connections (S).
    pub skip_channels: usize,
    /// Channels of the hidden head layer (H).
    pub head_channels: usize,
    /// Output classes (μ-law codes).
    pub classes: usize,
    /// Number of global-conditioning labels (0: unconditioned).
    pub num_labels: usize,
    /// Local conditioning on mel features (a vocoder), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local: Option<LocalConfig>,
}

/// A vocoder's conditioning: how its features are made and the frame network that reads them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LocalConfig {
    /// The analysis (its hop is the upsampling factor; its bands are `M`).
    pub mel: MelConfig,
    /// Channels of the frame network (`R`).
    pub channels: usize,
    /// Rows the frame network gives each frame (`K`, dividing the hop): 1 repeats one row over
    /// the frame's samples; more is a learned upsampling by K before the repeat.
    #[serde(default = "one")]
    pub subframes: usize,
    /// Frames the frame network reads on either side of each frame (`c`): the look-ahead.
    #[serde(default = "one")]
    pub context: usize,
    /// Channels of the frame network's hidden layer (`N`); 0 for none (one layer).
    #[serde(default)]
    pub hidden: usize,
    /// Each band's mean over the training features.
    pub mean: Vec<f32>,
    /// Each band's standard deviation over the training features (the network reads
    /// (x − mean) / deviation).
    pub deviation: Vec<f32>,
}

fn one() -> usize {
    1
}

impl LocalConfig {
    /// Conditioning on `mel` features through `channels` frame channels and `subframes` rows
    /// per frame, standardised with `mean` and `deviation` per band; a frame network of one
    /// layer reading one frame on either side.
    pub fn new(mel: MelConfig, channels: usize, subframes: usize, mean: Vec<f32>, deviation: Vec<f32>) -> Self {
        LocalConfig { mel, channels, subframes, context: 1, hidden: 0, mean, deviation }
    }

    /// The frame network's inputs per frame (2c + 1 frames of M bands) and outputs (K rows of R).
    fn frame_sizes(&self) -> (usize, usize) {
        ((2 * self.context + 1) * self.mel.bands, self.subframes * self.channels)
    }

    /// Parameters of the frame network (the per-layer projections not counted).
    pub fn frame_weights(&self) -> usize {
        let (input, out) = self.frame_sizes();
        match self.hidden {
            0 => input * out + out,
            n => input * n + n + n * out + out,
        }
    }

    /// One line for logs and `wavegen info`: the analysis and the frame network.
    pub fn describe(&self) -> String {
        let mel = &self.mel;
        let mut line = format!(
            "{} mel bands {}–{} Hz, FFT {}, hop {} ({:.1} ms) at {} Hz; frame network of {} channels",
            mel.bands,
            mel.fmin,
            mel.fmax,
            mel.n_fft,
            mel.hop,
            1000.0 * mel.hop as f64 / mel.sample_rate as f64,
            mel.sample_rate,
            self.channels
        );
        if self.subframes > 1 {
            line += &format!(", {} rows per frame ({} samples each)", self.subframes, self.samples_per_row());
        }
        if self.context > 1 {
            line += &format!(", reading {} frames either side", self.context);
        }
        if self.hidden > 0 {
            line += &format!(", a hidden layer of {}", self.hidden);
        }
        line
    }

    /// Samples per row of the frame network's output: the hop over the sub-frames.
    pub fn samples_per_row(&self) -> usize {
        self.mel.hop / self.subframes
    }

    /// Checks the analysis, the frame network's sizes and the statistics.
    pub fn validate(&self) -> Result<()> {
        use super::within;
        self.mel.validate()?;
        within("vocoder --cond-channels", self.channels, 1, 4096)?;
        within("vocoder --frame-context", self.context, 1, 64)?;
        within("vocoder --frame-hidden", self.hidden, 0, 4096)?;
        if self.subframes == 0 || !self.mel.hop.is_multiple_of(self.subframes) {
            return Err(Error::Config(format!(
                "vocoder: {} sub-frames do not divide the hop of {} samples",
                self.subframes, self.mel.hop
            )));
        }
        let bands = self.mel.bands;
        if self.mean.len() != bands || self.deviation.len() != bands {
            return Err(Error::Config(format!(
                "vocoder: {} means and {} deviations for {bands} mel bands",
                self.mean.len(),
                self.deviation.len()
            )));
        }
        if !self.mean.iter().all(|m| m.is_finite()) || !self.deviation.iter().all(|d| d.is_finite() && *d > 0.0) {
            return Err(Error::Config("vocoder: the band means and deviations must be finite, deviations > 0".into()));
        }
        Ok(())
    }
}

impl Default for Config {
    /// Two cycles of ten layers: a receptive field of 2,047 samples (256 ms at 8 kHz, 128 ms
    /// at 16 kHz). Narrower than the paper's (which does not give its channel counts) so that
    /// it trains on two CPU cores.
    fn default() -> Self {
        Config {
            layers_per_cycle: 10,
            cycles: 2,
            kernel_width: 2,
            residual_channels: 32,
            gate_channels: 32,
            skip_channels: 128,
            head_channels: 128,
            classes: 256,
            num_labels: 0,
            local: None,
        }
    }
}

impl Config {
    /// A model small enough that 50 training steps take seconds (tests, smoke runs).
    pub fn tiny() -> Self {
        Config {
            layers_per_cycle: 4,
            cycles: 1,
            kernel_width: 2,
            residual_channels: 8,
            gate_channels: 8,
            skip_channels: 16,
            head_channels: 16,
            classes: 256,
            num_labels: 0,
            local: None,
        }
    }

    /// The default real-time model: one cycle of 12 layers (dilations 1 … 2048, a receptive
    /// field of 4,096 samples = 256 ms at 16 kHz), 32 residual and gate channels, 64 skip and
    /// head channels. Chosen so that the streaming engine runs it at several times real time
    /// at 16 kHz on one core (see the README's benchmarks).
    pub fn realtime() -> Self {
        Config {
            layers_per_cycle: 12,
            cycles: 1,
            kernel_width: 2,
            residual_channels: 32,
            gate_channels: 32,
            skip_channels: 64,
            head_channels: 64,
            classes: 256,
            num_labels: 0,
            local: None,
        }
    }

    /// The dilation of layer `i`.
    pub fn dilation(&self, i: usize) -> usize {
        1 << (i % self.layers_per_cycle)
    }

    /// The number of layers.
    pub fn layers(&self) -> usize {
        self.layers_per_cycle * self.cycles
    }

    /// How many past samples the logits of a sample see: 1 (the shift) + (k−1)·Σ dilations.
    pub fn receptive_field(&self) -> usize {
        1 + (self.kernel_width - 1) * (0..self.layers()).map(|i| self.dilation(i)).sum::<usize>()
    }

    /// The number of weights.
    pub fn weights(&self) -> usize {
        let (c, g, s, h) = (self.residual_channels, self.gate_channels, self.skip_channels, self.head_channels);
        let per_layer = self.kernel_width * c * 2 * g + (self.num_labels + 1) * 2 * g + g * (c + s) + c + s;
        let local = self.local.as_ref().map_or(0, |l| l.frame_weights() + self.layers() * l.channels * 2 * g);
        self.classes * c + self.layers() * per_layer + (s + 1) * h + (h + 1) * self.classes + local
    }

    /// Checks that every size is usable, within limits that keep a model (and its receptive
    /// field) buildable; nothing is allocated before this passes.
    pub fn validate(&self) -> Result<()> {
        use super::within;
        within("WaveNet --layers-per-cycle", self.layers_per_cycle, 1, 20)?;
        within("WaveNet --cycles", self.cycles, 1, 64)?;
        within("WaveNet --kernel-width", self.kernel_width, 1, 16)?;
        within("WaveNet --residual-channels", self.residual_channels, 1, 4096)?;
        within("WaveNet --gate-channels", self.gate_channels, 1, 4096)?;
        within("WaveNet --skip-channels", self.skip_channels, 1, 4096)?;
        within("WaveNet --head-channels", self.head_channels, 1, 4096)?;
        within("WaveNet classes", self.classes, 2, 65_536)?;
        within("WaveNet labels", self.num_labels, 0, 100_000)?;
        within("WaveNet receptive field (samples)", self.receptive_field(), 1, 1 << 22)?;
        if let Some(local) = &self.local {
            local.validate()?;
        }
        let params = self.weights();
        if params > super::MAX_PARAMETERS {
            return Err(Error::Config(format!(
                "this WaveNet would hold {params} weights, more than the limit of {}: use fewer layers or channels",
                super::MAX_PARAMETERS
            )));
        }
        Ok(())
    }
}

/// One residual layer: dilated convolution, gated unit, residual and skip 1×1s.
#[derive(Debug, Clone)]
pub struct ResidualLayer {
    /// Dilated convolution as one `(k·C, 2G)` matrix over stacked taps.
    pub dilated: ChannelLinear,
    /// Label embedding into the filter and gate pre-activations, `(L, 2G)`.
    pub label: Option<Embedding>,
    /// 1×1 from the gated unit back to the residual stream.
    pub residual: ChannelLinear,
    /// 1×1 from the gated unit to the skip sum.
    pub skip: ChannelLinear,
    /// The frame network's output into the filter and gate pre-activations, `(R, 2G)`.
    pub local: Option<Tensor>,
    /// Dilation of this layer.
    pub dilation: usize,
    /// Kernel width.
    pub kernel: usize,
    gate: usize,
}

impl ResidualLayer {
    fn new(cfg: &Config, dilation: usize, vb: VarBuilder) -> Result<Self> {
        let (k, c, g) = (cfg.kernel_width, cfg.residual_channels, cfg.gate_channels);
        // Stored (k, C, 2G) so that each tap's matrix is one slice; `apply` multiplies by it
        // as one (k·C, 2G) matrix over the stacked taps.
        let vd = vb.pp("dilated");
        let dilated = ChannelLinear {
            weight: vd.get_with_hints(
                (k, c, 2 * g),
                "weight",
                Init::Randn { mean: 0.0, stdev: 1.0 / ((k * c) as f64).sqrt() },
            )?,
            bias: vd.get_with_hints(2 * g, "bias", Init::Const(0.0))?,
        };
        let label = (cfg.num_labels > 0)
            .then(|| -> Result<Embedding> {
                let w = vb.pp("label").get_with_hints(
                    (cfg.num_labels, 2 * g),
                    "weight",
                    Init::Randn { mean: 0.0, stdev: 1.0 },
                )?;
                Ok(Embedding::new(w, 2 * g))
            })
            .transpose()?;
        let local = cfg
            .local
            .as_ref()
            .map(|l| {
                let init = Init::Randn { mean: 0.0, stdev: 1.0 / (l.channels as f64).sqrt() };
                vb.pp("local").get_with_hints((l.channels, 2 * g), "weight", init)
            })
            .transpose()?;
        Ok(ResidualLayer {
            dilated,
            label,
            local,
            residual: ChannelLinear::new(g, c, 1.0, vb.pp("residual"))?,
            skip: ChannelLinear::new(g, cfg.skip_channels, 1.0, vb.pp("skip"))?,
            dilation,
            kernel: k,
            gate: g,
        })
    }

    /// From stacked taps `(B, T, k·C)` and the layer input `x (B, T, C)` to the next residual
    /// stream `(B, T, C)` and this layer's skip output `(B, T, S)`. `cond` is `(B, 1, 2G)` or
    /// `(B, T, 2G)`.
    fn apply(&self, taps: &Tensor, x: &Tensor, cond: Option<&Tensor>) -> Result<(Tensor, Tensor)> {
        let (b, t, kc) = taps.dims3()?;
        let w = self.dilated.weight.reshape((kc, 2 * self.gate))?; // (k·C, 2G)
        let mut pre =
            taps.reshape((b * t, kc))?.matmul(&w)?.broadcast_add(&self.dilated.bias)?.reshape((b, t, 2 * self.gate))?;
        if let Some(c) = cond {
            pre = pre.broadcast_add(c)?; // (B, T, 2G)
        }
        let z = gated_unit(&pre)?; // (B, T, G): tanh(filter) ⊙ σ(gate)
        let next = (x + self.residual.forward(&z)?)?; // (B, T, C)
        Ok((next, self.skip.forward(&z)?))
    }

    fn condition(&self, labels: Option<&Tensor>) -> Result<Option<Tensor>> {
        check_labels(self.label.is_some(), labels)?;
        match (&self.label, labels) {
            (Some(emb), Some(l)) => Ok(Some(emb.forward(l)?.unsqueeze(1)?)), // (B, 1, 2G)
            _ => Ok(None),
        }
    }
}

/// Fails unless labels are given exactly when the model is conditioned on them.
fn check_labels(conditioned: bool, labels: Option<&Tensor>) -> Result<()> {
    match (conditioned, labels.is_some()) {
        (true, false) => Err(Error::Config("this model is conditioned on a label: pass --label".into())),
        (false, true) => Err(Error::Config("this model takes no label".into())),
        _ => Ok(()),
    }
}

/// The vocoder's frame network: log-mel frames to `R` channels per frame, and every layer's
/// projection of them.
#[derive(Debug, Clone)]
pub struct FrameNet {
    /// Its settings.
    pub cfg: LocalConfig,
    /// 2c + 1 frames, `f − c … f + c`, stacked, to K rows of R (or to the hidden layer).
    pub conv: ChannelLinear,
    /// The hidden layer to K rows of R, when there is one.
    pub out: Option<ChannelLinear>,
    mean: Tensor,
    inverse_deviation: Tensor,
}

impl FrameNet {
    fn new(cfg: &LocalConfig, vb: VarBuilder) -> Result<Self> {
        let bands = cfg.mel.bands;
        let dev = candle_core::Device::Cpu;
        let inverse: Vec<f32> = cfg.deviation.iter().map(|d| 1.0 / d).collect();
        let (input, rows) = cfg.frame_sizes();
        let first = if cfg.hidden > 0 { cfg.hidden } else { rows };
        Ok(FrameNet {
            cfg: cfg.clone(),
            conv: ChannelLinear::new(input, first, 1.0, vb.clone())?,
            out: (cfg.hidden > 0).then(|| ChannelLinear::new(cfg.hidden, rows, 1.0, vb.pp("out"))).transpose()?,
            mean: Tensor::from_slice(&cfg.mean, bands, &dev)?,
            inverse_deviation: Tensor::from_vec(inverse, bands, &dev)?,
        })
    }

    /// From features `(B, F + 2c, M)` (frames −c … F − 1 + c of each sequence) to the frame
    /// network's output `(B, F·K, R)`: K rows per frame.
    pub fn forward(&self, features: &Tensor) -> Result<Tensor> {
        let (b, rows, m) = features.dims3()?;
        let width = 2 * self.cfg.context + 1;
        if m != self.cfg.mel.bands || rows < width {
            return Err(Error::Config(format!(
                "features of {m} bands in {rows} frames: this vocoder reads {} bands, at least {width} frames",
                self.cfg.mel.bands
            )));
        }
        let f = rows - (width - 1);
        let dtype = self.conv.weight.dtype();
        let x = features
            .to_dtype(dtype)?
            .broadcast_sub(&self.mean.to_dtype(dtype)?)?
            .broadcast_mul(&self.inverse_deviation.to_dtype(dtype)?)?;
        let shifted = (0..width).map(|j| x.narrow(1, j, f)).collect::<candle_core::Result<Vec<_>>>()?;
        let stacked = Tensor::cat(&shifted, 2)?; // (B, F, (2c+1)·M)
        // Plain 2-D products on contiguous operands (candle's batched CPU products on
        // transposed views have wrong gradients; see the notes).
        let layer = |x: &Tensor, l: &ChannelLinear| x.matmul(&l.weight)?.broadcast_add(&l.bias)?.tanh();
        let mut h = layer(&stacked.reshape((b * f, width * m))?, &self.conv)?;
        if let Some(out) = &self.out {
            h = layer(&h, out)?;
        }
        Ok(h.reshape((b, f * self.cfg.subframes, self.cfg.channels))?)
    }
}

/// The WaveNet model.
#[derive(Debug, Clone)]
pub struct WaveNet {
    /// Hyper-parameters.
    pub cfg: Config,
    /// Input code → residual channels.
    pub embed: Embedding,
    /// The residual layers.
    pub layers: Vec<ResidualLayer>,
    /// Head: skip → hidden.
    pub head0: ChannelLinear,
    /// Head: hidden → logits.
    pub head1: ChannelLinear,
    /// The frame network, when the model is a vocoder.
    pub frames: Option<FrameNet>,
    /// Where each weight sits in the flat vector the fused training op takes.
    layout: ParamLayout,
    /// Precision of the fused op's products.
    precision: Precision,
}

impl WaveNet {
    /// Loads or creates the weights under `vb`.
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let embed_w = vb.pp("embed").get_with_hints(
            (cfg.classes, cfg.residual_channels),
            "weight",
            Init::Randn { mean: 0.0, stdev: 1.0 },
        )?;
        let layers = (0..cfg.layers())
            .map(|i| ResidualLayer::new(cfg, cfg.dilation(i), vb.pp(format!("layers.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        Ok(WaveNet {
            cfg: cfg.clone(),
            embed: Embedding::new(embed_w, cfg.residual_channels),
            layers,
            head0: ChannelLinear::new(cfg.skip_channels, cfg.head_channels, 1.0, vb.pp("head.0"))?,
            head1: ChannelLinear::new(cfg.head_channels, cfg.classes, 1.0, vb.pp("head.1"))?,
            frames: cfg.local.as_ref().map(|l| FrameNet::new(l, vb.pp("frames"))).transpose()?,
            layout: ParamLayout::new(cfg),
            precision: Precision::F32,
        })
    }

    /// The same model (sharing its weights) with the fused op's products in `precision`.
    pub fn with_precision(mut self, precision: Precision) -> Self {
        self.precision = precision;
        self
    }

    /// Every weight flattened into one vector, in [`ParamLayout`]'s order (the fused op's
    /// input; the concatenation's backward gives each weight its gradient).
    fn packed(&self) -> Result<Tensor> {
        let mut parts = vec![self.embed.embeddings().flatten_all()?];
        for l in &self.layers {
            parts.push(l.dilated.weight.flatten_all()?);
            parts.push(l.dilated.bias.clone());
            if let Some(emb) = &l.label {
                parts.push(emb.embeddings().flatten_all()?);
            }
            parts.extend([l.residual.weight.flatten_all()?, l.residual.bias.clone()]);
            parts.extend([l.skip.weight.flatten_all()?, l.skip.bias.clone()]);
        }
        parts.extend([self.head0.weight.flatten_all()?, self.head0.bias.clone()]);
        parts.extend([self.head1.weight.flatten_all()?, self.head1.bias.clone()]);
        let packed = Tensor::cat(&parts, 0)?;
        debug_assert_eq!(packed.elem_count(), self.layout.len);
        Ok(packed)
    }

    /// The logits through candle's own operations and autograd: the reference the fused op
    /// ([`crate::layers::wavenet_stack`]) is checked against, and the path of the stepper's
    /// building blocks.
    pub fn reference_logits(
        &self,
        tokens: &Tensor,
        labels: Option<&Tensor>,
        features: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (_b, t) = tokens.dims2()?;
        let x = self.embed.forward(tokens)?; // (B, T, C)
        let mut x = x.pad_with_zeros(1, 1, 0)?.narrow(1, 0, t)?.contiguous()?; // shifted: position t holds x_{t−1}
        // The frame network's output repeated to the samples: position t reads row ⌊t / (hop/K)⌋.
        let per_sample = match self.frame_outputs(features, t)? {
            Some((y, per_row)) => {
                let row_of: Vec<u32> = (0..t).map(|i| (i / per_row) as u32).collect();
                Some(y.index_select(&Tensor::new(row_of, y.device())?, 1)?) // (B, T, R)
            }
            None => None,
        };
        let mut skip: Option<Tensor> = None;
        for layer in &self.layers {
            let taps = causal_taps(&x, layer.kernel, layer.dilation)?; // (B, T, k·C)
            let mut cond = layer.condition(labels)?;
            if let (Some(y), Some(v)) = (&per_sample, &layer.local) {
                let (b, t, r) = y.dims3()?;
                let local = y.reshape((b * t, r))?.matmul(v)?.reshape((b, t, v.dim(1)?))?;
                cond = Some(match cond {
                    Some(c) => local.broadcast_add(&c)?,
                    None => local,
                });
            }
            let (next, s) = layer.apply(&taps, &x, cond.as_ref())?;
            x = next;
            skip = Some(match skip {
                Some(acc) => (acc + s)?,
                None => s,
            });
        }
        self.head(&skip.expect("invariant: validated to have at least one layer"))
    }

    /// The frame network's output `(B, F·K, R)` for sequences of `len` samples, and the samples
    /// each of its rows covers; `None` for a model without local conditioning. Fails unless
    /// features are given exactly when the model is a vocoder, with enough frames for `len`.
    fn frame_outputs(&self, features: Option<&Tensor>, len: usize) -> Result<Option<(Tensor, usize)>> {
        match (&self.frames, features) {
            (None, None) => Ok(None),
            (Some(_), None) => {
                Err(Error::Config("this model is a vocoder: it needs mel features (use `wavegen vocode`)".into()))
            }
            (None, Some(_)) => Err(Error::Config("this model takes no mel features (it is not a vocoder)".into())),
            (Some(net), Some(f)) => {
                let (hop, c) = (net.cfg.mel.hop, net.cfg.context);
                let (given, needed) = (f.dim(1)?, len.div_ceil(hop));
                if given < needed + 2 * c {
                    return Err(Error::Config(format!(
                        "{given} frames of features for {len} samples: a hop of {hop} needs {} (frames −{c} … {})",
                        needed + 2 * c,
                        needed + c - 1
                    )));
                }
                Ok(Some((net.forward(f)?, net.cfg.samples_per_row())))
            }
        }
    }

    /// Every layer's projection of the frame network's output, side by side `(B, F·K, L·2G)`:
    /// what the fused op adds per row (sub-frame).
    fn frame_projections(&self, features: Option<&Tensor>, len: usize) -> Result<Option<(Tensor, usize)>> {
        let Some((y, per_row)) = self.frame_outputs(features, len)? else { return Ok(None) };
        let (b, f, r) = y.dims3()?;
        let v = Tensor::cat(
            &self.layers.iter().map(|l| l.local.clone().expect("invariant: a vocoder's layers")).collect::<Vec<_>>(),
            1,
        )?; // (R, L·2G)
        Ok(Some((y.reshape((b * f, r))?.matmul(&v)?.reshape((b, f, v.dim(1)?))?, per_row)))
    }

    /// The logits `(B, T, V)` of `tokens (B, T)`, with the labels `(B,)` and the features
    /// `(B, ⌈T / hop⌉ + 2c, M)` (frames −c … ⌈T / hop⌉ − 1 + c of each sequence, c the frame
    /// network's context) the model is conditioned on.
    pub fn logits(&self, tokens: &Tensor, labels: Option<&Tensor>, features: Option<&Tensor>) -> Result<Tensor> {
        check_labels(self.cfg.num_labels > 0, labels)?;
        let projections = self.frame_projections(features, tokens.dim(1)?)?;
        let frames = projections.as_ref().map(|(p, per_row)| FrameConditioning { projections: p, hop: *per_row });
        wavenet_logits(&self.layout, &self.packed()?, tokens, labels, frames, self.precision)
    }

    fn head(&self, skip: &Tensor) -> Result<Tensor> {
        let h = self.head0.forward(&skip.relu()?)?.relu()?;
        Ok(self.head1.forward(&h)?)
    }
}

/// The incremental state of the cached generator: per layer, a queue of its last (k−1)·d
/// inputs, so one step costs O(layers) whatever the receptive field.
pub struct State {
    queues: Vec<VecDeque<Tensor>>,
    cond: Vec<Option<Tensor>>,
    batch: usize,
}

impl Registered for WaveNet {
    type Config = Config;

    fn build(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        WaveNet::new(cfg, vb)
    }

    fn with_precision(self, precision: Precision) -> Self {
        WaveNet::with_precision(self, precision)
    }

    fn has_precision(_cfg: &Config) -> bool {
        true
    }

    fn weights(cfg: &Config) -> Result<usize> {
        cfg.validate()?;
        Ok(cfg.weights())
    }

    fn sequence_len(_cfg: &Config) -> Option<usize> {
        None
    }

    fn image_config(_pixels: usize, _settings: &Settings) -> Option<Result<Config>> {
        None
    }

    fn examples() -> Vec<(&'static str, Config)> {
        let small = Config {
            residual_channels: 6,
            gate_channels: 5,
            skip_channels: 7,
            head_channels: 9,
            classes: 16,
            ..Config::tiny()
        };
        vec![
            ("wavenet k2, 1 cycle", Config { layers_per_cycle: 3, kernel_width: 2, ..small.clone() }),
            ("wavenet k2, 3 cycles", Config { layers_per_cycle: 2, cycles: 3, kernel_width: 2, ..small.clone() }),
            ("wavenet k3, 2 cycles", Config { layers_per_cycle: 3, cycles: 2, kernel_width: 3, ..small.clone() }),
            ("wavenet k4, labels", Config { layers_per_cycle: 2, kernel_width: 4, num_labels: 3, ..small }),
        ]
    }
}

impl Autoregressive for WaveNet {
    type State = State;

    fn vocab_size(&self) -> usize {
        self.cfg.classes
    }

    fn dependency_window(&self) -> Option<usize> {
        Some(self.cfg.receptive_field())
    }

    fn num_labels(&self) -> usize {
        self.cfg.num_labels
    }

    fn forward(&self, tokens: &Tensor, labels: Option<&Tensor>) -> Result<Tensor> {
        // The fused op (one forward and backward for the whole network); same logits and
        // gradients as `reference_logits`, checked by the property tests.
        self.logits(tokens, labels, None)
    }

    fn position_nll(&self, batch: &crate::data::Batch) -> Result<Tensor> {
        let labels = batch.labels.as_ref();
        check_labels(self.cfg.num_labels > 0, labels)?;
        let projections = self.frame_projections(batch.features.as_ref(), batch.tokens.dim(1)?)?;
        let frames = projections.as_ref().map(|(p, per_row)| FrameConditioning { projections: p, hop: *per_row });
        wavenet_nll(&self.layout, &self.packed()?, &batch.tokens, labels, frames, self.precision)
    }

    fn forward_reference(&self, tokens: &Tensor, labels: Option<&Tensor>) -> Option<Result<Tensor>> {
        Some(self.reference_logits(tokens, labels, None))
    }

    fn start(&self, batch: usize, labels: Option<&Tensor>) -> Result<State> {
        if self.frames.is_some() {
            return Err(Error::Config(
                "this model is a vocoder: it generates from mel features, through `wavegen vocode`".into(),
            ));
        }
        let zeros = Tensor::zeros(
            (batch, 1, self.cfg.residual_channels),
            self.embed.embeddings().dtype(),
            &candle_core::Device::Cpu,
        )?;
        let queues = self.layers.iter().map(|l| vec![zeros.clone(); (l.kernel - 1) * l.dilation].into()).collect();
        let cond = self.layers.iter().map(|l| l.condition(labels)).collect::<Result<Vec<_>>>()?;
        Ok(State { queues, cond, batch })
    }

    fn step(&self, state: &mut State, prev: Option<&Tensor>) -> Result<Tensor> {
        let mut x = match prev {
            Some(p) => self.embed.forward(&p.reshape((state.batch, 1))?)?, // (B, 1, C)
            None => Tensor::zeros(
                (state.batch, 1, self.cfg.residual_channels),
                self.embed.embeddings().dtype(),
                &candle_core::Device::Cpu,
            )?,
        };
        let mut skip: Option<Tensor> = None;
        for ((layer, queue), cond) in self.layers.iter().zip(&mut state.queues).zip(&state.cond) {
            // Tap j reads x[t − (k−1−j)·d]: the queue holds the last (k−1)·d inputs, oldest first.
            let mut taps: Vec<Tensor> = (0..layer.kernel - 1).map(|j| queue[j * layer.dilation].clone()).collect();
            taps.push(x.clone());
            let stacked = Tensor::cat(&taps, 2)?; // (B, 1, k·C)
            if !queue.is_empty() {
                queue.pop_front();
                queue.push_back(x.clone());
            }
            let (next, s) = layer.apply(&stacked, &x, cond.as_ref())?;
            x = next;
            skip = Some(match skip {
                Some(acc) => (acc + s)?,
                None => s,
            });
        }
        Ok(self.head(&skip.expect("invariant: at least one layer"))?.squeeze(1)?) // (B, V)
    }
}
