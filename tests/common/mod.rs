//! Helpers shared by the integration tests: synthetic WAV files and quick training options.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

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
        change_steps: None,
        reschedule_decay: None,
        change_precision: None,
        change_average: None,
        speed_perturbation: None,
        model: wavegen::tasks::train::AudioModelSpec::Wavenet(wavenet::Config::tiny()),
        labels: false,
        condition: None,
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
            precision: Default::default(),
            dropout: 0.0,
        },
        window: Some(128),
        batch_size: Some(4),
        max_val_windows: 8,
        seed: 1,
        cache_dir: out.with_extension("cache"),
    }
}

/// Runs the binary with `args`, decoded corpora cached in `cache`.
pub fn wavegen(args: &[&str], cache: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_wavegen"))
        .args(args)
        .env("WAVEGEN_CACHE", cache)
        .output()
        .expect("the binary runs")
}

/// The one JSON object a `--json` command printed (failing if it failed).
pub fn json(out: &Output) -> serde_json::Value {
    assert!(out.status.success(), "failed: {}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout.clone()).unwrap();
    assert_eq!(stdout.lines().count(), 1, "one JSON object on stdout: {stdout}");
    serde_json::from_str(&stdout).unwrap()
}

/// Fails unless the command exited non-zero with a one-line error naming every `needle`, no panic.
pub fn assert_clear_error(out: &Output, needle: &str) {
    let line = error_line(out);
    assert!(line.contains(needle), "error {line:?} should mention {needle:?}");
}

/// The `error:` line of a command that must have failed cleanly (exit 2, no panic).
pub fn error_line(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "should have failed: {stderr}");
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    assert_eq!(out.status.code(), Some(2), "exit code of an error: {stderr}");
    stderr.lines().find(|l| l.starts_with("error:")).unwrap_or_else(|| panic!("no error line in {stderr}")).to_string()
}
