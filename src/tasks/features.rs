//! `wavegen mel`: a WAV file's log-mel features (`audio::mel`) written as `.npy`, the format
//! TTS tools exchange, so that features for `vocode` can be made, looked at or compared here.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::Result;
use crate::audio::mel::{MelConfig, log_mel};
use crate::audio::{npy, resample, wav};

/// What to analyse, and how.
#[derive(Debug, Clone)]
pub struct MelOptions {
    /// Resample to this rate first [default: the file's own].
    pub sample_rate: Option<u32>,
    /// FFT size [default: `MelConfig::for_rate`'s].
    pub n_fft: Option<usize>,
    /// Hop [default: a quarter of the FFT size].
    pub hop: Option<usize>,
    /// Bands [default: `MelConfig::for_rate`'s].
    pub bands: Option<usize>,
    /// Lowest filter frequency, Hz [default: 0].
    pub fmin: Option<f64>,
    /// Highest filter frequency, Hz [default: half the rate].
    pub fmax: Option<f64>,
}

/// What was written.
#[derive(Debug, Clone, Serialize)]
pub struct MelSummary {
    /// The `.npy` file.
    pub out: PathBuf,
    /// Its rows.
    pub frames: usize,
    /// The analysis, every parameter.
    pub config: MelConfig,
    /// Seconds of audio analysed.
    pub seconds: f64,
}

/// The analysis parameters `opts` give for audio at `rate`, checked.
pub fn mel_config(rate: u32, opts: &MelOptions) -> Result<MelConfig> {
    let base = MelConfig::for_rate(rate);
    let n_fft = opts.n_fft.unwrap_or(base.n_fft);
    let cfg = MelConfig {
        sample_rate: rate,
        n_fft,
        hop: opts.hop.unwrap_or(n_fft / 4),
        bands: opts.bands.unwrap_or(base.bands),
        fmin: opts.fmin.unwrap_or(base.fmin),
        fmax: opts.fmax.unwrap_or(base.fmax),
    };
    cfg.validate()?;
    Ok(cfg)
}

/// Reads `input` (any WAV: mixed to mono, resampled if asked), and writes its log-mel features
/// `(frames, bands)` to `out` as float32 `.npy`.
pub fn mel(input: &Path, out: &Path, opts: &MelOptions) -> Result<MelSummary> {
    let audio = wav::read_mono(input)?;
    let rate = opts.sample_rate.unwrap_or(audio.sample_rate);
    let cfg = mel_config(rate, opts)?;
    let samples = resample::resample(&audio.samples, audio.sample_rate, rate)?;
    let mel = log_mel(&samples, &cfg)?;
    npy::write(out, &npy::Array2 { rows: mel.frames, cols: mel.bands, values: mel.values })?;
    Ok(MelSummary { out: out.to_path_buf(), frames: mel.frames, config: cfg, seconds: audio.seconds() })
}
