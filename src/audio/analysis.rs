//! Measurements of a signal: its averaged power spectrum, dominant frequency, spectral
//! flatness and μ-law code histogram, and [`check_plausible_audio`], the check that generated
//! audio is neither silence, nor a constant, nor white noise.

use realfft::RealFftPlanner;
use serde::Serialize;

use super::mulaw;

/// Welch's averaged periodogram: Hann-windowed frames of `n_fft` samples with 50 % overlap.
/// Returns `n_fft / 2 + 1` powers (bin `k` is at `k · rate / n_fft` Hz). Signals shorter than
/// one frame are zero-padded.
pub fn power_spectrum(samples: &[f32], n_fft: usize) -> Vec<f64> {
    let fft = RealFftPlanner::<f64>::new().plan_fft_forward(n_fft);
    let window: Vec<f64> =
        (0..n_fft).map(|i| 0.5 - 0.5 * (2.0 * std::f64::consts::PI * i as f64 / n_fft as f64).cos()).collect();
    let mut input = fft.make_input_vec();
    let mut output = fft.make_output_vec();
    let mut power = vec![0.0; n_fft / 2 + 1];
    let hop = n_fft / 2;
    let mut frames = 0;
    let mut start = 0;
    loop {
        for (i, slot) in input.iter_mut().enumerate() {
            *slot = samples.get(start + i).copied().unwrap_or(0.0) as f64 * window[i];
        }
        fft.process(&mut input, &mut output).expect("invariant: buffers come from the same plan");
        for (p, c) in power.iter_mut().zip(&output) {
            *p += c.norm_sqr();
        }
        frames += 1;
        start += hop;
        if start + n_fft > samples.len() {
            break;
        }
    }
    power.iter_mut().for_each(|p| *p /= frames as f64);
    power
}

/// The frequency in Hz with the most power, refined by a parabola through the peak bin and
/// its neighbours (so it is accurate to a small fraction of a bin).
pub fn dominant_frequency(samples: &[f32], sample_rate: u32) -> f64 {
    let n_fft = 8192;
    let p = power_spectrum(samples, n_fft);
    let k = (1..p.len() - 1).max_by(|&a, &b| p[a].total_cmp(&p[b])).unwrap_or(1);
    let (a, b, c) = (p[k - 1].ln(), p[k].ln(), p[k + 1].ln());
    let offset = 0.5 * (a - c) / (a - 2.0 * b + c);
    (k as f64 + offset) * sample_rate as f64 / n_fft as f64
}

/// Spectral flatness: geometric over arithmetic mean of the averaged power spectrum (DC
/// excluded). Near 1 for white noise, near 0 for tonal or speech-like sound.
pub fn spectral_flatness(samples: &[f32]) -> f64 {
    let p = power_spectrum(samples, 512);
    let bins = &p[1..];
    let floor = 1e-20;
    let log_mean = bins.iter().map(|&x| (x + floor).ln()).sum::<f64>() / bins.len() as f64;
    let mean = bins.iter().map(|&x| x + floor).sum::<f64>() / bins.len() as f64;
    log_mean.exp() / mean
}

/// What [`check_plausible_audio`] measured.
#[derive(Debug, Clone, Serialize)]
pub struct SignalReport {
    /// Root-mean-square amplitude.
    pub rms: f64,
    /// Standard deviation (RMS about the mean).
    pub std: f64,
    /// How many of the 256 μ-law codes occur.
    pub distinct_codes: usize,
    /// Entropy of the μ-law code histogram in bits (8 = uniform).
    pub code_entropy_bits: f64,
    /// Spectral flatness (1 = white).
    pub spectral_flatness: f64,
}

/// Thresholds of [`check_plausible_audio`], chosen with margin: speech and music measure a
/// flatness of 0.001–0.2 and a code entropy of 4–7 bits; white noise measures a flatness above
/// 0.8 (Welch averaging removes the periodogram's bias) and, uniform in amplitude, 7.6 bits.
pub const MIN_STD: f64 = 1e-3;
/// See [`MIN_STD`].
pub const MAX_FLATNESS: f64 = 0.5;
/// See [`MIN_STD`].
pub const MAX_CODE_ENTROPY_BITS: f64 = 7.5;

/// Measures `samples` and says why they are not plausible audio: silence, a constant (or
/// near-constant) signal, white noise (flat spectrum), or a near-uniform code histogram.
pub fn check_plausible_audio(samples: &[f32]) -> std::result::Result<SignalReport, String> {
    if samples.len() < 512 {
        return Err(format!("only {} samples: too short to judge", samples.len()));
    }
    let n = samples.len() as f64;
    let mean = samples.iter().map(|&x| x as f64).sum::<f64>() / n;
    let rms = (samples.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / n).sqrt();
    let std = (samples.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
    let mut histogram = [0usize; mulaw::CLASSES];
    for &x in samples {
        histogram[mulaw::encode(x) as usize] += 1;
    }
    let distinct_codes = histogram.iter().filter(|&&c| c > 0).count();
    let code_entropy_bits = -histogram
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f64 / n;
            p * p.log2()
        })
        .sum::<f64>();
    let report =
        SignalReport { rms, std, distinct_codes, code_entropy_bits, spectral_flatness: spectral_flatness(samples) };
    if rms < MIN_STD {
        return Err(format!("silence (RMS {rms:.2e})"));
    }
    if std < MIN_STD || distinct_codes < 4 {
        return Err(format!("a constant signal (std {std:.2e}, {distinct_codes} distinct codes)"));
    }
    if report.spectral_flatness > MAX_FLATNESS {
        return Err(format!("white noise (spectral flatness {:.3} > {MAX_FLATNESS})", report.spectral_flatness));
    }
    if code_entropy_bits > MAX_CODE_ENTROPY_BITS {
        return Err(format!("a near-uniform code histogram ({code_entropy_bits:.2} bits > {MAX_CODE_ENTROPY_BITS})"));
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn sine(freq: f64, rate: u32, n: usize) -> Vec<f32> {
        (0..n).map(|i| (0.5 * (2.0 * std::f64::consts::PI * freq * i as f64 / rate as f64).sin()) as f32).collect()
    }

    #[test]
    fn dominant_frequency_of_a_sine() {
        let f = dominant_frequency(&sine(440.0, 16000, 16000), 16000);
        assert!((f - 440.0).abs() < 1.0, "{f}");
    }

    #[test]
    fn accepts_a_chirp_and_rejects_silence_constants_and_noise() {
        let rate = 8000.0;
        // A chord with a slow amplitude envelope: not flat, not uniform.
        let chord: Vec<f32> = (0..8000)
            .map(|i| {
                let t = i as f64 / rate;
                let env = 0.3 + 0.2 * (2.0 * std::f64::consts::PI * 3.0 * t).sin();
                (env * ((2.0 * std::f64::consts::PI * 220.0 * t).sin()
                    + 0.5 * (2.0 * std::f64::consts::PI * 330.0 * t).sin())) as f32
            })
            .collect();
        check_plausible_audio(&chord).unwrap();
        assert!(check_plausible_audio(&vec![0.0; 8000]).unwrap_err().contains("silence"));
        assert!(check_plausible_audio(&vec![0.4; 8000]).unwrap_err().contains("constant"));
        let mut rng = Rng::new(3);
        let noise: Vec<f32> = (0..8000).map(|_| (rng.uniform() * 2.0 - 1.0) as f32).collect();
        assert!(check_plausible_audio(&noise).unwrap_err().contains("white noise"));
        let gaussian: Vec<f32> = (0..8000).map(|_| (rng.normal() * 0.1) as f32).collect();
        assert!(check_plausible_audio(&gaussian).unwrap_err().contains("white noise"));
        // Uniformly random μ-law codes: white and uniform.
        let codes: Vec<f32> = (0..8000).map(|_| mulaw::decode(rng.below(256) as u8)).collect();
        assert!(check_plausible_audio(&codes).is_err());
    }
}
