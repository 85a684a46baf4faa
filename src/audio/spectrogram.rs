//! Log-magnitude spectrogram images (PNG), so that a person can see what was generated:
//! time runs left to right, frequency bottom to top (0 Hz to half the sample rate), colour
//! from dark (quiet) to bright (loud) over the top 80 dB.

use std::path::Path;

use realfft::RealFftPlanner;

use crate::Result;

const N_FFT: usize = 512;
const HOP: usize = 128;
const RANGE_DB: f32 = 80.0;
const MAX_WIDTH: usize = 2400;
const MIN_WIDTH: usize = 400;

/// The magnitude in dB of each STFT frame (Hann window), `frames × (N_FFT/2 + 1)`.
pub fn stft_db(samples: &[f32]) -> Vec<Vec<f32>> {
    let fft = RealFftPlanner::<f32>::new().plan_fft_forward(N_FFT);
    let window: Vec<f32> =
        (0..N_FFT).map(|i| 0.5 - 0.5 * (2.0 * std::f32::consts::PI * i as f32 / N_FFT as f32).cos()).collect();
    let (mut input, mut output) = (fft.make_input_vec(), fft.make_output_vec());
    let frames = samples.len().saturating_sub(N_FFT) / HOP + 1;
    (0..frames)
        .map(|f| {
            for (i, slot) in input.iter_mut().enumerate() {
                *slot = samples.get(f * HOP + i).copied().unwrap_or(0.0) * window[i];
            }
            fft.process(&mut input, &mut output).expect("invariant: buffers from the plan");
            output.iter().map(|c| 10.0 * (c.norm_sqr() + 1e-12).log10()).collect()
        })
        .collect()
}

/// A colour ramp from black through purple and orange to pale yellow (like "magma").
fn colour(v: f32) -> [u8; 3] {
    const STOPS: [[f32; 3]; 5] =
        [[0.0, 0.0, 0.02], [0.3, 0.06, 0.45], [0.72, 0.2, 0.45], [0.98, 0.55, 0.25], [0.99, 0.99, 0.75]];
    let x = v.clamp(0.0, 1.0) * (STOPS.len() - 1) as f32;
    let i = (x as usize).min(STOPS.len() - 2);
    let t = x - i as f32;
    let mix = |k: usize| ((STOPS[i][k] * (1.0 - t) + STOPS[i + 1][k] * t) * 255.0) as u8;
    [mix(0), mix(1), mix(2)]
}

/// Writes the spectrogram of `samples` as a PNG (atomically).
pub fn write_png(path: &Path, samples: &[f32]) -> Result<()> {
    write_png_stacked(path, &[samples])
}

/// Writes the spectrograms of `signals` one above the other (the first on top, a white line
/// between them) as one PNG, on one colour scale (the first signal's loudest is the top), so
/// that they compare by eye.
pub fn write_png_stacked(path: &Path, signals: &[&[f32]]) -> Result<()> {
    let bins = N_FFT / 2 + 1;
    let longest = signals.iter().map(|s| stft_db(s).len()).max().unwrap_or(1);
    // Long audio: average neighbouring frames so the image stays a sensible width.
    let per_column = longest.div_ceil(MAX_WIDTH).max(1);
    let images: Vec<Vec<Vec<f32>>> = signals
        .iter()
        .map(|s| {
            stft_db(s)
                .chunks(per_column)
                .map(|c| (0..bins).map(|b| c.iter().map(|f| f[b]).sum::<f32>() / c.len() as f32).collect())
                .collect()
        })
        .collect();
    let peak = images.first().map_or(0.0, |columns| columns.iter().flatten().fold(f32::MIN, |m, &v| m.max(v)));
    // Short audio: each column drawn several pixels wide, so the image is at least MIN_WIDTH.
    let frames = images.iter().map(|c| c.len()).max().unwrap_or(1).max(1);
    let repeat = MIN_WIDTH.div_ceil(frames).max(1);
    let images: Vec<Vec<Vec<f32>>> =
        images.into_iter().map(|c| c.into_iter().flat_map(|col| std::iter::repeat_n(col, repeat)).collect()).collect();
    let width = frames * repeat;
    let mut pixels = Vec::new();
    for (i, columns) in images.iter().enumerate() {
        if i > 0 {
            pixels.extend(std::iter::repeat_n(255u8, width * 3));
        }
        for row in 0..bins {
            let bin = bins - 1 - row; // low frequencies at the bottom
            for x in 0..width {
                let level = columns.get(x).map_or(f32::MIN, |col| col[bin]);
                pixels.extend_from_slice(&colour(1.0 - (peak - level) / RANGE_DB));
            }
        }
    }
    let height = images.len() * bins + images.len().saturating_sub(1);
    crate::fsutil::write_png(path, width, height, &pixels, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tone_lights_up_its_frequency_bin() {
        let rate = 16000.0;
        let x: Vec<f32> = (0..8000).map(|i| (2.0 * std::f32::consts::PI * 1000.0 * i as f32 / rate).sin()).collect();
        let db = stft_db(&x);
        let frame = &db[10];
        let loudest = (0..frame.len()).max_by(|&a, &b| frame[a].total_cmp(&frame[b])).unwrap();
        assert_eq!(loudest, (1000.0 / rate * N_FFT as f32).round() as usize);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.png");
        write_png(&path, &x).unwrap();
        let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&path).unwrap()));
        let reader = decoder.read_info().unwrap();
        assert_eq!(reader.info().height as usize, N_FFT / 2 + 1);
        // 59 frames, each drawn 7 pixels wide to reach the minimum width.
        assert_eq!(reader.info().width as usize, db.len() * MIN_WIDTH.div_ceil(db.len()));
        // Stacked: three images and two separating rows.
        write_png_stacked(&path, &[&x, &x[..4000], &x]).unwrap();
        let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&path).unwrap()));
        assert_eq!(decoder.read_info().unwrap().info().height as usize, 3 * (N_FFT / 2 + 1) + 2);
    }
}
