//! A causal transformer over tokens (Vaswani et al., 2017, "Attention Is All You Need", in the
//! pre-norm form of GPT-2): token and learned position embeddings, blocks of multi-head causal
//! self-attention and a ReLU MLP, each behind a layer norm and added to the residual stream,
//! a final layer norm and the logits. As an image model it reads the pixels in raster order.
//!
//! The stepper keeps every layer's keys and values (the KV cache, plain memory written in
//! place), so the t-th token costs O(t·d) for attention (a hand-written loop per head) and
//! O(d²) for the rest, not a pass over the prefix; `prefill` fills the cache with one parallel
//! pass. The parallel pass (training, scoring, naive sampling) is one operation over the whole
//! network with its own backward pass (`layers::transformer_stack`); `prefill` runs the same
//! network as separate operations, which also fill the cache: an attention over blocks of
//! queries that never stores the scores (`layers::attention`), layer norms and linear maps
//! (`layers::norm`, `layers::linear`). candle 0.11 multiplies transposed views broadcast over a
//! batch wrongly, and its element-wise operations and zero-then-add gradients dominated the step.
//!
//! | name | shape | role |
//! |---|---|---|
//! | `embed.weight` | `(V + 1, D)` | token embeddings; row V is the start token |
//! | `position.weight` | `(L, D)` | learned position embeddings, L the longest sequence |
//! | `blocks.{l}.norm1.weight`, `.bias` | `(D,)` | layer norm before attention |
//! | `blocks.{l}.qkv.weight`, `.bias` | `(D, 3D)`, `(3D,)` | queries, keys, values of all heads |
//! | `blocks.{l}.out.weight`, `.bias` | `(D, D)`, `(D,)` | heads → residual stream |
//! | `blocks.{l}.norm2.weight`, `.bias` | `(D,)` | layer norm before the MLP |
//! | `blocks.{l}.mlp.0.weight`, `.bias` | `(D, M)`, `(M,)` | MLP in |
//! | `blocks.{l}.mlp.1.weight`, `.bias` | `(M, D)`, `(D,)` | MLP out |
//! | `norm.weight`, `.bias` | `(D,)` | final layer norm |
//! | `output.weight`, `.bias` | `(D, V)`, `(V,)` | logits |

use candle_core::{DType, Device, Tensor};
use candle_nn::{Init, VarBuilder};
use serde::{Deserialize, Serialize};

use super::{MAX_HIDDEN, Registered, Settings, within};
use crate::core::Autoregressive;
use crate::core::train::Precision;
use crate::layers::ChannelLinear;
use crate::layers::attention::causal_attention;
use crate::layers::conv_stack::conv_stack;
use crate::layers::norm::layer_norm;
use crate::layers::shifted::Options;
use crate::layers::transformer_stack::TransformerStack;
use crate::{Error, Result};

/// Hyper-parameters of a transformer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    /// Token classes V.
    pub classes: usize,
    /// Width D of the residual stream.
    pub dim: usize,
    /// Attention heads (D a multiple of it).
    pub heads: usize,
    /// Blocks.
    pub layers: usize,
    /// Hidden units M of each MLP.
    pub mlp: usize,
    /// The longest sequence L (the positions learnt).
    pub context: usize,
    /// Whether every sequence is exactly `context` long (an image's pixels).
    pub fixed_length: bool,
}

/// A layer norm over the last axis (`layers::norm`).
#[derive(Debug, Clone)]
struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
}

impl LayerNorm {
    fn new(dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(LayerNorm {
            weight: vb.get_with_hints(dim, "weight", Init::Const(1.0))?,
            bias: vb.get_with_hints(dim, "bias", Init::Const(0.0))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        layer_norm(x, &self.weight, &self.bias)
    }
}

#[derive(Debug, Clone)]
struct Block {
    norm1: LayerNorm,
    qkv: ChannelLinear,
    out: ChannelLinear,
    norm2: LayerNorm,
    mlp_in: ChannelLinear,
    mlp_out: ChannelLinear,
}

/// A causal transformer.
#[derive(Debug, Clone)]
pub struct Transformer {
    /// Hyper-parameters.
    pub cfg: Config,
    embed: Tensor,
    position: Tensor,
    blocks: Vec<Block>,
    norm: LayerNorm,
    output: ChannelLinear,
    /// Precision of the products.
    precision: Precision,
    /// The same network as one operation, for the parallel pass.
    stack: TransformerStack,
}

/// One layer's keys and values of every position so far, in plain memory laid out `(B·H,
/// L, D/H)` (L the context), filled in place: a step appends one row per head and reads them
/// all, with no copy of what is there.
struct KvCache {
    k: Vec<f32>,
    v: Vec<f32>,
}

impl Transformer {
    /// Loads or creates the weights under `vb` (GPT-2's: N(0, 0.02²), the projections into
    /// the residual stream scaled by 1/√(2·layers)).
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        <Self as Registered>::weights(cfg)?;
        let (d, m) = (cfg.dim, cfg.mlp);
        let init = Init::Randn { mean: 0.0, stdev: 0.02 };
        let linear = |i: usize, o: usize, gain: f64, vb: VarBuilder| ChannelLinear::new(i, o, gain, vb);
        // ChannelLinear draws N(0, gain²/in): a gain of 0.02·√in gives GPT-2's 0.02.
        let g = |i: usize| 0.02 * (i as f64).sqrt();
        let deep = 1.0 / (2.0 * cfg.layers as f64).sqrt();
        let blocks = (0..cfg.layers)
            .map(|l| {
                let vb = vb.pp(format!("blocks.{l}"));
                Ok(Block {
                    norm1: LayerNorm::new(d, vb.pp("norm1"))?,
                    qkv: linear(d, 3 * d, g(d), vb.pp("qkv"))?,
                    out: linear(d, d, g(d) * deep, vb.pp("out"))?,
                    norm2: LayerNorm::new(d, vb.pp("norm2"))?,
                    mlp_in: linear(d, m, g(d), vb.pp("mlp.0"))?,
                    mlp_out: linear(m, d, g(m) * deep, vb.pp("mlp.1"))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Transformer {
            cfg: cfg.clone(),
            embed: vb.pp("embed").get_with_hints((cfg.classes + 1, d), "weight", init)?,
            position: vb.pp("position").get_with_hints((cfg.context, d), "weight", init)?,
            blocks,
            norm: LayerNorm::new(d, vb.pp("norm"))?,
            output: linear(d, cfg.classes, g(d), vb.pp("output"))?,
            precision: Precision::F32,
            stack: TransformerStack::new(cfg.classes, d, cfg.heads, cfg.layers, m, cfg.context),
        })
    }

    /// Every weight, in the order of [`TransformerStack`].
    fn flat_weights(&self) -> Result<Tensor> {
        let norm = |n: &LayerNorm| [n.weight.clone(), n.bias.clone()];
        let linear = |l: &ChannelLinear| -> Result<[Tensor; 2]> { Ok([l.weight.flatten_all()?, l.bias.clone()]) };
        let mut parts = vec![self.embed.flatten_all()?, self.position.flatten_all()?];
        for b in &self.blocks {
            parts.extend(norm(&b.norm1));
            parts.extend(linear(&b.qkv)?.into_iter().chain(linear(&b.out)?));
            parts.extend(norm(&b.norm2));
            parts.extend(linear(&b.mlp_in)?.into_iter().chain(linear(&b.mlp_out)?));
        }
        parts.extend(norm(&self.norm));
        parts.extend(linear(&self.output)?);
        Ok(Tensor::cat(&parts, 0)?)
    }

    /// The residual stream's input for `inputs (B, T)` (tokens, V meaning the start token) at
    /// positions `start..start + T`, `(B, T, D)`.
    fn embed(&self, inputs: &Tensor, start: usize) -> Result<Tensor> {
        let (b, t) = inputs.dims2()?;
        if start + t > self.cfg.context {
            return Err(Error::Config(format!(
                "position {} is past the transformer's context of {}",
                start + t - 1,
                self.cfg.context
            )));
        }
        let x = self.embed.index_select(&inputs.flatten_all()?, 0)?.reshape((b, t, self.cfg.dim))?;
        Ok(x.broadcast_add(&self.position.narrow(0, start, t)?)?)
    }

    /// `(B, T, D)` → `(B·H, T, D/H)`, contiguous.
    fn split_heads(&self, x: &Tensor) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (h, dh) = (self.cfg.heads, self.cfg.dim / self.cfg.heads);
        Ok(x.reshape((b, t, h, dh))?.transpose(1, 2)?.contiguous()?.reshape((b * h, t, dh))?)
    }

    /// The blocks over `x (B, T, D)`: in parallel over the T positions (causal attention
    /// among them) when `step` is `None`, also writing their keys and values into `caches` if
    /// given; or one position (T = 1) at `step`, attending to the cache.
    fn blocks(&self, mut x: Tensor, caches: Option<&mut [KvCache]>, step: Option<usize>) -> Result<Tensor> {
        let d = x.dim(2)?;
        let heads = self.cfg.heads;
        let scale = 1.0 / ((d / heads) as f64).sqrt();
        let mut caches = caches.map(|c| c.iter_mut());
        let plain = Options { precision: self.precision, ..Options::plain() };
        // The MLP's ReLU is applied by the map that reads it, so its output is never stored.
        let relu_first = Options { relu_input: true, ..plain };
        for block in &self.blocks {
            let qkv = block.qkv.forward_with(&block.norm1.forward(&x)?, plain)?; // (B, T, 3D)
            let cache = caches.as_mut().and_then(|c| c.next());
            let att = match (step, cache) {
                (Some(position), Some(cache)) => self.attend_one(&qkv, cache, position, scale)?,
                (_, cache) => {
                    if let Some(cache) = cache {
                        let k = self.split_heads(&qkv.narrow(2, d, d)?)?;
                        let v = self.split_heads(&qkv.narrow(2, 2 * d, d)?)?;
                        self.fill(cache, &k, &v)?;
                    }
                    causal_attention(&qkv, heads, self.precision)? // (B, T, D)
                }
            };
            x = (x + block.out.forward_with(&att, plain)?)?;
            let hidden = block.mlp_in.forward_with(&block.norm2.forward(&x)?, plain)?; // before the ReLU
            x = (&x + block.mlp_out.forward_with(&hidden, relu_first)?)?;
        }
        self.output.forward_with(&self.norm.forward(&x)?, plain)
    }

    /// Writes keys and values `(B·H, T, D/H)` into rows `0..T` of `cache`.
    fn fill(&self, cache: &mut KvCache, k: &Tensor, v: &Tensor) -> Result<()> {
        let (bh, t, dh) = k.dims3()?;
        let context = self.cfg.context;
        for (dst, src) in [(&mut cache.k, k), (&mut cache.v, v)] {
            let src = src.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            for (i, rows) in src.chunks_exact(t * dh).enumerate().take(bh) {
                dst[i * context * dh..][..t * dh].copy_from_slice(rows);
            }
        }
        Ok(())
    }

    /// Attention of the one new position `position` (queries, keys and values `qkv (B, 1,
    /// 3D)`) over the cache, after appending its key and value: `(B, 1, D)`.
    fn attend_one(&self, qkv: &Tensor, cache: &mut KvCache, position: usize, scale: f64) -> Result<Tensor> {
        let (b, _, d3) = qkv.dims3()?;
        let (d, heads, context) = (d3 / 3, self.cfg.heads, self.cfg.context);
        let dh = d / heads;
        let qkv_rows = qkv.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let mut out = vec![0f32; b * d];
        let mut p = vec![0f32; position + 1];
        for (i, row) in qkv_rows.chunks_exact(d3).enumerate() {
            for h in 0..heads {
                let base = (i * heads + h) * context * dh;
                cache.k[base + position * dh..][..dh].copy_from_slice(&row[d + h * dh..][..dh]);
                cache.v[base + position * dh..][..dh].copy_from_slice(&row[2 * d + h * dh..][..dh]);
                attend(
                    &row[h * dh..][..dh],
                    &cache.k[base..],
                    &cache.v[base..],
                    &mut p,
                    &mut out[i * d + h * dh..][..dh],
                    scale as f32,
                );
            }
        }
        Ok(Tensor::from_vec(out, (b, 1, d), &Device::Cpu)?.to_dtype(qkv.dtype())?)
    }

    /// The inputs of tokens `(B, T)`: the start token, then all but the last token.
    fn shifted(&self, tokens: &Tensor) -> Result<Tensor> {
        let (b, t) = tokens.dims2()?;
        let start = Tensor::full(self.cfg.classes as u32, (b, 1), tokens.device())?;
        Ok(Tensor::cat(&[&start, &tokens.narrow(1, 0, t.saturating_sub(1))?], 1)?)
    }
}

/// The stepper state: every layer's KV cache and the next position.
pub struct State {
    caches: Vec<KvCache>,
    position: usize,
    batch: usize,
}

impl Registered for Transformer {
    type Config = Config;

    fn build(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        Transformer::new(cfg, vb)
    }

    fn weights(cfg: &Config) -> Result<usize> {
        within("transformer classes", cfg.classes, 2, 65_536)?;
        within("transformer --hidden (width)", cfg.dim, 1, MAX_HIDDEN)?;
        within("transformer --heads", cfg.heads, 1, cfg.dim)?;
        if !cfg.dim.is_multiple_of(cfg.heads) {
            return Err(Error::Config(format!(
                "the transformer's width {} is not a multiple of its {} heads",
                cfg.dim, cfg.heads
            )));
        }
        within("transformer --layers", cfg.layers, 1, 256)?;
        within("transformer MLP width", cfg.mlp, 1, 4 * MAX_HIDDEN)?;
        within("transformer context", cfg.context, 2, 1 << 20)?;
        let (d, m, v) = (cfg.dim, cfg.mlp, cfg.classes);
        let block = 4 * d + (d + 1) * 3 * d + (d + 1) * d + (d + 1) * m + (m + 1) * d;
        Ok((v + 1 + cfg.context) * d + cfg.layers * block + 2 * d + (d + 1) * v)
    }

    fn sequence_len(cfg: &Config) -> Option<usize> {
        cfg.fixed_length.then_some(cfg.context)
    }

    /// 4 blocks of width 128 with 4 heads and an MLP of 512 by default.
    fn image_config(pixels: usize, s: &Settings) -> Option<Result<Config>> {
        Some(s.single_hidden(128).map(|dim| Config {
            classes: 2,
            dim,
            heads: s.heads.unwrap_or(4),
            layers: s.layers.unwrap_or(4),
            mlp: 4 * dim,
            context: pixels,
            fixed_length: true,
        }))
    }

    /// μ-law codes in windows of `window` samples (its context), the image defaults otherwise.
    fn audio_config(window: usize, s: &Settings) -> Option<Result<Config>> {
        Some(Self::image_config(window, s)?.map(|c| Config { classes: 256, fixed_length: false, ..c }))
    }

    fn with_precision(self, precision: Precision) -> Self {
        Transformer { precision, ..self }
    }

    fn has_precision(_cfg: &Config) -> bool {
        true
    }

    fn examples() -> Vec<(&'static str, Config)> {
        vec![
            (
                "transformer 2 blocks",
                Config { classes: 3, dim: 8, heads: 2, layers: 2, mlp: 12, context: 80, fixed_length: false },
            ),
            (
                "transformer 12 pixels",
                Config { classes: 2, dim: 8, heads: 4, layers: 1, mlp: 16, context: 12, fixed_length: true },
            ),
        ]
    }
}

impl Autoregressive for Transformer {
    type State = State;

    fn vocab_size(&self) -> usize {
        self.cfg.classes
    }

    fn dependency_window(&self) -> Option<usize> {
        None
    }

    fn max_context(&self) -> Option<usize> {
        Some(self.cfg.context)
    }

    /// One operation over the whole network ([`TransformerStack`]).
    fn forward(&self, tokens: &Tensor, _labels: Option<&Tensor>) -> Result<Tensor> {
        let t = tokens.dim(1)?;
        if t > self.cfg.context {
            return Err(Error::Config(format!(
                "a sequence of {t} tokens is longer than the transformer's context of {}",
                self.cfg.context
            )));
        }
        // The fused pass reads embeddings by token value: check the range, as index_select would.
        if t > 0 {
            let max = tokens.to_dtype(DType::U32)?.max_all()?.to_scalar::<u32>()? as usize;
            if max >= self.cfg.classes {
                return Err(Error::Config(format!(
                    "token {max} given to a transformer of {} classes",
                    self.cfg.classes
                )));
            }
        }
        let x = self.shifted(tokens)?.to_dtype(self.embed.dtype())?.unsqueeze(2)?; // (B, T, 1)
        conv_stack(&self.stack, &x, &self.flat_weights()?, self.precision)
    }

    fn start(&self, batch: usize, _labels: Option<&Tensor>) -> Result<State> {
        let size = batch * self.cfg.context * self.cfg.dim;
        let caches = (0..self.blocks.len()).map(|_| KvCache { k: vec![0.0; size], v: vec![0.0; size] }).collect();
        Ok(State { caches, position: 0, batch })
    }

    fn step(&self, state: &mut State, prev: Option<&Tensor>) -> Result<Tensor> {
        let input = match prev {
            Some(p) => p.to_dtype(DType::U32)?.reshape((state.batch, 1))?,
            None => Tensor::full(self.cfg.classes as u32, (state.batch, 1), &Device::Cpu)?,
        };
        let x = self.embed(&input, state.position)?;
        let logits = self.blocks(x, Some(&mut state.caches), Some(state.position))?; // (B, 1, V)
        state.position += 1;
        Ok(logits.squeeze(1)?)
    }

    /// One parallel pass over the start token and `tokens`, keeping their keys and values.
    fn prefill(&self, state: &mut State, tokens: &Tensor) -> Result<Tensor> {
        let (b, t) = tokens.dims2()?;
        let start = Tensor::full(self.cfg.classes as u32, (b, 1), tokens.device())?;
        let inputs = Tensor::cat(&[&start, &tokens.to_dtype(DType::U32)?], 1)?; // (B, T + 1)
        if state.position != 0 {
            return Err(Error::Config("prefill starts from a fresh state".into()));
        }
        let x = self.embed(&inputs, 0)?;
        let logits = self.blocks(x, Some(&mut state.caches), None)?; // (B, T + 1, V)
        state.position += t + 1;
        Ok(logits.narrow(1, t, 1)?.squeeze(1)?)
    }
}

/// One head's attention of query `q (D/H)` over the keys and values `k`, `v` (rows of D/H, as
/// many as `p` is long), into `out`; `p` is scratch for the probabilities.
fn attend(q: &[f32], k: &[f32], v: &[f32], p: &mut [f32], out: &mut [f32], scale: f32) {
    let dh = q.len();
    for (j, pj) in p.iter_mut().enumerate() {
        *pj = q.iter().zip(&k[j * dh..][..dh]).map(|(a, b)| a * b).sum::<f32>() * scale;
    }
    let max = p.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let mut sum = 0.0;
    for pj in p.iter_mut() {
        *pj = crate::fastmath::fast_exp(*pj - max);
        sum += *pj;
    }
    out.fill(0.0);
    for (j, &pj) in p.iter().enumerate() {
        let w = pj / sum;
        out.iter_mut().zip(&v[j * dh..][..dh]).for_each(|(o, &x)| *o += w * x);
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};

    use super::*;
    use crate::core::params::Params;
    use crate::models::fused_check::{assert_agree, perturb};
    use crate::rng::Rng;

    /// The fused pass's logits and every weight's gradient against the separate operations the
    /// stepper runs, within `tolerance` of their scale, for 2 sequences of `t` tokens.
    fn fused_equals_separate(cfg: &Config, t: usize, dtype: DType, precision: Precision, tolerance: f64) {
        let params = Params::new(3);
        let model = Transformer::new(cfg, params.var_builder(dtype)).unwrap().with_precision(precision);
        let mut rng = Rng::new(4);
        perturb(&params, dtype, &mut rng);
        let tokens: Vec<u32> = (0..2 * t).map(|_| rng.below(cfg.classes) as u32).collect();
        let tokens = Tensor::from_vec(tokens, (2, t), &Device::Cpu).unwrap();
        let fused = model.forward(&tokens, None).unwrap();
        let separate = model.blocks(model.embed(&model.shifted(&tokens).unwrap(), 0).unwrap(), None, None).unwrap();
        assert_agree(&params, &fused, &separate, tolerance, &mut rng);
    }

    /// Three classes, a sequence longer than one block of queries and shorter than the context:
    /// the fused pass equals the separate operations in f64, values and gradients.
    #[test]
    fn fused_network_equals_separate_operations() {
        let cfg = Config { classes: 3, dim: 8, heads: 2, layers: 2, mlp: 12, context: 90, fixed_length: false };
        fused_equals_separate(&cfg, 70, DType::F64, Precision::F32, 1e-12);
    }

    /// A token past the classes, or a sequence past the context, is an error, not a wrong read.
    #[test]
    fn out_of_range_inputs_are_refused() {
        let cfg = Config { classes: 3, dim: 8, heads: 2, layers: 1, mlp: 12, context: 10, fixed_length: false };
        let model = Transformer::new(&cfg, Params::new(1).var_builder(DType::F32)).unwrap();
        let tokens = |v: Vec<u32>| Tensor::from_vec(v.clone(), (1, v.len()), &Device::Cpu).unwrap();
        assert!(model.forward(&tokens(vec![0, 2, 1]), None).is_ok());
        let err = model.forward(&tokens(vec![0, 3, 1]), None).unwrap_err().to_string();
        assert!(err.contains("token 3"), "{err}");
        let err = model.forward(&tokens(vec![0; 11]), None).unwrap_err().to_string();
        assert!(err.contains("context of 10"), "{err}");
    }

    /// In bf16 on the AMX unit both make the same products (the separate attention and maps
    /// take the precision too), so they agree closely.
    #[test]
    fn fused_network_in_bf16_equals_separate_operations() {
        if !crate::layers::matmul::amx::available() {
            return;
        }
        let cfg = Config { classes: 2, dim: 32, heads: 2, layers: 2, mlp: 64, context: 80, fixed_length: true };
        fused_equals_separate(&cfg, 80, DType::F32, Precision::Bf16, 1e-3);
    }
}
