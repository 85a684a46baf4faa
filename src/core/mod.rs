//! The generic autoregressive core: every model (WaveNet, and the image models) is a model of
//! token sequences that gives p(x_t | x_<t) for all t in one parallel pass, and the same
//! probabilities one step at a time from an incremental state. The trainer, the sampler, the
//! checkpoints and the property checks are written once against [`Autoregressive`].
//!
//! Conventions: tokens are `u32` in `0..vocab_size()`; `logits[b, t]` scores x_t given the
//! tokens before it (so the model shifts its input internally); a model may take one
//! global-conditioning label per sequence. "Before" is left to right unless the model has
//! another [`Autoregressive::ordering`] (MADE): then `logits[b, order[k]]` depends only on the
//! tokens at `order[..k]`, and the stepper produces the positions in that order.

use candle_core::{D, DType, Tensor};

use crate::Result;
use crate::data::Batch;

pub mod check;
pub mod checkpoint;
pub mod optim;
pub mod params;
pub mod sample;
pub mod train;

/// A model of token sequences.
pub trait Autoregressive {
    /// The incremental state of one batch of sequences being generated.
    type State;

    /// The number of distinct tokens.
    fn vocab_size(&self) -> usize;

    /// How many previous tokens the logits at t depend on: x_{t−R} … x_{t−1} (WaveNet's
    /// receptive field). `None` when they depend on the whole prefix.
    fn dependency_window(&self) -> Option<usize>;

    /// The longest sequence the model can take (an image model's pixels, a transformer's
    /// positions); `None` when any length will do. Apart from [`Autoregressive::dependency_window`]:
    /// a model may depend on the whole prefix and still have a limit, or the reverse.
    fn max_context(&self) -> Option<usize> {
        None
    }

    /// What the model's likelihood is: categorical over its tokens, or a density.
    fn likelihood(&self) -> Likelihood {
        Likelihood::Categorical
    }

    /// The number of distinct global-conditioning labels (0: the model takes none).
    fn num_labels(&self) -> usize {
        0
    }

    /// Logits of every position: tokens `(B, T)` u32, labels `(B,)` u32 → `(B, T, V)`, where
    /// `[b, t]` depends only on `tokens[b, ..t]`.
    fn forward(&self, tokens: &Tensor, labels: Option<&Tensor>) -> Result<Tensor>;

    /// The same logits as [`Autoregressive::forward`] through candle's own operations and
    /// autograd, for a model whose `forward` is a hand-written operation with its own backward
    /// pass (`None` otherwise). The property tests check that both give the same logits and
    /// the same gradients.
    fn forward_reference(&self, _tokens: &Tensor, _labels: Option<&Tensor>) -> Option<Result<Tensor>> {
        None
    }

    /// The order in which positions are generated, when it is not left to right: position
    /// `order[k]` is the k-th.
    fn ordering(&self) -> Option<Vec<usize>> {
        None
    }

    /// How many connectivities (MADE's masks: orderings and hidden-unit degrees) the model
    /// holds: 1 for most models. Training cycles through them; evaluation can average them.
    fn connectivities(&self) -> usize {
        1
    }

    /// Makes connectivity `k` (modulo `connectivities()`) the one `forward`, `start` and
    /// `ordering` use. Part of the model's value, not hidden state: a clone keeps its own.
    fn select_connectivity(&mut self, _k: usize) {}

    /// Whether the model drops units while training (a batch's `dropout`); a model without
    /// dropout ignores it, and the trainer refuses a dropout rate for it.
    fn has_dropout(&self) -> bool {
        false
    }

    /// The NLL in nats of every position of `batch`, `(B, T)`, unmasked. By default the
    /// categorical NLL of the tokens under [`Autoregressive::forward`]; a model of real values
    /// (RNADE) scores `batch.values` with its density instead.
    fn position_nll(&self, batch: &Batch) -> Result<Tensor> {
        token_nll(&self.forward(&batch.tokens, batch.labels.as_ref())?, &batch.tokens)
    }

    /// A fresh state for `batch` sequences.
    fn start(&self, batch: usize, labels: Option<&Tensor>) -> Result<Self::State>;

    /// Advances the state by the previous token of each sequence (`(B,)` u32; `None` at the
    /// first position) and returns the logits of the next one, `(B, V)`.
    fn step(&self, state: &mut Self::State, prev: Option<&Tensor>) -> Result<Tensor>;

    /// Feeds the tokens `(B, T)` into a fresh `state` and returns the logits of the token after
    /// them, `(B, V)`: the same as [`Autoregressive::step`] with `None`, then with each token in
    /// turn (the default), which a model may do in one parallel pass.
    fn prefill(&self, state: &mut Self::State, tokens: &Tensor) -> Result<Tensor> {
        let (_b, len) = tokens.dims2()?;
        let mut logits = self.step(state, None)?;
        for t in 0..len {
            logits = self.step(state, Some(&tokens.narrow(1, t, 1)?.squeeze(1)?.contiguous()?))?;
        }
        Ok(logits)
    }
}

/// What a model's likelihood is over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Likelihood {
    /// A categorical distribution over the `vocab_size()` tokens at each position: its NLL in
    /// nats is the score of the data.
    Categorical,
    /// A density over real values in [0, 1), the data being quantised to `levels` levels and
    /// dequantised with uniform noise (RNADE): the score of the quantised data adds
    /// ln(`levels`) per position to the density's NLL.
    Density {
        /// Quantisation levels of the data.
        levels: usize,
    },
}

/// The NLL in nats of each token under `logits`: `logits (B, T, V)`, `tokens (B, T)` u32 →
/// `(B, T)`.
pub fn token_nll(logits: &Tensor, tokens: &Tensor) -> Result<Tensor> {
    let log_p = candle_nn::ops::log_softmax(logits, D::Minus1)?; // (B, T, V)
    Ok(log_p.gather(&tokens.unsqueeze(2)?.contiguous()?, 2)?.squeeze(2)?.neg()?)
}

/// The summed NLL (a scalar tensor) of the positions of `batch` whose mask is 1, and their
/// number.
pub fn masked_nll_sum<M: Autoregressive + ?Sized>(model: &M, batch: &Batch) -> Result<(Tensor, f64)> {
    let nll = model.position_nll(batch)?;
    let mask = batch.mask.to_dtype(nll.dtype())?;
    let count = mask.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    Ok(((nll * mask)?.sum_all()?, count.max(1.0)))
}

/// The mean NLL in nats over the positions of `batch` whose mask is 1 (the training loss).
pub fn masked_nll<M: Autoregressive + ?Sized>(model: &M, batch: &Batch) -> Result<Tensor> {
    let (sum, count) = masked_nll_sum(model, batch)?;
    Ok((sum / count)?)
}

/// The logits of the next token of each history, recomputed from scratch by the parallel
/// pass over the last `dependency_window` tokens: the slow reference the cached stepper is
/// compared with (`--naive`). All histories must have the same length.
pub fn naive_next_logits<M: Autoregressive + Sync>(
    model: &M,
    histories: &[Vec<u32>],
    labels: Option<&Tensor>,
) -> Result<Tensor> {
    let len = histories.first().map_or(0, |h| h.len());
    if let Some(max) = model.max_context().filter(|&m| len >= m) {
        return Err(crate::Error::Config(format!("a history of {len} tokens leaves no room in a context of {max}")));
    }
    let keep = model.dependency_window().map_or(len, |r| r.min(len));
    // Any token will do in the last slot: logits at the last position never see it.
    let rows: Vec<u32> = histories.iter().flat_map(|h| h[len - keep..].iter().copied().chain([0])).collect();
    let tokens = Tensor::from_vec(rows, (histories.len(), keep + 1), &candle_core::Device::Cpu)?;
    // One shard of the rows per thread, as the trainer runs them (the fused networks run each
    // call on one thread).
    let batch = histories.len();
    let threads = rayon::current_num_threads().clamp(1, batch.max(1));
    let shards = train::shard_bounds(batch, threads);
    let logits = train::in_parallel(&shards, threads, |&(start, n)| -> Result<Tensor> {
        let labels = labels.map(|l| l.narrow(0, start, n)).transpose()?;
        let logits = model.forward(&tokens.narrow(0, start, n)?, labels.as_ref())?; // (n, keep + 1, V)
        Ok(logits.narrow(1, keep, 1)?.squeeze(1)?)
    });
    Ok(Tensor::cat(&logits.into_iter().collect::<Result<Vec<_>>>()?, 0)?)
}
