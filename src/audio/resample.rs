//! Sample-rate conversion with rubato's FFT resampler (band-limited, no audible aliasing).

use rubato::audioadapter_buffers::direct::InterleavedSlice;
use rubato::{Fft, FixedSync, Resampler};

use crate::{Error, Result};

/// Resamples a whole mono signal from `from` Hz to `to` Hz. The output has
/// `ceil(len · to / from)` samples and no start-up delay.
pub fn resample(samples: &[f32], from: u32, to: u32) -> Result<Vec<f32>> {
    if from == to || samples.is_empty() {
        return Ok(samples.to_vec());
    }
    let out_len = (samples.len() as u128 * to as u128).div_ceil(from.max(1) as u128);
    if out_len > crate::audio::wav::MAX_SAMPLES as u128 {
        return Err(Error::Config(format!(
            "{} samples at {from} Hz make {out_len} at {to} Hz, more than the {} one signal may hold: split the file",
            samples.len(),
            crate::audio::wav::MAX_SAMPLES
        )));
    }
    let mut resampler = Fft::<f32>::new(from as usize, to as usize, 1024, 1, FixedSync::Input)
        .map_err(|e| Error::Config(format!("cannot resample {from} Hz to {to} Hz: {e}")))?;
    let input =
        InterleavedSlice::new(samples, 1, samples.len()).map_err(|e| Error::Config(format!("resampler input: {e}")))?;
    let out = resampler
        .process_all(&input, samples.len(), None)
        .map_err(|e| Error::Config(format!("resampling {from} Hz to {to} Hz: {e}")))?;
    Ok(out.take_data())
}
