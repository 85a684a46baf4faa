//! WAV in and out (hound). Any integer bit depth from 8 to 32, 32-bit float, any channel count
//! in; channels are averaged to mono. Out: 16-bit PCM, written atomically.

use std::path::Path;

use crate::{Error, Result};

/// A mono signal in [-1, 1] and its sample rate.
#[derive(Debug, Clone)]
pub struct Mono {
    /// Samples in [-1, 1].
    pub samples: Vec<f32>,
    /// Sample rate in Hz.
    pub sample_rate: u32,
}

impl Mono {
    /// Duration in seconds.
    pub fn seconds(&self) -> f64 {
        self.samples.len() as f64 / self.sample_rate as f64
    }
}

/// Reads a WAV file and mixes its channels down to mono.
pub fn read_mono(path: &Path) -> Result<Mono> {
    let bad = |reason: String| Error::BadWav { path: path.to_path_buf(), reason };
    let reader = hound::WavReader::open(path).map_err(|e| match e {
        hound::Error::IoError(io) if io.kind() != std::io::ErrorKind::UnexpectedEof => Error::io(path, io),
        other => bad(other.to_string()),
    })?;
    let spec = reader.spec();
    let channels = spec.channels as usize;
    if channels == 0 || spec.sample_rate == 0 {
        return Err(bad(format!("{} channels at {} Hz", spec.channels, spec.sample_rate)));
    }
    // hound checks the data chunk's declared length, not that the bytes are there: a truncated
    // file shows up as an error part-way through the samples, which we report rather than skip.
    let interleaved: Vec<f32> = match spec.sample_format {
        hound::SampleFormat::Float if spec.bits_per_sample == 32 => reader
            .into_samples::<f32>()
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| bad(format!("reading samples: {e}")))?,
        hound::SampleFormat::Int if (8..=32).contains(&spec.bits_per_sample) => {
            let scale = 1.0 / (1u64 << (spec.bits_per_sample - 1)) as f32;
            reader
                .into_samples::<i32>()
                .map(|s| s.map(|v| v as f32 * scale))
                .collect::<std::result::Result<_, _>>()
                .map_err(|e| bad(format!("reading samples: {e}")))?
        }
        format => {
            return Err(bad(format!("unsupported sample format {format:?} with {} bits", spec.bits_per_sample)));
        }
    };
    let samples = interleaved.chunks_exact(channels).map(|frame| frame.iter().sum::<f32>() / channels as f32).collect();
    Ok(Mono { samples, sample_rate: spec.sample_rate })
}

/// Writes a mono 16-bit PCM WAV, or several equally long signals as one multichannel file.
/// The file appears complete or not at all (temporary file, then rename).
pub fn write_pcm16(path: &Path, sample_rate: u32, channels: &[&[f32]]) -> Result<()> {
    let spec = hound::WavSpec {
        channels: channels.len() as u16,
        sample_rate,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let frames = channels.iter().map(|c| c.len()).min().unwrap_or(0);
    crate::fsutil::write_atomically(path, |file| {
        let mut writer = hound::WavWriter::new(std::io::BufWriter::new(file), spec).map_err(std::io::Error::other)?;
        for i in 0..frames {
            for ch in channels {
                let v = (ch[i].clamp(-1.0, 1.0) * 32767.0).round() as i16;
                writer.write_sample(v).map_err(std::io::Error::other)?;
            }
        }
        writer.finalize().map_err(std::io::Error::other)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_then_read_round_trips_within_16_bit_precision() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.wav");
        let x: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.01).sin() * 0.8).collect();
        write_pcm16(&path, 8000, &[&x]).unwrap();
        let back = read_mono(&path).unwrap();
        assert_eq!(back.sample_rate, 8000);
        assert_eq!(back.samples.len(), x.len());
        for (a, b) in x.iter().zip(&back.samples) {
            assert!((a - b).abs() < 1e-4);
        }
    }

    #[test]
    fn missing_file_is_an_io_error_naming_it() {
        let err = read_mono(Path::new("/nonexistent/x.wav")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/x.wav"), "{err}");
    }
}
