//! Checkpoints: a directory holding
//! - `model.safetensors`: the weights, named as each model file documents (a shipping copy
//!   made by `wavegen mnist compact` holds `model.safetensors.gz` instead);
//! - `optimizer.safetensors`: AdamW's moments (`m.NAME`, `v.NAME`), needed only to resume;
//! - `config.json`: the [`Manifest`] — model config, audio settings, file split, training
//!   settings and state (step, data generator, log).
//!
//! Each file is written atomically, config.json last; both safetensors files record the step
//! in their metadata, and loading checks it against config.json, so a checkpoint whose writing
//! was cut short is reported, never silently mixed.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::optim::AdamW;
use super::params::{Params, read_safetensors, safetensors_bytes};
use super::train::{TrainConfig, TrainState};
use crate::data::wav_folder::AudioSettings;
use crate::fsutil::write_bytes_atomically as write;
use crate::models::ModelConfig;
use crate::{Error, Result};

/// The `format` field of every config.json this version writes.
pub const FORMAT: &str = "wavegen-checkpoint/1";
/// The weights file of a checkpoint directory.
pub const MODEL_FILE: &str = "model.safetensors";
/// The gzip-compressed weights file of a shipping copy (read when `MODEL_FILE` is absent).
pub const MODEL_FILE_GZ: &str = "model.safetensors.gz";
const OPTIMIZER_FILE: &str = "optimizer.safetensors";
const MANIFEST_FILE: &str = "config.json";

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
    /// Always [`FORMAT`].
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
}

impl Manifest {
    /// This manifest with the training state and optimizer step count of now (what a
    /// checkpoint written during training records).
    pub fn at(&self, state: &TrainState, optimizer_steps: u64) -> Manifest {
        Manifest { state: state.clone(), optimizer_steps, ..self.clone() }
    }
}

/// Resolves what the user passed as `--checkpoint`: the directory, or a file inside it.
pub fn resolve_dir(path: &Path) -> PathBuf {
    let is_member = path
        .file_name()
        .is_some_and(|n| n == MANIFEST_FILE || n == MODEL_FILE || n == MODEL_FILE_GZ || n == OPTIMIZER_FILE);
    if is_member && path.is_file() {
        path.parent().map(Path::to_path_buf).unwrap_or_default()
    } else {
        path.to_path_buf()
    }
}

/// Reads config.json of the checkpoint directory `dir`.
pub fn read_manifest(dir: &Path) -> Result<Manifest> {
    let dir = resolve_dir(dir);
    if !dir.is_dir() {
        return Err(Error::checkpoint(
            &dir,
            "no such directory (train one with `wavegen train` or `wavegen mnist train`)",
        ));
    }
    let path = dir.join(MANIFEST_FILE);
    let bytes = std::fs::read(&path).map_err(|e| {
        Error::checkpoint(&dir, format!("cannot read {MANIFEST_FILE} ({e}); is this a wavegen checkpoint directory?"))
    })?;
    let manifest: Manifest =
        serde_json::from_slice(&bytes).map_err(|e| Error::Json { path: path.clone(), source: e })?;
    if manifest.format != FORMAT {
        return Err(Error::checkpoint(&path, format!("format {:?}, this wavegen reads {FORMAT:?}", manifest.format)));
    }
    Ok(manifest)
}

/// The weights file of `dir`: `model.safetensors`, or the compressed one of a shipping copy.
pub fn weights_file(dir: &Path) -> PathBuf {
    let dir = resolve_dir(dir);
    let gz = dir.join(MODEL_FILE_GZ);
    if !dir.join(MODEL_FILE).exists() && gz.exists() { gz } else { dir.join(MODEL_FILE) }
}

/// Loads the weights of `dir` into `params` (whose model was built from the manifest).
pub fn load_weights(dir: &Path, manifest: &Manifest, params: &Params) -> Result<()> {
    let path = weights_file(dir);
    let (tensors, meta) = read_safetensors(&path)?;
    check_step(&path, &meta, manifest)?;
    params.assign(&tensors, &path)
}

/// Restores the optimizer moments of `dir`; fails if they are missing (a checkpoint saved
/// without them cannot be resumed exactly).
pub fn load_optimizer(dir: &Path, manifest: &Manifest, opt: &mut AdamW) -> Result<()> {
    let path = resolve_dir(dir).join(OPTIMIZER_FILE);
    let (tensors, meta) = read_safetensors(&path)?;
    check_step(&path, &meta, manifest)?;
    opt.load_state(&tensors, manifest.optimizer_steps)
        .ok_or_else(|| Error::checkpoint(&path, "optimizer state does not match the model's parameters"))
}

fn check_step(path: &Path, meta: &HashMap<String, String>, manifest: &Manifest) -> Result<()> {
    match meta.get("step").map(|s| s.parse::<u64>()) {
        Some(Ok(step)) if step == manifest.state.step => Ok(()),
        Some(Ok(step)) => Err(Error::checkpoint(
            path,
            format!(
                "holds step {step} but config.json says step {}: the checkpoint was interrupted while being written",
                manifest.state.step
            ),
        )),
        _ => Ok(()), // written by another tool: nothing to check against
    }
}

/// Writes the checkpoint directory `dir`: weights, optimizer (if given), then config.json.
pub fn save(dir: &Path, manifest: &Manifest, params: &Params, opt: Option<&AdamW>) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    if let Some(opt) = opt {
        write(&dir.join(OPTIMIZER_FILE), &safetensors_bytes(&opt.state_tensors(), metadata(manifest))?)?;
    }
    write(&dir.join(MODEL_FILE), &safetensors_bytes(&params.tensors(), metadata(manifest))?)?;
    write_manifest(dir, manifest)
}

/// Writes a shipping copy to `dir`: `weights` (named tensors of any float type: loading
/// converts) gzip-compressed, and config.json; no optimizer, so it cannot be resumed.
pub fn save_shipping_copy(dir: &Path, manifest: &Manifest, weights: &[(String, Tensor)]) -> Result<()> {
    use std::io::Write;
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let path = dir.join(MODEL_FILE_GZ);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    let zipped = gz.write_all(&safetensors_bytes(weights, metadata(manifest))?).and_then(|_| gz.finish());
    write(&path, &zipped.map_err(|e| Error::io(&path, e))?)?;
    // An uncompressed file left from before would be read first.
    let stale = dir.join(MODEL_FILE);
    if stale.exists() {
        std::fs::remove_file(&stale).map_err(|e| Error::io(&stale, e))?;
    }
    write_manifest(dir, manifest)
}

fn metadata(manifest: &Manifest) -> HashMap<String, String> {
    HashMap::from([("step".to_string(), manifest.state.step.to_string()), ("format".into(), FORMAT.into())])
}

fn write_manifest(dir: &Path, manifest: &Manifest) -> Result<()> {
    let json = serde_json::to_vec_pretty(manifest).expect("invariant: plain data serialises");
    write(&dir.join(MANIFEST_FILE), &json)
}
