//! Helpers shared by the integration tests: synthetic WAV files and quick training options.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use wavegen::core::optim::AdamWConfig;
use wavegen::core::train::TrainConfig;
use wavegen::data::wav_folder::AudioSettings;
use wavegen::models::wavenet;
use wavegen::tasks::train::TrainOptions;

/// A sine of `freq` Hz at `rate`, amplitude `amp`.
pub fn sine(freq: f64, rate: u32, seconds: f64, amp: f64) -> Vec<f64> {
    let n = (seconds * rate as f64).round() as usize;
    (0..n).map(|i| amp * (2.0 * std::f64::consts::PI * freq * i as f64 / rate as f64).sin()).collect()
}

/// Writes `samples` (in [-1, 1]) to every channel of a WAV with the given format.
pub fn write_wav(path: &Path, samples: &[f64], rate: u32, channels: u16, bits: u16, float: bool) {
    let spec = hound::WavSpec {
        channels,
        sample_rate: rate,
        bits_per_sample: bits,
        sample_format: if float { hound::SampleFormat::Float } else { hound::SampleFormat::Int },
    };
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let mut w = hound::WavWriter::create(path, spec).unwrap();
    for &x in samples {
        for _ in 0..channels {
            if float {
                w.write_sample(x as f32).unwrap();
            } else {
                let scale = ((1i64 << (bits - 1)) - 1) as f64;
                w.write_sample((x * scale).round() as i32).unwrap();
            }
        }
    }
    w.finalize().unwrap();
}

/// A folder of `files` WAV files holding a periodic signal of `period` samples at `rate`.
pub fn periodic_folder(dir: &Path, files: usize, period: usize, rate: u32, seconds: f64) -> PathBuf {
    let folder = dir.join("periodic");
    for f in 0..files {
        let n = (seconds * rate as f64) as usize;
        // Start mid-cycle so the silence trimming keeps every file's phase different.
        let x: Vec<f64> = (0..n)
            .map(|i| 0.6 * (2.0 * std::f64::consts::PI * ((i + 3 * f + 1) % period) as f64 / period as f64).sin())
            .collect();
        write_wav(&folder.join(format!("p{f}.wav")), &x, rate, 1, 16, false);
    }
    folder
}

/// Training options for a tiny WaveNet at 8 kHz.
pub fn tiny_options(data: &Path, out: &Path, steps: u64) -> TrainOptions {
    TrainOptions {
        data_dir: Some(data.to_path_buf()),
        val_dir: None,
        val_fraction: 0.25,
        out: out.to_path_buf(),
        resume: false,
        reschedule_decay: None,
        model: wavenet::Config::tiny(),
        labels: false,
        audio: AudioSettings { sample_rate: 8000, ..AudioSettings::default() },
        train: TrainConfig {
            max_steps: steps,
            max_minutes: None,
            lr: 1e-2,
            min_lr: 1e-3,
            warmup_steps: 10,
            decay_steps: steps,
            adamw: AdamWConfig::default(),
            eval_every: 20,
            checkpoint_every: 20,
        },
        window: 128,
        batch_size: 4,
        max_val_windows: 8,
        seed: 1,
        cache_dir: out.with_extension("cache"),
    }
}
