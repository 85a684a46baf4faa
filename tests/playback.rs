//! `wavegen play` through a real ALSA device with no sound card: a JACK server with its dummy
//! driver paces playback in real time, and ALSA's `file` plugin records what was played.
//! Needs `jackd2`, `libasound2-plugins` and `alsa-utils` (installed by `.ci/run`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const JACK_RATE: u32 = 16000;

/// Two JACK servers at once upset each other's clients, so the tests that start one take turns.
static ONE_SERVER_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

struct Jack(Child, String);

impl Drop for Jack {
    /// SIGTERM, so that jackd leaves the shared-memory registry clean (after SIGKILL it keeps
    /// the slot, and after a few runs "too many servers already active" stops new ones).
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts a dummy-driver JACK server and writes an ALSA config whose default device plays
/// into it and records to `raw`. Returns the server (its name goes to the child's
/// environment: tests run in parallel, each with its own server) and the config path.
fn headless_audio(dir: &Path, raw: &Path) -> (Jack, PathBuf) {
    let server = format!("wavegen-test-{}", std::process::id());
    let child = Command::new("jackd")
        .args([
            "--no-realtime",
            "-n",
            &server,
            "-d",
            "dummy",
            "-r",
            &JACK_RATE.to_string(),
            "-p",
            "256",
            "-P",
            "2",
            "-C",
            "0",
        ])
        .env("JACK_NO_AUDIO_RESERVATION", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("jackd is needed for this test: apt-get install jackd2 libasound2-plugins alsa-utils");
    let jack = Jack(child, server.clone());
    let conf = dir.join("asound.conf");
    std::fs::write(
        &conf,
        format!(
            r#"pcm.jackmono {{ type jack playback_ports {{ 0 system:playback_1 }} }}
pcm.jacktee {{ type file slave.pcm "jackmono" file "{}" format "raw" }}
pcm.!default {{ type plug slave.pcm "jacktee" }}
ctl.!default {{ type hw card 0 }}
"#,
            raw.display()
        ),
    )
    .unwrap();
    let started = Instant::now();
    while Command::new("jack_lsp").env("JACK_DEFAULT_SERVER", &server).output().map_or(true, |o| !o.status.success()) {
        assert!(started.elapsed() < Duration::from_secs(10), "jackd did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    (jack, conf)
}

fn command(args: &[&str], alsa_conf: &Path, jack: Option<&Jack>) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_wavegen"));
    c.args(args).env("ALSA_CONFIG_PATH", format!("/usr/share/alsa/alsa.conf:{}", alsa_conf.display()));
    if let Some(j) = jack {
        c.env("JACK_DEFAULT_SERVER", &j.1);
    }
    c
}

fn wavegen(args: &[&str], alsa_conf: &Path, jack: Option<&Jack>) -> Output {
    command(args, alsa_conf, jack).output().unwrap()
}

fn checkpoint() -> String {
    format!("{}/checkpoints/fsdd", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn play_streams_in_real_time_without_underruns_and_records_what_it_played() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("played.raw");
    let _turn = ONE_SERVER_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let (jack, conf) = headless_audio(dir.path(), &raw);
    let out = dir.path().join("played.wav");
    let seconds = 2.0;
    let started = Instant::now();
    let o = wavegen(
        &["play", "--checkpoint", &checkpoint(), "--seconds", "2", "--out", out.to_str().unwrap(), "--json"],
        &conf,
        Some(&jack),
    );
    let wall = started.elapsed().as_secs_f64();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let summary: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(summary["underruns"], 0, "{summary}");
    assert!(summary["realtime_factor"].as_f64().unwrap() > 1.0, "{summary}");
    assert!(wall >= seconds, "playback is paced in real time: took {wall:.2} s for {seconds} s");

    // What the device received, at the JACK rate.
    let bytes = std::fs::read(&raw).unwrap();
    let played: Vec<f32> = bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    let captured = played.len() as f64 / JACK_RATE as f64;
    assert!((captured - seconds).abs() < 0.15, "captured {captured:.3} s for {seconds} s");
    let rms = (played.iter().map(|x| (x * x) as f64).sum::<f64>() / played.len() as f64).sqrt();
    assert!(rms > 1e-4, "silence (RMS {rms:.2e})");

    // --out holds the same audio at the model rate.
    let wav = wavegen::audio::wav::read_mono(&out).unwrap();
    assert_eq!(wav.sample_rate, 8000);
    assert!((wav.seconds() - seconds).abs() < 0.1, "{} s in --out", wav.seconds());
}

#[test]
fn no_output_device_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("asound.conf");
    std::fs::write(&conf, "pcm.!default { type hw card 97 }\nctl.!default { type hw card 97 }\n").unwrap();
    let o = wavegen(&["play", "--checkpoint", &checkpoint(), "--seconds", "1"], &conf, None);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(!stderr.contains("panicked"), "{stderr}");
    let line = stderr.lines().find(|l| l.starts_with("error:")).unwrap_or_else(|| panic!("{stderr}"));
    assert!(line.contains("--out") && line.contains("--list-devices"), "{line}");
    let o = wavegen(&["play", "--checkpoint", &checkpoint(), "--device", "no-such-device-xyz"], &conf, None);
    assert!(String::from_utf8_lossy(&o.stderr).contains("no-such-device-xyz"));
}

#[test]
fn ctrl_c_stops_playback_cleanly_and_keeps_what_was_played() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("played.raw");
    let _turn = ONE_SERVER_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let (jack, conf) = headless_audio(dir.path(), &raw);
    let out = dir.path().join("heard.wav");
    let child =
        command(&["play", "--checkpoint", &checkpoint(), "--out", out.to_str().unwrap(), "--json"], &conf, Some(&jack))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
    std::thread::sleep(Duration::from_millis(2500));
    // SAFETY: sending a signal to our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let summary: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let played = summary["seconds"].as_f64().unwrap();
    assert!(played > 0.5 && played < 3.0, "{summary}");
    let wav = wavegen::audio::wav::read_mono(&out).unwrap();
    assert!((wav.seconds() - played).abs() < 0.1, "--out holds {} s, {played} s were played", wav.seconds());
}

/// `play --vocode`: a vocoder's audio from a WAV's features streams through the device in real
/// time, stops at the input's end, and `--out` holds as many samples as the input.
#[test]
fn play_vocodes_a_wav_in_real_time() {
    let dir = tempfile::tempdir().unwrap();
    // A tiny vocoder, trained for a few steps on two tones.
    let data = dir.path().join("tones");
    std::fs::create_dir_all(&data).unwrap();
    for (i, hz) in [220.0f64, 330.0].iter().enumerate() {
        let x: Vec<f32> =
            (0..12_000).map(|n| (0.5 * (2.0 * std::f64::consts::PI * hz * n as f64 / 8000.0).sin()) as f32).collect();
        wavegen::audio::wav::write_pcm16(&data.join(format!("t{i}.wav")), 8000, &[&x]).unwrap();
    }
    let ckpt = dir.path().join("vocoder");
    let no_audio = dir.path().join("none.conf");
    std::fs::write(&no_audio, "").unwrap();
    let train = [
        "train",
        data.to_str().unwrap(),
        "--out",
        ckpt.to_str().unwrap(),
        "--preset",
        "tiny",
        "--sample-rate",
        "8000",
        "--condition",
        "mel",
        "--steps",
        "10",
        "--window",
        "512",
        "--json",
    ];
    let t = command(&train, &no_audio, None).env("WAVEGEN_CACHE", dir.path().join("cache")).output().unwrap();
    assert!(t.status.success(), "{}", String::from_utf8_lossy(&t.stderr));

    let raw = dir.path().join("played.raw");
    let _turn = ONE_SERVER_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let (jack, conf) = headless_audio(dir.path(), &raw);
    let out = dir.path().join("played.wav");
    let input = data.join("t1.wav");
    let started = Instant::now();
    let args = ["play", "--checkpoint", ckpt.to_str().unwrap(), "--vocode", input.to_str().unwrap()];
    let o = wavegen(&[&args[..], &["--out", out.to_str().unwrap(), "--json"]].concat(), &conf, Some(&jack));
    let wall = started.elapsed().as_secs_f64();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let summary: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(summary["underruns"], 0, "{summary}");
    assert!(summary["realtime_factor"].as_f64().unwrap() > 1.0, "{summary}");
    assert!(wall >= 1.5, "paced in real time: {wall:.2} s for 1.5 s");
    let played = std::fs::read(&raw).unwrap().len() as f64 / 4.0 / JACK_RATE as f64;
    assert!((played - 1.5).abs() < 0.15, "played {played:.3} s of a 1.5 s input");
    assert_eq!(wavegen::audio::wav::read_mono(&out).unwrap().samples.len(), 12_000);
    // A vocoder needs an input, and other models take none.
    let e = wavegen(&["play", "--checkpoint", ckpt.to_str().unwrap(), "--seconds", "1"], &conf, Some(&jack));
    assert!(String::from_utf8_lossy(&e.stderr).contains("--vocode"), "{}", String::from_utf8_lossy(&e.stderr));
    let e = wavegen(&["play", "--checkpoint", &checkpoint(), "--vocode", input.to_str().unwrap()], &conf, Some(&jack));
    assert!(String::from_utf8_lossy(&e.stderr).contains("not a vocoder"), "{}", String::from_utf8_lossy(&e.stderr));
}
