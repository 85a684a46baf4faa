//! Datasets as token sequences. A [`Batch`] is what every model of the core trains on; a
//! [`BatchSource`] hands them to the trainer (random training batches, fixed validation ones).

use candle_core::{Device, Tensor};

use crate::Result;
use crate::layers::dropout::Dropout;
use crate::rng::Rng;

pub mod mnist;
pub mod wav_folder;

/// A batch of token sequences.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Tokens, `(B, T)` u32.
    pub tokens: Tensor,
    /// Which positions count in the loss, `(B, T)` f32 of 0 and 1 (0 for left context that only
    /// gives the model its receptive field, and for padding past the end of a file).
    pub mask: Tensor,
    /// One global-conditioning label per sequence, `(B,)` u32, for models that take one.
    pub labels: Option<Tensor>,
    /// Real values behind the tokens, `(B, T)` f32, for models of real values (RNADE scores
    /// these; the tokens are their quantised levels).
    pub values: Option<Tensor>,
    /// Log-mel features for a vocoder, `(B, ⌈T / hop⌉ + 2c, M)` f32: frames −c to ⌈T / hop⌉ −
    /// 1 + c of each sequence (c the frames its frame network reads on either side), position
    /// t belonging to frame ⌊t / hop⌋.
    pub features: Option<Tensor>,
    /// This training step's dropout, for models that have it; `None` (never drop) when
    /// evaluating.
    pub dropout: Option<Dropout>,
}

impl Batch {
    /// Rows `start .. start + len` of every part.
    pub fn rows(&self, start: usize, len: usize) -> Result<Batch> {
        let part = |t: &Tensor| t.narrow(0, start, len).and_then(|t| t.contiguous());
        Ok(Batch {
            tokens: part(&self.tokens)?,
            mask: part(&self.mask)?,
            labels: self.labels.as_ref().map(part).transpose()?,
            values: self.values.as_ref().map(part).transpose()?,
            features: self.features.as_ref().map(part).transpose()?,
            dropout: self.dropout.map(|d| d.from_sequence(start)),
        })
    }

    /// Builds a batch from rows of equal length.
    pub fn from_rows(
        tokens: &[Vec<u32>],
        mask: &[Vec<f32>],
        labels: Option<Vec<u32>>,
        device: &Device,
    ) -> Result<Self> {
        let (b, t) = (tokens.len(), tokens.first().map_or(0, |r| r.len()));
        let flat_tokens: Vec<u32> = tokens.concat();
        let flat_mask: Vec<f32> = mask.concat();
        Ok(Batch {
            tokens: Tensor::from_vec(flat_tokens, (b, t), device)?,
            mask: Tensor::from_vec(flat_mask, (b, t), device)?,
            labels: labels.map(|l| Tensor::from_vec(l, b, device)).transpose()?,
            values: None,
            features: None,
            dropout: None,
        })
    }

    /// The number of positions that count in the loss.
    pub fn counted_positions(&self) -> Result<f64> {
        Ok(self.mask.sum_all()?.to_scalar::<f32>()? as f64)
    }
}

/// Where the trainer gets its data.
pub trait BatchSource {
    /// A random training batch; all randomness comes from `rng`, so that resuming with the
    /// saved generator continues the same data stream.
    fn train_batch(&mut self, rng: &mut Rng) -> Result<Batch>;
    /// The fixed validation batches (the same ones every time).
    fn val_batches(&self) -> Result<Vec<Batch>>;
}
