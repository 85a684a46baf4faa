//! `wavegen generate`: sample audio from a checkpoint, with the cached stepper (or the naive
//! recomputation, for comparison), and write it as WAV.

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{Device, Tensor};
use serde::Serialize;

use super::{AudioModel, Reporter};
use crate::audio::{mulaw, resample, wav};
use crate::core::Autoregressive;
use crate::core::sample::{self, Method, SamplerConfig};
use crate::rng::Rng;
use crate::{Error, Result};

/// Everything `wavegen generate` needs.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// Checkpoint directory.
    pub checkpoint: PathBuf,
    /// Seconds of audio to make.
    pub seconds: f64,
    /// Output WAV (None: keep the audio in memory only).
    pub out: Option<PathBuf>,
    /// Temperature, top-k, top-p.
    pub sampler: SamplerConfig,
    /// Seed of the sampler.
    pub seed: u64,
    /// A WAV whose last receptive field of samples starts the generation.
    pub prime: Option<PathBuf>,
    /// Global-conditioning label.
    pub label: Option<String>,
    /// Recompute the whole receptive field for every sample.
    pub naive: bool,
}

/// What was generated.
#[derive(Debug, Serialize)]
pub struct GenerateSummary {
    /// Where the WAV went.
    pub out: Option<PathBuf>,
    /// Samples generated.
    pub samples: usize,
    /// Seconds of audio.
    pub seconds: f64,
    /// Sample rate.
    pub sample_rate: u32,
    /// Generation speed (samples per wall-clock second, priming excluded).
    pub samples_per_second: f64,
    /// Generation speed over the sample rate: above 1 is faster than real time.
    pub realtime_factor: f64,
    /// "cached" or "naive".
    pub method: &'static str,
    /// The generated audio (not printed).
    #[serde(skip)]
    pub audio: Vec<f32>,
    /// The generated codes (not printed).
    #[serde(skip)]
    pub codes: Vec<u32>,
}

/// Generates audio.
pub fn generate(opts: &GenerateOptions, reporter: &mut dyn Reporter) -> Result<GenerateSummary> {
    opts.sampler.validate()?;
    if !(opts.seconds > 0.0 && opts.seconds.is_finite()) {
        return Err(Error::Config(format!(
            "--seconds must be positive, got {}",
            opts.seconds
        )));
    }
    let m = AudioModel::load(&opts.checkpoint)?;
    let rate = m.audio().settings.sample_rate;
    let label = m.label_index(opts.label.as_deref())?;
    let labels = label.map(|l| Tensor::new(&[l], &Device::Cpu)).transpose()?;
    let rf = m
        .model
        .receptive_field()
        .expect("invariant: WaveNet has a finite receptive field");
    // Start from the end of the prime file, or from silence (training windows start so too).
    let prime: Vec<u32> = match &opts.prime {
        Some(path) => {
            let audio = wav::read_mono(path)?;
            let samples = resample::resample(&audio.samples, audio.sample_rate, rate)?;
            let tail = &samples[samples.len().saturating_sub(rf)..];
            tail.iter().map(|&x| mulaw::encode(x) as u32).collect()
        }
        None => vec![mulaw::silence() as u32; rf],
    };
    let steps = (opts.seconds * rate as f64).round().max(1.0) as usize;
    let method = if opts.naive {
        Method::Naive
    } else {
        Method::Cached
    };
    let mut rng = Rng::derived(opts.seed, "sample");
    let mut primed_at = None;
    let codes = sample::generate(
        &m.model,
        &[prime],
        labels.as_ref(),
        steps,
        &opts.sampler,
        &mut rng,
        method,
        &mut |done| {
            primed_at.get_or_insert_with(Instant::now);
            reporter.progress("generating", done as u64, steps as u64);
        },
    )?
    .remove(0);
    let elapsed = primed_at.map_or(0.0, |t| t.elapsed().as_secs_f64());
    let samples_per_second = steps as f64 / elapsed.max(1e-9);
    let audio: Vec<f32> = codes.iter().map(|&c| mulaw::decode(c as u8)).collect();
    if let Some(out) = &opts.out {
        wav::write_pcm16(out, rate, &[&audio])?;
    }
    Ok(GenerateSummary {
        out: opts.out.clone(),
        samples: steps,
        seconds: steps as f64 / rate as f64,
        sample_rate: rate,
        samples_per_second,
        realtime_factor: samples_per_second / rate as f64,
        method: if opts.naive { "naive" } else { "cached" },
        audio,
        codes,
    })
}
