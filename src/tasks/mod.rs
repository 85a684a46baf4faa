//! What the commands do, as library functions: train a WaveNet on a folder, generate audio,
//! score files, describe a checkpoint. Each takes an options struct and a [`Reporter`] for
//! progress, and returns a summary that the CLI prints (or prints as JSON).

use std::path::{Path, PathBuf};

use candle_core::DType;
use serde::Serialize;

use crate::core::checkpoint;
use crate::core::params::Params;
use crate::core::train::Event;
use crate::models::wavenet::WaveNet;
use crate::{Error, Result};

pub mod eval;
pub mod features;
pub mod fetch;
pub mod generate;
pub mod mnist;
pub mod play;
pub mod run;
pub mod train;
pub mod vocode;

pub use run::Manifest;

/// Receives progress from long-running work (the CLI draws progress bars; tests ignore it).
pub trait Reporter {
    /// A line for the user (what was found, kept, dropped, resumed ...).
    fn note(&mut self, message: &str);
    /// `done` of `total` items of a named phase (decoding files, generating samples).
    fn progress(&mut self, phase: &str, done: u64, total: u64);
    /// A training event.
    fn train_event(&mut self, event: &Event);
    /// A one-line live status that replaces the previous one (playback).
    fn live(&mut self, _line: &str) {}
}

/// A reporter that discards everything.
pub struct Silent;

impl Reporter for Silent {
    fn note(&mut self, _: &str) {}
    fn progress(&mut self, _: &str, _: u64, _: u64) {}
    fn train_event(&mut self, _: &Event) {}
}

/// A trained audio model with everything needed to use it.
pub struct AudioModel {
    /// config.json.
    pub manifest: Manifest,
    /// The network.
    pub model: WaveNet,
    /// Its parameters.
    pub params: Params,
}

/// The default real-time model (`checkpoints/default`), compiled into the binary so that
/// `play`, `generate` and `info` work from any directory and after `cargo install`.
pub mod embedded {
    /// Its config.json.
    pub const CONFIG: &[u8] = include_bytes!("../../checkpoints/default/config.json");
    /// Its weights (468 KB).
    pub const WEIGHTS: &[u8] = include_bytes!("../../checkpoints/default/model.safetensors");
    /// How errors and `info` name it.
    pub const NAME: &str = "<embedded default model>";
}

impl AudioModel {
    /// Loads the checkpoint directory `dir` (or a file in it), or the embedded default model.
    pub fn open(dir: Option<&Path>) -> Result<Self> {
        match dir {
            Some(dir) => Self::load(dir),
            None => Self::embedded(),
        }
    }

    /// The default model compiled into the binary.
    pub fn embedded() -> Result<Self> {
        let name = Path::new(embedded::NAME);
        let (manifest, tensors) = checkpoint::from_bytes::<Manifest>(name, embedded::CONFIG, embedded::WEIGHTS)?;
        let cfg = manifest.model.wavenet().ok_or_else(|| Error::checkpoint(name, "not an audio model"))?;
        let params = Params::new(manifest.seed);
        let model = WaveNet::new(cfg, params.var_builder(DType::F32))?;
        params.assign(&tensors, &name.join(checkpoint::MODEL_FILE))?;
        Ok(AudioModel { manifest, model, params })
    }

    /// Loads the checkpoint directory `dir` (or a file in it).
    pub fn load(dir: &Path) -> Result<Self> {
        let (manifest, model, params) = run::load(dir, |manifest, vb| {
            if manifest.audio.is_none() {
                return Err(Error::checkpoint(dir, "not an audio model (no audio settings in config.json)"));
            }
            let cfg = manifest.model.wavenet().ok_or_else(|| {
                Error::checkpoint(
                    dir,
                    format!(
                        "holds a {} model; generate, play and eval run WaveNets (its held-out score is in `wavegen info`)",
                        manifest.model.name()
                    ),
                )
            })?;
            WaveNet::new(cfg, vb)
        })?;
        Ok(AudioModel { manifest, model, params })
    }

    /// The files the model was validated on (held out of its training), or an error that
    /// says where they were expected.
    pub fn held_out_files(&self) -> Result<Vec<PathBuf>> {
        let audio = self.audio();
        let dir = audio.val_dir.as_ref().unwrap_or(&audio.train_dir);
        if !dir.is_dir() {
            return Err(Error::Config(format!(
                "the checkpoint's held-out files are under {}, which is not there: pass the files instead",
                dir.display()
            )));
        }
        Ok(audio.val_files.iter().map(|f| dir.join(f)).collect())
    }

    /// The audio settings.
    pub fn audio(&self) -> &run::AudioData {
        self.manifest.audio.as_ref().expect("invariant: checked at load")
    }

    /// The index of a label name, or an error listing the model's labels.
    pub fn label_index(&self, label: Option<&str>) -> Result<Option<u32>> {
        let labels = &self.audio().labels;
        match label {
            None if labels.is_empty() => Ok(None),
            None => Err(Error::Config(format!("this model is conditioned: pass --label, one of {labels:?}"))),
            Some(_) if labels.is_empty() => {
                Err(Error::Config("this model was trained without labels: drop --label".into()))
            }
            Some(name) => labels
                .iter()
                .position(|l| l == name)
                .map(|i| Some(i as u32))
                .ok_or_else(|| Error::Config(format!("unknown label {name:?}; the model knows {labels:?}"))),
        }
    }
}

/// What `wavegen info` reports.
#[derive(Debug, Serialize)]
pub struct Info {
    /// config.json as saved.
    pub manifest: Manifest,
    /// Trainable scalars.
    pub parameters: usize,
    /// Receptive field in samples (audio models).
    pub receptive_field_samples: Option<usize>,
    /// Receptive field in milliseconds (audio models).
    pub receptive_field_ms: Option<f64>,
    /// Last validation NLL in bits per position (per audio sample, per pixel).
    pub last_val_bits_per_sample: Option<f64>,
}

/// Describes a checkpoint of any model, or (`None`) the embedded default model.
pub fn info(dir: Option<&Path>) -> Result<Info> {
    let (manifest, params) = match dir {
        None => {
            let m = AudioModel::embedded()?;
            (m.manifest, m.params)
        }
        Some(dir) => {
            let (manifest, _model, params) = run::load(dir, |manifest, vb| manifest.model.build(vb))?;
            (manifest, params)
        }
    };
    let rf = manifest.audio.as_ref().and(manifest.model.wavenet()).map(|c| c.receptive_field());
    let rate = manifest.audio.as_ref().map(|a| a.settings.sample_rate as f64);
    Ok(Info {
        parameters: params.count(),
        receptive_field_samples: rf,
        receptive_field_ms: rf.zip(rate).map(|(rf, rate)| 1000.0 * rf as f64 / rate),
        last_val_bits_per_sample: manifest.state.history.last().map(|e| e.val_nats / std::f64::consts::LN_2),
        manifest,
    })
}
