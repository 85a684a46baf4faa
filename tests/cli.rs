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
    // A resume can turn on weight averaging (the checkpoint then holds the average).
    let r =
        json(&wavegen(&["train", d, "--out", c, "--resume", "--steps", "70", "--average", "0.9", "--json"], &cache));
    assert_eq!(r["steps"], 70);
    // A run that has reached its end says how to go on, and leaves the checkpoint as it was.
    assert_clear_error(&wavegen(&["train", "--out", c, "--resume"], &cache), "--steps");

    let i = json(&wavegen(&["info", c, "--json"], &cache));
    assert_eq!(i["receptive_field_samples"], 16);
    assert_eq!(i["manifest"]["state"]["step"], 70);
    assert_eq!(i["manifest"]["train"]["max_steps"], 70);
    assert_eq!(i["manifest"]["train"]["adamw"]["average_decay"], 0.9);
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
    // The samples by level add up to all of them, and so do their bits.
    let levels = e["by_level"].as_array().unwrap();
    let count = |l: &serde_json::Value| l["samples"].as_f64().unwrap();
    assert_eq!(levels.iter().map(count).sum::<f64>(), e["samples"].as_f64().unwrap());
    let bits: f64 = levels.iter().map(|l| count(l) * l["bits_per_sample"].as_f64().unwrap_or(0.0)).sum();
    assert!((bits / e["samples"].as_f64().unwrap() - e["bits_per_sample"].as_f64().unwrap()).abs() < 1e-4);
}

/// Every shipped checkpoint opens: `info` reads its config and builds its model from its weights.
#[test]
fn every_shipped_checkpoint_opens() {
    let dir = tempfile::tempdir().unwrap();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("checkpoints");
    let mut opened = Vec::new();
    for entry in std::fs::read_dir(&root).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            let i = json(&wavegen(&["info", path.to_str().unwrap(), "--json"], &dir.path().join("cache")));
            assert!(i["parameters"].as_u64().unwrap() > 0, "{}", path.display());
            opened.push(path.file_name().unwrap().to_string_lossy().into_owned());
        }
    }
    for name in ["default", "fsdd", "fsdd-vocoder", "mnist-pixelcnn", "mnist-gated-pixelcnn", "mnist-transformer"] {
        assert!(opened.iter().any(|o| o == name), "{name} is shipped");
    }
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

/// A vocoder end to end: `train --condition mel` (with its settings in the checkpoint), resume,
/// `vocode` from a WAV (with `--compare`) and from `.npy` features, and clear errors for what
/// does not fit.
#[test]
fn speed_perturbation_is_kept_by_the_run_and_changed_on_resume() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let data = common::periodic_folder(dir.path(), 3, 16, 8000, 0.3);
    let (d, ckpt) = (data.to_str().unwrap(), dir.path().join("ckpt"));
    let c = ckpt.to_str().unwrap();
    let tiny = ["--preset", "tiny", "--sample-rate", "8000", "--json"];
    let speeds =
        |c: &str| json(&wavegen(&["info", c, "--json"], &cache))["manifest"]["audio"]["speed_perturbation"].clone();
    let bad = wavegen(
        &[&["train", d, "--out", c, "--steps", "2", "--speed-perturbation", "3"][..], &tiny[..]].concat(),
        &cache,
    );
    assert_clear_error(&bad, "from 0.5 to 2");
    let args = [&["train", d, "--out", c, "--steps", "4", "--speed-perturbation", "0.9,1,1.1"][..], &tiny[..]].concat();
    assert_eq!(json(&wavegen(&args, &cache))["steps"], 4);
    assert_eq!(speeds(c), serde_json::json!([0.9, 1.1]), "1, the files as recorded, is always trained on");
    // A resume keeps the run's speeds, or replaces them; `1` alone turns them off.
    json(&wavegen(&["train", "--out", c, "--resume", "--steps", "6", "--json"], &cache));
    assert_eq!(speeds(c), serde_json::json!([0.9, 1.1]));
    json(&wavegen(&["train", "--out", c, "--resume", "--steps", "8", "--speed-perturbation", "1", "--json"], &cache));
    assert_eq!(speeds(c), serde_json::Value::Null);
}

#[test]
fn a_vocoder_trains_resumes_and_vocodes_wavs_and_features() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let data = common::periodic_folder(dir.path(), 3, 16, 8000, 0.5);
    let (d, ckpt) = (data.to_str().unwrap(), dir.path().join("vocoder"));
    let c = ckpt.to_str().unwrap();
    let tiny = ["--preset", "tiny", "--sample-rate", "8000", "--batch-size", "4", "--json"];
    let mel = ["--condition", "mel", "--mel-bands", "40", "--hop", "64", "--cond-channels", "8"];
    // A frame network reading two frames either side through a hidden layer, everywhere below.
    let frames = ["--frame-context", "2", "--frame-hidden", "6"];
    let args =
        [&["train", d, "--out", c, "--steps", "30", "--window", "256"][..], &tiny[..], &mel[..], &frames[..]].concat();
    let t = json(&wavegen(&args, &cache));
    assert_eq!(t["steps"], 30);
    let info = json(&wavegen(&["info", c, "--json"], &cache));
    let local = &info["manifest"]["model"]["local"];
    assert_eq!((local["mel"]["hop"].as_u64(), local["mel"]["bands"].as_u64()), (Some(64), Some(40)));
    assert_eq!((local["context"].as_u64(), local["hidden"].as_u64()), (Some(2), Some(6)));
    assert_eq!(local["mean"].as_array().unwrap().len(), 40);
    assert_eq!(json(&wavegen(&["train", "--out", c, "--resume", "--steps", "32", "--json"], &cache))["steps"], 32);

    // Copy synthesis from a WAV: as long as the input, measured against it and Griffin-Lim.
    let wav = data.join("p1.wav");
    let out = dir.path().join("out.wav");
    let args = ["vocode", wav.to_str().unwrap(), "--checkpoint", c, "--out", out.to_str().unwrap()];
    let v = json(&wavegen(&[&args[..], &["--compare", "--griffin-lim-iterations", "10", "--json"]].concat(), &cache));
    let input_len = wavegen::audio::wav::read_mono(&wav).unwrap().samples.len();
    assert_eq!(v["files"][0]["samples"].as_u64(), Some(input_len as u64));
    assert_eq!(wavegen::audio::wav::read_mono(&out).unwrap().samples.len(), input_len);
    for name in ["wavenet", "griffin_lim", "mulaw_original"] {
        assert!(v["files"][0]["comparison"][name]["lsd_db"].as_f64().unwrap().is_finite(), "{name}");
    }
    assert!(dir.path().join("out-griffin-lim.wav").is_file());
    // The same twice with one seed.
    let again = dir.path().join("again.wav");
    let args2 = ["vocode", wav.to_str().unwrap(), "--checkpoint", c, "--out", again.to_str().unwrap(), "--json"];
    json(&wavegen(&args2, &cache));
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&again).unwrap());

    // External features: (frames − 1) · hop samples.
    let npy = dir.path().join("p1.npy");
    let m = ["mel", wav.to_str().unwrap(), "--out", npy.to_str().unwrap(), "--mel-bands", "40", "--hop", "64"];
    json(&wavegen(&[&m[..], &["--json"]].concat(), &cache));
    let frames = wavegen::audio::npy::read(&npy).unwrap().rows;
    let v = json(&wavegen(
        &["vocode", npy.to_str().unwrap(), "--checkpoint", c, "--out", out.to_str().unwrap(), "--json"],
        &cache,
    ));
    assert_eq!(v["files"][0]["samples"].as_u64(), Some(((frames - 1) * 64) as u64));
    // The held-out files, into a folder, with the mean distances.
    let held = dir.path().join("held");
    let args = ["vocode", "--held-out", "--checkpoint", c, "--out", held.to_str().unwrap(), "--compare"];
    let v = json(&wavegen(&[&args[..], &["--griffin-lim-iterations", "5", "--json"]].concat(), &cache));
    let held_out = v["files"].as_array().unwrap();
    assert_eq!(held_out.len(), 1, "one of the 3 files is held out");
    assert!(
        held.join(format!(
            "{}.wav",
            std::path::Path::new(held_out[0]["input"].as_str().unwrap()).file_stem().unwrap().to_str().unwrap()
        ))
        .is_file()
    );
    assert!(v["mean"]["wavenet"]["mcd_db"].as_f64().unwrap().is_finite());
    let e = json(&wavegen(&["eval", "--held-out", "--checkpoint", c, "--json"], &cache));
    assert_eq!(e["files"].as_array().unwrap().len(), 1);

    // What does not fit.
    let other = dir.path().join("other.npy");
    let m = ["mel", wav.to_str().unwrap(), "--out", other.to_str().unwrap(), "--mel-bands", "30", "--json"];
    json(&wavegen(&m, &cache));
    let o = out.to_str().unwrap();
    assert_clear_error(
        &wavegen(&["vocode", other.to_str().unwrap(), "--checkpoint", c, "--out", o], &cache),
        "40 mel bands",
    );
    assert_clear_error(
        &wavegen(&["vocode", npy.to_str().unwrap(), "--checkpoint", c, "--out", o, "--compare"], &cache),
        "give a WAV",
    );
    assert_clear_error(&wavegen(&["generate", "--checkpoint", c, "--out", o], &cache), "vocoder");
    let plain = dir.path().join("plain");
    let p = plain.to_str().unwrap();
    json(&wavegen(&[&["train", d, "--out", p, "--steps", "2", "--window", "256"][..], &tiny[..]].concat(), &cache));
    assert_clear_error(
        &wavegen(&["vocode", wav.to_str().unwrap(), "--checkpoint", p, "--out", o], &cache),
        "not a vocoder",
    );
    let bad = dir.path().join("bad");
    let args = [&["train", d, "--out", bad.to_str().unwrap(), "--window", "200"][..], &tiny[..], &mel[..]].concat();
    assert_clear_error(&wavegen(&args, &cache), "whole frames");
    let args =
        [&["train", d, "--out", bad.to_str().unwrap(), "--frame-context", "0"][..], &tiny[..], &mel[..]].concat();
    assert_clear_error(&wavegen(&args, &cache), "--frame-context");
    let args = ["train", d, "--out", bad.to_str().unwrap(), "--mel-bands", "40"];
    assert!(!wavegen(&args, &cache).status.success(), "--mel-bands needs --condition mel");
}
