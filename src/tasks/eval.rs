//! `wavegen eval`: the NLL of WAV files under a checkpoint (teacher forcing, the training
//! preprocessing), in bits per sample: density estimation, usable for anomaly detection.

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::{AudioModel, Reporter};
use crate::audio::mel::Mel;
use crate::audio::wav;
use crate::core::train::nll_sum;
use crate::data::Batch;
use crate::data::wav_folder::{find_wav_files, frame_context, window, window_frames};
use crate::{Error, Result};

/// One file's score.
#[derive(Debug, Serialize)]
pub struct FileScore {
    /// The file.
    pub path: PathBuf,
    /// Samples scored (at the model rate, after trimming).
    pub samples: usize,
    /// Mean NLL in bits per sample.
    pub bits_per_sample: f64,
}

/// Scores of all files.
#[derive(Debug, Serialize)]
pub struct EvalReport {
    /// Per file, in the order given.
    pub files: Vec<FileScore>,
    /// Samples scored in all.
    pub samples: usize,
    /// NLL over all samples, bits per sample.
    pub bits_per_sample: f64,
}

/// Expands folders into their WAV files; keeps files as given.
pub fn expand_paths(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            out.extend(find_wav_files(p)?.files.into_iter().map(|(_, path)| path));
        } else {
            out.push(p.clone());
        }
    }
    if out.is_empty() {
        return Err(Error::Config("no WAV files to score".into()));
    }
    Ok(out)
}

/// The summed NLL in nats of one file's codes, in windows of `window` targets, batched; a
/// vocoder's windows carry the file's features `mel` (frames outside the file at the floor,
/// windows on frame boundaries, as in training).
pub fn nll_of_codes(
    model: &AudioModel,
    codes: &[u8],
    mel: Option<&Mel>,
    label: Option<u32>,
    window_len: usize,
    batch: usize,
) -> Result<f64> {
    let hop = model.model.cfg.local.as_ref().map(|l| l.mel.hop);
    let context = frame_context(model.model.cfg.receptive_field(), hop);
    let starts: Vec<usize> = (0..codes.len()).step_by(window_len).collect();
    let batches = starts
        .chunks(batch)
        .map(|chunk| {
            let (tokens, mask): (Vec<_>, Vec<_>) = chunk.iter().map(|&s| window(codes, s, context, window_len)).unzip();
            let mut b =
                Batch::from_rows(&tokens, &mask, label.map(|l| vec![l; chunk.len()]), &candle_core::Device::Cpu)?;
            if let (Some(hop), Some(mel)) = (hop, mel) {
                let mut values = Vec::new();
                for &s in chunk {
                    let first = s as isize - context as isize;
                    window_frames(
                        first,
                        context + window_len,
                        hop,
                        mel.bands,
                        |f, row| mel.copy_frame(f, row),
                        &mut values,
                    );
                }
                let shape = (chunk.len(), values.len() / (chunk.len() * mel.bands), mel.bands);
                b.features = Some(candle_core::Tensor::from_vec(values, shape, &candle_core::Device::Cpu)?);
            }
            Ok(b)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(nll_sum(&model.model, &batches)?.0)
}

/// Scores `paths` (files or folders) under the checkpoint; none: its held-out files.
pub fn eval(
    checkpoint: &Path,
    paths: &[PathBuf],
    label: Option<&str>,
    reporter: &mut dyn Reporter,
) -> Result<EvalReport> {
    let model = AudioModel::load(checkpoint)?;
    let label = model.label_index(label)?;
    // No paths: the files the checkpoint held out of its training.
    let files = if paths.is_empty() { model.held_out_files()? } else { expand_paths(paths)? };
    let settings = model.audio().settings.clone();
    let window_len = model.audio().window;
    let (mut scores, mut total_nats, mut total_samples) = (Vec::new(), 0.0, 0);
    for (i, path) in files.iter().enumerate() {
        reporter.progress("scoring", i as u64, files.len() as u64);
        let audio = wav::read_mono(path)?;
        let samples =
            settings.prepare_for_scoring(&audio).map_err(|reason| Error::NoAudio { path: path.clone(), reason })?;
        let codes = crate::audio::mulaw::encode_all(&samples);
        // A vocoder is scored given the file's own features.
        let mel = match &model.model.cfg.local {
            Some(l) => Some(crate::audio::mel::log_mel(&samples, &l.mel)?),
            None => None,
        };
        let nats = nll_of_codes(&model, &codes, mel.as_ref(), label, window_len, 8)?;
        total_nats += nats;
        total_samples += codes.len();
        scores.push(FileScore {
            path: path.clone(),
            samples: codes.len(),
            bits_per_sample: nats / codes.len() as f64 / std::f64::consts::LN_2,
        });
    }
    reporter.progress("scoring", files.len() as u64, files.len() as u64);
    Ok(EvalReport {
        files: scores,
        samples: total_samples,
        bits_per_sample: total_nats / total_samples as f64 / std::f64::consts::LN_2,
    })
}
