//! WAV in and out. In (hound): any integer bit depth from 8 to 32, 32- and 64-bit float
//! (hound does not read 64-bit float; a small reader of the `fmt `/`data` chunks does), any
//! channel count; channels are averaged to mono. Out: 16-bit PCM written as a stream whose
//! length is known in advance, so it can go to a pipe or `/dev/stdout` as well as a file.

use std::io::{BufReader, Read, Seek, SeekFrom, Write};
use std::path::Path;

use crate::fsutil::Output;
use crate::{Error, Result};

/// The most samples (over all channels) a file may hold: 2^28, about 4.6 hours of mono at
/// 16 kHz, 1 GiB as f32.
pub const MAX_SAMPLES: u64 = 1 << 28;
/// Sample rates a file may declare.
const RATES: std::ops::RangeInclusive<u32> = 1000..=768_000;

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

/// Reads a WAV file and mixes its channels down to mono. Non-finite float samples become 0.
pub fn read_mono(path: &Path) -> Result<Mono> {
    let bad = |reason: String| Error::BadWav { path: path.to_path_buf(), reason };
    let (file, file_len) = crate::fsutil::open_regular(path)?;
    let mut file = BufReader::new(file);
    let format = read_format(&mut file).map_err(bad)?;
    file.seek(SeekFrom::Start(0)).map_err(|e| Error::io(path, e))?;
    if !RATES.contains(&format.sample_rate) {
        return Err(bad(format!("sample rate {} Hz, outside 1 kHz to 768 kHz", format.sample_rate)));
    }
    if format.channels == 0 {
        return Err(bad("0 channels".into()));
    }
    if format.float && format.bits == 64 {
        let samples = read_f64_data(&mut file, file_len).map_err(bad)?;
        return Ok(mix(samples, format.channels as usize, format.sample_rate));
    }
    let reader = hound::WavReader::new(file).map_err(|e| match e {
        hound::Error::IoError(io) if io.kind() != std::io::ErrorKind::UnexpectedEof => Error::io(path, io),
        other => bad(other.to_string()),
    })?;
    let spec = reader.spec();
    let declared = reader.len() as u64;
    if declared > MAX_SAMPLES {
        return Err(bad(format!("{declared} samples, more than the {MAX_SAMPLES} a file may hold: split it")));
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
    Ok(mix(interleaved, spec.channels as usize, spec.sample_rate))
}

fn mix(interleaved: Vec<f32>, channels: usize, sample_rate: u32) -> Mono {
    let clean = |x: f32| if x.is_finite() { x } else { 0.0 };
    let samples = if channels == 1 {
        interleaved.into_iter().map(clean).collect()
    } else {
        interleaved.chunks_exact(channels).map(|f| f.iter().map(|&x| clean(x)).sum::<f32>() / channels as f32).collect()
    };
    Mono { samples, sample_rate }
}

/// What the `fmt ` chunk says.
struct Format {
    channels: u16,
    sample_rate: u32,
    bits: u16,
    float: bool,
}

/// Walks the RIFF chunks up to `fmt ` and reads it.
fn read_format(r: &mut impl Read) -> std::result::Result<Format, String> {
    let mut header = [0u8; 12];
    r.read_exact(&mut header).map_err(|_| "shorter than a WAV header".to_string())?;
    if &header[0..4] != b"RIFF" || &header[8..12] != b"WAVE" {
        return Err("no RIFF/WAVE header".into());
    }
    loop {
        let (id, len) = chunk_header(r)?;
        if &id == b"fmt " {
            if len < 16 {
                return Err(format!("a fmt chunk of {len} bytes (at least 16 expected)"));
            }
            let mut fmt = vec![0u8; len.min(64) as usize];
            r.read_exact(&mut fmt).map_err(|_| "the fmt chunk is cut short".to_string())?;
            let u16_at = |i: usize| u16::from_le_bytes([fmt[i], fmt[i + 1]]);
            let tag = u16_at(0);
            // WAVE_FORMAT_EXTENSIBLE: the real tag is the first two bytes of the sub-format GUID.
            let tag = if tag == 0xFFFE && fmt.len() >= 26 { u16_at(24) } else { tag };
            return Ok(Format {
                channels: u16_at(2),
                sample_rate: u32::from_le_bytes([fmt[4], fmt[5], fmt[6], fmt[7]]),
                bits: u16_at(14),
                float: tag == 3,
            });
        }
        skip(r, len)?;
    }
}

fn chunk_header(r: &mut impl Read) -> std::result::Result<([u8; 4], u64), String> {
    let mut h = [0u8; 8];
    r.read_exact(&mut h).map_err(|_| "no fmt or data chunk before the end of the file".to_string())?;
    Ok(([h[0], h[1], h[2], h[3]], u32::from_le_bytes([h[4], h[5], h[6], h[7]]) as u64))
}

fn skip(r: &mut impl Read, len: u64) -> std::result::Result<(), String> {
    let padded = len + (len & 1); // chunks are word-aligned
    let skipped = std::io::copy(&mut r.take(padded), &mut std::io::sink()).map_err(|e| e.to_string())?;
    if skipped < padded { Err("a chunk runs past the end of the file".into()) } else { Ok(()) }
}

/// The samples of a 64-bit float file (positioned at its start).
fn read_f64_data(r: &mut impl Read, file_len: u64) -> std::result::Result<Vec<f32>, String> {
    r.read_exact(&mut [0u8; 12]).map_err(|e| e.to_string())?;
    loop {
        let (id, len) = chunk_header(r)?;
        if &id != b"data" {
            skip(r, len)?;
            continue;
        }
        if len > file_len {
            return Err(format!("the data chunk claims {len} bytes, the file has {file_len} (truncated?)"));
        }
        if len / 8 > MAX_SAMPLES {
            return Err(format!("{} samples, more than the {MAX_SAMPLES} a file may hold: split it", len / 8));
        }
        let mut bytes = Vec::with_capacity(len as usize);
        r.take(len).read_to_end(&mut bytes).map_err(|e| e.to_string())?;
        if (bytes.len() as u64) < len {
            return Err(format!("reading samples: the file ends {} bytes into a {len}-byte data chunk", bytes.len()));
        }
        return Ok(bytes
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().expect("invariant: 8 bytes")) as f32)
            .collect());
    }
}

/// A 16-bit PCM WAV being written frame by frame, in constant memory. With the frame count
/// known at the start the header is final and any writable target works (a pipe, a FIFO);
/// an open-ended file gets its lengths patched in at the end (a stream that cannot seek keeps
/// the "unknown length" sizes, 0xFFFFFFFF, that streaming readers accept).
pub struct PcmWriter {
    out: Output,
    buffer: Vec<u8>,
    channels: usize,
    /// Frames the header announced (None: open-ended).
    announced: Option<u64>,
    written: u64,
    path: std::path::PathBuf,
}

/// The largest data chunk a WAV file can describe.
const MAX_DATA_BYTES: u64 = u32::MAX as u64 - 36;

impl PcmWriter {
    /// Starts `path` (see [`Output`] for what happens to links, devices and FIFOs) for
    /// `frames` frames of `channels` channels.
    pub fn create(path: &Path, sample_rate: u32, channels: usize, frames: u64) -> Result<PcmWriter> {
        Self::start(path, sample_rate, channels, Some(frames))
    }

    /// Starts `path` for frames whose number is not known yet.
    pub fn open_ended(path: &Path, sample_rate: u32, channels: usize) -> Result<PcmWriter> {
        Self::start(path, sample_rate, channels, None)
    }

    fn start(path: &Path, sample_rate: u32, channels: usize, frames: Option<u64>) -> Result<PcmWriter> {
        let data_bytes = frames.map(|f| f.saturating_mul(channels as u64 * 2));
        if channels == 0 || channels > u16::MAX as usize || data_bytes.is_some_and(|b| b > MAX_DATA_BYTES) {
            return Err(Error::Config(format!(
                "{}: a WAV file holds at most 4 GiB of samples and 65535 channels ({channels} channels of {} frames asked)",
                path.display(),
                frames.map_or("?".into(), |f| f.to_string())
            )));
        }
        let mut out = Output::create(path)?;
        let header = header(sample_rate, channels as u16, data_bytes.map_or(u32::MAX, |b| b as u32));
        out.file().write_all(&header).map_err(|e| Error::io(path, e))?;
        Ok(PcmWriter { out, buffer: Vec::new(), channels, announced: frames, written: 0, path: path.to_path_buf() })
    }

    /// Appends frames: `channels` equally long slices, one per channel.
    pub fn write(&mut self, channels: &[&[f32]]) -> Result<()> {
        let frames = channels.first().map_or(0, |c| c.len()) as u64;
        if channels.len() != self.channels || channels.iter().any(|c| c.len() as u64 != frames) {
            return Err(Error::Config("PcmWriter::write: one equally long slice per channel".into()));
        }
        let limit = self.announced.unwrap_or(MAX_DATA_BYTES / (2 * self.channels as u64));
        if self.written + frames > limit {
            return Err(Error::Config(format!("{}: more frames than the file can hold", self.path.display())));
        }
        self.buffer.clear();
        for i in 0..frames as usize {
            for ch in channels {
                let v = (ch[i].clamp(-1.0, 1.0) * 32767.0).round() as i16;
                self.buffer.extend_from_slice(&v.to_le_bytes());
            }
        }
        self.written += frames;
        self.out.file().write_all(&self.buffer).map_err(|e| Error::io(&self.path, e))
    }

    /// Finishes the file: all announced frames must have been written; an open-ended file
    /// gets its lengths.
    pub fn finish(mut self) -> Result<()> {
        match self.announced {
            Some(n) if n != self.written => {
                return Err(Error::Config(format!("{} frames fewer than announced were written", n - self.written)));
            }
            Some(_) => {}
            None if self.out.is_replacing() => {
                let data = (self.written * 2 * self.channels as u64) as u32;
                let file = self.out.file();
                let patch = |f: &mut std::fs::File| -> std::io::Result<()> {
                    f.seek(SeekFrom::Start(4))?;
                    f.write_all(&(36 + data).to_le_bytes())?;
                    f.seek(SeekFrom::Start(40))?;
                    f.write_all(&data.to_le_bytes())
                };
                patch(file).map_err(|e| Error::io(&self.path, e))?;
            }
            None => {} // a stream: sizes stay "unknown"
        }
        self.out.commit()
    }
}

/// The 44-byte header of 16-bit PCM with `data_bytes` of samples.
fn header(sample_rate: u32, channels: u16, data_bytes: u32) -> Vec<u8> {
    let block = channels * 2;
    let mut h = Vec::with_capacity(44);
    h.extend_from_slice(b"RIFF");
    h.extend_from_slice(&data_bytes.saturating_add(36).to_le_bytes());
    h.extend_from_slice(b"WAVEfmt ");
    h.extend_from_slice(&16u32.to_le_bytes());
    h.extend_from_slice(&1u16.to_le_bytes()); // PCM
    h.extend_from_slice(&channels.to_le_bytes());
    h.extend_from_slice(&sample_rate.to_le_bytes());
    h.extend_from_slice(&(sample_rate * block as u32).to_le_bytes());
    h.extend_from_slice(&block.to_le_bytes());
    h.extend_from_slice(&16u16.to_le_bytes());
    h.extend_from_slice(b"data");
    h.extend_from_slice(&data_bytes.to_le_bytes());
    h
}

/// Writes a mono 16-bit PCM WAV, or several equally long signals as one multichannel file.
/// The file appears complete or not at all.
pub fn write_pcm16(path: &Path, sample_rate: u32, channels: &[&[f32]]) -> Result<()> {
    let frames = channels.iter().map(|c| c.len()).min().unwrap_or(0);
    let mut w = PcmWriter::create(path, sample_rate, channels.len(), frames as u64)?;
    let trimmed: Vec<&[f32]> = channels.iter().map(|c| &c[..frames]).collect();
    w.write(&trimmed)?;
    w.finish()
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
        // hound reads what we write, channels and all.
        write_pcm16(&path, 16000, &[&x, &x, &x]).unwrap();
        let r = hound::WavReader::open(&path).unwrap();
        assert_eq!((r.spec().channels, r.spec().sample_rate, r.len()), (3, 16000, 3000));
        // Open-ended: the lengths are patched in at the end.
        let mut w = PcmWriter::open_ended(&path, 8000, 1).unwrap();
        w.write(&[&x[..300]]).unwrap();
        w.write(&[&x[300..]]).unwrap();
        w.finish().unwrap();
        assert_eq!(read_mono(&path).unwrap().samples.len(), 1000);
    }

    #[test]
    fn a_64_bit_float_file_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f64.wav");
        let x: Vec<f64> = (0..500).map(|i| (i as f64 * 0.02).sin() * 0.5).collect();
        let data: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut f = Vec::new();
        f.extend_from_slice(b"RIFF");
        f.extend_from_slice(&(36 + data.len() as u32).to_le_bytes());
        f.extend_from_slice(b"WAVEfmt ");
        for v in [16u32.to_le_bytes().to_vec(), 3u16.to_le_bytes().to_vec(), 1u16.to_le_bytes().to_vec()] {
            f.extend_from_slice(&v);
        }
        f.extend_from_slice(&8000u32.to_le_bytes());
        f.extend_from_slice(&64000u32.to_le_bytes());
        f.extend_from_slice(&8u16.to_le_bytes());
        f.extend_from_slice(&64u16.to_le_bytes());
        f.extend_from_slice(b"data");
        f.extend_from_slice(&(data.len() as u32).to_le_bytes());
        f.extend_from_slice(&data);
        std::fs::write(&path, &f).unwrap();
        let m = read_mono(&path).unwrap();
        assert_eq!((m.sample_rate, m.samples.len()), (8000, 500));
        assert!((m.samples[100] - x[100] as f32).abs() < 1e-7);
        std::fs::write(&path, &f[..f.len() - 100]).unwrap();
        let err = read_mono(&path).unwrap_err().to_string();
        assert!(err.contains("f64.wav") && err.contains("truncated"), "{err}");
    }

    #[test]
    fn missing_file_is_an_io_error_naming_it() {
        let err = read_mono(Path::new("/nonexistent/x.wav")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/x.wav"), "{err}");
    }
}
