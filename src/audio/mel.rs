//! Log-mel spectrograms: the features a vocoder is conditioned on. Every parameter is in
//! [`MelConfig`] (stored in a vocoder's checkpoint), and the analysis is exactly this, so that
//! another tool can produce the same features:
//!
//! - **Frames.** Frame `f` (from 0 to `⌊N / hop⌋`, for N samples) is centred on sample `f · hop`:
//!   it reads samples `f · hop − n_fft/2 … f · hop + n_fft/2 − 1`, zeros outside the signal
//!   (librosa's `center=True` with `pad_mode="constant"`).
//! - **Spectrum.** A periodic Hann window `w[n] = 0.5 − 0.5 cos(2πn / n_fft)`, the real FFT, and
//!   the magnitude `|X_k|` of bins `k = 0 … n_fft/2` (not the power).
//! - **Mel filters.** The HTK mel scale `mel(f) = 2595 log₁₀(1 + f / 700)`. Band `m` (0 … bands
//!   − 1) is the triangle over the mel points `p_m, p_{m+1}, p_{m+2}` of `bands + 2` points
//!   spaced evenly in mel from `mel(fmin)` to `mel(fmax)`: weight 0 at its two outer corners, 1
//!   at the centre, linear in hertz between, at bin frequencies `f_k = k · rate / n_fft`
//!   (librosa's `filters.mel(htk=True, norm=None)`).
//! - **Compression.** `ln(max(Σ_k weight_mk |X_k|, 1e-5))`, the natural log.
//!
//! The features are `(frames, bands)`, row-major. A model standardises them itself (per band,
//! with the training corpus's mean and deviation), so files hold the plain log-mel values.

use realfft::RealFftPlanner;
use realfft::num_complex::Complex32;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The floor under the mel magnitudes before the log (−11.5 after it).
pub const FLOOR: f32 = 1e-5;

/// The analysis parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MelConfig {
    /// Samples per second of the audio analysed.
    pub sample_rate: u32,
    /// FFT size and window length, in samples.
    pub n_fft: usize,
    /// Samples between frames.
    pub hop: usize,
    /// Mel bands.
    pub bands: usize,
    /// Lowest frequency of the filters, Hz.
    pub fmin: f64,
    /// Highest frequency of the filters, Hz (at most half the sample rate).
    pub fmax: f64,
}

impl MelConfig {
    /// The defaults for `sample_rate`: a window of about 64 ms (a power of two), a hop of a
    /// quarter of it, 80 bands from 0 Hz to half the rate (64 below 16 kHz, where 80 bands
    /// would be narrower than an FFT bin at the bottom).
    pub fn for_rate(sample_rate: u32) -> Self {
        let n_fft = (sample_rate as usize * 64 / 1000).next_power_of_two().max(64);
        MelConfig {
            sample_rate,
            n_fft,
            hop: n_fft / 4,
            bands: if sample_rate >= 16_000 { 80 } else { 64 },
            fmin: 0.0,
            fmax: sample_rate as f64 / 2.0,
        }
    }

    /// The analysis `vocode --compare` measures distances with: 40 bands over the whole band,
    /// a window of about 32 ms (a power of two) and a hop of 5 ms, the usual frame rate of
    /// mel-cepstral distortion. Deliberately not a vocoder's own analysis: Griffin-Lim fits the
    /// magnitudes of that one by construction, so measuring with it would favour Griffin-Lim.
    pub fn measuring(sample_rate: u32) -> Self {
        let n_fft = (sample_rate as usize * 32 / 1000).next_power_of_two().max(64);
        MelConfig {
            sample_rate,
            n_fft,
            hop: (sample_rate as usize / 200).clamp(1, n_fft),
            bands: 40.min(n_fft / 4),
            fmin: 0.0,
            fmax: sample_rate as f64 / 2.0,
        }
    }

    /// Checks the parameters, and that every band has at least one FFT bin with a weight.
    pub fn validate(&self) -> Result<()> {
        let bad = |why: String| Err(Error::Config(format!("mel features: {why}")));
        if self.sample_rate == 0 || self.n_fft < 4 || !self.n_fft.is_power_of_two() {
            return bad(format!(
                "the FFT size {} must be a power of two of at least 4, and the rate ({} Hz) positive",
                self.n_fft, self.sample_rate
            ));
        }
        if self.hop == 0 || self.hop > self.n_fft {
            return bad(format!("the hop {} must be from 1 to the FFT size {}", self.hop, self.n_fft));
        }
        let nyquist = self.sample_rate as f64 / 2.0;
        if !(0.0..nyquist).contains(&self.fmin) || self.fmax <= self.fmin || self.fmax > nyquist {
            return bad(format!(
                "the band {}–{} Hz must lie within 0–{nyquist} Hz, lowest first",
                self.fmin, self.fmax
            ));
        }
        if self.bands == 0 || self.bands > self.n_fft / 2 {
            return bad(format!("{} bands for an FFT of {}: use 1 to {}", self.bands, self.n_fft, self.n_fft / 2));
        }
        if let Some(m) = self.filterbank().iter().position(|row| row.iter().all(|&w| w == 0.0)) {
            return bad(format!(
                "band {m} falls between two FFT bins ({} bands over {}–{} Hz with an FFT of {}): use fewer bands, \
                 a larger FFT or a higher --mel-fmin",
                self.bands, self.fmin, self.fmax, self.n_fft
            ));
        }
        Ok(())
    }

    /// FFT bins `n_fft/2 + 1`.
    pub fn bins(&self) -> usize {
        self.n_fft / 2 + 1
    }

    /// Frames of `samples` samples: `⌊samples / hop⌋ + 1`.
    pub fn frames(&self, samples: usize) -> usize {
        samples / self.hop + 1
    }

    /// The filters, `bands × bins` (see the module's description).
    pub fn filterbank(&self) -> Vec<Vec<f32>> {
        let (lo, hi) = (hz_to_mel(self.fmin), hz_to_mel(self.fmax));
        let corners: Vec<f64> =
            (0..self.bands + 2).map(|i| mel_to_hz(lo + (hi - lo) * i as f64 / (self.bands + 1) as f64)).collect();
        let bin_hz = self.sample_rate as f64 / self.n_fft as f64;
        (0..self.bands)
            .map(|m| {
                let (left, centre, right) = (corners[m], corners[m + 1], corners[m + 2]);
                (0..self.bins())
                    .map(|k| {
                        let f = k as f64 * bin_hz;
                        let up = (f - left) / (centre - left);
                        let down = (right - f) / (right - centre);
                        up.min(down).max(0.0) as f32
                    })
                    .collect()
            })
            .collect()
    }
}

/// Hertz to HTK mel.
pub fn hz_to_mel(f: f64) -> f64 {
    2595.0 * (1.0 + f / 700.0).log10()
}

/// HTK mel to hertz.
pub fn mel_to_hz(m: f64) -> f64 {
    700.0 * (10f64.powf(m / 2595.0) - 1.0)
}

/// The periodic Hann window of `n` samples.
pub fn hann(n: usize) -> Vec<f32> {
    (0..n).map(|i| (0.5 - 0.5 * (2.0 * std::f64::consts::PI * i as f64 / n as f64).cos()) as f32).collect()
}

/// Log-mel features of `samples`: `frames × bands` values, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Mel {
    /// Frames (rows).
    pub frames: usize,
    /// Bands (columns).
    pub bands: usize,
    /// The values, frame after frame.
    pub values: Vec<f32>,
}

impl Mel {
    /// Frame `f`'s bands.
    pub fn frame(&self, f: usize) -> &[f32] {
        &self.values[f * self.bands..(f + 1) * self.bands]
    }

    /// Writes frame `f` into `out`; frames outside the signal read as silence, the floor (as
    /// the zeros a centred frame reads past the signal).
    pub fn copy_frame(&self, f: isize, out: &mut [f32]) {
        match usize::try_from(f).ok().filter(|&f| f < self.frames) {
            Some(f) => out.copy_from_slice(self.frame(f)),
            None => out.fill(FLOOR.ln()),
        }
    }
}

/// The short-time spectra `X_k` of every frame of `samples`, `frames × bins` (see the module's
/// description).
pub fn stft(samples: &[f32], cfg: &MelConfig) -> Vec<Vec<Complex32>> {
    let fft = RealFftPlanner::<f32>::new().plan_fft_forward(cfg.n_fft);
    let window = hann(cfg.n_fft);
    let mut input = fft.make_input_vec();
    let half = cfg.n_fft as isize / 2;
    (0..cfg.frames(samples.len()))
        .map(|f| {
            let start = (f * cfg.hop) as isize - half;
            for (i, slot) in input.iter_mut().enumerate() {
                let at = start + i as isize;
                let x = if at >= 0 { samples.get(at as usize).copied().unwrap_or(0.0) } else { 0.0 };
                *slot = x * window[i];
            }
            let mut output = fft.make_output_vec();
            fft.process(&mut input, &mut output).expect("invariant: buffers from the plan");
            output
        })
        .collect()
}

/// The inverse of [`stft`] for `len` samples: each frame's inverse FFT, windowed again and
/// overlap-added, divided by the sum of the squared windows at each sample (the least-squares
/// signal whose STFT is nearest `spectra`, Griffin & Lim 1984).
pub fn istft(spectra: &[Vec<Complex32>], cfg: &MelConfig, len: usize) -> Vec<f32> {
    let ifft = RealFftPlanner::<f32>::new().plan_fft_inverse(cfg.n_fft);
    let window = hann(cfg.n_fft);
    let (mut sum, mut weight) = (vec![0f32; len], vec![0f32; len]);
    let mut frame = ifft.make_output_vec();
    let half = cfg.n_fft as isize / 2;
    let scale = 1.0 / cfg.n_fft as f32;
    for (f, spectrum) in spectra.iter().enumerate() {
        let mut input = spectrum.clone();
        // A real signal's spectrum: no imaginary part at 0 Hz and at the Nyquist bin.
        let last = input.len() - 1;
        input[0].im = 0.0;
        input[last].im = 0.0;
        ifft.process(&mut input, &mut frame).expect("invariant: buffers from the plan, real end bins");
        let start = (f * cfg.hop) as isize - half;
        for (i, (&x, &w)) in frame.iter().zip(&window).enumerate() {
            let at = start + i as isize;
            if at >= 0 && (at as usize) < len {
                sum[at as usize] += x * scale * w;
                weight[at as usize] += w * w;
            }
        }
    }
    sum.iter().zip(&weight).map(|(&s, &w)| if w > 1e-8 { s / w } else { 0.0 }).collect()
}

/// The magnitude spectra `|X_k|` of every frame of `samples`, `frames × bins`.
pub fn magnitudes(samples: &[f32], cfg: &MelConfig) -> Vec<Vec<f32>> {
    stft(samples, cfg).iter().map(|frame| frame.iter().map(|c| c.norm()).collect()).collect()
}

/// The log-mel features of `samples` (at `cfg.sample_rate`).
pub fn log_mel(samples: &[f32], cfg: &MelConfig) -> Result<Mel> {
    cfg.validate()?;
    let bank = cfg.filterbank();
    // Each band's first and last weighted bin: the sums skip the zeros.
    let spans: Vec<(usize, usize)> = bank
        .iter()
        .map(|row| {
            let first = row.iter().position(|&w| w > 0.0).unwrap_or(0);
            let last = row.iter().rposition(|&w| w > 0.0).map_or(0, |k| k + 1);
            (first, last.max(first))
        })
        .collect();
    let spectra = magnitudes(samples, cfg);
    let mut values = Vec::with_capacity(spectra.len() * cfg.bands);
    for spectrum in &spectra {
        for (row, &(a, b)) in bank.iter().zip(&spans) {
            let energy: f32 = row[a..b].iter().zip(&spectrum[a..b]).map(|(w, x)| w * x).sum();
            values.push(energy.max(FLOOR).ln());
        }
    }
    Ok(Mel { frames: spectra.len(), bands: cfg.bands, values })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The features by the definition, term by term: a direct DFT of every windowed frame (no
    /// FFT), the triangle weights from the mel formula, the sum and the log, in f64.
    fn direct(samples: &[f32], cfg: &MelConfig) -> Vec<Vec<f64>> {
        let n = cfg.n_fft;
        let frames = samples.len() / cfg.hop + 1;
        let (lo, hi) = (hz_to_mel(cfg.fmin), hz_to_mel(cfg.fmax));
        let corner = |i: usize| mel_to_hz(lo + (hi - lo) * i as f64 / (cfg.bands + 1) as f64);
        (0..frames)
            .map(|f| {
                let x: Vec<f64> = (0..n)
                    .map(|i| {
                        let at = (f * cfg.hop + i) as isize - (n / 2) as isize;
                        let s =
                            if at >= 0 && (at as usize) < samples.len() { samples[at as usize] as f64 } else { 0.0 };
                        s * (0.5 - 0.5 * (2.0 * std::f64::consts::PI * i as f64 / n as f64).cos())
                    })
                    .collect();
                let mags: Vec<f64> = (0..=n / 2)
                    .map(|k| {
                        let (mut re, mut im) = (0.0, 0.0);
                        for (i, &v) in x.iter().enumerate() {
                            let a = -2.0 * std::f64::consts::PI * (k * i) as f64 / n as f64;
                            re += v * a.cos();
                            im += v * a.sin();
                        }
                        (re * re + im * im).sqrt()
                    })
                    .collect();
                (0..cfg.bands)
                    .map(|m| {
                        let (l, c, r) = (corner(m), corner(m + 1), corner(m + 2));
                        let e: f64 = mags
                            .iter()
                            .enumerate()
                            .map(|(k, &mag)| {
                                let hz = k as f64 * cfg.sample_rate as f64 / n as f64;
                                let w = if hz > l && hz <= c {
                                    (hz - l) / (c - l)
                                } else if hz > c && hz < r {
                                    (r - hz) / (r - c)
                                } else {
                                    0.0
                                };
                                w * mag
                            })
                            .sum();
                        e.max(FLOOR as f64).ln()
                    })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn features_equal_the_direct_computation() {
        let cfg = MelConfig { sample_rate: 8000, n_fft: 128, hop: 32, bands: 20, fmin: 50.0, fmax: 3800.0 };
        let mut rng = crate::rng::Rng::new(1);
        // A chirp plus noise, 300 samples: frames at both edges reach past the signal.
        let samples: Vec<f32> = (0..300)
            .map(|i| {
                let t = i as f64 / 8000.0;
                (0.5 * (2.0 * std::f64::consts::PI * (200.0 + 3000.0 * t) * t * 8.0).sin() + 0.05 * rng.normal()) as f32
            })
            .collect();
        let ours = log_mel(&samples, &cfg).unwrap();
        let theirs = direct(&samples, &cfg);
        assert_eq!((ours.frames, ours.bands), (theirs.len(), 20));
        for (f, row) in theirs.iter().enumerate() {
            for (m, &v) in row.iter().enumerate() {
                let got = ours.frame(f)[m] as f64;
                // f32 FFT against an f64 DFT: close in the log wherever there is energy.
                assert!((got - v).abs() < 1e-3 * (1.0 + v.abs()) || v < -10.0, "frame {f} band {m}: {got} vs {v}");
            }
        }
    }

    #[test]
    fn the_measuring_analysis_is_valid_at_the_usual_rates() {
        for rate in [8000, 16_000, 22_050, 44_100, 48_000] {
            let m = MelConfig::measuring(rate);
            m.validate().unwrap_or_else(|e| panic!("{rate} Hz: {e}"));
            assert_ne!((m.n_fft, m.hop), (MelConfig::for_rate(rate).n_fft, MelConfig::for_rate(rate).hop));
        }
    }

    #[test]
    fn a_sine_peaks_in_the_band_around_its_frequency() {
        let cfg = MelConfig::for_rate(16_000);
        cfg.validate().unwrap();
        let hz = 1000.0;
        let samples: Vec<f32> =
            (0..16_000).map(|i| (2.0 * std::f64::consts::PI * hz * i as f64 / 16_000.0).sin() as f32).collect();
        let mel = log_mel(&samples, &cfg).unwrap();
        let middle = mel.frame(mel.frames / 2);
        let peak = (0..cfg.bands).max_by(|&a, &b| middle[a].total_cmp(&middle[b])).unwrap();
        let (lo, hi) = (hz_to_mel(cfg.fmin), hz_to_mel(cfg.fmax));
        let centre = mel_to_hz(lo + (hi - lo) * (peak + 1) as f64 / (cfg.bands + 1) as f64);
        let spacing = mel_to_hz(hz_to_mel(centre) + (hi - lo) / (cfg.bands + 1) as f64) - centre;
        assert!((centre - hz).abs() <= spacing, "peak band centred at {centre} Hz for a {hz} Hz sine");
        // Silence is the floor.
        let quiet = log_mel(&[0.0; 4000], &cfg).unwrap();
        assert!(quiet.values.iter().all(|&v| v == FLOOR.ln()));
    }

    #[test]
    fn the_mel_scale_round_trips_and_bad_settings_are_refused() {
        for f in [0.0, 100.0, 1000.0, 7999.0] {
            assert!((mel_to_hz(hz_to_mel(f)) - f).abs() < 1e-6);
        }
        assert!((hz_to_mel(700.0) - 2595.0 * 2f64.log10()).abs() < 1e-9);
        assert!(MelConfig::for_rate(8000).validate().is_ok());
        assert!(MelConfig::for_rate(16_000).validate().is_ok());
        assert!(MelConfig::for_rate(44_100).validate().is_ok());
        let ok = MelConfig::for_rate(8000);
        for bad in [
            MelConfig { n_fft: 100, ..ok.clone() },
            MelConfig { hop: 0, ..ok.clone() },
            MelConfig { fmax: 5000.0, ..ok.clone() },
            MelConfig { fmin: 3000.0, fmax: 2000.0, ..ok.clone() },
            MelConfig { bands: 0, ..ok.clone() },
            // 200 bands over an FFT of 512 at 8 kHz: the lowest fall between bins.
            MelConfig { bands: 200, ..ok.clone() },
        ] {
            assert!(bad.validate().is_err(), "{bad:?} was accepted");
        }
    }
}
