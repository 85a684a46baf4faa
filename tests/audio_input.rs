//! WAV input: every supported format loads, channels are mixed, resampling keeps pitch and
//! length, and the folder corpus reports what it kept and dropped.

mod common;

use common::{sine, write_wav};
use wavegen::audio::analysis::dominant_frequency;
use wavegen::audio::{resample, wav};
use wavegen::data::wav_folder::{AudioSettings, Corpus};

#[test]
fn every_bit_depth_and_float_and_stereo_loads_with_the_right_values() {
    let dir = tempfile::tempdir().unwrap();
    let x = sine(440.0, 8000, 0.25, 0.5);
    for (bits, float, channels) in
        [(8, false, 1), (16, false, 1), (24, false, 1), (32, false, 1), (32, true, 1), (16, false, 2), (24, false, 6)]
    {
        let path = dir.path().join(format!("t{bits}{float}{channels}.wav"));
        write_wav(&path, &x, 8000, channels, bits, float);
        let m = wav::read_mono(&path).unwrap();
        assert_eq!(m.sample_rate, 8000);
        assert_eq!(m.samples.len(), x.len(), "{bits} bits, {channels} channels");
        let tolerance = if bits == 8 { 1.0 / 100.0 } else { 1e-4 };
        let worst = x.iter().zip(&m.samples).map(|(a, b)| (*a as f32 - b).abs()).fold(0.0, f32::max);
        assert!(worst < tolerance, "{bits}-bit {}: error {worst}", if float { "float" } else { "int" });
    }
}

#[test]
fn stereo_is_averaged_to_mono() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lr.wav");
    let spec =
        hound::WavSpec { channels: 2, sample_rate: 8000, bits_per_sample: 16, sample_format: hound::SampleFormat::Int };
    let mut w = hound::WavWriter::create(&path, spec).unwrap();
    for _ in 0..100 {
        w.write_sample(16384i16).unwrap(); // left 0.5
        w.write_sample(0i16).unwrap(); // right 0
    }
    w.finalize().unwrap();
    let m = wav::read_mono(&path).unwrap();
    assert!(m.samples.iter().all(|&s| (s - 0.25).abs() < 1e-4));
}

#[test]
fn resampling_keeps_a_440_hz_sine_at_440_hz_and_the_expected_length() {
    for from in [8000, 44100, 48000] {
        let x: Vec<f32> = sine(440.0, from, 1.0, 0.5).iter().map(|&v| v as f32).collect();
        let y = resample::resample(&x, from, 16000).unwrap();
        let expected = (x.len() as f64 * 16000.0 / from as f64).ceil() as usize;
        assert_eq!(y.len(), expected, "{from} Hz");
        let f = dominant_frequency(&y, 16000);
        assert!((f - 440.0).abs() < 1.0, "{from} Hz → 16 kHz: measured {f} Hz");
        // Amplitude is kept too (away from the edges).
        let peak = y[2000..14000].iter().fold(0.0f32, |m, &v| m.max(v.abs()));
        assert!((peak - 0.5).abs() < 0.02, "{from} Hz: peak {peak}");
    }
}

#[test]
fn folder_corpus_resamples_trims_reports_and_caches() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // 0.1 s of silence, 0.5 s of tone, 0.2 s of silence, at 44.1 kHz stereo.
    let mut x = vec![0.0; 4410];
    x.extend(sine(300.0, 44100, 0.5, 0.5));
    x.extend(vec![0.0; 8820]);
    write_wav(&data.join("a/tone.WAV"), &x, 44100, 2, 16, false);
    write_wav(&data.join("b/silent.wav"), &vec![0.0; 4000], 16000, 1, 16, false);
    std::fs::write(data.join("b/notes.txt"), "not audio").unwrap();
    std::fs::write(data.join("b/broken.wav"), "RIFF but not really").unwrap();
    let settings = AudioSettings { sample_rate: 16000, ..AudioSettings::default() };
    let cache = dir.path().join("cache");
    let mut calls = 0;
    let c = Corpus::open(&data, &settings, &cache, &mut |_, _| calls += 1).unwrap();
    assert_eq!(c.report.found, 3);
    assert_eq!(c.files.len(), 1);
    assert_eq!(c.files[0].name, "a/tone.WAV");
    assert_eq!(c.files[0].label(), Some("a"));
    let kept = c.files[0].len as f64 / 16000.0;
    assert!((kept - 0.5).abs() < 0.01, "kept {kept} s");
    assert!((c.report.trimmed_seconds - 0.3).abs() < 0.01, "trimmed {}", c.report.trimmed_seconds);
    let reasons: Vec<&str> = c.report.dropped.iter().map(|(f, _)| f.as_str()).collect();
    assert_eq!(reasons, ["b/broken.wav", "b/silent.wav"]);
    assert!(c.report.dropped[1].1.contains("silence"));
    assert!(calls > 0);
    // Second open: from the cache, no decoding.
    let mut calls_again = 0;
    let again = Corpus::open(&data, &settings, &cache, &mut |_, _| calls_again += 1).unwrap();
    assert_eq!(calls_again, 0);
    assert_eq!(again.codes(0), c.codes(0));
    // Other settings: rebuilt.
    let other = AudioSettings { sample_rate: 8000, ..settings };
    let mut calls_other = 0;
    let c8 = Corpus::open(&data, &other, &cache, &mut |_, _| calls_other += 1).unwrap();
    assert!(calls_other > 0);
    assert!((c8.files[0].len as f64 / 8000.0 - 0.5).abs() < 0.01);
}
