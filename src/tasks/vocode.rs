//! `wavegen vocode`: audio from a log-mel spectrogram with a WaveNet vocoder. The features come
//! from a WAV (copy synthesis: analysed with the vocoder's own settings) or from a `.npy` file
//! `(frames, bands)` made by another tool with the same analysis ([`crate::audio::mel`]). The
//! streaming engine computes each layer's projection once per frame and generates sample by
//! sample. `--compare` measures the result against the original, beside Griffin-Lim from the
//! same features and the μ-law round trip of the original (the best a 256-code model can do).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use super::{AudioModel, Reporter};
use crate::audio::mel::{self, Mel, MelConfig};
use crate::audio::{distortion, griffin_lim, mulaw, npy, resample, spectrogram, wav};
use crate::core::sample::SamplerConfig;
use crate::engine::{self, Engine, Kernels, StreamSpec};
use crate::rng::Rng;
use crate::{Error, Result};

/// Everything `wavegen vocode` needs.
#[derive(Debug, Clone)]
pub struct VocodeOptions {
    /// The vocoder's checkpoint directory.
    pub checkpoint: PathBuf,
    /// WAV files (analysed with the vocoder's settings), folders of them, or `.npy` files of
    /// log-mel features; none: the checkpoint's held-out files.
    pub inputs: Vec<PathBuf>,
    /// The WAV to write for one input; a folder (created if needed) for several, each output
    /// named after its input.
    pub out: PathBuf,
    /// Temperature, top-k, top-p.
    pub sampler: SamplerConfig,
    /// Seed of the sampler.
    pub seed: u64,
    /// Global-conditioning label, for a vocoder that also takes one.
    pub label: Option<String>,
    /// Exact tanh/exp in the engine instead of the fast approximations.
    pub exact: bool,
    /// Measure against the original (a WAV input only), beside Griffin-Lim.
    pub compare: bool,
    /// Griffin-Lim iterations for `compare`.
    pub griffin_lim_iterations: usize,
    /// With `compare`: also draw the original's, Griffin-Lim's and the vocoder's spectrograms,
    /// one above the other, next to each output (`NAME.png`).
    pub spectrograms: bool,
}

/// The distances of one signal from the original.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Distances {
    /// Log-spectral distance, dB.
    pub lsd_db: f64,
    /// Mel-cepstral distortion, dB.
    pub mcd_db: f64,
}

impl Distances {
    fn between(original: &[f32], test: &[f32], cfg: &MelConfig) -> Result<Self> {
        Ok(Distances {
            lsd_db: distortion::log_spectral_distance(original, test, cfg)?,
            mcd_db: distortion::mel_cepstral_distortion(original, test, cfg)?,
        })
    }
}

/// The vocoder against the baselines, each measured against the original with
/// [`MelConfig::measuring`]'s analysis.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    /// The vocoder's output.
    pub wavenet: Distances,
    /// Griffin-Lim from the same features.
    pub griffin_lim: Distances,
    /// The original through μ-law coding and back: the floor for any 256-code model.
    pub mulaw_original: Distances,
    /// Where the Griffin-Lim audio was written.
    pub griffin_lim_out: PathBuf,
}

/// What was made of one input.
#[derive(Debug, Serialize)]
pub struct Vocoded {
    /// The input.
    pub input: PathBuf,
    /// The WAV written.
    pub out: PathBuf,
    /// Frames of features read.
    pub frames: usize,
    /// Samples generated.
    pub samples: usize,
    /// Seconds of audio.
    pub seconds: f64,
    /// Sample rate.
    pub sample_rate: u32,
    /// Samples per wall-clock second, on one core (priming excluded).
    pub samples_per_second: f64,
    /// `samples_per_second` over the sample rate: above 1 is faster than real time.
    pub realtime_factor: f64,
    /// The engine's kernels.
    pub kernels: &'static str,
    /// With `compare`: the distances from the original.
    pub comparison: Option<Comparison>,
}

/// What was made of every input.
#[derive(Debug, Serialize)]
pub struct VocodeSummary {
    /// Per input, in order.
    pub files: Vec<Vocoded>,
    /// Samples per wall-clock second over all inputs, on one core.
    pub samples_per_second: f64,
    /// `samples_per_second` over the sample rate.
    pub realtime_factor: f64,
    /// With `compare`: each distance's mean over the inputs.
    pub mean: Option<MeanComparison>,
    /// With `compare`: the analysis the distances were measured with.
    pub measured_with: Option<MelConfig>,
}

/// Mean distances over several inputs.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct MeanComparison {
    /// The vocoder's.
    pub wavenet: Distances,
    /// Griffin-Lim's.
    pub griffin_lim: Distances,
    /// The μ-law round trip's.
    pub mulaw_original: Distances,
}

impl MeanComparison {
    fn of(all: &[&Comparison]) -> Option<Self> {
        let n = all.len() as f64;
        let mean = |pick: &dyn Fn(&Comparison) -> Distances| Distances {
            lsd_db: all.iter().map(|c| pick(c).lsd_db).sum::<f64>() / n,
            mcd_db: all.iter().map(|c| pick(c).mcd_db).sum::<f64>() / n,
        };
        (!all.is_empty()).then(|| MeanComparison {
            wavenet: mean(&|c| c.wavenet),
            griffin_lim: mean(&|c| c.griffin_lim),
            mulaw_original: mean(&|c| c.mulaw_original),
        })
    }
}

/// The features to vocode: from a WAV (and its samples at the model's rate), or a `.npy`.
pub struct Input {
    /// `(frames, bands)` log-mel features.
    pub mel: Mel,
    /// The original samples at the model's rate (WAV input only).
    pub original: Option<Vec<f32>>,
    /// Samples to generate: the WAV's length, or (frames − 1) · hop for features.
    pub samples: usize,
}

/// Reads `path` as the vocoder's input: a `.npy` of features, or a WAV analysed with `cfg`.
pub fn read_input(path: &Path, cfg: &MelConfig) -> Result<Input> {
    let is_npy = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("npy"));
    if is_npy {
        let a = npy::read(path)?;
        if a.cols != cfg.bands || a.rows < 2 {
            return Err(Error::Config(format!(
                "{}: features of shape ({}, {}); this vocoder reads {} mel bands (FFT {}, hop {}, {}–{} Hz at {} Hz), \
                 at least 2 frames: make them with `wavegen mel --sample-rate {} --n-fft {} --hop {} --mel-bands {}`",
                path.display(),
                a.rows,
                a.cols,
                cfg.bands,
                cfg.n_fft,
                cfg.hop,
                cfg.fmin,
                cfg.fmax,
                cfg.sample_rate,
                cfg.sample_rate,
                cfg.n_fft,
                cfg.hop,
                cfg.bands
            )));
        }
        if let Some(bad) = a.values.iter().position(|v| !v.is_finite()) {
            return Err(Error::Config(format!(
                "{}: value {bad} is not a finite number; features are log-mel values",
                path.display()
            )));
        }
        let samples = (a.rows - 1) * cfg.hop;
        return Ok(Input { mel: Mel { frames: a.rows, bands: a.cols, values: a.values }, original: None, samples });
    }
    let audio = wav::read_mono(path)?;
    let samples = resample::resample(&audio.samples, audio.sample_rate, cfg.sample_rate)?;
    if samples.is_empty() {
        return Err(Error::Config(format!("{}: the file holds no samples", path.display())));
    }
    let mel = mel::log_mel(&samples, cfg)?;
    Ok(Input { mel, samples: samples.len(), original: Some(samples) })
}

/// `out` with `-suffix.ext` in place of its extension.
fn sibling(out: &Path, suffix: &str, ext: &str) -> PathBuf {
    let stem = out.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    out.with_file_name(format!("{stem}{suffix}.{ext}"))
}

/// The vocoder's engine, its streams' conditioning on `input`, and the priming: one receptive
/// field of silence, as training windows start.
pub fn prepare<'e>(
    engine: &'e Engine,
    input: &Input,
    label: u32,
    sampler: &SamplerConfig,
    seed: u64,
) -> Result<engine::Generator<'e>> {
    let local = Arc::new(engine.condition(&input.mel.values, input.mel.frames)?);
    let spec = StreamSpec { sampler: sampler.clone(), rng: Rng::derived(seed, "sample"), label, local: Some(local) };
    let prime = vec![mulaw::silence() as u32; engine.config().receptive_field()];
    engine::Generator::new(engine, vec![spec], &prime, 1)
}

/// The vocoder's settings in a checkpoint, or an error that says it is not one.
pub fn vocoder_settings(m: &AudioModel, checkpoint: &Path) -> Result<MelConfig> {
    m.model.cfg.local.as_ref().map(|l| l.mel.clone()).ok_or_else(|| {
        Error::checkpoint(
            checkpoint,
            "not a vocoder (trained without --condition mel): use `wavegen generate`, or train one with \
             `wavegen train DIR --condition mel`",
        )
    })
}

/// Vocodes every input of `opts`.
pub fn vocode(opts: &VocodeOptions, reporter: &mut dyn Reporter) -> Result<VocodeSummary> {
    opts.sampler.validate()?;
    let m = AudioModel::load(&opts.checkpoint)?;
    let cfg = vocoder_settings(&m, &opts.checkpoint)?;
    let label = m.label_index(opts.label.as_deref())?.unwrap_or(0);
    let inputs = if opts.inputs.is_empty() {
        m.held_out_files()?
    } else {
        let mut files = Vec::new();
        for p in &opts.inputs {
            match p.is_dir() {
                true => files.extend(super::eval::expand_paths(std::slice::from_ref(p))?),
                false => files.push(p.clone()),
            }
        }
        files
    };
    // One input: `out` is its file; several: a folder of them.
    let outs: Vec<PathBuf> = if inputs.len() == 1 && opts.inputs.len() == 1 && !opts.inputs[0].is_dir() {
        vec![opts.out.clone()]
    } else {
        std::fs::create_dir_all(&opts.out).map_err(|e| Error::io(&opts.out, e))?;
        inputs
            .iter()
            .map(|p| opts.out.join(format!("{}.wav", p.file_stem().unwrap_or_default().to_string_lossy())))
            .collect()
    };
    let engine = Engine::new(&m.model, Kernels::detect(), opts.exact)?;
    let (mut files, mut busy, mut made) = (Vec::new(), 0.0, 0usize);
    for (i, (input_path, out)) in inputs.iter().zip(&outs).enumerate() {
        if inputs.len() > 1 {
            reporter.progress("vocoding files", i as u64, inputs.len() as u64);
        }
        let done = vocode_one(opts, &engine, &cfg, label, input_path, out, reporter)?;
        busy += done.samples as f64 / done.samples_per_second;
        made += done.samples;
        files.push(done);
    }
    let samples_per_second = made as f64 / busy.max(1e-9);
    let comparisons: Vec<&Comparison> = files.iter().filter_map(|f| f.comparison.as_ref()).collect();
    Ok(VocodeSummary {
        measured_with: opts.compare.then(|| MelConfig::measuring(cfg.sample_rate)),
        mean: MeanComparison::of(&comparisons),
        samples_per_second,
        realtime_factor: samples_per_second / cfg.sample_rate as f64,
        files,
    })
}

/// Vocodes one input into `out`.
#[allow(clippy::too_many_arguments)]
fn vocode_one(
    opts: &VocodeOptions,
    engine: &Engine,
    cfg: &MelConfig,
    label: u32,
    input_path: &Path,
    out: &Path,
    reporter: &mut dyn Reporter,
) -> Result<Vocoded> {
    let input = read_input(input_path, cfg)?;
    if opts.compare && input.original.is_none() {
        return Err(Error::Config(format!(
            "{}: --compare measures against the original audio: give a WAV, not features",
            input_path.display()
        )));
    }
    let rate = cfg.sample_rate;
    let mut writer = wav::PcmWriter::create(out, rate, 1, input.samples as u64)?;
    let mut generator = prepare(engine, &input, label, &opts.sampler, opts.seed)?;
    let started = Instant::now();
    let mut audio = Vec::with_capacity(if opts.compare { input.samples } else { 0 });
    let mut done = 0;
    while done < input.samples {
        reporter.progress("vocoding", done as u64, input.samples as u64);
        let n = (input.samples - done).min(rate as usize);
        let codes = generator.next_chunk(n).map_err(|e| Error::checkpoint(&opts.checkpoint, e.to_string()))?;
        let chunk: Vec<f32> = codes[0].iter().map(|&c| mulaw::decode(c as u8)).collect();
        writer.write(&[&chunk])?;
        if opts.compare {
            audio.extend_from_slice(&chunk);
        }
        done += n;
    }
    reporter.progress("vocoding", done as u64, input.samples as u64);
    let samples_per_second = input.samples as f64 / started.elapsed().as_secs_f64().max(1e-9);
    writer.finish()?;
    let comparison = match (&input.original, opts.compare) {
        (Some(original), true) => {
            let gl = griffin_lim::from_mel(&input.mel, cfg, input.samples, opts.griffin_lim_iterations, opts.seed)?;
            let griffin_lim_out = sibling(out, "-griffin-lim", "wav");
            wav::write_pcm16(&griffin_lim_out, rate, &[&gl])?;
            if opts.spectrograms {
                spectrogram::write_png_stacked(&sibling(out, "", "png"), &[original, &gl, &audio])?;
            }
            let coded: Vec<f32> = original.iter().map(|&x| mulaw::decode(mulaw::encode(x))).collect();
            let measuring = MelConfig::measuring(rate);
            Some(Comparison {
                wavenet: Distances::between(original, &audio, &measuring)?,
                griffin_lim: Distances::between(original, &gl, &measuring)?,
                mulaw_original: Distances::between(original, &coded, &measuring)?,
                griffin_lim_out,
            })
        }
        _ => None,
    };
    Ok(Vocoded {
        input: input_path.to_path_buf(),
        out: out.to_path_buf(),
        frames: input.mel.frames,
        samples: input.samples,
        seconds: input.samples as f64 / rate as f64,
        sample_rate: rate,
        samples_per_second,
        realtime_factor: samples_per_second / rate as f64,
        kernels: engine.kernels().name,
        comparison,
    })
}
