//! μ-law companding and quantisation to 256 classes (WaveNet, van den Oord et al. 2016, eq. 2):
//! f(x) = sign(x) · ln(1 + μ|x|) / ln(1 + μ), then f ∈ [-1, 1] is quantised uniformly.
//! Quiet sounds get finer steps than loud ones, which matches hearing and keeps the
//! classification over codes well spread.

/// The number of classes a sample is quantised to (μ + 1).
pub const CLASSES: usize = 256;
/// The companding constant.
pub const MU: f32 = 255.0;

/// The code of a sample in [-1, 1] (values outside are clamped).
pub fn encode(x: f32) -> u8 {
    let x = x.clamp(-1.0, 1.0);
    let f = x.signum() * (MU * x.abs()).ln_1p() / MU.ln_1p();
    ((f + 1.0) * 0.5 * MU + 0.5).floor() as u8
}

/// The sample a code stands for (the centre of its quantisation bin in the companded domain).
pub fn decode(code: u8) -> f32 {
    let f = 2.0 * code as f32 / MU - 1.0;
    f.signum() * ((MU.ln_1p() * f.abs()).exp() - 1.0) / MU
}

/// The code of digital silence (0.0), the value generation starts from.
pub fn silence() -> u8 {
    encode(0.0)
}

/// Encodes a whole signal.
pub fn encode_all(samples: &[f32]) -> Vec<u8> {
    samples.iter().map(|&x| encode(x)).collect()
}

/// Decodes a whole signal.
pub fn decode_all(codes: &[u8]) -> Vec<f32> {
    codes.iter().map(|&c| decode(c)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_values() {
        assert_eq!(encode(-1.0), 0);
        assert_eq!(encode(1.0), 255);
        assert_eq!(encode(0.0), 128);
        assert_eq!(encode(2.0), 255, "clamped");
        assert_eq!(encode(-7.5), 0, "clamped");
        assert!((decode(0) + 1.0).abs() < 1e-6);
        assert!((decode(255) - 1.0).abs() < 1e-6);
        assert!(decode(128).abs() < 1e-4);
        // f(0.5) = ln(128.5)/ln(256) = 0.8754 → (1.8754/2)·255 = 239.1 → 239.
        assert_eq!(encode(0.5), 239);
        assert_eq!(encode(-0.5), 16);
    }

    #[test]
    fn codes_are_monotonic_and_every_code_round_trips() {
        for c in 0..=255u8 {
            assert_eq!(encode(decode(c)), c, "code {c}");
        }
        let mut last = 0;
        for i in -1000..=1000 {
            let c = encode(i as f32 / 1000.0);
            assert!(c >= last);
            last = c;
        }
    }

    #[test]
    fn round_trip_error_is_bounded_relative_to_amplitude() {
        // Half a quantisation step of f is 1/μ; through the inverse, |x − x̂| ≤ (|x| + 1/μ)(e^{ln(1+μ)/μ} − 1).
        let growth = (MU.ln_1p() / MU).exp() - 1.0; // ≈ 0.0220
        for i in -10_000..=10_000 {
            let x = i as f32 / 10_000.0;
            let err = (decode(encode(x)) - x).abs();
            assert!(err <= (x.abs() + 1.0 / MU) * growth + 1e-6, "x = {x}: error {err}");
        }
    }
}
