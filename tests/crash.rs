//! Crash consistency of checkpoints: a trainer that writes a checkpoint every step is killed
//! with SIGKILL between every two steps of a commit (by the test-only `WAVEGEN_CRASH_AT` hook)
//! and at random moments; every time, the directory opens and `--resume` ends on exactly the
//! weights of a run that was never interrupted.
#![cfg(unix)]

mod common;

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use candle_core::DType;
use wavegen::core::checkpoint;
use wavegen::tasks::run;

const STEPS: &str = "12";

fn train_command(data: &Path, out: &Path, cache: &Path, resume: bool) -> Command {
    train_steps(data, out, cache, resume, STEPS)
}

fn train_steps(data: &Path, out: &Path, cache: &Path, resume: bool, steps: &str) -> Command {
    train_threads(data, out, cache, resume, steps, "1")
}

fn train_threads(data: &Path, out: &Path, cache: &Path, resume: bool, steps: &str, threads: &str) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_wavegen"));
    cmd.args(["--threads", threads, "train"])
        .arg(data)
        .arg("--out")
        .arg(out)
        .args(["--preset", "tiny", "--sample-rate", "8000", "--steps", steps, "--checkpoint-every", "1"])
        .args(["--eval-every", "5", "--val-windows", "4"])
        .env("WAVEGEN_CACHE", cache)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if resume {
        cmd.arg("--resume");
    }
    cmd
}

fn run_ok(mut cmd: Command) {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// The weights of a committed checkpoint, as raw f32 bits by name.
fn weights(dir: &Path) -> Vec<(String, Vec<u32>)> {
    let mut w: Vec<(String, Vec<u32>)> = run::open(dir)
        .unwrap_or_else(|e| panic!("{e}"))
        .weights()
        .unwrap()
        .into_iter()
        .map(|(k, t)| {
            let v = t.flatten_all().unwrap().to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap();
            (k, v.into_iter().map(f32::to_bits).collect())
        })
        .collect();
    w.sort();
    w
}

/// After a crash: the directory holds a loadable checkpoint (or none, if the first commit was
/// cut), and continuing it reproduces the uninterrupted run bit for bit.
fn recover_and_compare(data: &Path, out: &Path, cache: &Path, reference: &[(String, Vec<u32>)], what: &str) {
    let resume = checkpoint::exists(out);
    if resume {
        let ckpt = run::open(out).unwrap_or_else(|e| panic!("{what}: {e}"));
        ckpt.weights().unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(ckpt.manifest.state.step >= 1, "{what}");
    }
    run_ok(train_command(data, out, cache, resume));
    assert!(weights(out) == reference, "{what}: resumed weights differ from the uninterrupted run");
    let leftovers: Vec<String> = std::fs::read_dir(out)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{what}: temporary files left: {leftovers:?}");
}

#[test]
fn a_kill_at_any_point_of_a_commit_leaves_a_checkpoint_that_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let data = common::periodic_folder(dir.path(), 3, 16, 8000, 0.3);
    let reference_dir = dir.path().join("reference");
    run_ok(train_command(&data, &reference_dir, &cache, false)); // decodes the corpus into the cache
    let again = dir.path().join("timed");
    let started = Instant::now();
    run_ok(train_command(&data, &again, &cache, false));
    let run_time = started.elapsed();
    let reference = weights(&reference_dir);
    assert!(weights(&again) == reference, "two uninterrupted runs agree");

    // Each commit passes "checkpoint-file" twice (weights, optimizer), then "-staged" and
    // "-committed" once: these kill before the config, between the files, before the
    // switch of `current`, and after it (before the old folder is removed).
    let points = [("checkpoint-file", 1..=5), ("checkpoint-staged", 1..=3), ("checkpoint-committed", 1..=3)];
    let mut crashes = 0;
    for (point, range) in points {
        for n in range {
            let out = dir.path().join(format!("{point}-{n}"));
            let mut cmd = train_command(&data, &out, &cache, false);
            cmd.env("WAVEGEN_CRASH_AT", format!("{point}:{n}"));
            let status = cmd.status().unwrap();
            assert_eq!(status.signal(), Some(9), "{point}:{n} should have been killed");
            crashes += 1;
            recover_and_compare(&data, &out, &cache, &reference, &format!("{point}:{n}"));
        }
    }

    // Killed at random moments of a run (seeded, so a failure can be replayed).
    let mut rng = wavegen::rng::Rng::new(7);
    let mut killed = 0;
    for i in 0..12 {
        let out = dir.path().join(format!("random-{i}"));
        let mut child = train_command(&data, &out, &cache, false).stderr(Stdio::null()).spawn().unwrap();
        let started = Instant::now();
        let after = run_time.mul_f64(rng.uniform());
        while started.elapsed() < after && child.try_wait().unwrap().is_none() {
            std::thread::sleep(Duration::from_micros(200));
        }
        let _ = child.kill();
        if child.wait().unwrap().signal() == Some(9) {
            killed += 1;
        }
        recover_and_compare(&data, &out, &cache, &reference, &format!("random kill {i} after {after:?}"));
    }
    assert!(killed >= 6, "only {killed} of 12 random kills landed before the run ended");
    eprintln!("{crashes} kills at commit points, {killed} at random moments: every directory resumed exactly");
}

#[test]
fn a_damaged_weights_file_is_detected_by_its_checksum() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let data = common::periodic_folder(dir.path(), 3, 16, 8000, 0.3);
    let out = dir.path().join("ckpt");
    run_ok(train_command(&data, &out, &cache, false));
    let file = out.join("current/model.safetensors");
    let mut bytes = std::fs::read(&file).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x10; // one bit of one weight
    std::fs::write(&file, &bytes).unwrap();
    let err = run::open(&out).unwrap().weights().unwrap_err().to_string();
    assert!(err.contains("model.safetensors") && err.contains("checksum"), "{err}");
}

/// Starts a long run, waits for its first checkpoint, sends `signals` one after the other.
fn interrupt(signals: &[i32], name: &str) -> (std::process::ExitStatus, std::path::PathBuf, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let data = common::periodic_folder(dir.path(), 3, 16, 8000, 0.3);
    let out = dir.path().join(name);
    let mut child = train_steps(&data, &out, &cache, false, "1000000").stderr(Stdio::null()).spawn().unwrap();
    let started = Instant::now();
    while !checkpoint::exists(&out) {
        assert!(child.try_wait().unwrap().is_none(), "the run ended early");
        assert!(started.elapsed() < Duration::from_secs(60), "no checkpoint after a minute");
        std::thread::sleep(Duration::from_millis(5));
    }
    for &s in signals {
        // SAFETY: signals a child process of this test.
        unsafe { libc::kill(child.id() as i32, s) };
    }
    let status = child.wait().unwrap();
    (status, out, dir)
}

#[test]
fn sigterm_and_sighup_stop_training_with_a_checkpoint() {
    for (signal, code) in [(libc::SIGTERM, 143), (libc::SIGHUP, 129), (libc::SIGINT, 130)] {
        let (status, out, _dir) = interrupt(&[signal], "ckpt");
        assert_eq!(status.code(), Some(code), "signal {signal}: {status:?}");
        let ckpt = run::open(&out).unwrap();
        ckpt.weights().unwrap();
        assert!(ckpt.manifest.state.step < 1_000_000);
    }
    // A second signal right behind the first quits at once, but never mid-commit.
    for _ in 0..5 {
        let (status, out, _dir) = interrupt(&[libc::SIGTERM, libc::SIGTERM], "twice");
        assert_eq!(status.code(), Some(143), "{status:?}");
        run::open(&out).unwrap().weights().unwrap();
    }
}

#[test]
fn data_parallel_training_is_deterministic_and_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let data = common::periodic_folder(dir.path(), 3, 16, 8000, 0.3);
    let one = {
        let out = dir.path().join("one-thread");
        run_ok(train_threads(&data, &out, &cache, false, STEPS, "1"));
        weights(&out)
    };
    // Two and three threads (the batch of 4 windows split 2 + 2, and 1 + 1 + 2).
    for threads in ["2", "3"] {
        let a = dir.path().join(format!("a{threads}"));
        let b = dir.path().join(format!("b{threads}"));
        run_ok(train_threads(&data, &a, &cache, false, STEPS, threads));
        run_ok(train_threads(&data, &b, &cache, false, STEPS, threads));
        let reference = weights(&a);
        assert!(weights(&b) == reference, "{threads} threads: two runs differ");
        // Stopped half-way and resumed, on the same number of threads: the same weights.
        let c = dir.path().join(format!("c{threads}"));
        let mut first = train_threads(&data, &c, &cache, false, "6", threads);
        first.args(["--decay-steps", STEPS]);
        run_ok(first);
        run_ok(train_threads(&data, &c, &cache, true, STEPS, threads));
        assert!(weights(&c) == reference, "{threads} threads: the resumed run differs");
        // Sharding changes only the order of additions: close to one thread, not equal.
        let close = reference.iter().zip(&one).all(|((_, x), (_, y))| {
            x.iter().zip(y).all(|(&p, &q)| (f32::from_bits(p) - f32::from_bits(q)).abs() < 1e-3)
        });
        assert!(close, "{threads} threads drift from one thread by more than 1e-3");
    }
}
