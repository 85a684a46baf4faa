//! `wavegen eval`: the NLL of WAV files under a checkpoint (teacher forcing, the training
//! preprocessing), in bits per sample: density estimation, usable for anomaly detection.

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::{AudioModel, Reporter};
use crate::audio::mel::Mel;
use crate::audio::wav;
use crate::core::Autoregressive;
use crate::core::train::in_parallel;
use crate::data::Batch;
use crate::data::wav_folder::{find_wav_files, frame_context, window, window_frames};
use crate::{Error, Result};
use candle_core::DType;

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
    /// The NLL of the samples in loud, middle and quiet parts of the files (where the bits go:
    /// the noise floor of pauses is unpredictable to any model).
    pub by_level: Vec<LevelScore>,
}

/// The NLL of the samples whose block lies in one range of level.
#[derive(Debug, Serialize)]
pub struct LevelScore {
    /// The range, in dB relative to the loudest block of each file: from `above_db` (inclusive)
    /// down to `to_db` (exclusive; `None`: no lower end).
    pub above_db: f64,
    /// See `above_db`.
    pub to_db: Option<f64>,
    /// Samples in the range, over all files.
    pub samples: usize,
    /// Their share of all samples.
    pub share: f64,
    /// Their mean NLL, bits per sample (`None` when there are none).
    pub bits_per_sample: Option<f64>,
}

/// Blocks of this many milliseconds are what a sample's level is measured over.
pub const LEVEL_BLOCK_MS: usize = 20;

/// The lower ends of the level ranges of [`EvalReport::by_level`], dB below a file's loudest
/// block.
const LEVEL_RANGES: [Option<f64>; 4] = [Some(-10.0), Some(-20.0), Some(-30.0), None];

/// The level of each sample's block of `block` samples, in dB below the loudest block of
/// `samples` (mean squares compared).
fn sample_levels(samples: &[f32], block: usize) -> Vec<f64> {
    let power: Vec<f64> = samples
        .chunks(block)
        .map(|b| b.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>() / b.len() as f64)
        .collect();
    let loudest = power.iter().fold(0.0f64, |m, &p| m.max(p));
    let db = |p: f64| if loudest > 0.0 { 10.0 * (p.max(1e-30) / loudest).log10() } else { 0.0 };
    power.iter().flat_map(|&p| std::iter::repeat_n(db(p), block)).take(samples.len()).collect()
}

/// The range of [`LEVEL_RANGES`] a level falls in.
fn level_range(db: f64) -> usize {
    LEVEL_RANGES.iter().position(|low| low.is_none_or(|low| db > low)).expect("invariant: the last range is open")
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

/// The NLL in nats of each of one file's codes, in windows of `window` targets, batched; a
/// vocoder's windows carry the file's features `mel` (frames outside the file at the floor,
/// windows on frame boundaries, as in training).
pub fn nll_of_each_code(
    model: &AudioModel,
    codes: &[u8],
    mel: Option<&Mel>,
    label: Option<u32>,
    window_len: usize,
    batch: usize,
) -> Result<Vec<f32>> {
    let local = model.model.cfg.local.as_ref();
    let hop = local.map(|l| l.mel.hop);
    let side_frames = local.map_or(1, |l| l.context);
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
                        (hop, side_frames),
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
    // Each window's targets are the positions its mask keeps, in order, and the windows follow
    // one another through the file.
    let per_batch = in_parallel(&batches, rayon::current_num_threads(), |b| -> Result<Vec<f32>> {
        let nll = model.model.position_nll(b)?.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        let mask = b.mask.to_vec2::<f32>()?;
        Ok(nll
            .iter()
            .zip(&mask)
            .flat_map(|(n, m)| n.iter().zip(m).filter(|&(_, &m)| m > 0.0).map(|(&n, _)| n))
            .collect())
    });
    let mut out = Vec::with_capacity(codes.len());
    for b in per_batch {
        out.extend(b?);
    }
    debug_assert_eq!(out.len(), codes.len());
    Ok(out)
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
    let mut by_level = [(0.0f64, 0usize); LEVEL_RANGES.len()];
    let level_block = (settings.sample_rate as usize * LEVEL_BLOCK_MS / 1000).max(1);
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
        let each = nll_of_each_code(&model, &codes, mel.as_ref(), label, window_len, 8)?;
        for (&nll, db) in each.iter().zip(sample_levels(&samples, level_block)) {
            let range = &mut by_level[level_range(db)];
            range.0 += nll as f64;
            range.1 += 1;
        }
        let nats: f64 = each.iter().map(|&n| n as f64).sum();
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
        by_level: by_level
            .iter()
            .enumerate()
            .map(|(i, &(nats, n))| LevelScore {
                above_db: if i == 0 { 0.0 } else { LEVEL_RANGES[i - 1].expect("invariant: only the last is open") },
                to_db: LEVEL_RANGES[i],
                samples: n,
                share: n as f64 / total_samples.max(1) as f64,
                bits_per_sample: (n > 0).then(|| nats / n as f64 / std::f64::consts::LN_2),
            })
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_are_per_block_below_the_loudest() {
        // Blocks of 4: full scale, a tenth (−20 dB), a thousandth (−60 dB), a partial block.
        let x: Vec<f32> = [1.0f32, 0.1, 0.001].iter().flat_map(|&a| [a, -a, a, -a]).chain([1.0, -1.0]).collect();
        let db = sample_levels(&x, 4);
        assert_eq!(db.len(), x.len());
        for (i, want) in [0.0, -20.0, -60.0, 0.0].iter().enumerate() {
            assert!((db[4 * i] - want).abs() < 1e-5 && db[4 * i] == db[(4 * i + 1).min(x.len() - 1)], "{db:?}");
        }
        // Each range holds its upper end: −10 dB is the second's, −30 and below the last's.
        assert_eq!([0.0, -9.9, -10.0, -19.9, -20.0, -30.0, -120.0].map(level_range), [0, 0, 1, 1, 2, 3, 3]);
        assert!(sample_levels(&[0.0; 5], 4).iter().all(|&d| d == 0.0), "silence is at its own peak");
    }
}
