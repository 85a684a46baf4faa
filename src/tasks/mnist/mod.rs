//! `wavegen mnist …`: the image models on static binarized MNIST. Train (validation NLL every
//! epoch, the best model kept), evaluate (test NLL in nats per image with a confidence
//! interval; MADE's connectivities as an ensemble), sample and complete digits as PNG grids,
//! and score images by their likelihood.
//!
//! A checkpoint directory holds the best model on the validation split; its `last/`
//! subdirectory holds the latest state with the optimizer, which `--resume` continues.

// The commands' shared imports: each submodule takes them with `use super::*`.
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use candle_core::{DType, Tensor};
use serde::Serialize;

use super::Reporter;
use super::run::{self, ImageData, Manifest};
use crate::core::checkpoint::{self, FORMAT};
use crate::core::optim::{AdamW, AdamWConfig};
use crate::core::params::Params;
use crate::core::sample::{self, Method, SamplerConfig};
use crate::core::train::{self, Event, Precision, Stop, TrainConfig, TrainState};
use crate::core::{Autoregressive, Likelihood};
use crate::data::mnist::{self, ImageBatches, Images, PIXELS, Prepare, batch_of};
use crate::models::{Model, ModelConfig};
use crate::rng::Rng;
use crate::{Error, Result};

mod draw;
mod eval;
mod training;

pub use draw::{SampleSummary, complete, sample};
pub use eval::{ImageScore, MnistEvalReport, Split, ensemble_log_probs, eval, log_probs, score};
pub use training::{DEFAULT_LR, MnistTrainOptions, MnistTrainSummary, train};

const LAST: &str = "last";
/// Images sampled together.
const SAMPLING_GROUP: usize = 100;
/// The most images a grid of samples or completions may hold.
const MAX_GRID_IMAGES: usize = 10_000;
/// The most epochs a run may ask for.
const MAX_EPOCHS: u64 = 100_000;

/// Whether a model is of grey levels (a density over dequantised 8-bit MNIST: RNADE) rather
/// than binary pixels.
fn is_grey(model: &ModelConfig) -> bool {
    dequantisation(model.likelihood()).is_some()
}

/// The datasets, as `config.json` names them.
const BINARIZED: &str = "binarized";
const GREY: &str = "grey";
const DYNAMIC: &str = "dynamic";

/// (train, validation, test) of a dataset: static binarized MNIST; grey-level MNIST (the last
/// 10k training images as validation); or, for dynamic binarization, grey-level training
/// images (binarized afresh in each batch) with validation and test binarized once, from a
/// fixed seed.
fn splits(dataset: &str, data_dir: &Path) -> Result<(Images, Images, Images)> {
    match dataset {
        GREY => mnist::grey_splits(data_dir),
        DYNAMIC => {
            let (train, val, test) = mnist::grey_splits(data_dir)?;
            let mut rng = Rng::derived(0, "fixed binarization of the evaluation images");
            let (val, test) = (val.sample_binary(&mut rng), test.sample_binary(&mut rng));
            Ok((train, val, test))
        }
        _ => mnist::binarized(data_dir),
    }
}

fn dataset_of(manifest: &Manifest) -> &str {
    manifest.images.as_ref().map_or(BINARIZED, |i| i.dataset.as_str())
}

/// For a density over dequantised data of L levels, D·ln L: log p(quantised image) =
/// log p(dequantised image) − D·ln L, the density on [0, 1]^D moved to the scale of the 8-bit
/// data, comparable with discrete models. `None` for a categorical model (binary pixels).
fn dequantisation(likelihood: Likelihood) -> Option<f64> {
    match likelihood {
        Likelihood::Categorical => None,
        Likelihood::Density { levels } => Some(PIXELS as f64 * (levels as f64).ln()),
    }
}

/// A trained image model.
pub struct ImageModel {
    /// config.json.
    pub manifest: Manifest,
    /// The network.
    pub model: Model,
    /// Its parameters.
    pub params: Params,
}

impl ImageModel {
    /// Loads the checkpoint directory `dir` (or a file in it).
    pub fn load(dir: &Path) -> Result<Self> {
        let (manifest, model, params) = run::load(dir, |manifest, vb| {
            if manifest.images.is_none() {
                return Err(Error::checkpoint(
                    dir,
                    format!("holds a {} model trained on audio, not an image model", manifest.model.name()),
                ));
            }
            manifest.model.build(vb)
        })?;
        Ok(ImageModel { manifest, model, params })
    }

    /// Loads the raw weights of a resumable checkpoint of a run that averages its weights: the
    /// ones training continues, kept in its optimizer file beside the average that it
    /// validates and keeps (to see what the average gains or, while the weights move fast,
    /// costs).
    pub fn load_raw(dir: &Path) -> Result<Self> {
        let m = Self::load(dir)?;
        if m.manifest.train.adamw.average_decay <= 0.0 {
            return Err(Error::checkpoint(dir, "was trained without weight averaging: its weights are the raw ones"));
        }
        let mut opt = AdamW::new(&m.params, m.manifest.train.adamw.clone())?;
        // Restoring the optimizer sets the parameters to the raw weights it carries.
        run::open(dir)?.load_optimizer(&mut opt).map_err(|e| {
            Error::checkpoint(dir, format!("{e}; the raw weights are kept only in a run's resumable state (its last/)"))
        })?;
        Ok(m)
    }

    /// Images per evaluation pass: the run's training batch size (see [`log_probs`]).
    pub fn eval_chunk(&self) -> usize {
        self.manifest.images.as_ref().map_or(64, |i| i.batch_size)
    }
}

/// Writes a copy of the checkpoint `dir` into `out` for shipping: the weights as f16 (half the
/// bytes; the NLL moves by hundredths of a nat, so evaluate the copy), those that no
/// connectivity uses set to 0 (about half of FVSBN's and MADE's, which the gzip of the weights
/// file then nearly removes), no optimizer state (the copy cannot be resumed), config.json and any
/// train.log. Returns the bytes of the weights before and after.
pub fn compact(dir: &Path, out: &Path) -> Result<(u64, u64)> {
    let m = ImageModel::load(dir)?;
    if checkpoint::resolve_dir(out) == checkpoint::resolve_dir(dir) {
        return Err(Error::Config("--out must differ from --checkpoint (the original stays as it is)".into()));
    }
    let masks = m.model.weight_masks()?;
    let weights = m
        .params
        .tensors()
        .into_iter()
        .map(|(name, t)| {
            let t = match masks.iter().find(|(n, _)| *n == name) {
                Some((_, mask)) => (t * mask)?,
                None => t,
            };
            Ok((name, t.to_dtype(DType::F16)?))
        })
        .collect::<Result<Vec<_>>>()?;
    let _guard = checkpoint::WriteGuard::acquire(out)?;
    checkpoint::save_shipping_copy(out, &m.manifest, &weights)?;
    let dir = checkpoint::resolve_dir(dir);
    let log = dir.join("train.log");
    if log.is_file() {
        let bytes = crate::fsutil::read_regular(&log, 64 << 20)?;
        crate::fsutil::write_bytes_atomically(&out.join("train.log"), &bytes)?;
    }
    let size = |d: &Path| -> Result<u64> {
        let file = run::open(d)?.weights_file();
        Ok(std::fs::metadata(&file).map_err(|e| Error::io(&file, e))?.len())
    };
    Ok((size(&dir)?, size(out)?))
}
