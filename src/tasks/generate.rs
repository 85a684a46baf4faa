//! `wavegen generate`: sample audio from a checkpoint and write it as WAV. Three ways to
//! compute it, giving the same distribution: the streaming engine (default, fastest), the
//! candle stepper (cached queues on tensors) and the naive recomputation of the whole receptive
//! field for every sample (the reference).

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Tensor};
use serde::Serialize;

use super::{AudioModel, Reporter};
use crate::audio::{mulaw, resample, spectrogram, wav};
use crate::core::sample::{self, SamplerConfig};
use crate::engine::{self, Engine, Kernels, StreamSpec};
use crate::rng::Rng;
use crate::{Error, Result};

/// How the logits are computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// The streaming engine (plain f32 kernels).
    #[default]
    Engine,
    /// The candle model's incremental state.
    Stepper,
    /// The candle model's parallel pass over the receptive field, for every sample.
    Naive,
}

/// Everything `wavegen generate` needs.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// Checkpoint directory (None: the embedded default model).
    pub checkpoint: Option<PathBuf>,
    /// Seconds of audio to make.
    pub seconds: f64,
    /// Output WAV (None: keep the audio in memory only). With several streams, one file per
    /// stream (`NAME-0.wav`, …) unless `multichannel`.
    pub out: Option<PathBuf>,
    /// Temperature, top-k, top-p.
    pub sampler: SamplerConfig,
    /// Seed of the sampler; stream i of several uses seed + i.
    pub seed: u64,
    /// A WAV whose last receptive field of samples starts the generation.
    pub prime: Option<PathBuf>,
    /// Global-conditioning label.
    pub label: Option<String>,
    /// How to compute.
    pub method: Method,
    /// Independent streams generated together.
    pub streams: usize,
    /// Write the streams as the channels of one file.
    pub multichannel: bool,
    /// Exact tanh/exp in the engine instead of the fast approximations.
    pub exact: bool,
    /// Also draw a spectrogram (of the first stream) to this PNG.
    pub spectrogram: Option<PathBuf>,
    /// Threads the engine splits the streams over.
    pub threads: usize,
    /// Return the generated codes and audio in the summary (memory grows with seconds ×
    /// streams; without it, generation runs in the memory of one second of audio).
    pub keep: bool,
}

impl GenerateOptions {
    /// Defaults for everything but the checkpoint and length.
    pub fn new(checkpoint: PathBuf, seconds: f64) -> Self {
        GenerateOptions {
            checkpoint: Some(checkpoint),
            seconds,
            out: None,
            sampler: SamplerConfig::default(),
            seed: 0,
            prime: None,
            label: None,
            method: Method::Engine,
            streams: 1,
            multichannel: false,
            exact: false,
            spectrogram: None,
            threads: 1,
            keep: true,
        }
    }
}

/// What was generated.
#[derive(Debug, Serialize)]
pub struct GenerateSummary {
    /// The files written.
    pub out: Vec<PathBuf>,
    /// Samples generated per stream.
    pub samples: usize,
    /// Seconds of audio per stream.
    pub seconds: f64,
    /// Sample rate.
    pub sample_rate: u32,
    /// Streams generated together.
    pub streams: usize,
    /// Samples per wall-clock second over all streams (priming excluded).
    pub samples_per_second: f64,
    /// `samples_per_second` over the sample rate: above 1 is faster than real time.
    pub realtime_factor: f64,
    /// How the logits were computed.
    pub method: Method,
    /// The engine's kernels (for the engine).
    pub kernels: Option<&'static str>,
    /// The generated audio of each stream, when asked to keep it (not printed).
    #[serde(skip)]
    pub audio: Vec<Vec<f32>>,
    /// The generated codes of each stream, when asked to keep them (not printed).
    #[serde(skip)]
    pub codes: Vec<Vec<u32>>,
}

/// `out.wav` → `out-3.wav`.
fn numbered(path: &Path, i: usize) -> PathBuf {
    let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let ext = path.extension().map(|e| format!(".{}", e.to_string_lossy())).unwrap_or_default();
    path.with_file_name(format!("{stem}-{i}{ext}"))
}

/// The longest generation: a day of audio.
pub const MAX_SECONDS: f64 = 86_400.0;
/// The most streams generated together.
pub const MAX_STREAMS: usize = 1024;
/// The candle methods keep every code in memory and are references, not for long audio.
const MAX_REFERENCE_SECONDS: f64 = 60.0;
/// The spectrogram shows at most this much of the first stream.
const MAX_SPECTROGRAM_SECONDS: f64 = 600.0;

/// Where generated chunks go: the WAV files, and what the summary keeps.
struct Sinks {
    writers: Vec<wav::PcmWriter>,
    files: Vec<PathBuf>,
    multichannel: bool,
    keep: Option<Vec<Vec<u32>>>,
    spectrogram: Option<Vec<f32>>,
    spectrogram_limit: usize,
}

impl Sinks {
    fn take(&mut self, codes: &[Vec<u32>]) -> Result<()> {
        if let Some(kept) = &mut self.keep {
            kept.iter_mut().zip(codes).for_each(|(k, c)| k.extend_from_slice(c));
        }
        if self.writers.is_empty() && self.spectrogram.is_none() {
            return Ok(()); // nothing needs the samples
        }
        let audio: Vec<Vec<f32>> = codes.iter().map(|c| c.iter().map(|&x| mulaw::decode(x as u8)).collect()).collect();
        if self.multichannel {
            let channels: Vec<&[f32]> = audio.iter().map(|a| a.as_slice()).collect();
            if let Some(w) = self.writers.first_mut() {
                w.write(&channels)?;
            }
        } else {
            for (w, a) in self.writers.iter_mut().zip(&audio) {
                w.write(&[a])?;
            }
        }
        if let Some(first) = &mut self.spectrogram {
            let room = self.spectrogram_limit.saturating_sub(first.len());
            first.extend_from_slice(&audio[0][..room.min(audio[0].len())]);
        }
        Ok(())
    }
}

/// Generates audio.
pub fn generate(opts: &GenerateOptions, reporter: &mut dyn Reporter) -> Result<GenerateSummary> {
    opts.sampler.validate()?;
    if !(opts.seconds > 0.0 && opts.seconds <= MAX_SECONDS) {
        return Err(Error::Config(format!(
            "--seconds is {}; it must be more than 0 and at most {MAX_SECONDS} (a day)",
            opts.seconds
        )));
    }
    crate::models::within("--streams", opts.streams, 1, MAX_STREAMS)?;
    if opts.method != Method::Engine && opts.seconds > MAX_REFERENCE_SECONDS {
        return Err(Error::Config(format!(
            "--method {:?} is a slow reference: at most {MAX_REFERENCE_SECONDS} s (use the engine for long audio)",
            opts.method
        )));
    }
    let m = AudioModel::open(opts.checkpoint.as_deref())?;
    let source = opts.checkpoint.clone().unwrap_or_else(|| PathBuf::from(super::embedded::NAME));
    let rate = m.audio().settings.sample_rate;
    let label = m.label_index(opts.label.as_deref())?;
    let rf = m.model.cfg.receptive_field();
    // Start from the end of the prime file, or from silence (training windows start so too).
    let prime: Vec<u32> = match &opts.prime {
        Some(path) => {
            let audio = wav::read_mono(path)?;
            let samples = resample::resample(&audio.samples, audio.sample_rate, rate)?;
            samples[samples.len().saturating_sub(rf)..].iter().map(|&x| mulaw::encode(x) as u32).collect()
        }
        None => vec![mulaw::silence() as u32; rf],
    };
    let steps = (opts.seconds * rate as f64).round().max(1.0) as usize;
    let n = opts.streams;

    // The outputs first: a bad path fails before any work is done.
    let mut sinks = Sinks {
        writers: vec![],
        files: vec![],
        multichannel: opts.multichannel && n > 1,
        keep: opts.keep.then(|| vec![Vec::new(); n]),
        spectrogram: opts.spectrogram.as_ref().map(|_| Vec::new()),
        spectrogram_limit: (MAX_SPECTROGRAM_SECONDS * rate as f64) as usize,
    };
    if let Some(out) = &opts.out {
        if n == 1 || opts.multichannel {
            sinks.writers.push(wav::PcmWriter::create(out, rate, n, steps as u64)?);
            sinks.files.push(out.clone());
        } else {
            for i in 0..n {
                let path = numbered(out, i);
                sinks.writers.push(wav::PcmWriter::create(&path, rate, 1, steps as u64)?);
                sinks.files.push(path);
            }
        }
    }

    let mut kernels = None;
    let primed_at;
    match opts.method {
        Method::Engine => {
            let engine = Engine::new(&m.model, Kernels::detect(), opts.exact)?;
            kernels = Some(engine.kernels().name);
            let specs: Vec<StreamSpec> = (0..n)
                .map(|i| StreamSpec {
                    sampler: opts.sampler.clone(),
                    rng: Rng::derived(opts.seed + i as u64, "sample"),
                    label: label.unwrap_or(0),
                    local: None,
                })
                .collect();
            let mut generator = engine::Generator::new(&engine, specs, &prime, opts.threads)?;
            primed_at = Instant::now();
            // One second at a time: memory stays that of one second, whatever the length.
            let chunk = rate as usize;
            let mut done = 0;
            while done < steps {
                reporter.progress("generating", done as u64, steps as u64);
                let len = chunk.min(steps - done);
                let chunk = generator.next_chunk(len).map_err(|e| Error::checkpoint(&source, e.to_string()))?;
                sinks.take(&chunk)?;
                done += len;
            }
        }
        Method::Stepper | Method::Naive => {
            let labels = label.map(|l| Tensor::new(vec![l; n], &Device::Cpu)).transpose()?;
            let method = if opts.method == Method::Naive { sample::Method::Naive } else { sample::Method::Cached };
            let mut rng = Rng::derived(opts.seed, "sample");
            let mut started = None;
            let codes = sample::generate(
                &m.model,
                &vec![prime; n],
                labels.as_ref(),
                steps,
                &opts.sampler,
                &mut rng,
                method,
                &mut |done| {
                    started.get_or_insert_with(Instant::now);
                    reporter.progress("generating", done as u64, steps as u64);
                },
            )?;
            primed_at = started.unwrap_or_else(Instant::now);
            sinks.take(&codes)?;
        }
    }
    reporter.progress("generating", steps as u64, steps as u64);
    let elapsed = primed_at.elapsed().as_secs_f64();
    let samples_per_second = (steps * n) as f64 / elapsed.max(1e-9);
    for w in sinks.writers.drain(..) {
        w.finish()?;
    }
    if let (Some(png), Some(first)) = (&opts.spectrogram, &sinks.spectrogram) {
        spectrogram::write_png(png, first)?;
    }
    let codes = sinks.keep.unwrap_or_default();
    let audio = codes.iter().map(|c| c.iter().map(|&x| mulaw::decode(x as u8)).collect()).collect();
    Ok(GenerateSummary {
        out: sinks.files,
        samples: steps,
        seconds: steps as f64 / rate as f64,
        sample_rate: rate,
        streams: n,
        samples_per_second,
        realtime_factor: samples_per_second / rate as f64,
        method: opts.method,
        kernels,
        audio,
        codes,
    })
}
