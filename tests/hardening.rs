//! The hostile-but-fair cases of issue 10, through the binary: each once lost data, damaged a
//! file that was not ours, panicked, hung, allocated without bound or said something untrue.
#![cfg(unix)]

mod common;

use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{assert_clear_error, error_line, json, wavegen};

/// A trained tiny checkpoint and the folder it came from.
fn trained(dir: &Path, cache: &Path) -> (PathBuf, PathBuf) {
    let data = common::periodic_folder(dir, 3, 16, 8000, 0.3);
    let ckpt = dir.join("ckpt");
    let args = ["train", data.to_str().unwrap(), "--out", ckpt.to_str().unwrap(), "--preset", "tiny"];
    json(&wavegen(&[&args[..], &["--steps", "4", "--sample-rate", "8000", "--json"]].concat(), cache));
    (data, ckpt)
}

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
}

/// Runs the binary, failing the test (not hanging it) if it takes over a minute.
fn within_a_minute(args: &[&str], cache: &Path) -> std::process::Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_wavegen"))
        .args(args)
        .env("WAVEGEN_CACHE", cache)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("wavegen {args:?} hung");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// Rewrites the committed config.json of `ckpt` with `edit`.
fn edit_config(ckpt: &Path, edit: impl Fn(&mut serde_json::Value)) {
    let path = ckpt.join("current/config.json");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&path, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
}

#[test]
fn checkpoints_are_never_lost_or_shared() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let (data, ckpt) = trained(dir.path(), &cache);
    let (d, c) = (data.to_str().unwrap(), ckpt.to_str().unwrap());

    // --resume on a directory with no checkpoint: an error, and nothing is created.
    let typo = dir.path().join("ckpt-typo");
    assert_clear_error(&wavegen(&["train", d, "--out", typo.to_str().unwrap(), "--resume"], &cache), "--resume");
    assert!(!typo.exists());
    // Weights without config.json: neither resumed over nor replaced by a new run.
    let orphan = dir.path().join("orphan");
    std::fs::create_dir(&orphan).unwrap();
    std::fs::write(orphan.join("model.safetensors"), b"precious").unwrap();
    let o = orphan.to_str().unwrap();
    assert_clear_error(&wavegen(&["train", d, "--out", o, "--resume"], &cache), "no committed checkpoint");
    assert_clear_error(&wavegen(&["train", d, "--out", o, "--preset", "tiny"], &cache), "no config.json");
    assert_eq!(std::fs::read(orphan.join("model.safetensors")).unwrap(), b"precious");

    // A second trainer on a directory in use is told who holds it.
    let mut first = Command::new(env!("CARGO_BIN_EXE_wavegen"))
        .args(["train", d, "--out", c, "--resume", "--steps", "1000000", "--checkpoint-every", "1"])
        .env("WAVEGEN_CACHE", &cache)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while std::fs::read_to_string(ckpt.join(".lock")).unwrap_or_default().trim() != first.id().to_string() {
        assert!(started.elapsed() < Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(10));
    }
    let second = wavegen(&["train", d, "--out", c, "--resume", "--steps", "10"], &cache);
    assert_clear_error(&second, &format!("in use by process {}", first.id()));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(first.id() as i32, libc::SIGTERM) };
    assert_eq!(first.wait().unwrap().code(), Some(143));
    let at = wavegen::tasks::run::open(&ckpt).unwrap().manifest.state.step;

    // Leftovers of an interrupted commit are removed by the next writer.
    std::fs::create_dir(ckpt.join("step-000999999")).unwrap();
    std::fs::write(ckpt.join(".current.4194305.tmp"), b"").unwrap();
    let next = (at + 1).to_string();
    json(&wavegen(&["train", "--out", c, "--resume", "--steps", &next, "--json"], &cache));
    assert!(!ckpt.join("step-000999999").exists() && !ckpt.join(".current.4194305.tmp").exists());

    // Resumed from another working directory with no DIR: the folder was stored absolute.
    let after = (at + 2).to_string();
    let elsewhere = Command::new(env!("CARGO_BIN_EXE_wavegen"))
        .args(["train", "--out", c, "--resume", "--steps", &after, "--json"])
        .env("WAVEGEN_CACHE", &cache)
        .current_dir("/")
        .output()
        .unwrap();
    assert_eq!(json(&elsewhere)["steps"], at + 2);
}

#[test]
fn outputs_never_replace_what_is_not_ours() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let (_, ckpt) = trained(dir.path(), &cache);
    let c = ckpt.to_str().unwrap();
    let generate = |out: &str| wavegen(&["generate", "--checkpoint", c, "--seconds", "0.05", "--out", out], &cache);

    assert!(generate("/dev/null").status.success());
    assert!(!std::fs::metadata("/dev/null").unwrap().is_file(), "/dev/null is still a device");
    assert_clear_error(&generate("/dev/full"), "/dev/full");
    // A link: its target is replaced, the link stays.
    let target = dir.path().join("target.wav");
    std::fs::write(&target, b"old").unwrap();
    let link = dir.path().join("link.wav");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    assert!(generate(link.to_str().unwrap()).status.success());
    assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
    assert_eq!(wavegen::audio::wav::read_mono(&target).unwrap().samples.len(), 400);
    // A FIFO: written into, as a stream.
    let fifo = dir.path().join("pipe.wav");
    mkfifo(&fifo);
    let reader = {
        let fifo = fifo.clone();
        std::thread::spawn(move || std::fs::read(&fifo).unwrap())
    };
    assert!(generate(fifo.to_str().unwrap()).status.success());
    let streamed = reader.join().unwrap();
    assert_eq!((&streamed[..4], streamed.len()), (&b"RIFF"[..], 44 + 400 * 2));
    // Standard output.
    let out = generate("/dev/stdout");
    assert!(out.status.success() && out.stdout.starts_with(b"RIFF"));

    // Too many streams for one file: refused before anything is written.
    let many = dir.path().join("many.wav");
    let m = many.to_str().unwrap();
    let args = ["generate", "--checkpoint", c, "--seconds", "0.05", "--out", m, "--streams", "65536", "--multichannel"];
    assert_clear_error(&wavegen(&args, &cache), "--streams");
    let files: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().map(|e| e.file_name()).collect();
    assert!(!files.iter().any(|f| f.to_string_lossy().ends_with(".tmp")), "{files:?}");
}

#[test]
fn sizes_are_bounded_before_anything_is_allocated() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let (data, ckpt) = trained(dir.path(), &cache);
    let (d, c) = (data.to_str().unwrap(), ckpt.to_str().unwrap());
    let out = dir.path().join("x.wav");
    let o = out.to_str().unwrap();
    for (flags, needle) in [(&["--seconds", "1e12"][..], "--seconds"), (&["--temperature", "inf"], "finite")] {
        let args = [&["generate", "--checkpoint", c, "--out", o][..], flags].concat();
        assert_clear_error(&wavegen(&args, &cache), needle);
    }
    assert_clear_error(&wavegen(&["--threads", "100000", "info", c], &cache), "--threads");
    let new = dir.path().join("new");
    let n = new.to_str().unwrap();
    for (flags, needle) in [
        (&["--sample-rate", "1000000000"][..], "sample rate"),
        (&["--window", "10000000"], "--window"),
        (&["--batch-size", "1000000"], "--batch-size"),
        (&["--residual-channels", "1000000"], "--residual-channels"),
        (&["--kernel-width", "100000"], "--kernel-width"),
        (&["--cycles", "1000000000"], "--cycles"),
        (&["--window", "60000", "--batch-size", "4000"], "GiB"),
    ] {
        let args = [&["train", d, "--out", n, "--preset", "tiny"][..], flags].concat();
        assert_clear_error(&within_a_minute(&args, &cache), needle);
        assert!(!new.exists(), "{flags:?}: a refused run leaves nothing");
    }

    // config.json edited to anything: the setting and the file are named, nothing is built.
    type Edit = fn(&mut serde_json::Value);
    let edits: [(&str, Edit, &str); 7] = [
        ("sample_rate 0", |v| v["audio"]["settings"]["sample_rate"] = 0.into(), "sample rate"),
        ("trim_db -5", |v| v["audio"]["settings"]["trim_db"] = (-5.0).into(), "trim depth"),
        ("batch_size 0", |v| v["audio"]["batch_size"] = 0.into(), "--batch-size"),
        ("window 0", |v| v["audio"]["window"] = 0.into(), "--window"),
        ("train_files []", |v| v["audio"]["train_files"] = serde_json::json!([]), "train_files"),
        ("cycles 1e9", |v| v["model"]["cycles"] = 1_000_000_000u64.into(), "--cycles"),
        ("classes 100", |v| v["model"]["classes"] = 100.into(), "256 classes"),
    ];
    let original = std::fs::read(ckpt.join("current/config.json")).unwrap();
    for (what, edit, needle) in edits {
        edit_config(&ckpt, edit);
        for command in [&["info", c][..], &["train", "--out", c, "--resume", "--steps", "9"]] {
            let line = error_line(&within_a_minute(command, &cache));
            assert!(line.contains("config.json") && line.contains(needle), "{what}: {line}");
        }
        std::fs::write(ckpt.join("current/config.json"), &original).unwrap();
    }
}

#[test]
fn odd_files_are_skipped_or_read_never_hung_on() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let data = common::periodic_folder(dir.path(), 3, 16, 8000, 0.3);
    // A link loop, a dangling link, a FIFO named .wav and a file whose name is not UTF-8.
    std::os::unix::fs::symlink("..", data.join("loop")).unwrap();
    std::os::unix::fs::symlink("nowhere.wav", data.join("dangling.wav")).unwrap();
    mkfifo(&data.join("fifo.wav"));
    let odd_name = std::ffi::OsStr::from_bytes(b"caf\xe9.wav");
    std::fs::copy(data.join("p0.wav"), data.join(odd_name)).unwrap();
    let ckpt = dir.path().join("ckpt");
    let (d, c) = (data.to_str().unwrap(), ckpt.to_str().unwrap());
    let args = ["train", d, "--out", c, "--preset", "tiny", "--steps", "2", "--sample-rate", "8000"];
    let out = within_a_minute(&args, &cache);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let notes = String::from_utf8_lossy(&out.stderr);
    assert!(notes.contains("dangling.wav") && notes.contains("fifo.wav"), "{notes}");
    let info = json(&wavegen(&["info", c, "--json"], &cache));
    let audio = &info["manifest"]["audio"];
    let files = audio["train_files"].as_array().unwrap().len() + audio["val_files"].as_array().unwrap().len();
    assert_eq!(files, 4, "the three files and the one with an odd name, each once: {audio}");
    // Resuming finds the odd name again.
    assert!(within_a_minute(&["train", "--out", c, "--resume", "--steps", "3"], &cache).status.success());

    // A FIFO where the weights should be: refused at once.
    let fifo_ckpt = dir.path().join("fifo-ckpt");
    std::fs::create_dir(&fifo_ckpt).unwrap();
    std::fs::copy(ckpt.join("current/config.json"), fifo_ckpt.join("config.json")).unwrap();
    mkfifo(&fifo_ckpt.join("model.safetensors"));
    let line = error_line(&within_a_minute(&["info", fifo_ckpt.to_str().unwrap()], &cache));
    assert!(line.contains("model.safetensors") && line.contains("not a regular file"), "{line}");
    // A regular file given as the checkpoint.
    let file = dir.path().join("notes.txt");
    std::fs::write(&file, "hello").unwrap();
    assert_clear_error(&wavegen(&["info", file.to_str().unwrap()], &cache), "is a file");
}

#[test]
fn valid_files_are_scored_and_true_errors_named() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let (_, ckpt) = trained(dir.path(), &cache);
    let c = ckpt.to_str().unwrap();
    let eval = |path: &Path| wavegen(&["eval", "--checkpoint", c, path.to_str().unwrap(), "--json"], &cache);

    let one = dir.path().join("one.wav");
    common::write_wav(&one, &[0.5], 8000, 1, 16, false);
    assert_eq!(json(&eval(&one))["samples"], 1);
    let silent = dir.path().join("silent.wav");
    common::write_wav(&silent, &vec![0.0; 800], 8000, 1, 16, false);
    assert_eq!(json(&eval(&silent))["samples"], 800);
    let empty = dir.path().join("empty.wav");
    common::write_wav(&empty, &[], 8000, 1, 16, false);
    let line = error_line(&eval(&empty));
    assert!(line.contains("empty.wav") && line.contains("no samples") && !line.contains("readable"), "{line}");

    // NaN weights: an error naming the checkpoint, from every command that loads them.
    let nan = dir.path().join("nan");
    std::fs::create_dir(&nan).unwrap();
    let committed = wavegen::tasks::run::open(&ckpt).unwrap();
    let mut manifest = committed.manifest.clone();
    manifest.files.clear();
    std::fs::write(nan.join("config.json"), serde_json::to_vec(&manifest).unwrap()).unwrap();
    let weights: Vec<(String, candle_core::Tensor)> =
        committed.weights().unwrap().into_iter().map(|(k, t)| (k, (t * f64::NAN).unwrap())).collect();
    let bytes = wavegen::core::params::safetensors_bytes(&weights, Default::default()).unwrap();
    std::fs::write(nan.join("model.safetensors"), bytes).unwrap();
    let n = nan.to_str().unwrap();
    for command in [
        &["eval", "--checkpoint", n, one.to_str().unwrap(), "--json"][..],
        &["generate", "--checkpoint", n, "--out", dir.path().join("nan.wav").to_str().unwrap()],
    ] {
        let line = error_line(&wavegen(command, &cache));
        assert!(line.contains("nan") && line.contains("NaN"), "{line}");
    }

    // No audio device by that name: one line, no ALSA chatter.
    let out = wavegen(&["play", "--checkpoint", c, "--device", "no-such-device-xyz", "--seconds", "0.1"], &cache);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("no-such-device-xyz"), "{stderr}");
}

/// A binarized-MNIST folder of `train`, `valid` and `test` random images.
fn tiny_mnist(dir: &Path, train: u32, valid: u32, test: u32) -> PathBuf {
    let folder = dir.join("binarized_mnist");
    std::fs::create_dir_all(&folder).unwrap();
    let mut rng = wavegen::rng::Rng::new(5);
    for (split, n) in [("train", train), ("valid", valid), ("test", test)] {
        let mut bytes = vec![0, 0, 0x08, 3];
        for d in [n, 28, 28] {
            bytes.extend_from_slice(&d.to_be_bytes());
        }
        bytes.extend((0..n as usize * 784).map(|_| u8::from(rng.uniform() < 0.2)));
        std::fs::write(folder.join(format!("binarized_mnist_{split}-images-idx3-ubyte")), bytes).unwrap();
    }
    dir.to_path_buf()
}

#[test]
fn image_commands_refuse_empty_splits_and_huge_grids() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let data = tiny_mnist(&dir.path().join("data"), 40, 10, 0);
    let ckpt = dir.path().join("fvsbn");
    let c = ckpt.to_str().unwrap();
    let mnist = |args: &[&str]| {
        let mut all = vec!["mnist"];
        all.extend_from_slice(args);
        if args[0] != "sample" {
            all.extend_from_slice(&["--data", data.to_str().unwrap()]);
        }
        within_a_minute(&all, &cache)
    };
    let out = mnist(&["train", "--model", "fvsbn", "--out", c, "--epochs", "1", "--batch-size", "20"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let grid = dir.path().join("grid.png");
    let g = grid.to_str().unwrap();
    assert_clear_error(&mnist(&["complete", "--checkpoint", c, "--out", g]), "no images");
    assert_clear_error(&mnist(&["eval", "--checkpoint", c]), "no images");
    assert_clear_error(
        &mnist(&["complete", "--checkpoint", c, "--out", g, "--n", "10001", "--per-digit", "1"]),
        "10000",
    );
    assert_clear_error(&mnist(&["sample", "--checkpoint", c, "--out", g, "--n", "1000000"]), "--n");
    assert!(!grid.exists());
    // --resume needs the latest state, and a second run needs --resume.
    assert_clear_error(&mnist(&["train", "--model", "fvsbn", "--out", c, "--epochs", "1"]), "--resume");
    let other = dir.path().join("other");
    let o = other.to_str().unwrap();
    assert_clear_error(&mnist(&["train", "--model", "fvsbn", "--out", o, "--resume"]), "no committed");
    assert!(!other.exists());
}
