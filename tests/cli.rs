//! The command-line contract: `train`, `info`, `generate` and `eval` with `--json`, exit codes,
//! and clear one-line errors (never a panic) on bad input.

mod common;

use common::{assert_clear_error, json, wavegen};

#[test]
fn train_info_generate_eval_with_json() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let data = common::periodic_folder(dir.path(), 3, 16, 8000, 0.3);
    let ckpt = dir.path().join("ckpt");
    let (d, c) = (data.to_str().unwrap(), ckpt.to_str().unwrap());

    let t = json(&wavegen(&["train", d, "--out", c, "--preset", "tiny", "--sample-rate", "8000", "--json"], &cache));
    assert_eq!(t["steps"], 50);
    assert!(t["val_bits_per_sample"].as_f64().unwrap() > 0.0);
    for f in ["model.safetensors", "optimizer.safetensors", "config.json"] {
        assert!(ckpt.join("current").join(f).is_file(), "{f}");
    }
    // Training again into the same directory needs --resume.
    assert_clear_error(&wavegen(&["train", d, "--out", c, "--preset", "tiny"], &cache), "--resume");
    let r = json(&wavegen(&["train", d, "--out", c, "--resume", "--steps", "60", "--json"], &cache));
    assert_eq!(r["steps"], 60);

    let i = json(&wavegen(&["info", c, "--json"], &cache));
    assert_eq!(i["receptive_field_samples"], 16);
    assert_eq!(i["manifest"]["state"]["step"], 60);
    assert!(i["parameters"].as_u64().unwrap() > 1000);

    let wav = dir.path().join("g.wav");
    let g = json(&wavegen(
        &["generate", "--checkpoint", c, "--seconds", "0.25", "--out", wav.to_str().unwrap(), "--seed", "4", "--json"],
        &cache,
    ));
    assert_eq!(g["samples"], 2000);
    assert_eq!(g["seconds"], 0.25);
    assert!(g["samples_per_second"].as_f64().unwrap() > 0.0);
    assert!(g["realtime_factor"].as_f64().unwrap() > 0.0);
    let first = std::fs::read(&wav).unwrap();
    json(&wavegen(
        &["generate", "--checkpoint", c, "--seconds", "0.25", "--out", wav.to_str().unwrap(), "--seed", "4", "--json"],
        &cache,
    ));
    assert_eq!(first, std::fs::read(&wav).unwrap(), "same seed, same audio");

    let e = json(&wavegen(&["eval", "--checkpoint", c, data.join("p0.wav").to_str().unwrap(), d, "--json"], &cache));
    assert_eq!(e["files"].as_array().unwrap().len(), 4, "one file plus the three of the folder");
    assert!(e["bits_per_sample"].as_f64().unwrap() > 0.0);
    assert!(e["files"][0]["bits_per_sample"].as_f64().unwrap() > 0.0);
}

#[test]
fn bad_input_gets_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let out = dir.path().join("out");
    let o = out.to_str().unwrap();

    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    assert_clear_error(
        &wavegen(&["train", empty.to_str().unwrap(), "--out", o, "--preset", "tiny"], &cache),
        "no .wav files",
    );

    let fake = dir.path().join("fake");
    std::fs::create_dir(&fake).unwrap();
    std::fs::write(fake.join("song.wav"), "this is a text file").unwrap();
    assert_clear_error(
        &wavegen(&["train", fake.to_str().unwrap(), "--out", o, "--preset", "tiny"], &cache),
        "song.wav",
    );

    // A real WAV cut short: the header promises more samples than the file holds.
    let good = dir.path().join("good.wav");
    common::write_wav(&good, &common::sine(200.0, 8000, 0.5, 0.5), 8000, 1, 16, false);
    let bytes = std::fs::read(&good).unwrap();
    let truncated = dir.path().join("truncated.wav");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();

    assert_clear_error(&wavegen(&["info", dir.path().join("nope").to_str().unwrap()], &cache), "no such directory");
    assert_clear_error(&wavegen(&["generate", "--checkpoint", o, "--out", "x.wav"], &cache), "no such directory");

    // A checkpoint whose weights do not fit its config.
    let data = common::periodic_folder(dir.path(), 2, 16, 8000, 0.2);
    let ckpt = dir.path().join("ckpt");
    let c = ckpt.to_str().unwrap();
    assert!(
        wavegen(
            &["train", data.to_str().unwrap(), "--out", c, "--preset", "tiny", "--steps", "2", "--sample-rate", "8000"],
            &cache
        )
        .status
        .success()
    );
    assert_clear_error(&wavegen(&["eval", "--checkpoint", c, truncated.to_str().unwrap()], &cache), "truncated.wav");
    let config = ckpt.join("current/config.json");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, text.replace("\"residual_channels\": 8", "\"residual_channels\": 12")).unwrap();
    assert_clear_error(&wavegen(&["info", c], &cache), "embed.weight");
    std::fs::write(&config, "{ not json").unwrap();
    assert_clear_error(&wavegen(&["info", c], &cache), "config.json");

    // Settings out of range.
    assert_clear_error(
        &wavegen(&["generate", "--checkpoint", c, "--out", "x.wav", "--temperature=-1"], &cache),
        "temperature",
    );
}

#[test]
fn labels_from_subfolders_condition_training_and_generation() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let data = dir.path().join("speakers");
    for (label, freq) in [("alice", 200.0), ("bob", 700.0)] {
        for i in 0..2 {
            common::write_wav(
                &data.join(label).join(format!("{i}.wav")),
                &common::sine(freq, 8000, 0.3, 0.5),
                8000,
                1,
                16,
                false,
            );
        }
    }
    let ckpt = dir.path().join("ckpt");
    let (d, c) = (data.to_str().unwrap(), ckpt.to_str().unwrap());
    json(&wavegen(
        &[
            "train",
            d,
            "--out",
            c,
            "--preset",
            "tiny",
            "--steps",
            "10",
            "--labels",
            "--val-fraction",
            "0.25",
            "--sample-rate",
            "8000",
            "--json",
        ],
        &cache,
    ));
    let i = json(&wavegen(&["info", c, "--json"], &cache));
    assert_eq!(i["manifest"]["audio"]["labels"], serde_json::json!(["alice", "bob"]));
    assert_eq!(i["manifest"]["model"]["num_labels"], 2);
    let out = dir.path().join("bob.wav");
    let o = out.to_str().unwrap();
    json(&wavegen(
        &["generate", "--checkpoint", c, "--seconds", "0.05", "--out", o, "--label", "bob", "--json"],
        &cache,
    ));
    assert_clear_error(&wavegen(&["generate", "--checkpoint", c, "--seconds", "0.05", "--out", o], &cache), "--label");
    assert_clear_error(
        &wavegen(&["generate", "--checkpoint", c, "--seconds", "0.05", "--out", o, "--label", "carol"], &cache),
        "carol",
    );
    let e = json(&wavegen(
        &["eval", "--checkpoint", c, "--label", "alice", data.join("alice/0.wav").to_str().unwrap(), "--json"],
        &cache,
    ));
    assert!(e["bits_per_sample"].as_f64().unwrap() > 0.0);
}

#[test]
fn the_default_model_is_built_in_and_works_from_any_directory() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_wavegen")).args(args).current_dir(dir.path()).output().unwrap()
    };
    let info = json(&run(&["info", "--json"]));
    assert_eq!(info["receptive_field_samples"], 4096);
    let embedded = dir.path().join("embedded.wav");
    json(&run(&["generate", "--seconds", "0.1", "--seed", "3", "--out", embedded.to_str().unwrap(), "--json"]));
    // The same model as the shipped checkpoint: the same seed gives the same audio.
    let shipped = dir.path().join("shipped.wav");
    let repo = env!("CARGO_MANIFEST_DIR");
    let from_dir = format!("{repo}/checkpoints/default");
    json(&run(&[
        "generate",
        "--checkpoint",
        &from_dir,
        "--seconds",
        "0.1",
        "--seed",
        "3",
        "--out",
        shipped.to_str().unwrap(),
        "--json",
    ]));
    assert_eq!(std::fs::read(&embedded).unwrap(), std::fs::read(&shipped).unwrap());
}

#[test]
fn version_and_shell_completions() {
    let dir = tempfile::tempdir().unwrap();
    let v = wavegen(&["--version"], dir.path());
    assert!(String::from_utf8_lossy(&v.stdout).starts_with("wavegen "));
    for shell in ["bash", "zsh", "fish", "powershell"] {
        let out = wavegen(&["completions", shell], dir.path());
        assert!(out.status.success());
        let script = String::from_utf8_lossy(&out.stdout);
        assert!(script.contains("wavegen") && script.contains("generate"), "{shell}");
    }
}

/// `train --model` trains the core's sequence models on audio too: a few steps of an LSTM and
/// a transformer lower the held-out NLL below 8 bits (uniform), resume, and the audio
/// commands that need a WaveNet say so.
#[test]
fn sequence_models_train_on_audio() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let data = common::periodic_folder(dir.path(), 3, 16, 8000, 0.3);
    let d = data.to_str().unwrap();
    for model in ["lstm", "transformer"] {
        let ckpt = dir.path().join(model);
        let c = ckpt.to_str().unwrap();
        let common = ["--hidden", "16", "--window", "128", "--batch-size", "4", "--sample-rate", "8000", "--json"];
        let args =
            [&["train", d, "--out", c, "--model", model, "--steps", "30", "--lr", "0.01"][..], &common[..]].concat();
        let t = json(&wavegen(&args, &cache));
        assert_eq!(t["steps"], 30, "{model}");
        assert!(t["val_bits_per_sample"].as_f64().unwrap() < 7.0, "{model}: {}", t["val_bits_per_sample"]);
        let r = json(&wavegen(&["train", "--out", c, "--resume", "--steps", "32", "--json"], &cache));
        assert_eq!(r["steps"], 32, "{model}");
        assert_eq!(json(&wavegen(&["info", c, "--json"], &cache))["manifest"]["model"]["kind"], model);
        assert_clear_error(&wavegen(&["generate", "--checkpoint", c, "--out", "-"], &cache), "run WaveNets");
    }
    let ckpt = dir.path().join("labels");
    assert_clear_error(
        &wavegen(&["train", d, "--out", ckpt.to_str().unwrap(), "--model", "lstm", "--labels"], &cache),
        "takes no labels",
    );
}

/// `wavegen mel` writes a WAV file's features as .npy that the library reads back, at the
/// file's rate or resampled; bad settings and bad files get clear errors.
#[test]
fn mel_features_as_npy() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let data = common::periodic_folder(dir.path(), 1, 16, 8000, 0.5);
    let wav = data.join("p0.wav");
    let (w, out) = (wav.to_str().unwrap(), dir.path().join("p0.npy"));
    let o = out.to_str().unwrap();
    let m = json(&wavegen(&["mel", w, "--out", o, "--json"], &cache));
    assert_eq!(m["config"]["n_fft"], 512);
    assert_eq!(m["config"]["bands"], 64);
    let a = wavegen::audio::npy::read(&out).unwrap();
    assert_eq!((a.rows, a.cols), (4000 / 128 + 1, 64));
    assert_eq!(m["frames"], a.rows);
    let m = json(&wavegen(&["mel", w, "--out", o, "--sample-rate", "16000", "--mel-bands", "40", "--json"], &cache));
    let a = wavegen::audio::npy::read(&out).unwrap();
    assert_eq!((a.rows, a.cols, m["config"]["hop"].as_u64()), (8000 / 256 + 1, 40, Some(256)));
    assert_clear_error(&wavegen(&["mel", w, "--out", o, "--mel-bands", "300"], &cache), "bands");
    assert_clear_error(&wavegen(&["mel", w, "--out", o, "--n-fft", "500"], &cache), "power of two");
    std::fs::write(dir.path().join("bad.wav"), b"RIFF not really").unwrap();
    let bad = dir.path().join("bad.wav");
    assert_clear_error(&wavegen(&["mel", bad.to_str().unwrap(), "--out", o], &cache), "bad.wav");
}
