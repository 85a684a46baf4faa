//! `wavegen mnist …` on real MNIST: a short FVSBN run, then eval (JSON), sample and complete
//! (PNG grids of the right size), score (CSV, lowest likelihood first), resume, and clear
//! errors on bad input. By default on the small subsets in `tests/fixtures`; the `#[ignore]`d
//! variants run the same on the full sets in `WAVEGEN_DATA`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The small real subsets committed with the tests.
fn fixtures() -> String {
    format!("{}/tests/fixtures", env!("CARGO_MANIFEST_DIR"))
}

/// The full datasets, for the ignored tests.
fn full_data() -> String {
    let dir = std::env::var("WAVEGEN_DATA").expect("the full-data tests need WAVEGEN_DATA (see datasets/README.md)");
    assert!(Path::new(&dir).join("binarized_mnist").is_dir(), "{dir}/binarized_mnist is missing: wavegen data fetch");
    dir
}

fn wavegen(args: &[&str]) -> Output {
    wavegen_on(&fixtures(), args)
}

fn wavegen_on(data: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_wavegen"))
        .args(args)
        .env("WAVEGEN_DATA", data)
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .expect("the binary runs")
}

fn ok(out: &Output) -> String {
    assert!(out.status.success(), "failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn error_line(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "should have failed");
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    stderr.lines().find(|l| l.starts_with("error:")).unwrap_or_else(|| panic!("no error line in {stderr}")).to_string()
}

fn png_size(path: &Path) -> (u32, u32) {
    let reader = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap())).read_info().unwrap();
    (reader.info().width, reader.info().height)
}

#[test]
fn train_eval_sample_complete_score_on_binarized_mnist() {
    train_eval_sample_complete_score(&fixtures(), "20", 100);
}

#[test]
#[ignore = "needs the full binarized MNIST in WAVEGEN_DATA"]
fn train_eval_sample_complete_score_on_the_full_binarized_mnist() {
    train_eval_sample_complete_score(&full_data(), "1", 10_000);
}

fn train_eval_sample_complete_score(data: &str, epochs: &str, test_images: u64) {
    let wavegen = |args: &[&str]| wavegen_on(data, args);
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("fvsbn");
    let c = ckpt.to_str().unwrap();
    // 100 steps of FVSBN (a few seconds; a step count, not a time, so that a busy machine
    // trains the same): far from converged, but already far better than uniform pixels.
    let t: serde_json::Value = serde_json::from_str(&ok(&wavegen(&[
        "mnist", "train", "--model", "fvsbn", "--out", c, "--epochs", epochs, "--steps", "100", "--lr", "3e-3",
        "--json",
    ])))
    .unwrap();
    assert_eq!((t["model"].as_str(), t["stopped"].as_str()), (Some("fvsbn"), Some("Steps")));
    assert!(
        ckpt.join("current/model.safetensors").is_file() && ckpt.join("last/current/optimizer.safetensors").is_file()
    );

    let e: serde_json::Value =
        serde_json::from_str(&ok(&wavegen(&["mnist", "eval", "--checkpoint", c, "--json"]))).unwrap();
    let nll = e["nll_nats"].as_f64().unwrap();
    assert_eq!(
        (e["model"].as_str(), e["split"].as_str(), e["images"].as_u64()),
        (Some("fvsbn"), Some("test"), Some(test_images))
    );
    assert!(nll > 60.0 && nll < 784.0 * 2f64.ln() / 2.0, "{nll} nats/image");
    let ci = e["ci95"].as_array().unwrap();
    assert!(ci[0].as_f64().unwrap() < nll && nll < ci[1].as_f64().unwrap());

    // A copy for shipping (f16 weights, no optimizer) is half the size and scores the same
    // within a tenth of a nat.
    let small = dir.path().join("fvsbn-small");
    ok(&wavegen(&["mnist", "compact", "--checkpoint", c, "--out", small.to_str().unwrap()]));
    let size = |f: PathBuf| std::fs::metadata(f).unwrap().len();
    let (before, after) =
        (size(ckpt.join("current/model.safetensors")), size(small.join("current/model.safetensors.gz")));
    assert!(after * 2 <= before, "{after} vs {before} bytes");
    assert!(!small.join("last").exists() && !small.join("current/model.safetensors").exists());
    let e: serde_json::Value =
        serde_json::from_str(&ok(&wavegen(&["mnist", "eval", "--checkpoint", small.to_str().unwrap(), "--json"])))
            .unwrap();
    assert!((e["nll_nats"].as_f64().unwrap() - nll).abs() < 0.1, "{} vs {nll}", e["nll_nats"]);
    // A damaged compressed file is reported by name, not decoded into garbage.
    let gz = small.join("current/model.safetensors.gz");
    let bytes = std::fs::read(&gz).unwrap();
    std::fs::write(&gz, &bytes[..bytes.len() / 2]).unwrap();
    let broken = error_line(&wavegen(&["mnist", "eval", "--checkpoint", small.to_str().unwrap()]));
    assert!(broken.contains("model.safetensors.gz") && broken.contains("checksum"), "{broken}");
    let same = error_line(&wavegen(&["mnist", "compact", "--checkpoint", c, "--out", c]));
    assert!(same.contains("--out must differ"), "{same}");

    let grid = dir.path().join("samples.png");
    ok(&wavegen(&["mnist", "sample", "--checkpoint", c, "--n", "4", "--out", grid.to_str().unwrap()]));
    assert_eq!(png_size(&grid), (2 * 58 + 2, 2 * 58 + 2), "a 2×2 grid of 56-pixel digits with 2-pixel gaps");
    // --method naive (a full pass per pixel) draws the same digits; --json reports the time.
    let naive = dir.path().join("naive.png");
    let s: serde_json::Value = serde_json::from_str(&ok(&wavegen(&[
        "mnist",
        "sample",
        "--checkpoint",
        c,
        "--n",
        "4",
        "--method",
        "naive",
        "--json",
        "--out",
        naive.to_str().unwrap(),
    ])))
    .unwrap();
    assert_eq!((s["method"].as_str(), s["images"].as_u64()), (Some("naive"), Some(4)));
    assert!(s["seconds"].as_f64().unwrap() > 0.0);
    assert_eq!(std::fs::read(&grid).unwrap(), std::fs::read(&naive).unwrap(), "naive and cached digits differ");
    let completions = dir.path().join("complete.png");
    ok(&wavegen(&[
        "mnist",
        "complete",
        "--checkpoint",
        c,
        "--n",
        "2",
        "--per-digit",
        "3",
        "--out",
        completions.to_str().unwrap(),
    ]));
    assert_eq!(png_size(&completions), (4 * 58 + 2, 2 * 58 + 2));

    let csv = ok(&wavegen(&["mnist", "score", "--checkpoint", c]));
    let rows: Vec<f64> = csv.lines().skip(1).map(|l| l.split(',').nth(1).unwrap().parse().unwrap()).collect();
    assert_eq!(rows.len() as u64, test_images);
    assert!(rows.windows(2).all(|w| w[0] >= w[1]), "lowest likelihood (highest NLL) first");
    let mean = rows.iter().sum::<f64>() / rows.len() as f64;
    assert!((mean - nll).abs() < 1e-2, "score and eval agree: {mean} vs {nll}");

    // Again into the same directory needs --resume; with it, training continues.
    let again = ["mnist", "train", "--model", "fvsbn", "--out", c, "--epochs", "1", "--minutes", "0.02"];
    assert!(error_line(&wavegen(&again)).contains("--resume"));
    let mut resumed = again.to_vec();
    resumed.push("--resume");
    ok(&wavegen(&resumed));
    // A resume can turn on weight averaging; the checkpoint then holds the average, and says so.
    let more = (epochs.parse::<u64>().unwrap() + 1).to_string();
    resumed[7] = &more; // --epochs past the first run's: steps to average over
    resumed.extend(["--average", "0.99"]);
    ok(&wavegen(&resumed));
    let info = ok(&wavegen(&["info", c]));
    assert!(info.contains("moving average, decay 0.99"), "{info}");
    // The raw weights that training continues are scored from the resumable state, and differ.
    let last = Path::new(c).join("last");
    let scored = |dir: &str, raw: bool| {
        let args = ["mnist", "eval", "--checkpoint", dir, "--valid", "--json", "--raw-weights"];
        let out: serde_json::Value = serde_json::from_str(&ok(&wavegen(&args[..6 + raw as usize]))).unwrap();
        assert_eq!(out["raw_weights"].as_bool(), Some(raw));
        out["nll_nats"].as_f64().unwrap()
    };
    assert_ne!(scored(last.to_str().unwrap(), true), scored(last.to_str().unwrap(), false));
    let refused = error_line(&wavegen(&["mnist", "eval", "--checkpoint", c, "--raw-weights"]));
    assert!(refused.contains("resumable state"), "{refused}");
    *resumed.last_mut().unwrap() = "1";
    let refused = error_line(&wavegen(&resumed));
    assert!(refused.contains("--average must be in [0, 1)"), "{refused}");
    // … and turn it off again: the raw weights are then validated and kept.
    *resumed.last_mut().unwrap() = "0";
    let off = wavegen(&resumed);
    ok(&off);
    assert!(String::from_utf8_lossy(&off.stderr).contains("weight averaging off"));
    assert!(!ok(&wavegen(&["info", c])).contains("moving average"));
    let refused = error_line(&wavegen(&["mnist", "eval", "--checkpoint", last.to_str().unwrap(), "--raw-weights"]));
    assert!(refused.contains("without weight averaging"), "{refused}");
    // A resume can lower the peak learning rate: the schedule is rescaled, floor included.
    let relearned = [&again[..], &["--resume", "--lr", "5e-4"]].concat();
    ok(&wavegen(&relearned));
    let info = ok(&wavegen(&["info", c]));
    assert!(info.contains("learning rate 0.0005 to 0.000025"), "{info}");
    // FVSBN has no dropout: asking for it is an error, not a silent no-op.
    let mut dropped = again.to_vec();
    dropped.extend(["--resume", "--dropout", "0.2"]);
    let refused = error_line(&wavegen(&dropped));
    assert!(refused.contains("no dropout"), "{refused}");
    // A model kept without its training state (last/) cannot be resumed, and the error says so.
    std::fs::remove_dir_all(Path::new(c).join("last")).unwrap();
    let refused = error_line(&wavegen(&[&again[..], &["--resume"]].concat()));
    assert!(refused.contains("without the state to resume"), "{refused}");
}

/// PixelCNN and Gated PixelCNN train with dropout, which the checkpoint records and a resume
/// can change; a rate outside [0, 1) is refused.
#[test]
fn pixelcnns_train_with_dropout() {
    let dir = tempfile::tempdir().unwrap();
    for model in ["pixelcnn", "gated-pixelcnn"] {
        let out = dir.path().join(model);
        let c = out.to_str().unwrap();
        let mut args = vec!["mnist", "train", "--model", model, "--out", c, "--channels", "4", "--layers", "2"];
        args.extend(["--head", "8", "--batch-size", "8", "--epochs", "1", "--minutes", "0.02", "--dropout"]);
        ok(&wavegen(&[&args[..], &["0.3"]].concat()));
        let info = ok(&wavegen(&["info", c]));
        assert!(info.contains("dropout         0.3 while training"), "{info}");
        let resumed = wavegen(&[&args[..], &["0.1", "--resume"]].concat());
        let note = String::from_utf8_lossy(&resumed.stderr).to_string();
        assert!(note.contains("dropout 0.1 (the run had 0.3)"), "{note}");
        ok(&resumed);
        let nll: serde_json::Value =
            serde_json::from_str(&ok(&wavegen(&["mnist", "eval", "--checkpoint", c, "--json"]))).unwrap();
        assert!(nll["nll_nats"].as_f64().unwrap().is_finite());
    }
    let bad = dir.path().join("bad");
    let line = error_line(&wavegen(&[
        "mnist",
        "train",
        "--model",
        "pixelcnn",
        "--out",
        bad.to_str().unwrap(),
        "--dropout",
        "1",
    ]));
    assert!(line.contains("--dropout must be in [0, 1)"), "{line}");
}

#[test]
fn dynamic_binarization_and_rnade_train_and_evaluate() {
    dynamic_binarization_and_rnade(&fixtures());
}

#[test]
#[ignore = "needs the full MNIST in WAVEGEN_DATA"]
fn dynamic_binarization_and_rnade_on_the_full_mnist() {
    dynamic_binarization_and_rnade(&full_data());
}

fn dynamic_binarization_and_rnade(data: &str) {
    let wavegen = |args: &[&str]| wavegen_on(data, args);
    let dir = tempfile::tempdir().unwrap();
    for (model, extra, scale, low, high) in [
        // Dynamically binarized grey MNIST: worse than uniform pixels (543 nats) is a failure.
        ("fvsbn", vec!["--dynamic", "--lr", "3e-3", "--steps", "100"], "binary", 60.0, 543.0),
        // RNADE on dequantised grey levels: below 8 bits per pixel on the 8-bit scale.
        (
            "rnade",
            vec!["--hidden", "20", "--components", "3", "--lr", "3e-3", "--steps", "300"],
            "8-bit (dequantised)",
            0.0,
            784.0 * 256f64.ln(),
        ),
    ] {
        let ckpt = dir.path().join(model);
        let c = ckpt.to_str().unwrap();
        let mut args = vec!["mnist", "train", "--model", model, "--out", c];
        args.extend(extra);
        ok(&wavegen(&args));
        let e: serde_json::Value =
            serde_json::from_str(&ok(&wavegen(&["mnist", "eval", "--checkpoint", c, "--json"]))).unwrap();
        let nll = e["nll_nats"].as_f64().unwrap();
        assert_eq!(e["scale"], scale);
        assert!(nll > low && nll < high, "{model}: {nll} nats/image");
    }
}

#[test]
fn bad_input_gives_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    // No dataset where --data points.
    let line =
        error_line(&wavegen(&["mnist", "train", "--model", "nade", "--out", "/tmp/x", "--data", "/nonexistent"]));
    assert!(line.contains("binarized_mnist") && line.contains("WAVEGEN_DATA"), "{line}");
    // No steps to take: refused before anything is written.
    let out = dir.path().join("no-steps");
    let line =
        error_line(&wavegen(&["mnist", "train", "--model", "fvsbn", "--steps", "0", "--out", out.to_str().unwrap()]));
    assert!(line.contains("--steps must be at least 1") && !out.exists(), "{line}");
    // A bad model setting is named before the dataset is looked for (there is none here).
    let out = dir.path().join("even-kernel");
    let o = out.to_str().unwrap();
    for (kernel, says) in [("4", "must be odd"), ("1", "must be from 3 to 31")] {
        let args =
            ["mnist", "train", "--model", "pixelcnn", "--first-kernel", kernel, "--out", o, "--data", "/nonexistent"];
        let line = error_line(&wavegen(&args));
        assert!(line.contains("--first-kernel") && line.contains(says) && !out.exists(), "{line}");
    }
    // An audio checkpoint is not an image model.
    let line = error_line(&wavegen(&["mnist", "eval", "--checkpoint", "checkpoints/fsdd"]));
    assert!(line.contains("not an image model"), "{line}");
    // No checkpoint at all.
    let missing = dir.path().join("none");
    let line = error_line(&wavegen(&["mnist", "sample", "--checkpoint", missing.to_str().unwrap(), "--out", "x.png"]));
    assert!(line.contains("none") && line.contains("no such directory"), "{line}");
    // A broken IDX file to score.
    let bad = dir.path().join("bad-idx");
    std::fs::write(&bad, b"not an idx file at all").unwrap();
    let line = error_line(&wavegen(&[
        "mnist",
        "score",
        "--checkpoint",
        "checkpoints/mnist-fvsbn",
        "--images",
        bad.to_str().unwrap(),
    ]));
    assert!(line.contains("bad-idx") && line.contains("not an IDX file"), "{line}");
    // MADE needs a hidden layer; NADE takes one size.
    let line = error_line(&wavegen(&["mnist", "train", "--model", "nade", "--hidden", "5,5", "--out", "/tmp/y"]));
    assert!(line.contains("--hidden"), "{line}");
}
