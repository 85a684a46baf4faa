//! How far a resynthesis is from the original: the two measures `vocode --compare` prints.
//! Both compare frame `f` of one signal with frame `f` of the other (a vocoder keeps the
//! timing: no alignment), over the frames both have, and skip frames in which the original is
//! silent (more than 60 dB below its loudest frame), where any measure of the difference is
//! only a measure of the noise floor.
//!
//! - **Log-spectral distance** (dB): per frame `√(mean_k (10 log₁₀ P_k − 10 log₁₀ P̂_k)²)` over
//!   the STFT power spectra (the [`MelConfig`]'s FFT and hop), each floored 80 dB below the
//!   original's loudest bin; the mean over frames.
//! - **Mel-cepstral distortion** (dB): per frame `(10 / ln 10) · √(2 Σ_{d=1}^{D} (c_d − ĉ_d)²)`
//!   (Kubichek 1993), where `c_d = (2/M) Σ_m ln X_m cos(π d (m + ½) / M)` is the mel cepstrum
//!   of the M-band mel *amplitude* spectrum `X` (the log-mel features of `audio::mel`), scaled as
//!   SPTK's mel cepstrum is (`ln X_m = c_0 + Σ_d c_d cos(π d (m + ½) / M)`: one-sided, the
//!   convention of the `mcep` coefficients most published MCDs use; checked with pysptk 1.0.1,
//!   whose `mgc2sp` of a lone c_d = a gives ln|H(ω)| = a·cos(dω)), so that a difference
//!   `a·cos(π d (m + ½) / M)` in `ln X` measures `(10 / ln 10) · √2 · a` dB whatever the number
//!   of bands. Each band is floored 80 dB below the signal's loudest band (without
//!   it, bands with no energy at all dominate: a tone plus faint noise measured over 100 dB);
//!   D = 24 (or the bands − 1 if fewer); `c_0`, the overall level, is left out, as is usual.
//!   The mean over frames.

use super::mel::{MelConfig, log_mel, magnitudes};
use crate::Result;

/// Coefficients of the mel cepstrum compared (after `c_0`).
pub const CEPSTRAL_COEFFICIENTS: usize = 24;
/// Frames quieter than this below the original's loudest are skipped (dB).
const SILENCE_DB: f64 = 60.0;

/// The frames of `reference` (per-frame energies) that are within 60 dB of its loudest.
fn audible(energies: &[f64]) -> Vec<bool> {
    let loudest = energies.iter().copied().fold(0f64, f64::max);
    energies.iter().map(|&e| e > 0.0 && 10.0 * (loudest / e).log10() <= SILENCE_DB).collect()
}

/// The log-spectral distance in dB between `reference` and `test` (see the module).
pub fn log_spectral_distance(reference: &[f32], test: &[f32], cfg: &MelConfig) -> Result<f64> {
    cfg.validate()?;
    let power = |s: &[f32]| -> Vec<Vec<f64>> {
        magnitudes(s, cfg).iter().map(|row| row.iter().map(|&m| (m as f64).powi(2)).collect()).collect()
    };
    let (p, q) = (power(reference), power(test));
    let floor = p.iter().flatten().copied().fold(0f64, f64::max) * 1e-8;
    let keep = audible(&p.iter().map(|row| row.iter().sum()).collect::<Vec<f64>>());
    let frames: Vec<f64> = p
        .iter()
        .zip(&q)
        .zip(&keep)
        .filter(|(_, k)| **k)
        .map(|((a, b), _)| {
            let sq: f64 =
                a.iter().zip(b).map(|(&x, &y)| (10.0 * (x.max(floor) / y.max(floor)).log10()).powi(2)).sum::<f64>();
            (sq / a.len() as f64).sqrt()
        })
        .collect();
    Ok(mean(&frames))
}

/// Coefficients 1 … D of the cepstrum of the log spectrum `x` (see the module: the DCT-II
/// times 2 over the number of bands).
fn cepstrum(x: &[f32], d: usize) -> Vec<f64> {
    let m = x.len() as f64;
    (1..=d)
        .map(|k| {
            let s: f64 = x
                .iter()
                .enumerate()
                .map(|(i, &v)| v as f64 * (std::f64::consts::PI * k as f64 * (i as f64 + 0.5) / m).cos())
                .sum();
            2.0 * s / m
        })
        .collect()
}

/// The mel-cepstral distortion in dB between `reference` and `test` (see the module).
pub fn mel_cepstral_distortion(reference: &[f32], test: &[f32], cfg: &MelConfig) -> Result<f64> {
    let (a, b) = (log_mel(reference, cfg)?, log_mel(test, cfg)?);
    let d = CEPSTRAL_COEFFICIENTS.min(cfg.bands - 1);
    let frames = a.frames.min(b.frames);
    let energies: Vec<f64> = (0..frames).map(|f| a.frame(f).iter().map(|&v| (2.0 * v as f64).exp()).sum()).collect();
    let keep = audible(&energies);
    // Each signal's bands floored at the ln of the amplitude 80 dB below its loudest band (so
    // that a change of level stays in c_0).
    let floor = |m: &super::mel::Mel| m.values.iter().copied().fold(f32::MIN, f32::max) - 4.0 * std::f32::consts::LN_10;
    let (floor_a, floor_b) = (floor(&a), floor(&b));
    let floored = |row: &[f32], floor: f32| -> Vec<f32> { row.iter().map(|&v| v.max(floor)).collect() };
    let k = 10.0 / std::f64::consts::LN_10;
    let per_frame: Vec<f64> = (0..frames)
        .filter(|&f| keep[f])
        .map(|f| {
            let (c, c_hat) = (cepstrum(&floored(a.frame(f), floor_a), d), cepstrum(&floored(b.frame(f), floor_b), d));
            k * (2.0 * c.iter().zip(&c_hat).map(|(x, y)| (x - y).powi(2)).sum::<f64>()).sqrt()
        })
        .collect();
    Ok(mean(&per_frame))
}

fn mean(x: &[f64]) -> f64 {
    if x.is_empty() { 0.0 } else { x.iter().sum::<f64>() / x.len() as f64 }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A voiced sound: harmonics of `f0` up to 3.9 kHz falling as 1/k, under a rise and fall,
    /// with a little noise: energy in every band, as speech has.
    fn voiced(f0: f64, len: usize, seed: u64) -> Vec<f32> {
        let mut rng = crate::rng::Rng::new(seed);
        (0..len)
            .map(|i| {
                let t = i as f64 / 8000.0;
                let env = (std::f64::consts::PI * i as f64 / len as f64).sin();
                let harmonics: f64 = (1..)
                    .take_while(|&k| k as f64 * f0 < 3900.0)
                    .map(|k| (2.0 * std::f64::consts::PI * k as f64 * f0 * t).sin() / k as f64)
                    .sum();
                (env * (0.2 * harmonics + 0.01 * rng.normal())) as f32
            })
            .collect()
    }

    #[test]
    fn identical_signals_are_zero_apart_and_a_gain_is_its_decibels() {
        let cfg = MelConfig::for_rate(8000);
        let x = voiced(150.0, 6000, 1);
        assert!(log_spectral_distance(&x, &x, &cfg).unwrap() < 1e-9);
        assert!(mel_cepstral_distortion(&x, &x, &cfg).unwrap() < 1e-9);
        // 6 dB quieter: every power ratio is 10^0.6, so the distance is 6 dB; the cepstrum
        // moves only in c_0, which the distortion leaves out.
        let quieter: Vec<f32> = x.iter().map(|&v| v * 10f32.powf(-6.0 / 20.0)).collect();
        let lsd = log_spectral_distance(&x, &quieter, &cfg).unwrap();
        assert!((lsd - 6.0).abs() < 0.05, "{lsd}");
        assert!(mel_cepstral_distortion(&x, &quieter, &cfg).unwrap() < 0.05);
    }

    #[test]
    fn a_cosine_ripple_in_the_log_spectrum_measures_its_amplitude() {
        // ln X differing by a·cos(π d (m + ½) / M): c_d moves by a (SPTK's one-sided cepstrum),
        // so the distortion is (10 / ln 10) · √2 · a, for any number of bands and any d ≤ D.
        for (bands, d, a) in [(64usize, 1usize, 0.5f64), (80, 3, 0.2), (40, 24, 1.0)] {
            let base: Vec<f32> = (0..bands).map(|m| -2.0 - 0.05 * m as f32).collect();
            let rippled: Vec<f32> = base
                .iter()
                .enumerate()
                .map(|(m, &v)| {
                    v + (a * (std::f64::consts::PI * d as f64 * (m as f64 + 0.5) / bands as f64).cos()) as f32
                })
                .collect();
            let (c, c_hat) = (cepstrum(&base, 24), cepstrum(&rippled, 24));
            let mcd = 10.0 / std::f64::consts::LN_10
                * (2.0 * c.iter().zip(&c_hat).map(|(x, y)| (x - y).powi(2)).sum::<f64>()).sqrt();
            let want = 10.0 / std::f64::consts::LN_10 * 2f64.sqrt() * a;
            assert!((mcd - want).abs() < 1e-4 * want, "{bands} bands, d = {d}: {mcd} against {want}");
        }
    }

    #[test]
    fn a_different_signal_is_farther_than_a_slightly_noisy_copy() {
        let cfg = MelConfig::for_rate(8000);
        let x = voiced(150.0, 6000, 1);
        let mut rng = crate::rng::Rng::new(9);
        // Noise 40 dB below the signal's peak.
        let noisy: Vec<f32> = x.iter().map(|&v| v + 0.0045 * rng.normal() as f32).collect();
        let other = voiced(230.0, 6000, 2);
        let (near, far) =
            (mel_cepstral_distortion(&x, &noisy, &cfg).unwrap(), mel_cepstral_distortion(&x, &other, &cfg).unwrap());
        assert!(near < far / 2.0, "MCD: noisy copy {near}, other {far}");
        let (near, far) =
            (log_spectral_distance(&x, &noisy, &cfg).unwrap(), log_spectral_distance(&x, &other, &cfg).unwrap());
        assert!(near < far / 2.0, "LSD: noisy copy {near}, other {far}");
    }
}
