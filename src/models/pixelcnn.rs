//! PixelCNN (van den Oord et al., 2016, "Pixel Recurrent Neural Networks",
//! <https://arxiv.org/abs/1601.06759>) and Gated PixelCNN (van den Oord et al., 2016,
//! "Conditional Image Generation with PixelCNN Decoders", <https://arxiv.org/abs/1606.05328>).
//!
//! Both are stacks of masked convolutions over the image, in raster order. Each convolution is
//! a sum of shifted matrix products (`layers::shifted`): the image is laid out row after row
//! with `pad` zero columns after each row, so that a tap at (dy, dx) is the row `dy·stride +
//! dx` away and a horizontal shift never wraps onto a pixel (PixelCNN's wide first layer has its
//! own, wider layout; its blocks run on rows padded for theirs). A mask is the choice of taps:
//!
//! - mask A (the first layer): the rows above and the pixels to the left;
//! - mask B (after it): the same and the pixel itself;
//! - Gated PixelCNN's vertical stack: the rows above *and* the current row, all columns, whose
//!   output reaches the horizontal stack one row down (the "link"), and its horizontal stack:
//!   the pixels to the left in the current row. Together they see every earlier pixel within
//!   reach: no blind spot. Each layer is gated, tanh(f) ⊙ σ(g).
//!
//! The parallel pass (training, scoring) runs the whole network as one operation with its own
//! backward pass (`layers::masked_stack`, `layers::gated_stack`); the tests check it against
//! the same network written as separate operations.
//!
//! Generation is cached (Ramachandran et al., 2017, "Fast Generation for Convolutional
//! Autoregressive Models"): every layer's activations are kept, and each new pixel computes
//! every layer at that one position (the vertical stack a whole row at a time, once the row
//! above is complete), so a pixel costs O(layers · taps · channels²), not a full pass.
//!
//! | name | shape | role |
//! |---|---|---|
//! | `input.weight` | `(K_A, 2, 2C)` | PixelCNN: mask-A convolution of the pixel values |
//! | `blocks.{l}.reduce.weight`, `.conv.weight`, `.expand.weight` | `(2C, C)`, `(K_B, C, C)`, `(C, 2C)` | PixelCNN's residual blocks |
//! | `layers.{l}.vertical.weight` | `(K_v, C_in, 2C)` | Gated: vertical stack, `C_in` 2 at l = 0 (the value and a one) |
//! | `layers.{l}.horizontal.weight` | `(K_h, C_in, 2C)` | Gated: horizontal stack |
//! | `layers.{l}.link.weight` | `(1, 2C, 2C)` | Gated: vertical → horizontal, one row down |
//! | `layers.{l}.residual.weight` | `(C, C)` | Gated: horizontal output, added to its input after l = 0 |
//! | `head.0.weight`, `head.1.weight` | `(C or 2C, H)`, `(H, V)` | ReLU, 1×1, ReLU, 1×1 to the logits |
//!
//! Every weight has a bias of its output size beside it.

use candle_core::{DType, Device, Tensor};
use candle_nn::{Init, VarBuilder};
use serde::{Deserialize, Serialize};

use super::{MAX_HIDDEN, Registered, Settings, within};
use crate::core::train::Precision;
use crate::core::{Autoregressive, token_nll};
use crate::data::Batch;
use crate::layers::conv_stack::{ConvShape, conv_stack};
#[cfg(test)]
use crate::layers::dropout::Dropout;
use crate::layers::gated_stack::GatedStack;
use crate::layers::masked_stack::MaskedStack;
use crate::layers::matmul::{Exact, Mat, Products};
#[cfg(test)]
use crate::layers::shifted::{Options, shifted_conv};
use crate::{Error, Result};

/// Hyper-parameters of a PixelCNN or Gated PixelCNN.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    /// Pixel classes V (2 for binary images).
    pub classes: usize,
    /// Image height.
    pub height: usize,
    /// Image width.
    pub width: usize,
    /// Channels C of the residual stream (PixelCNN: its blocks' inner width; the stream is 2C).
    pub channels: usize,
    /// Residual blocks (PixelCNN) or gated layers (Gated PixelCNN) after the first layer.
    pub layers: usize,
    /// Side of the first layer's kernel (odd).
    pub first_kernel: usize,
    /// Side of the later layers' kernels (odd).
    pub kernel: usize,
    /// Hidden units of the 1×1 output head.
    pub head: usize,
}

impl Config {
    /// The pixels of an image.
    pub fn pixels(&self) -> usize {
        self.height * self.width
    }

    fn check(&self, name: &str) -> Result<()> {
        within(&format!("{name} classes"), self.classes, 2, 256)?;
        within(&format!("{name} height"), self.height, 1, 4096)?;
        within(&format!("{name} width"), self.width, 1, 4096)?;
        within(&format!("{name} pixels"), self.pixels(), 2, super::MAX_PIXELS)?;
        within(&format!("{name} --channels"), self.channels, 1, MAX_HIDDEN)?;
        within(&format!("{name} --layers"), self.layers, 0, 256)?;
        within(&format!("{name} --head"), self.head, 1, MAX_HIDDEN)?;
        // A 1×1 mask-A kernel has no taps: the first layer would see nothing.
        for (what, k, least) in [("--first-kernel", self.first_kernel, 3), ("kernel", self.kernel, 1)] {
            within(&format!("{name} {what}"), k, least, 31)?;
            if k % 2 == 0 {
                return Err(Error::Config(format!("the {name}'s {what} is {k}; it must be odd")));
            }
        }
        Ok(())
    }

    /// The layout for `k × k` kernels: as many padding columns as their radius.
    fn grid(&self, k: usize) -> Grid {
        Grid { height: self.height, width: self.width, stride: self.width + k / 2 }
    }
}

/// The padded raster layout: `height` rows of `stride` slots, the first `width` of each a
/// pixel, the rest zero.
#[derive(Debug, Clone, Copy)]
struct Grid {
    height: usize,
    width: usize,
    stride: usize,
}

impl Grid {
    fn slots(&self) -> usize {
        self.height * self.stride
    }

    /// The slot of pixel `t` (raster order).
    fn slot(&self, t: usize) -> usize {
        (t / self.width) * self.stride + t % self.width
    }

    /// The offsets of the taps at (dy, dx).
    fn offsets(&self, taps: &[(isize, isize)]) -> Vec<isize> {
        taps.iter().map(|&(dy, dx)| dy * self.stride as isize + dx).collect()
    }

    /// How the convolutions run: in `precision`, their outputs zero at the padding (so the
    /// padding stays zero from layer to layer).
    #[cfg(test)]
    fn options(&self, precision: Precision) -> Options {
        Options { precision, relu_input: false, padding: Some(self.padding()) }
    }

    /// The padding rows: `(period, valid)` as [`Options::padding`] says.
    fn padding(&self) -> (usize, usize) {
        (self.stride, self.width)
    }

    /// The input of the first layer, `(B, slots, 2)` in the padded layout: the pixel values of
    /// tokens `(B, T)` (T ≤ pixels, the rest zero) scaled to [0, 1], and a channel of ones at
    /// every pixel (zero in the padding), so that the image's border is visible: without it,
    /// the padding would look like black pixels and the first pixels like later ones.
    fn values(&self, tokens: &Tensor, classes: usize, dtype: DType) -> Result<Tensor> {
        let (b, len) = tokens.dims2()?;
        let pixels = self.height * self.width;
        if len > pixels {
            return Err(Error::Config(format!("{len} tokens given to a model of {pixels} pixels")));
        }
        let x = (tokens.to_dtype(dtype)? / (classes - 1) as f64)?;
        let x = if len < pixels { x.pad_with_zeros(1, 0, pixels - len)? } else { x };
        let x = x.reshape((b, self.height, self.width))?.pad_with_zeros(2, 0, self.stride - self.width)?;
        let ones: Vec<f32> = (0..self.slots()).map(|s| if s % self.stride < self.width { 1.0 } else { 0.0 }).collect();
        let ones = Tensor::from_vec(ones, (1, self.slots(), 1), tokens.device())?.to_dtype(dtype)?;
        Ok(Tensor::cat(&[x.reshape((b, self.slots(), 1))?, ones.broadcast_as((b, self.slots(), 1))?], 2)?)
    }

    /// `x (B, slots, C)` in this layout → the same pixels in the layout `to`, zero padding.
    #[cfg(test)]
    fn relaid(&self, x: &Tensor, to: Grid) -> Result<Tensor> {
        let (b, _, c) = x.dims3()?;
        let x = x.reshape((b, self.height, self.stride, c))?.narrow(2, 0, self.width)?;
        Ok(x.pad_with_zeros(2, 0, to.stride - to.width)?.reshape((b, to.slots(), c))?)
    }

    /// Logits in the padded layout `(B, slots, V)` → the first `len` pixels' `(B, len, V)`.
    fn pixels_of(&self, logits: &Tensor, len: usize) -> Result<Tensor> {
        let (b, _, v) = logits.dims3()?;
        let x = logits.reshape((b, self.height, self.stride, v))?.narrow(2, 0, self.width)?;
        Ok(x.contiguous()?.reshape((b, self.height * self.width, v))?.narrow(1, 0, len)?)
    }
}

/// Input channels of the first layer: the pixel value and a constant one (see [`Grid::values`]).
const INPUTS: usize = 2;

/// Taps of a k × k kernel: the rows above (all columns), and in the current row the pixels to
/// the left, with the pixel itself when `center` (mask B) or not (mask A).
fn masked_taps(k: usize, center: bool) -> Vec<(isize, isize)> {
    let r = (k / 2) as isize;
    let above = (-r..0).flat_map(|dy| (-r..=r).map(move |dx| (dy, dx)));
    above.chain((-r..=0).filter(|&dx| center || dx < 0).map(|dx| (0, dx))).collect()
}

/// Gated PixelCNN's vertical taps: the rows above and the current one, all columns.
fn vertical_taps(k: usize) -> Vec<(isize, isize)> {
    let r = (k / 2) as isize;
    (-r..=0).flat_map(|dy| (-r..=r).map(move |dx| (dy, dx))).collect()
}

/// Gated PixelCNN's horizontal taps: the pixels to the left, and the pixel itself if `center`.
fn horizontal_taps(k: usize, center: bool) -> Vec<(isize, isize)> {
    let r = (k / 2) as isize;
    (-r..=0).filter(|&dx| center || dx < 0).map(|dx| (0, dx)).collect()
}

/// A masked convolution (or a 1×1 one: the single tap (0, 0)) and its bias.
#[derive(Debug, Clone)]
struct Conv {
    /// `(K, C_in, C_out)`.
    weight: Tensor,
    bias: Tensor,
    offsets: Vec<isize>,
}

impl Conv {
    /// Fresh weights N(0, 1/fan-in).
    fn new(grid: &Grid, taps: &[(isize, isize)], c_in: usize, c_out: usize, vb: VarBuilder) -> Result<Self> {
        let fan_in = (taps.len() * c_in) as f64;
        Self::with_init(grid, taps, c_in, c_out, Init::Randn { mean: 0.0, stdev: 1.0 / fan_in.sqrt() }, vb)
    }

    fn with_init(
        grid: &Grid,
        taps: &[(isize, isize)],
        c_in: usize,
        c_out: usize,
        init: Init,
        vb: VarBuilder,
    ) -> Result<Self> {
        Ok(Conv {
            weight: vb.get_with_hints((taps.len(), c_in, c_out), "weight", init)?,
            bias: vb.get_with_hints(c_out, "bias", Init::Const(0.0))?,
            offsets: grid.offsets(taps),
        })
    }

    #[cfg(test)]
    fn forward(&self, x: &Tensor, options: Options) -> Result<Tensor> {
        shifted_conv(x, &self.weight, &self.bias, &self.offsets, options)
    }

    fn weights(taps: usize, c_in: usize, c_out: usize) -> usize {
        (taps * c_in + 1) * c_out
    }

    /// Its taps and sizes, for a fused network's layout.
    fn shape(&self) -> Result<ConvShape> {
        let (_k, c_in, c_out) = self.weight.dims3()?;
        Ok((self.offsets.clone(), c_in, c_out))
    }
}

/// The weights and biases of `convs`, flattened and concatenated in that order: the flat vector
/// of a fused network.
fn flat_weights<'a>(convs: impl Iterator<Item = &'a Conv>) -> Result<Tensor> {
    let parts = convs
        .flat_map(|conv| [conv.weight.flatten_all(), Ok(conv.bias.clone())])
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(Tensor::cat(&parts, 0)?)
}

/// `x (B, slots, C)` times layer `layer`'s dropout mask, as the fused networks draw it: the
/// separate formulation of their dropout, for the tests.
#[cfg(test)]
fn dropped(x: Tensor, dropout: Option<Dropout>, layer: usize) -> Result<Tensor> {
    let Some(d) = dropout else { return Ok(x) };
    let (_b, slots, c) = x.dims3()?;
    let mut mask = vec![1f64; x.elem_count()];
    d.apply(&mut mask, layer, slots * c);
    Ok((&x * Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?)?)
}

/// The output head: ReLU, 1×1, ReLU, 1×1.
#[derive(Debug, Clone)]
struct Head {
    hidden: Conv,
    out: Conv,
}

impl Head {
    fn new(grid: &Grid, c_in: usize, cfg: &Config, vb: VarBuilder) -> Result<Self> {
        Ok(Head {
            hidden: Conv::new(grid, &[(0, 0)], c_in, cfg.head, vb.pp("head.0"))?,
            out: Conv::new(grid, &[(0, 0)], cfg.head, cfg.classes, vb.pp("head.1"))?,
        })
    }

    #[cfg(test)]
    fn forward(&self, x: &Tensor, options: Options) -> Result<Tensor> {
        let relu = Options { relu_input: true, ..options };
        self.out.forward(&self.hidden.forward(x, relu)?, relu)
    }

    fn weights(c_in: usize, cfg: &Config) -> usize {
        Conv::weights(1, c_in, cfg.head) + Conv::weights(1, cfg.head, cfg.classes)
    }

    fn shapes(&self) -> Result<[ConvShape; 2]> {
        Ok([self.hidden.shape()?, self.out.shape()?])
    }
}

/// PixelCNN: a mask-A convolution, residual blocks of a mask-B convolution, the head.
#[derive(Debug, Clone)]
pub struct PixelCnn {
    /// Hyper-parameters.
    pub cfg: Config,
    /// The first layer's layout (as wide as its kernel needs).
    input_grid: Grid,
    /// The blocks' and the head's layout (as wide as the blocks' kernels need).
    grid: Grid,
    input: Conv,
    blocks: Vec<[Conv; 3]>,
    head: Head,
    precision: Precision,
    /// The whole network as one operation, for training (`layers::masked_stack`).
    stack: MaskedStack,
}

/// Gated PixelCNN: vertical and horizontal stacks of gated layers, the head.
#[derive(Debug, Clone)]
pub struct GatedPixelCnn {
    /// Hyper-parameters.
    pub cfg: Config,
    grid: Grid,
    layers: Vec<GatedLayer>,
    head: Head,
    precision: Precision,
    /// The whole network as one operation, for training (`layers::gated_stack`).
    stack: GatedStack,
}

#[derive(Debug, Clone)]
struct GatedLayer {
    vertical: Conv,
    horizontal: Conv,
    link: Conv,
    residual: Conv,
}

impl PixelCnn {
    /// Loads or creates the weights under `vb`.
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        <Self as Registered>::weights(cfg)?;
        let (input_grid, grid, c) = (cfg.grid(cfg.first_kernel), cfg.grid(cfg.kernel), cfg.channels);
        let b_taps = masked_taps(cfg.kernel, true);
        let blocks = (0..cfg.layers)
            .map(|l| {
                let vb = vb.pp(format!("blocks.{l}"));
                Ok([
                    Conv::new(&grid, &[(0, 0)], 2 * c, c, vb.pp("reduce"))?,
                    Conv::new(&grid, &b_taps, c, c, vb.pp("conv"))?,
                    // Fresh blocks start as the identity: a deep ReLU stack then stays stable at
                    // high learning rates.
                    Conv::with_init(&grid, &[(0, 0)], c, 2 * c, Init::Const(0.0), vb.pp("expand"))?,
                ])
            })
            .collect::<Result<Vec<_>>>()?;
        let input = Conv::new(&input_grid, &masked_taps(cfg.first_kernel, false), INPUTS, 2 * c, vb.pp("input"))?;
        let head = Head::new(&grid, 2 * c, cfg, vb)?;
        let block_shapes =
            blocks.iter().map(|[r, m, e]| Ok([r.shape()?, m.shape()?, e.shape()?])).collect::<Result<Vec<_>>>()?;
        let stack =
            MaskedStack::new(&input.shape()?, &block_shapes, &head.shapes()?, input_grid.padding(), grid.padding());
        Ok(PixelCnn { cfg: cfg.clone(), input_grid, grid, input, blocks, head, precision: Precision::F32, stack })
    }

    /// Every weight, in the order of [`MaskedStack`].
    fn flat_weights(&self) -> Result<Tensor> {
        let convs = std::iter::once(&self.input).chain(self.blocks.iter().flatten());
        flat_weights(convs.chain([&self.head.hidden, &self.head.out]))
    }

    /// The logits over the padded layout as separate operations per convolution: the
    /// formulation [`MaskedStack`] fuses, kept for the tests.
    #[cfg(test)]
    fn forward_separate(&self, x: &Tensor, dropout: Option<Dropout>) -> Result<Tensor> {
        let plain = self.grid.options(self.precision);
        let relu = Options { relu_input: true, ..plain };
        let h = self.input.forward(x, self.input_grid.options(self.precision))?; // (B, input slots, 2C)
        let mut h = self.input_grid.relaid(&h, self.grid)?; // (B, slots, 2C)
        for (l, [reduce, conv, expand]) in self.blocks.iter().enumerate() {
            let y = reduce.forward(&h, relu)?;
            // Dropping before `expand`'s ReLU is dropping after it: the mask is ≥ 0.
            let z = dropped(conv.forward(&y, relu)?, dropout, l)?;
            h = (&h + expand.forward(&z, relu)?)?;
        }
        self.head.forward(&h, plain)
    }

    /// The same model, its products in `precision` when training.
    pub fn with_precision(mut self, precision: Precision) -> Self {
        self.precision = precision;
        self
    }

    /// The input's layout.
    #[cfg(test)]
    fn input_grid(&self) -> Grid {
        self.input_grid
    }

    /// The logits of every pixel through `stack` (the model's network, or it with dropout).
    fn logits(&self, stack: &MaskedStack, tokens: &Tensor) -> Result<Tensor> {
        let x = self.input_grid.values(tokens, self.cfg.classes, self.input.weight.dtype())?;
        let logits = conv_stack(stack, &x, &self.flat_weights()?, self.precision)?;
        self.grid.pixels_of(&logits, tokens.dim(1)?)
    }
}

impl GatedPixelCnn {
    /// Loads or creates the weights under `vb`.
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        <Self as Registered>::weights(cfg)?;
        let (grid, c) = (cfg.grid(cfg.first_kernel.max(cfg.kernel)), cfg.channels);
        let layers = (0..=cfg.layers)
            .map(|l| {
                let vb = vb.pp(format!("layers.{l}"));
                let (k, c_in) = if l == 0 { (cfg.first_kernel, INPUTS) } else { (cfg.kernel, c) };
                Ok(GatedLayer {
                    vertical: Conv::new(&grid, &vertical_taps(k), c_in, 2 * c, vb.pp("vertical"))?,
                    horizontal: Conv::new(&grid, &horizontal_taps(k, l > 0), c_in, 2 * c, vb.pp("horizontal"))?,
                    link: Conv::new(&grid, &[(-1, 0)], 2 * c, 2 * c, vb.pp("link"))?,
                    residual: Conv::new(&grid, &[(0, 0)], c, c, vb.pp("residual"))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let head = Head::new(&grid, c, cfg, vb)?;
        let layer_shapes = layers
            .iter()
            .map(|l| Ok([l.vertical.shape()?, l.horizontal.shape()?, l.link.shape()?, l.residual.shape()?]))
            .collect::<Result<Vec<_>>>()?;
        let stack = GatedStack::new(&layer_shapes, &head.shapes()?, grid.padding());
        Ok(GatedPixelCnn { cfg: cfg.clone(), grid, layers, head, precision: Precision::F32, stack })
    }

    /// Every weight, in the order of [`GatedStack`].
    fn flat_weights(&self) -> Result<Tensor> {
        let convs = self.layers.iter().flat_map(|l| [&l.vertical, &l.horizontal, &l.link, &l.residual]);
        flat_weights(convs.chain([&self.head.hidden, &self.head.out]))
    }

    /// The logits over the padded layout as separate operations per convolution and gate: the
    /// formulation [`GatedStack`] fuses, kept for the tests.
    #[cfg(test)]
    fn forward_separate(&self, x: &Tensor, dropout: Option<Dropout>) -> Result<Tensor> {
        use crate::layers::gated_unit;
        let p = self.grid.options(self.precision);
        // The padding is zero in every pre-activation, so also after the gates (tanh 0 = 0).
        let (mut v, mut h) = (x.clone(), x.clone());
        for (l, layer) in self.layers.iter().enumerate() {
            let v_pre = layer.vertical.forward(&v, p)?; // (B, slots, 2C)
            let h_pre = (layer.horizontal.forward(&h, p)? + layer.link.forward(&v_pre, p)?)?;
            v = gated_unit(&v_pre)?;
            let out = layer.residual.forward(&dropped(gated_unit(&h_pre)?, dropout, l)?, p)?;
            h = if l == 0 { out } else { (out + h)? };
        }
        self.head.forward(&h, p)
    }

    /// The same model, its products in `precision` when training.
    pub fn with_precision(mut self, precision: Precision) -> Self {
        self.precision = precision;
        self
    }

    /// The input's layout (that of every layer).
    #[cfg(test)]
    fn input_grid(&self) -> Grid {
        self.grid
    }

    /// The logits of every pixel through `stack` (the model's network, or it with dropout).
    fn logits(&self, stack: &GatedStack, tokens: &Tensor) -> Result<Tensor> {
        let x = self.grid.values(tokens, self.cfg.classes, self.head.out.weight.dtype())?;
        let logits = conv_stack(stack, &x, &self.flat_weights()?, self.precision)?;
        self.grid.pixels_of(&logits, tokens.dim(1)?)
    }

    /// How far the logit of a pixel reaches: `(rows above, columns to either side)`; within
    /// that, every earlier pixel influences it (there is no blind spot).
    pub fn reach(cfg: &Config) -> (usize, usize) {
        let side = cfg.first_kernel / 2 + cfg.layers * (cfg.kernel / 2);
        (side + 1, side)
    }
}

impl Registered for PixelCnn {
    type Config = Config;

    fn build(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        PixelCnn::new(cfg, vb)
    }

    fn with_precision(self, precision: Precision) -> Self {
        PixelCnn::with_precision(self, precision)
    }

    fn has_precision(_cfg: &Config) -> bool {
        true
    }

    fn weights(cfg: &Config) -> Result<usize> {
        cfg.check("PixelCNN")?;
        let c = cfg.channels;
        let block = Conv::weights(1, 2 * c, c)
            + Conv::weights(masked_taps(cfg.kernel, true).len(), c, c)
            + Conv::weights(1, c, 2 * c);
        Ok(Conv::weights(masked_taps(cfg.first_kernel, false).len(), INPUTS, 2 * c)
            + cfg.layers * block
            + Head::weights(2 * c, cfg))
    }

    fn sequence_len(cfg: &Config) -> Option<usize> {
        Some(cfg.pixels())
    }

    /// 28 × 28 (or a square of `pixels`), 7×7 mask A, then 3×3 mask B; by default 15 blocks
    /// of 64 channels (a stream of 128) and a head of 256.
    fn image_config(pixels: usize, s: &Settings) -> Option<Result<Config>> {
        Some(image_config(pixels, s, 15, 64))
    }

    fn examples() -> Vec<(&'static str, Config)> {
        vec![("pixelcnn 4×3, 2 blocks", example(2, 2)), ("pixelcnn 3 classes", example(3, 2))]
    }
}

impl Registered for GatedPixelCnn {
    type Config = Config;

    fn build(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        GatedPixelCnn::new(cfg, vb)
    }

    fn with_precision(self, precision: Precision) -> Self {
        GatedPixelCnn::with_precision(self, precision)
    }

    fn has_precision(_cfg: &Config) -> bool {
        true
    }

    fn weights(cfg: &Config) -> Result<usize> {
        cfg.check("Gated PixelCNN")?;
        let c = cfg.channels;
        let layer = |k: usize, c_in: usize, first: bool| {
            Conv::weights(vertical_taps(k).len(), c_in, 2 * c)
                + Conv::weights(horizontal_taps(k, !first).len(), c_in, 2 * c)
                + Conv::weights(1, 2 * c, 2 * c)
                + Conv::weights(1, c, c)
        };
        Ok(layer(cfg.first_kernel, INPUTS, true) + cfg.layers * layer(cfg.kernel, c, false) + Head::weights(c, cfg))
    }

    fn sequence_len(cfg: &Config) -> Option<usize> {
        Some(cfg.pixels())
    }

    /// 28 × 28 (or a square of `pixels`), a 7×7 first layer, then 3×3; by default 12 layers of
    /// 64 channels and a head of 256.
    fn image_config(pixels: usize, s: &Settings) -> Option<Result<Config>> {
        Some(image_config(pixels, s, 11, 64))
    }

    fn examples() -> Vec<(&'static str, Config)> {
        vec![("gated pixelcnn 4×3, 3 layers", example(2, 2)), ("gated pixelcnn 3 classes", example(3, 2))]
    }
}

/// A configuration for square binary images of `pixels` from the command line.
fn image_config(pixels: usize, s: &Settings, layers: usize, channels: usize) -> Result<Config> {
    let side = (pixels as f64).sqrt().round() as usize;
    if side * side != pixels {
        return Err(Error::Config(format!("PixelCNN needs square images; {pixels} pixels are not a square")));
    }
    Ok(Config {
        classes: 2,
        height: side,
        width: side,
        channels: s.channels.unwrap_or(channels),
        layers: s.layers.map_or(layers, |l| l.saturating_sub(1)),
        first_kernel: s.first_kernel.unwrap_or(7),
        kernel: 3,
        head: s.head.unwrap_or(256),
    })
}

/// A tiny model for the property tests: 4 × 3 pixels of `classes`, `layers` after the first.
/// The toy data copies the pixel two back, which in columns 0 and 1 is up and to the right: a
/// 5×5 first layer reaches it (in a wider image it would be in PixelCNN's blind spot).
fn example(classes: usize, layers: usize) -> Config {
    Config { classes, height: 4, width: 3, channels: 6, layers, first_kernel: 5, kernel: 3, head: 8 }
}

/// The two models differ, to the core, only in their stepper's state: one macro writes both
/// impls.
macro_rules! autoregressive_image_model {
    ($model:ty, $start:path) => {
        impl Autoregressive for $model {
            type State = cached::State;

            fn vocab_size(&self) -> usize {
                self.cfg.classes
            }

            fn dependency_window(&self) -> Option<usize> {
                None
            }

            fn max_context(&self) -> Option<usize> {
                Some(self.cfg.pixels())
            }

            fn forward(&self, tokens: &Tensor, _labels: Option<&Tensor>) -> Result<Tensor> {
                self.logits(&self.stack, tokens)
            }

            fn has_dropout(&self) -> bool {
                true
            }

            fn position_nll(&self, batch: &Batch) -> Result<Tensor> {
                let logits = match batch.dropout {
                    Some(d) => self.logits(&self.stack.with_dropout(d), &batch.tokens)?,
                    None => self.forward(&batch.tokens, None)?,
                };
                token_nll(&logits, &batch.tokens)
            }

            fn start(&self, batch: usize, _labels: Option<&Tensor>) -> Result<cached::State> {
                $start(self, batch)
            }

            fn step(&self, state: &mut cached::State, prev: Option<&Tensor>) -> Result<Tensor> {
                state.step(prev)
            }
        }
    };
}

autoregressive_image_model!(PixelCnn, cached::State::plain);
autoregressive_image_model!(GatedPixelCnn, cached::State::gated);

/// Cached generation: every layer's activations over the padded layout, filled in as the
/// pixels are generated, in plain loops over f32 (a step is many small products, for which
/// candle's per-operation cost would dominate).
pub mod cached {
    use super::*;

    /// A convolution's weights as f32 rows `(K·C_in, C_out)`.
    struct Weights {
        w: Vec<f32>,
        b: Vec<f32>,
        offsets: Vec<isize>,
        c_in: usize,
        c_out: usize,
    }

    impl Weights {
        fn of(conv: &Conv) -> Result<Self> {
            let (_k, c_in, c_out) = conv.weight.dims3()?;
            Ok(Weights {
                w: conv.weight.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?,
                b: conv.bias.to_dtype(DType::F32)?.to_vec1()?,
                offsets: conv.offsets.clone(),
                c_in,
                c_out,
            })
        }

        /// The convolution at the slots `at` ((image, slot) pairs) of `src`, rows `(at.len(),
        /// C_out)`: the taps gathered into one matrix, one product.
        fn at(&self, src: &Map, at: &[(usize, usize)]) -> Vec<f32> {
            let (k, c) = (self.offsets.len(), self.c_in);
            let mut gathered = vec![0f32; at.len() * k * c];
            for (i, &(b, s)) in at.iter().enumerate() {
                for (j, &o) in self.offsets.iter().enumerate() {
                    let q = s as isize + o;
                    if q >= 0 && (q as usize) < src.slots {
                        gathered[(i * k + j) * c..][..c].copy_from_slice(src.row(b, q as usize));
                    }
                }
            }
            self.product(&gathered, at.len())
        }

        /// `rows (n, K·C_in) × W + b`.
        fn product(&self, rows: &[f32], n: usize) -> Vec<f32> {
            let mut out: Vec<f32> = (0..n).flat_map(|_| self.b.iter().copied()).collect();
            let depth = self.offsets.len() * self.c_in;
            Exact::acc(&mut out, 0, Mat::new(rows, 0, n, depth), Mat::new(&self.w, 0, depth, self.c_out));
            out
        }
    }

    /// One layer's activations for a batch of images, `(B, slots, C)`, zero until computed
    /// and at the padding.
    struct Map {
        slots: usize,
        c: usize,
        data: Vec<f32>,
    }

    impl Map {
        fn new(batch: usize, slots: usize, c: usize) -> Self {
            Map { slots, c, data: vec![0.0; batch * slots * c] }
        }

        /// The first layer's input before any pixel is known: values 0, and the channel of ones.
        fn ones_at_pixels(batch: usize, grid: Grid) -> Self {
            let mut map = Map::new(batch, grid.slots(), INPUTS);
            for (i, row) in map.data.chunks_exact_mut(INPUTS).enumerate() {
                row[1] = if (i % grid.slots()) % grid.stride < grid.width { 1.0 } else { 0.0 };
            }
            map
        }

        fn row(&self, b: usize, s: usize) -> &[f32] {
            &self.data[(b * self.slots + s) * self.c..][..self.c]
        }

        /// Stores `rows (at.len(), C)` at the slots `at`.
        fn write(&mut self, at: &[(usize, usize)], rows: &[f32]) {
            for (&(b, s), row) in at.iter().zip(rows.chunks_exact(self.c)) {
                let start = (b * self.slots + s) * self.c;
                self.data[start..start + self.c].copy_from_slice(row);
            }
        }
    }

    fn gate(pre: &[f32], c: usize) -> Vec<f32> {
        let sigmoid = |x: f32| 1.0 / (1.0 + (-x).exp());
        pre.chunks_exact(2 * c).flat_map(|r| (0..c).map(move |i| r[i].tanh() * sigmoid(r[c + i]))).collect()
    }

    fn relu(x: &mut [f32]) {
        x.iter_mut().for_each(|v| *v = v.max(0.0));
    }

    enum Net {
        /// `grid`: the blocks' layout (the pixels' is the state's).
        Plain {
            input: Weights,
            blocks: Vec<[Weights; 3]>,
            maps: Vec<Map>,
            grid: Grid,
        },
        Gated {
            layers: Vec<[Weights; 4]>,
            vertical: Vec<Map>,
            link: Vec<Map>,
            horizontal: Vec<Map>,
        },
    }

    /// The stepper state of a PixelCNN or Gated PixelCNN: the generated pixels, every layer's
    /// activations so far, and the next pixel's index.
    pub struct State {
        /// The pixels' layout.
        grid: Grid,
        classes: usize,
        dtype: DType,
        batch: usize,
        pixels: Map,
        net: Net,
        head: [Weights; 2],
        next: usize,
    }

    impl State {
        /// Writes the previous pixel (if any), computes every layer at the next one, and
        /// returns its logits `(B, V)`.
        pub(super) fn step(&mut self, prev: Option<&Tensor>) -> Result<Tensor> {
            let pixels = self.grid.height * self.grid.width;
            if let Some(p) = prev {
                let values: Vec<f32> = p
                    .to_dtype(DType::F32)?
                    .to_vec1::<f32>()?
                    .iter()
                    .flat_map(|&v| [v / (self.classes - 1) as f32, 1.0])
                    .collect();
                let at: Vec<_> = (0..self.batch).map(|b| (b, self.grid.slot(self.next))).collect();
                self.pixels.write(&at, &values);
                self.next += 1;
            }
            if self.next >= pixels {
                return Err(Error::Config(format!("all {pixels} pixels are generated; there is no next one")));
            }
            let (grid, slot) = (self.grid, self.grid.slot(self.next));
            let at: Vec<_> = (0..self.batch).map(|b| (b, slot)).collect();
            let top = match &mut self.net {
                Net::Plain { input, blocks, maps, grid: blocks_grid } => {
                    let mut h = input.at(&self.pixels, &at);
                    let at: Vec<_> = (0..self.batch).map(|b| (b, blocks_grid.slot(self.next))).collect();
                    for (l, [reduce, conv, expand]) in blocks.iter().enumerate() {
                        let mut x = h.clone();
                        relu(&mut x);
                        let mut y = reduce.product(&x, at.len());
                        relu(&mut y);
                        maps[l].write(&at, &y);
                        let mut y = conv.at(&maps[l], &at);
                        relu(&mut y);
                        let y = expand.product(&y, at.len());
                        h.iter_mut().zip(&y).for_each(|(a, b)| *a += b);
                    }
                    h
                }
                Net::Gated { layers, vertical, link, horizontal } => {
                    let (row, col) = (self.next / grid.width, self.next % grid.width);
                    if col == 0 && row > 0 {
                        // The row above is complete: the vertical stack over all of it.
                        let above: Vec<_> = (0..self.batch)
                            .flat_map(|b| (0..grid.width).map(move |x| (b, (row - 1) * grid.stride + x)))
                            .collect();
                        for (l, [vert, _, lnk, _]) in layers.iter().enumerate() {
                            let src = if l == 0 { &self.pixels } else { &vertical[l - 1] };
                            let pre = vert.at(src, &above);
                            link[l].write(&above, &lnk.product(&pre, above.len()));
                            vertical[l].write(&above, &gate(&pre, vert.c_out / 2));
                        }
                    }
                    let mut h = Vec::new();
                    for (l, [_, horiz, _, residual]) in layers.iter().enumerate() {
                        let src = if l == 0 { &self.pixels } else { &horizontal[l - 1] };
                        let mut pre = horiz.at(src, &at);
                        // The vertical stack's link from the row above (only its bias in row 0).
                        let c = horiz.c_out;
                        for (i, &(b, _)) in at.iter().enumerate() {
                            let above = if row > 0 { link[l].row(b, slot - grid.stride) } else { &layers[l][2].b[..] };
                            pre[i * c..][..c].iter_mut().zip(above).for_each(|(a, v)| *a += v);
                        }
                        let mut out = residual.product(&gate(&pre, horiz.c_out / 2), at.len());
                        if l > 0 {
                            out.iter_mut().zip(&h).for_each(|(a, b): (&mut f32, &f32)| *a += b);
                        }
                        horizontal[l].write(&at, &out);
                        h = out;
                    }
                    h
                }
            };
            let mut x = top;
            relu(&mut x);
            let mut y = self.head[0].product(&x, self.batch);
            relu(&mut y);
            let logits = self.head[1].product(&y, self.batch);
            Ok(Tensor::from_vec(logits, (self.batch, self.classes), &Device::Cpu)?.to_dtype(self.dtype)?)
        }
    }

    fn convs<const N: usize>(convs: [&Conv; N]) -> Result<[Weights; N]> {
        let all = convs.iter().map(|c| Weights::of(c)).collect::<Result<Vec<_>>>()?;
        Ok(all.try_into().unwrap_or_else(|_| unreachable!("N weights from N convolutions")))
    }

    impl State {
        fn with(grid: Grid, cfg: &Config, head: &Head, batch: usize, net: Net) -> Result<State> {
            Ok(State {
                grid,
                classes: cfg.classes,
                dtype: head.out.weight.dtype(),
                batch,
                pixels: Map::ones_at_pixels(batch, grid),
                net,
                head: convs([&head.hidden, &head.out])?,
                next: 0,
            })
        }

        pub(super) fn plain(m: &PixelCnn, batch: usize) -> Result<State> {
            let blocks = m.blocks.iter().map(|[a, b, c]| convs([a, b, c])).collect::<Result<Vec<_>>>()?;
            let maps = (0..blocks.len()).map(|_| Map::new(batch, m.grid.slots(), m.cfg.channels)).collect();
            let net = Net::Plain { input: Weights::of(&m.input)?, blocks, maps, grid: m.grid };
            State::with(m.input_grid, &m.cfg, &m.head, batch, net)
        }

        pub(super) fn gated(m: &GatedPixelCnn, batch: usize) -> Result<State> {
            let layers = m
                .layers
                .iter()
                .map(|l| convs([&l.vertical, &l.horizontal, &l.link, &l.residual]))
                .collect::<Result<Vec<_>>>()?;
            let maps = |c: usize| (0..layers.len()).map(|_| Map::new(batch, m.grid.slots(), c)).collect::<Vec<_>>();
            let c = m.cfg.channels;
            let (vertical, link, horizontal) = (maps(c), maps(2 * c), maps(c));
            let net = Net::Gated { layers, vertical, link, horizontal };
            State::with(m.grid, &m.cfg, &m.head, batch, net)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::params::Params;
    use crate::models::fused_check::{assert_agree, perturb};
    use crate::rng::Rng;

    /// Both models, run fused and as separate operations.
    trait Fused: Sized {
        fn build(cfg: &Config, vb: VarBuilder) -> Self;
        fn fused(&self, x: &Tensor, precision: Precision, dropout: Option<Dropout>) -> Tensor;
        fn separate(&self, x: &Tensor, precision: Precision, dropout: Option<Dropout>) -> Tensor;
        /// The input's layout.
        fn input_grid(&self) -> Grid;
    }

    macro_rules! fused {
        ($($model:ty),*) => {$(
            impl Fused for $model {
                fn build(cfg: &Config, vb: VarBuilder) -> Self {
                    <$model>::new(cfg, vb).unwrap()
                }
                fn fused(&self, x: &Tensor, precision: Precision, dropout: Option<Dropout>) -> Tensor {
                    let stack = match dropout {
                        Some(d) => self.stack.with_dropout(d),
                        None => self.stack.clone(),
                    };
                    conv_stack(&stack, x, &self.flat_weights().unwrap(), precision).unwrap()
                }
                fn separate(&self, x: &Tensor, precision: Precision, dropout: Option<Dropout>) -> Tensor {
                    self.clone().with_precision(precision).forward_separate(x, dropout).unwrap()
                }
                fn input_grid(&self) -> Grid {
                    <$model>::input_grid(self)
                }
            }
        )*};
    }
    fused!(PixelCnn, GatedPixelCnn);

    /// A model whose biases are random too (fresh ones are zero, which would hide a bias in the
    /// wrong place, and PixelCNN's blocks start at zero), and a batch of 3 images for it.
    fn model_and_images<M: Fused>(cfg: &Config, dtype: DType) -> (M, Params, Tensor) {
        let params = Params::new(7);
        let model = M::build(cfg, params.var_builder(dtype));
        let mut rng = Rng::new(8);
        perturb(&params, dtype, &mut rng);
        let tokens: Vec<u32> = (0..3 * cfg.pixels()).map(|_| rng.below(cfg.classes) as u32).collect();
        let tokens = Tensor::from_vec(tokens, (3, cfg.pixels()), &Device::Cpu).unwrap();
        let x = model.input_grid().values(&tokens, cfg.classes, dtype).unwrap();
        (model, params, x)
    }

    /// The fused network's logits and every weight's gradient against the separate operations',
    /// within `tolerance` of their scale.
    fn fused_equals_separate<M: Fused>(
        cfg: &Config,
        dtype: DType,
        precision: Precision,
        dropout: Option<Dropout>,
        tolerance: f64,
    ) {
        let (model, params, x) = model_and_images::<M>(cfg, dtype);
        let mut rng = Rng::new(9);
        let (fused, separate) = (model.fused(&x, precision, dropout), model.separate(&x, precision, dropout));
        assert_agree(&params, &fused, &separate, tolerance, &mut rng);
    }

    /// A 5×4 image of three classes, a first kernel wider than the image: the fused networks
    /// equal the separate operations in f64, values and gradients.
    #[test]
    fn fused_networks_equal_separate_operations() {
        let cfg =
            Config { classes: 3, height: 5, width: 4, channels: 3, layers: 2, first_kernel: 5, kernel: 3, head: 4 };
        fused_equals_separate::<GatedPixelCnn>(&cfg, DType::F64, Precision::F32, None, 1e-12);
        fused_equals_separate::<PixelCnn>(&cfg, DType::F64, Precision::F32, None, 1e-12);
    }

    /// With dropout the fused networks drop the units the mask names, in the forward pass and
    /// in the backward: the same as multiplying by the mask in separate operations, values and
    /// gradients. A shard that starts at a later image draws that image's mask.
    #[test]
    fn fused_networks_with_dropout_equal_separate_operations_times_the_mask() {
        let cfg =
            Config { classes: 3, height: 5, width: 4, channels: 3, layers: 2, first_kernel: 5, kernel: 3, head: 4 };
        for d in [Dropout { rate: 0.3, seed: 11, first: 0 }, Dropout { rate: 0.5, seed: 12, first: 5 }] {
            fused_equals_separate::<GatedPixelCnn>(&cfg, DType::F64, Precision::F32, Some(d), 1e-12);
            fused_equals_separate::<PixelCnn>(&cfg, DType::F64, Precision::F32, Some(d), 1e-12);
        }
        // And it does drop: the logits differ from those without dropout.
        let (model, _params, x) = model_and_images::<GatedPixelCnn>(&cfg, DType::F64);
        let d = Dropout { rate: 0.3, seed: 11, first: 0 };
        let diff = (model.fused(&x, Precision::F32, Some(d)) - model.fused(&x, Precision::F32, None)).unwrap();
        assert!(diff.abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap() > 1e-3);
    }

    /// In bf16 on the AMX unit the fused networks make the same products as the separate
    /// operations, so their logits and gradients agree closely (bf16 itself is a few percent
    /// from f32 here: `shifted`'s and `matmul`'s tests bound that).
    #[test]
    fn fused_networks_in_bf16_equal_separate_operations() {
        if !crate::layers::matmul::amx::available() {
            return;
        }
        let cfg =
            Config { classes: 2, height: 6, width: 6, channels: 16, layers: 3, first_kernel: 5, kernel: 3, head: 32 };
        fused_equals_separate::<GatedPixelCnn>(&cfg, DType::F32, Precision::Bf16, None, 1e-3);
        fused_equals_separate::<PixelCnn>(&cfg, DType::F32, Precision::Bf16, None, 1e-3);
    }
}
