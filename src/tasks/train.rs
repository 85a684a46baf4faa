//! `wavegen train`: a WaveNet on a folder of WAV files, with a file-level validation split,
//! periodic checkpoints and exact resume.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use serde::Serialize;

use super::Reporter;
use super::run::{self, AudioData, Manifest};
use crate::audio::mel::MelConfig;
use crate::core::Autoregressive;
use crate::core::checkpoint::{self, FORMAT};
use crate::core::optim::AdamW;
use crate::core::train::{self, Precision, Stop, TrainConfig, TrainState};
use crate::data::wav_folder::{AudioBatches, AudioSettings, Corpus, SAMPLES_PER_STEP, split_by_name};
use crate::models::wavenet::{self, LocalConfig};
use crate::models::{ModelConfig, Settings};
use crate::{Error, Result};

/// A vocoder's conditioning: the features and the frame network that reads them.
#[derive(Debug, Clone)]
pub struct VocoderOptions {
    /// The log-mel analysis of the audio.
    pub mel: MelConfig,
    /// Channels of the frame network.
    pub channels: usize,
    /// Rows the frame network gives each frame (dividing the hop): 1 repeats one row over the
    /// hop; K is a learned upsampling by K before the repeat.
    pub subframes: usize,
    /// Frames the frame network reads on either side of each frame (its look-ahead).
    pub context: usize,
    /// Channels of the frame network's hidden layer; 0 for none.
    pub hidden: usize,
}

impl VocoderOptions {
    /// The conditioning these options ask for, standardising with `mean` and `deviation`.
    fn local(&self, mean: Vec<f32>, deviation: Vec<f32>) -> LocalConfig {
        let VocoderOptions { mel, channels, subframes, context, hidden } = self.clone();
        LocalConfig { mel, channels, subframes, context, hidden, mean, deviation }
    }

    /// Checks the frame network's settings before any audio is read.
    fn validate(&self) -> Result<()> {
        let bands = self.mel.bands;
        self.local(vec![0.0; bands], vec![1.0; bands]).validate()
    }
}

/// Everything `wavegen train` needs.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// Folder of WAV files (searched recursively). Required for a new run; on resume, `None`
    /// uses the checkpoint's folder and `Some` replaces it (the folder moved).
    pub data_dir: Option<PathBuf>,
    /// Optional separate validation folder.
    pub val_dir: Option<PathBuf>,
    /// Fraction of files held out when there is no validation folder.
    pub val_fraction: f64,
    /// Checkpoint directory.
    pub out: PathBuf,
    /// Continue the checkpoint in `out` if there is one.
    pub resume: bool,
    /// The model (ignored when resuming: the checkpoint's config is used).
    pub model: AudioModelSpec,
    /// Condition on first-level subfolder names.
    pub labels: bool,
    /// Train a vocoder: condition a WaveNet on log-mel features of its audio (ignored when
    /// resuming).
    pub condition: Option<VocoderOptions>,
    /// Audio preprocessing (ignored when resuming).
    pub audio: AudioSettings,
    /// Optimisation settings (on resume only `max_minutes` is taken from here).
    pub train: TrainConfig,
    /// On resume: train until this step in total (`None`: to the run's own end).
    pub change_steps: Option<u64>,
    /// On resume: move the end of the cosine decay here (a warm restart that extends training).
    pub reschedule_decay: Option<u64>,
    /// On resume: switch the precision of the products to this.
    pub change_precision: Option<Precision>,
    /// On resume: a new decay for the moving average of the weights (0 turns it off).
    pub change_average: Option<f64>,
    /// Speeds at which copies of the training files are trained on too (`None`: none for a new
    /// run, the checkpoint's on resume; on resume an empty list turns them off).
    pub speed_perturbation: Option<Vec<f64>>,
    /// Target samples per training window [default: for the data, `Corpus::default_window`].
    pub window: Option<usize>,
    /// Windows per batch.
    pub batch_size: Option<usize>,
    /// Validation windows per evaluation.
    pub max_val_windows: usize,
    /// Seed of the weights and of the data order.
    pub seed: u64,
    /// Where decoded corpora are cached.
    pub cache_dir: PathBuf,
}

/// Which model `wavegen train` trains.
#[derive(Debug, Clone)]
pub enum AudioModelSpec {
    /// A WaveNet of these settings.
    Wavenet(wavenet::Config),
    /// A sequence model of the registry (`lstm`, `gru`, `transformer`), configured from these
    /// settings once the training window is known (a transformer's context is the window).
    Sequence {
        /// Its name.
        name: String,
        /// Its settings from the command line.
        settings: Settings,
    },
}

impl AudioModelSpec {
    fn config(&self, window: usize) -> Result<ModelConfig> {
        match self {
            AudioModelSpec::Wavenet(cfg) => Ok(ModelConfig::Wavenet(wavenet::Config { num_labels: 0, ..cfg.clone() })),
            AudioModelSpec::Sequence { name, settings } => ModelConfig::audio(name, window, settings),
        }
    }
}

/// What a training run did.
#[derive(Debug, Serialize)]
pub struct TrainSummary {
    /// The checkpoint directory.
    pub checkpoint: PathBuf,
    /// Steps done in total.
    pub steps: u64,
    /// Why it stopped.
    pub stopped: Stop,
    /// Last validation NLL, nats per sample.
    pub val_nats: Option<f64>,
    /// Last validation NLL, bits per sample.
    pub val_bits_per_sample: Option<f64>,
    /// Best validation NLL so far, bits per sample.
    pub best_val_bits_per_sample: Option<f64>,
    /// Training seconds in total.
    pub seconds: f64,
    /// Trainable scalars.
    pub parameters: usize,
    /// Receptive field in samples (0: the model reads the whole window, no more).
    pub receptive_field: usize,
}

fn open_corpus(
    dir: &Path,
    settings: &AudioSettings,
    mel: Option<&MelConfig>,
    cache: &Path,
    reporter: &mut dyn Reporter,
) -> Result<Corpus> {
    let corpus = Corpus::open_with_features(dir, settings, mel, cache, &mut |done, total| {
        reporter.progress(if mel.is_some() { "decoding, features" } else { "decoding" }, done as u64, total as u64)
    })?;
    let r = &corpus.report;
    reporter.note(&format!(
        "{}: {} of {} files kept, {:.1} s of audio at {} Hz ({:.1} s of leading/trailing silence trimmed), {} dropped",
        dir.display(),
        corpus.files.len(),
        r.found,
        r.kept_seconds,
        settings.sample_rate,
        r.trimmed_seconds,
        r.dropped.len()
    ));
    for (file, why) in r.dropped.iter().take(10) {
        reporter.note(&format!("  dropped {file}: {why}"));
    }
    if r.dropped.len() > 10 {
        reporter.note(&format!("  ... and {} more dropped", r.dropped.len() - 10));
    }
    Ok(corpus)
}

/// The training folder played `speed` times faster (see [`Corpus::open_at_speed`]).
fn open_copy(
    dir: &Path,
    settings: &AudioSettings,
    mel: Option<&MelConfig>,
    speed: f64,
    cache: &Path,
    reporter: &mut dyn Reporter,
) -> Result<Corpus> {
    let what = format!("speed {speed}");
    let corpus = Corpus::open_at_speed(dir, settings, mel, speed, cache, &mut |done, total| {
        reporter.progress(&what, done as u64, total as u64)
    })?;
    reporter.note(&format!(
        "{} at speed {speed}: {} files, {:.1} s of audio",
        dir.display(),
        corpus.files.len(),
        corpus.report.kept_seconds
    ));
    Ok(corpus)
}

fn indices_of(corpus: &Corpus, names: &[String]) -> Result<Vec<usize>> {
    names
        .iter()
        .map(|n| {
            corpus.files.iter().position(|f| &f.name == n).ok_or_else(|| {
                Error::Config(format!(
                    "{n}: in the checkpoint's file split but no longer usable under {}: restore it, or train a new checkpoint",
                    corpus.root.display()
                ))
            })
        })
        .collect()
}

/// Trains (or resumes) a WaveNet or a sequence model; `stop` is raised by Ctrl-C.
pub fn train(opts: &TrainOptions, reporter: &mut dyn Reporter, stop: &AtomicBool) -> Result<TrainSummary> {
    let (_guard, resumed) = run::take_for_training(&opts.out, &opts.out, opts.resume)?;
    let existing = resumed.is_some();
    // The run's settings: from the checkpoint when resuming, from the options otherwise.
    let (mut manifest, resumed) = if let Some(ckpt) = resumed {
        let mut m = ckpt.manifest.clone();
        match opts.change_steps {
            Some(steps) => m.train.max_steps = steps,
            // Asked to go on with no new end, a finished run has nothing to do: say how to extend it.
            // (An explicit end already reached is done, not an error, so resuming is idempotent.)
            None if m.state.step >= m.train.max_steps => {
                return Err(Error::Config(format!(
                    "{} has trained all {} of its steps: pass --steps N, more than {}, to train on",
                    opts.out.display(),
                    m.train.max_steps,
                    m.state.step
                )));
            }
            None => {}
        }
        m.train.max_minutes = opts.train.max_minutes;
        if let Some(decay_steps) = opts.reschedule_decay {
            m.train.decay_steps = decay_steps;
        }
        if let Some(precision) = opts.change_precision.filter(|&p| p != m.train.precision) {
            reporter.note(&format!("precision: {precision} (the run had {})", m.train.precision));
            m.train.precision = precision;
        }
        if let Some(d) = opts.change_average.filter(|&d| d != m.train.adamw.average_decay) {
            reporter.note(&format!("weights averaged with decay {d} (the run had {})", m.train.adamw.average_decay));
            m.train.adamw.average_decay = d;
        }
        m.train.validate()?;
        let Some(audio) = m.audio.as_mut() else {
            return Err(Error::checkpoint(&opts.out, "not an audio checkpoint: resume it with `wavegen mnist train`"));
        };
        if let Some(speeds) = opts.speed_perturbation.as_ref().filter(|&s| s != &audio.speed_perturbation) {
            reporter.note(&format!("speed perturbation: {speeds:?} (the run had {:?})", audio.speed_perturbation));
            audio.speed_perturbation = speeds.clone();
        }
        match &opts.data_dir {
            Some(dir) if !same_folder(dir, &audio.train_dir) => {
                reporter.note(&format!(
                    "training folder: {} (the checkpoint had {})",
                    dir.display(),
                    audio.train_dir.display()
                ));
                audio.train_dir = absolute(dir);
            }
            Some(_) => {}
            None if !audio.train_dir.is_dir() => {
                return Err(Error::Config(format!(
                    "the checkpoint's training folder {} is not there (moved, or relative to where training started): pass the folder as DIR",
                    audio.train_dir.display()
                )));
            }
            None => {}
        }
        reporter.note(&format!("resuming {} at step {}", opts.out.display(), m.state.step));
        (m, Some(ckpt))
    } else {
        (new_manifest(opts)?, None)
    };
    let audio = manifest.audio.clone().expect("invariant: audio manifest");
    // A vocoder's features: the checkpoint's analysis when resuming, the options' otherwise.
    let mel = match (existing, &manifest.model) {
        (true, ModelConfig::Wavenet(cfg)) => cfg.local.as_ref().map(|l| l.mel.clone()),
        (true, _) => None,
        (false, _) => opts.condition.as_ref().map(|v| v.mel.clone()),
    };
    if mel.is_some() && !matches!(opts.model, AudioModelSpec::Wavenet(_)) && !existing {
        return Err(Error::Config("--condition mel conditions a WaveNet (a vocoder); use --model wavenet".into()));
    }
    if let (false, Some(vocoder)) = (existing, &opts.condition) {
        vocoder.validate()?;
    }
    let train_corpus = open_corpus(&audio.train_dir, &audio.settings, mel.as_ref(), &opts.cache_dir, reporter)?;
    let val_corpus = match &audio.val_dir {
        Some(dir) => Some(open_corpus(dir, &audio.settings, mel.as_ref(), &opts.cache_dir, reporter)?),
        None => None,
    };
    // The file split: computed once, then always read back from the checkpoint.
    let (train_files, val_files) = if existing {
        (
            indices_of(&train_corpus, &audio.train_files)?,
            indices_of(val_corpus.as_ref().unwrap_or(&train_corpus), &audio.val_files)?,
        )
    } else {
        split(&train_corpus, val_corpus.as_ref(), audio.val_fraction)?
    };
    let val = val_corpus.as_ref().unwrap_or(&train_corpus);
    // Copies of the training folder at other speeds (the validation files are left out of them
    // by name, in `AudioBatches`).
    let copies = audio
        .speed_perturbation
        .iter()
        .map(|&speed| open_copy(&audio.train_dir, &audio.settings, mel.as_ref(), speed, &opts.cache_dir, reporter))
        .collect::<Result<Vec<Corpus>>>()?;
    let mut audio = audio;
    audio.train_files = train_files.iter().map(|&i| train_corpus.files[i].name.clone()).collect();
    audio.val_files = val_files.iter().map(|&i| val.files[i].name.clone()).collect();
    if !existing && (opts.window.is_none() || opts.batch_size.is_none()) {
        audio.window = opts.window.unwrap_or_else(|| {
            // A vocoder's windows are whole frames.
            let w = train_corpus.default_window(&train_files);
            mel.as_ref().map_or(w, |m| w.div_ceil(m.hop) * m.hop)
        });
        audio.batch_size = opts.batch_size.unwrap_or((SAMPLES_PER_STEP / audio.window).max(1));
        reporter.note(&format!(
            "windows: {} × {} target samples per step (chosen for the files; set --window and --batch-size to change)",
            audio.batch_size, audio.window
        ));
    }
    if !existing {
        manifest.model = opts.model.config(audio.window)?;
        if let (Some(vocoder), ModelConfig::Wavenet(cfg)) = (&opts.condition, &mut manifest.model) {
            let (mean, deviation) =
                train_corpus.feature_statistics(&train_files).expect("invariant: opened with features");
            cfg.local = Some(vocoder.local(mean, deviation));
            reporter.note(&format!("vocoder: {}", cfg.local.as_ref().expect("invariant: just set").describe()));
        }
    }
    if !existing && opts.labels {
        if manifest.model.wavenet().is_none() {
            return Err(Error::Config(format!(
                "--labels conditions a WaveNet; a {} takes no labels",
                manifest.model.name()
            )));
        }
        audio.labels = train_corpus.labels();
        if audio.labels.is_empty() {
            return Err(Error::Config(format!(
                "--labels: no subfolders under {}: put each label's files in a folder named after it",
                audio.train_dir.display()
            )));
        }
        if let ModelConfig::Wavenet(cfg) = &mut manifest.model {
            cfg.num_labels = audio.labels.len();
        }
    }
    reporter.note(&format!(
        "split: {} training files ({:.1} s), {} validation files ({:.1} s)",
        train_files.len(),
        train_corpus.seconds(&train_files, audio.settings.sample_rate),
        val_files.len(),
        val.seconds(&val_files, audio.settings.sample_rate)
    ));
    manifest.audio = Some(audio.clone());
    manifest.validate()?;

    // Model and optimizer, fresh or restored.
    let (mut model, params, mut opt) = run::model_and_optimizer(&manifest, resumed.as_ref(), |m, vb| {
        Ok(m.model.build(vb)?.with_precision(m.train.precision))
    })?;
    // WaveNet's windows carry its receptive field as context; the other models read each
    // window from its start.
    let receptive_field = model.dependency_window().unwrap_or(0);
    match manifest.model.wavenet() {
        Some(cfg) => reporter.note(&format!(
            "WaveNet: {} layers, {} parameters, receptive field {} samples ({:.0} ms), {}",
            cfg.layers(),
            params.count(),
            receptive_field,
            1000.0 * receptive_field as f64 / audio.settings.sample_rate as f64,
            manifest.train.precision.products_here()
        )),
        None => reporter.note(&format!(
            "{}: {} parameters, reading each window of {} samples from its start",
            manifest.model.name(),
            params.count(),
            audio.window
        )),
    }
    let label_names = (!audio.labels.is_empty()).then_some(audio.labels.as_slice());
    let mut batches = AudioBatches::new(
        &train_corpus,
        train_files,
        &copies.iter().collect::<Vec<_>>(),
        val,
        val_files,
        receptive_field,
        audio.window,
        audio.batch_size,
        audio.max_val_windows,
        label_names,
    )?
    .frame_context(manifest.model.wavenet().and_then(|w| w.local.as_ref()).map_or(1, |l| l.context));

    let mut state = manifest.state.clone();
    let train_cfg = manifest.train.clone();
    let out = opts.out.clone();
    let mut save = |state: &TrainState, opt: &AdamW| -> Result<()> {
        checkpoint::save(&out, &manifest.at(state, opt.t), &params, Some(opt))
    };
    let stopped = train::train(
        &mut model,
        &mut opt,
        &mut batches,
        &train_cfg,
        &mut state,
        &mut save,
        &mut |e| reporter.train_event(&e),
        stop,
    )?;
    let val_nats = state.history.last().map(|e| e.val_nats);
    let bits = |n: f64| n / std::f64::consts::LN_2;
    Ok(TrainSummary {
        checkpoint: opts.out.clone(),
        steps: state.step,
        stopped,
        val_nats,
        val_bits_per_sample: val_nats.map(bits),
        best_val_bits_per_sample: state.best_val_nats.map(bits),
        seconds: state.seconds,
        parameters: params.count(),
        receptive_field,
    })
}

/// The absolute form of `dir` (so that a checkpoint can be resumed from any directory).
fn absolute(dir: &Path) -> PathBuf {
    dir.canonicalize().or_else(|_| std::path::absolute(dir)).unwrap_or_else(|_| dir.to_path_buf())
}

fn same_folder(a: &Path, b: &Path) -> bool {
    matches!((a.canonicalize(), b.canonicalize()), (Ok(a), Ok(b)) if a == b)
}

fn new_manifest(opts: &TrainOptions) -> Result<Manifest> {
    let data_dir = opts.data_dir.as_deref().ok_or_else(|| Error::Config("no training folder given".into()))?;
    opts.train.validate()?;
    let manifest = Manifest {
        format: FORMAT.into(),
        model: opts.model.config(opts.window.unwrap_or(SAMPLES_PER_STEP))?,
        seed: opts.seed,
        audio: Some(AudioData {
            settings: opts.audio.clone(),
            labels: vec![],
            train_dir: absolute(data_dir),
            val_dir: opts.val_dir.as_deref().map(absolute),
            val_fraction: opts.val_fraction,
            train_files: vec![],
            val_files: vec![],
            // Until the folder is read (then `Corpus::default_window`).
            window: opts.window.unwrap_or(SAMPLES_PER_STEP),
            batch_size: opts.batch_size.unwrap_or(1),
            max_val_windows: opts.max_val_windows,
            speed_perturbation: opts.speed_perturbation.clone().unwrap_or_default(),
        }),
        images: None,
        train: opts.train.clone(),
        state: TrainState::new(opts.seed),
        optimizer_steps: 0,
        files: Default::default(),
    };
    // Labels and the file split are filled in once the folder is read; the rest is checked now.
    manifest.model.validate()?;
    manifest.audio.as_ref().expect("invariant: just made").validate(&manifest.model)?;
    Ok(manifest)
}

fn split(train: &Corpus, val: Option<&Corpus>, fraction: f64) -> Result<(Vec<usize>, Vec<usize>)> {
    match val {
        Some(v) => Ok(((0..train.files.len()).collect(), (0..v.files.len()).collect())),
        None => {
            let names: Vec<&str> = train.files.iter().map(|f| f.name.as_str()).collect();
            split_by_name(&names, fraction)
        }
    }
}
