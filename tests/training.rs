//! Training end to end through the library: a tiny WaveNet learns a periodic signal and
//! generates it back; checkpoints reload to identical logits; stopping and resuming gives
//! exactly the run that never stopped; bf16 training learns, resumes and repeats.

mod common;

use std::sync::atomic::AtomicBool;

use candle_core::{DType, Device, Tensor};
use wavegen::audio::mel::MelConfig;
use wavegen::core::Autoregressive;
use wavegen::core::sample::SamplerConfig;
use wavegen::core::train::{Event, Stop};
use wavegen::tasks::generate::{GenerateOptions, generate};
use wavegen::tasks::run;
use wavegen::tasks::train::{AudioModelSpec, VocoderOptions, train};
use wavegen::tasks::{AudioModel, Silent};

const PERIOD: usize = 20;

#[test]
fn a_tiny_wavenet_learns_a_periodic_signal_and_generates_it_back() {
    let dir = tempfile::tempdir().unwrap();
    let data = common::periodic_folder(dir.path(), 4, PERIOD, 8000, 0.5);
    let out = dir.path().join("ckpt");
    let summary = train(&common::tiny_options(&data, &out, 200), &mut Silent, &AtomicBool::new(false)).unwrap();
    // The signal is a deterministic function of its last two samples, so a model that uses
    // its context drives the NLL towards 0; one that learned only which 20 codes occur would
    // sit at log2(20) = 4.3 bits, one that sees a single previous sample at about 1 bit.
    let bits = summary.val_bits_per_sample.unwrap();
    assert!(bits < 0.5, "validation NLL {bits} bits/sample");

    let opts = GenerateOptions {
        out: Some(dir.path().join("gen.wav")),
        sampler: SamplerConfig { temperature: 0.7, ..Default::default() },
        seed: 3,
        prime: Some(data.join("p0.wav")),
        ..GenerateOptions::new(out.clone(), 0.1)
    };
    let g = generate(&opts, &mut Silent).unwrap();
    assert_eq!(g.samples, 800);
    let c = &g.codes[0];
    let repeats = (0..c.len() - PERIOD).filter(|&t| c[t] == c[t + PERIOD]).count() as f64 / (c.len() - PERIOD) as f64;
    assert!(repeats > 0.9, "only {:.0}% of samples repeat with period {PERIOD}", 100.0 * repeats);
    let f = wavegen::audio::analysis::dominant_frequency(&g.audio[0], 8000);
    assert!((f - 8000.0 / PERIOD as f64).abs() < 5.0, "dominant frequency {f} Hz");
    assert!(wavegen::audio::wav::read_mono(&dir.path().join("gen.wav")).unwrap().samples.len() == 800);
}

#[test]
fn save_then_load_gives_identical_logits() {
    let dir = tempfile::tempdir().unwrap();
    let data = common::periodic_folder(dir.path(), 3, PERIOD, 8000, 0.3);
    let out = dir.path().join("ckpt");
    let opts = common::tiny_options(&data, &out, 5);
    train(&opts, &mut Silent, &AtomicBool::new(false)).unwrap();
    let a = AudioModel::load(&out).unwrap();
    let b = AudioModel::load(&out.join("config.json")).unwrap();
    let tokens =
        Tensor::from_vec((0..64u32).map(|i| (i * 37) % 256).collect::<Vec<_>>(), (2, 32), &Device::Cpu).unwrap();
    let la = a.model.forward(&tokens, None).unwrap();
    let lb = b.model.forward(&tokens, None).unwrap();
    let diff = (la - lb).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert_eq!(diff, 0.0);
}

#[test]
fn stopping_and_resuming_gives_the_same_run_as_never_stopping() {
    resume_is_exact(&|_| {});
}

/// The same for a vocoder: its features, windows and frame network resume exactly too.
#[test]
fn a_vocoder_resumes_exactly() {
    resume_is_exact(&|o| {
        let mel = MelConfig { hop: 32, n_fft: 128, bands: 20, ..MelConfig::for_rate(8000) };
        o.condition = Some(VocoderOptions { mel, channels: 8, subframes: 2, context: 2, hidden: 6 });
    });
}

/// The same with an average of the weights: the checkpoint holds the average, the optimizer's
/// state the raw weights, and both continue exactly.
#[test]
fn a_run_that_averages_its_weights_resumes_exactly() {
    resume_is_exact(&|o| o.train.adamw.average_decay = 0.9);
}

fn resume_is_exact(adjust: &dyn Fn(&mut wavegen::tasks::train::TrainOptions)) {
    let dir = tempfile::tempdir().unwrap();
    let data = common::periodic_folder(dir.path(), 4, PERIOD, 8000, 0.3);
    let (n, m) = (20, 20);
    let options = |out: &std::path::Path, steps| {
        let mut o = common::tiny_options(&data, out, steps);
        adjust(&mut o);
        o
    };
    // One run of N + M steps.
    let whole = dir.path().join("whole");
    train(&options(&whole, n + m), &mut Silent, &AtomicBool::new(false)).unwrap();
    // The same run stopped after N steps (as Ctrl-C stops it), then resumed: with no step count
    // given, a resume trains to the run's own end.
    let split = dir.path().join("split");
    let stop = AtomicBool::new(false);
    let mut stop_at_n = StopAt { step: n, stop: &stop };
    let stopped = train(&options(&split, n + m), &mut stop_at_n, &stop).unwrap();
    assert_eq!((stopped.steps, stopped.stopped), (n, Stop::Interrupted));
    let mut second = options(&split, 1); // max_steps is ignored on resume ...
    second.resume = true;
    if let AudioModelSpec::Wavenet(cfg) = &mut second.model {
        cfg.residual_channels = 99; // ... as is the config: the checkpoint's wins
    }
    train(&second, &mut Silent, &AtomicBool::new(false)).unwrap();

    let w1 = run::open(&whole).unwrap().weights().unwrap();
    let w2 = run::open(&split).unwrap().weights().unwrap();
    assert_eq!(w1.len(), w2.len());
    for (name, t1) in &w1 {
        let d = (t1 - &w2[name])
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert_eq!(d, 0.0, "tensor {name} differs by {d}");
    }
    let h1 = run::read_manifest(&whole).unwrap().state;
    let h2 = run::read_manifest(&split).unwrap().state;
    let losses = |s: &wavegen::core::train::TrainState| {
        s.history.iter().map(|e| (e.step, e.train_nats, e.val_nats)).collect::<Vec<_>>()
    };
    assert_eq!(losses(&h1), losses(&h2));
    assert_eq!(h1.rng, h2.rng, "the data stream continued where it stopped");
    assert_eq!(h1.step, n + m);
    let local = |dir| run::read_manifest(dir).unwrap().model.wavenet().unwrap().local.clone();
    assert_eq!(local(&whole), local(&split), "the same conditioning (or none)");
}

/// A reporter that raises the stop flag after a given step, as Ctrl-C would.
struct StopAt<'a> {
    step: u64,
    stop: &'a AtomicBool,
}

impl wavegen::tasks::Reporter for StopAt<'_> {
    fn note(&mut self, _: &str) {}
    fn progress(&mut self, _: &str, _: u64, _: u64) {}
    fn train_event(&mut self, event: &Event) {
        if matches!(event, Event::Step { step, .. } if *step == self.step) {
            self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

/// `--precision bf16`: learns the periodic signal as f32 does, is recorded in the checkpoint
/// and kept on resume, and is deterministic (two runs with the same seed give the same weights).
/// Where the CPU has no AMX-BF16 the run is refused with an error that says so.
#[test]
fn bf16_training_learns_resumes_and_repeats() {
    use wavegen::core::train::Precision;
    let dir = tempfile::tempdir().unwrap();
    let data = common::periodic_folder(dir.path(), 4, PERIOD, 8000, 0.5);
    let run = |name: &str, steps: u64, resume: bool| {
        let mut opts = common::tiny_options(&data, &dir.path().join(name), steps);
        opts.train.precision = Precision::Bf16;
        opts.train.decay_steps = 200;
        opts.resume = resume;
        opts.change_steps = resume.then_some(steps);
        train(&opts, &mut Silent, &AtomicBool::new(false))
    };
    let first = match run("a", 120, false) {
        Err(e) if !wavegen::layers::matmul::amx::available() => {
            assert!(e.to_string().contains("AMX-BF16"), "{e}");
            return;
        }
        r => r.unwrap(),
    };
    assert!(first.val_bits_per_sample.is_some());
    let manifest = run::read_manifest(&dir.path().join("a")).unwrap();
    assert_eq!(manifest.train.precision, Precision::Bf16);
    let resumed = run("a", 200, true).unwrap();
    let bits = resumed.val_bits_per_sample.unwrap();
    assert!(bits < 0.5, "validation NLL {bits} bits/sample after 200 bf16 steps");
    assert_eq!(run::read_manifest(&dir.path().join("a")).unwrap().train.precision, Precision::Bf16);
    run("b", 120, false).unwrap();
    run("b", 200, true).unwrap();
    let (wa, wb) = (
        run::open(&dir.path().join("a")).unwrap().weights().unwrap(),
        run::open(&dir.path().join("b")).unwrap().weights().unwrap(),
    );
    for (name, t) in &wa {
        let same = t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            == wb[name].flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(same, "tensor {name} differs between two bf16 runs with the same seed");
    }
}

/// A tiny vocoder learns a signal that its features determine and its past does not: a sine
/// whose pitch (one of 16, 250–3250 Hz) and level jump every 128 samples. With two past samples (its receptive
/// field) a sine's next sample is 2 cos ω · x₋₁ − x₋₂: known given ω, which the mel frames
/// carry; without them, two samples of a sine of unknown level fit every pitch.
#[test]
fn a_tiny_vocoder_learns_a_pitch_its_features_carry_far_better_than_without_them() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("pitches");
    let mut rng = wavegen::rng::Rng::new(3);
    for f in 0..6 {
        let mut phase = 0.0f64;
        let x: Vec<f64> = (0..8000)
            .scan((0.0, 0.0), |(hz, level), i| {
                if i % 128 == 0 {
                    (*hz, *level) = (250.0 + 200.0 * rng.below(16) as f64, 0.1 + 0.5 * rng.uniform());
                }
                phase += 2.0 * std::f64::consts::PI * *hz / 8000.0;
                Some(*level * phase.sin())
            })
            .collect();
        common::write_wav(&data.join(format!("p{f}.wav")), &x, 8000, 1, 16, false);
    }
    let run = |out: &str, vocoder: bool| -> f64 {
        let mut o = common::tiny_options(&data, &dir.path().join(out), 1500);
        o.model = AudioModelSpec::Wavenet(wavegen::models::wavenet::Config {
            layers_per_cycle: 1,
            cycles: 1,
            residual_channels: 32,
            gate_channels: 32,
            skip_channels: 64,
            head_channels: 64,
            ..wavegen::models::wavenet::Config::tiny()
        });
        o.window = Some(512);
        o.val_fraction = 0.34;
        o.train.eval_every = 100;
        o.train.lr = 3e-3;
        if vocoder {
            let mel = MelConfig { n_fft: 128, hop: 32, bands: 20, ..MelConfig::for_rate(8000) };
            o.condition = Some(VocoderOptions { mel, channels: 16, subframes: 1, context: 1, hidden: 0 });
        }
        let s = train(&o, &mut Silent, &AtomicBool::new(false)).unwrap();
        s.best_val_bits_per_sample.unwrap()
    };
    let (with, without) = (run("vocoder", true), run("plain", false));
    eprintln!("{with:.3} bits/sample with the features, {without:.3} without");
    assert!(with < without - 1.0, "{with:.3} bits/sample with the features, {without:.3} without");
}
