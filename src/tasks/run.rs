//! A run's record and the one way to open it. [`Manifest`] is the content of a checkpoint's
//! `config.json` for every wavegen model: the model, its audio or image data, the training
//! settings and state. The core's checkpoint machinery (`core::checkpoint`) commits and opens
//! it through [`Record`] without knowing what it holds; this module is where models and data
//! meet it, for `info`, the audio and image commands and both trainers.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::DType;
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use crate::core::checkpoint::{self, FileSum, Record, WriteGuard};
use crate::core::optim::AdamW;
use crate::core::params::Params;
use crate::core::train::{TrainConfig, TrainState};
use crate::data::wav_folder::AudioSettings;
use crate::models::ModelConfig;
use crate::{Error, Result};

/// A committed checkpoint of a wavegen run, opened.
pub type Checkpoint = checkpoint::Checkpoint<Manifest>;

/// Opens the committed checkpoint of `path` (a checkpoint directory, or a file in one) and
/// checks its config.json: format, and every setting within its limits.
pub fn open(path: &Path) -> Result<Checkpoint> {
    checkpoint::open(path)
}

/// Reads config.json of the checkpoint `dir`.
pub fn read_manifest(dir: &Path) -> Result<Manifest> {
    Ok(open(dir)?.manifest)
}

/// The committed checkpoint of `path` with its weights in a model that `build` makes from the
/// manifest: what every command that uses a trained model starts with.
pub fn load<T>(path: &Path, build: impl FnOnce(&Manifest, VarBuilder) -> Result<T>) -> Result<(Manifest, T, Params)> {
    let ckpt = open(path)?;
    let params = Params::new(ckpt.manifest.seed);
    let model = build(&ckpt.manifest, params.var_builder(DType::F32))?;
    ckpt.load_weights(&params)?;
    Ok((ckpt.manifest, model, params))
}

/// A training run's model (made by `build` from the manifest), parameters and optimizer:
/// fresh from the manifest's seed, or with the weights and moments of `resumed`.
pub fn model_and_optimizer<T>(
    manifest: &Manifest,
    resumed: Option<&Checkpoint>,
    build: impl FnOnce(&Manifest, VarBuilder) -> Result<T>,
) -> Result<(T, Params, AdamW)> {
    let params = Params::new(manifest.seed);
    let model = build(manifest, params.var_builder(DType::F32))?;
    let mut opt = AdamW::new(&params, manifest.train.adamw.clone())?;
    if let Some(ckpt) = resumed {
        ckpt.load_weights(&params)?;
        ckpt.load_optimizer(&mut opt)?;
    }
    Ok((model, params, opt))
}

/// Takes `out` for a training run: its write lock, and the checkpoint in `state` (`out` itself,
/// or a folder of it that holds the resumable state) when resuming, `None` for a fresh run.
/// Refuses what would lose work: resuming where nothing is committed (checked before anything
/// is created, so a mistyped path does not become a new run), and a fresh run over a checkpoint
/// or over files that are not one.
pub fn take_for_training(out: &Path, state: &Path, resume: bool) -> Result<(WriteGuard, Option<Checkpoint>)> {
    let nothing_to_resume = || {
        if state != out && checkpoint::exists(out) {
            // A model shipped or kept without its training state (optimizer, step, schedule).
            return Error::checkpoint(
                state,
                "is missing: the model beside it was kept without the state to resume its run; \
                 start a new run with another --out",
            );
        }
        Error::checkpoint(
            state,
            "holds no committed checkpoint to resume: check the path, or drop --resume to start a new run",
        )
    };
    if resume && !checkpoint::exists(state) {
        return Err(nothing_to_resume());
    }
    let guard = WriteGuard::acquire(out)?;
    checkpoint::prepare_for_writing(state);
    let existing = checkpoint::exists(state);
    if state != out && checkpoint::exists(out) && !existing {
        return Err(Error::checkpoint(out, "holds a model but no state to resume: choose another --out"));
    }
    match (existing, resume) {
        (true, true) => Ok((guard, Some(open(state)?))),
        (true, false) => Err(Error::checkpoint(
            out,
            "holds a checkpoint already: pass --resume to continue it, or choose another --out",
        )),
        (false, true) => Err(nothing_to_resume()),
        (false, false) => {
            checkpoint::refuse_foreign_files(out)?;
            Ok((guard, None))
        }
    }
}

/// Where the training audio came from and how it was split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AudioData {
    /// Resampling, trimming and coding settings (the sample rate is the model's).
    pub settings: AudioSettings,
    /// Global-conditioning labels, in the order of their index.
    pub labels: Vec<String>,
    /// The training folder.
    pub train_dir: PathBuf,
    /// The validation folder, when it is not a split of the training folder.
    pub val_dir: Option<PathBuf>,
    /// The fraction of files held out (when `val_dir` is not given).
    pub val_fraction: f64,
    /// Training files, relative to `train_dir`.
    pub train_files: Vec<String>,
    /// Validation files, relative to `val_dir` or `train_dir`.
    pub val_files: Vec<String>,
    /// Target positions per training window (the left context is the receptive field).
    pub window: usize,
    /// Windows per batch.
    pub batch_size: usize,
    /// Validation windows evaluated during training.
    pub max_val_windows: usize,
    /// Speeds at which copies of the training files are trained on too (speed perturbation);
    /// empty: the files as recorded only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub speed_perturbation: Vec<f64>,
}

/// Which image data a model was trained on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageData {
    /// The dataset: `binarized` (static binarized MNIST), `grey` (dequantised grey levels) or
    /// `dynamic` (grey levels binarized afresh in every batch).
    pub dataset: String,
    /// The data folder it was read from.
    pub data_dir: PathBuf,
    /// Images per batch.
    pub batch_size: usize,
    /// Steps per epoch (training images ÷ batch size, rounded up).
    pub steps_per_epoch: u64,
}

/// The content of config.json.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always [`checkpoint::FORMAT`].
    pub format: String,
    /// The model and its hyper-parameters.
    pub model: ModelConfig,
    /// The seed of the initial weights.
    pub seed: u64,
    /// Audio settings and data, for audio models.
    #[serde(default)]
    pub audio: Option<AudioData>,
    /// Image data, for image models.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub images: Option<ImageData>,
    /// Training settings.
    pub train: TrainConfig,
    /// Training state.
    pub state: TrainState,
    /// AdamW's update count.
    pub optimizer_steps: u64,
    /// Length and SHA-256 of each tensor file of the committed folder, by name (absent in
    /// checkpoints written before version 0.2 and by other tools: then nothing is checked).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub files: BTreeMap<String, FileSum>,
}

/// Limits of the data settings of a run (sizes from a flag or a config.json).
const MAX_WINDOW: usize = 1 << 20;
const MAX_BATCH: usize = 4096;
/// A training batch's activations may take at most this many bytes (an estimate).
const MAX_BATCH_BYTES: f64 = 16.0 * (1u64 << 30) as f64;

impl AudioData {
    /// The checks of an audio run of a sequence model other than WaveNet: μ-law codes, no
    /// labels, a window that fits its context, and the attention scores within the memory
    /// limit.
    fn validate_sequence_model(&self, model: &ModelConfig) -> Result<()> {
        let fits = |classes: usize, fixed: Option<usize>| {
            if classes != 256 || fixed.is_some() {
                return Err(Error::Config(format!(
                    "this {} is not a model of μ-law codes (256 classes, any length)",
                    model.name()
                )));
            }
            if !self.labels.is_empty() {
                return Err(Error::Config(format!("a {} takes no labels", model.name())));
            }
            Ok(())
        };
        match model {
            ModelConfig::Lstm(c) | ModelConfig::Gru(c) => fits(c.classes, c.length),
            ModelConfig::Transformer(c) => {
                fits(c.classes, c.fixed_length.then_some(c.context))?;
                if c.context < self.window {
                    return Err(Error::Config(format!(
                        "the transformer's context of {} is shorter than the window of {}",
                        c.context, self.window
                    )));
                }
                // The scores and their softmax, kept for the backward pass.
                let bytes = (self.batch_size * c.layers * c.heads * 2) as f64 * (self.window as f64).powi(2) * 4.0;
                if bytes > MAX_BATCH_BYTES {
                    return Err(Error::Config(format!(
                        "{} windows of {} would hold about {:.1} GiB of attention scores: use a smaller --batch-size or --window",
                        self.batch_size,
                        self.window,
                        bytes / (1u64 << 30) as f64
                    )));
                }
                Ok(())
            }
            _ => Err(Error::Config(format!("a {} is not an audio model", model.name()))),
        }
    }

    /// Checks the data settings of an audio run of `model`.
    pub fn validate(&self, model: &ModelConfig) -> Result<()> {
        use crate::models::within;
        self.settings.validate()?;
        within("--window", self.window, 1, MAX_WINDOW)?;
        within("--batch-size", self.batch_size, 1, MAX_BATCH)?;
        within("--val-windows", self.max_val_windows, 1, 1_000_000)?;
        if !(0.0..1.0).contains(&self.val_fraction) {
            return Err(Error::Config(format!("--val-fraction must be in [0, 1), got {}", self.val_fraction)));
        }
        for &speed in &self.speed_perturbation {
            crate::data::wav_folder::check_speed(speed)?;
            if speed == 1.0 {
                return Err(Error::Config(
                    "--speed-perturbation 1: the files as recorded are always trained on; list only other speeds"
                        .into(),
                ));
            }
        }
        let Some(cfg) = model.wavenet() else {
            return self.validate_sequence_model(model);
        };
        if cfg.classes != 256 {
            return Err(Error::Config(format!("an audio WaveNet has 256 classes (μ-law codes), not {}", cfg.classes)));
        }
        if cfg.num_labels != self.labels.len() {
            return Err(Error::Config(format!(
                "the model has {} labels but {} label names are listed",
                cfg.num_labels,
                self.labels.len()
            )));
        }
        // What one training step holds for the backward pass, about: per position and layer
        // the input, pre-activation, gate output and skip, then the head.
        let positions = (self.batch_size * (self.window + cfg.receptive_field())) as f64;
        let (c, g, sk, h) = (cfg.residual_channels, cfg.gate_channels, cfg.skip_channels, cfg.head_channels);
        let per_position = (cfg.layers() * 3 * (c + 3 * g + sk) + 3 * (sk + h + 2 * cfg.classes)) as f64;
        let bytes = positions * per_position * 4.0;
        if bytes > MAX_BATCH_BYTES {
            return Err(Error::Config(format!(
                "a training batch of {} windows of {} + {} samples would need about {:.0} GiB: lower --batch-size or --window, or use a smaller model",
                self.batch_size,
                cfg.receptive_field(),
                self.window,
                bytes / (1u64 << 30) as f64
            )));
        }
        Ok(())
    }
}

impl ImageData {
    /// Checks the data settings of an image run.
    pub fn validate(&self) -> Result<()> {
        if !["binarized", "grey", "dynamic"].contains(&self.dataset.as_str()) {
            return Err(Error::Config(format!(
                "dataset {:?}: expected \"binarized\", \"grey\" or \"dynamic\"",
                self.dataset
            )));
        }
        crate::models::within("--batch-size", self.batch_size, 1, 100_000)?;
        Ok(())
    }
}

impl Manifest {
    /// Checks every setting against its limit, before anything is built from it.
    pub fn validate(&self) -> Result<()> {
        self.model.validate()?;
        self.train.validate()?;
        match (&self.audio, &self.images) {
            (Some(audio), None) => {
                audio.validate(&self.model)?;
                if audio.train_files.is_empty() || audio.val_files.is_empty() {
                    return Err(Error::Config("train_files or val_files is empty: the file split is lost".into()));
                }
            }
            (None, Some(images)) => {
                images.validate()?;
                let Some(pixels) = self.model.sequence_len() else {
                    return Err(Error::Config(format!(
                        "a {} is an audio model, but images are given",
                        self.model.name()
                    )));
                };
                let mnist = crate::data::mnist::PIXELS;
                if pixels != mnist {
                    return Err(Error::Config(format!("an MNIST model has {mnist} pixels, not {pixels}")));
                }
            }
            (Some(_), Some(_)) => return Err(Error::Config("both audio and images are given".into())),
            (None, None) => return Err(Error::Config("neither audio nor images are given".into())),
        }
        Ok(())
    }

    /// This manifest with the training state and optimizer step count of now (what a
    /// checkpoint written during training records).
    pub fn at(&self, state: &TrainState, optimizer_steps: u64) -> Manifest {
        Manifest { state: state.clone(), optimizer_steps, ..self.clone() }
    }
}

impl Record for Manifest {
    fn format(&self) -> &str {
        &self.format
    }

    fn step(&self) -> u64 {
        self.state.step
    }

    fn optimizer_steps(&self) -> u64 {
        self.optimizer_steps
    }

    fn files(&self) -> &BTreeMap<String, FileSum> {
        &self.files
    }

    fn set_files(&mut self, files: BTreeMap<String, FileSum>) {
        self.files = files;
    }

    fn validate(&self) -> Result<()> {
        Manifest::validate(self)
    }
}
