//! WaveNet with local conditioning (the vocoder): the fused training op against candle's own
//! operations (logits and every gradient, with a label too), gradients against finite
//! differences, what each sample may see (audio before it; features up to c frames ahead, c
//! the frame network's context), each with one row per frame and with sub-frames (a learned
//! upsampling inside the frame), with a frame network of one layer and of two, and the
//! streaming engine against the parallel pass (≤ 1e-4 exact, ≤ 1e-3 with its fast
//! tanh and exp; the same argmax).

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use wavegen::audio::mel::MelConfig;
use wavegen::core::params::Params;
use wavegen::core::{Autoregressive, check};
use wavegen::data::Batch;
use wavegen::engine::{Engine, Kernels};
use wavegen::models::wavenet::{Config, LocalConfig, WaveNet};
use wavegen::rng::Rng;

const HOP: usize = 8;
const BANDS: usize = 6;

/// The frame network: rows per frame (dividing HOP), frames read on either side, hidden
/// channels (0: one layer).
#[derive(Debug, Clone, Copy)]
struct Frames {
    subframes: usize,
    context: usize,
    hidden: usize,
}

/// The frame networks the tests run through: the default shape, sub-frames, wider context, a
/// hidden layer.
const SHAPES: [Frames; 5] = [
    Frames { subframes: 1, context: 1, hidden: 0 },
    Frames { subframes: 4, context: 1, hidden: 0 },
    Frames { subframes: 2, context: 1, hidden: 0 },
    Frames { subframes: 2, context: 2, hidden: 5 },
    Frames { subframes: 8, context: 3, hidden: 0 },
];

/// A small vocoder with the frame network `frames`.
fn vocoder(labels: usize, frames: Frames) -> Config {
    let mel = MelConfig { sample_rate: 8000, n_fft: 32, hop: HOP, bands: BANDS, fmin: 0.0, fmax: 4000.0 };
    let mean = (0..BANDS).map(|b| -3.0 + 0.2 * b as f32).collect();
    let deviation = (0..BANDS).map(|b| 1.5 + 0.1 * b as f32).collect();
    let Frames { subframes, context, hidden } = frames;
    Config {
        layers_per_cycle: 3,
        cycles: 2,
        kernel_width: 2,
        residual_channels: 6,
        gate_channels: 5,
        skip_channels: 7,
        head_channels: 9,
        classes: 16,
        num_labels: labels,
        local: Some(LocalConfig { context, hidden, ..LocalConfig::new(mel, 4, subframes, mean, deviation) }),
    }
}

/// Random log-mel-like features for `batch` sequences of `len` samples for a frame network
/// that reads `context` frames either side: frames −context … ⌈len/hop⌉ − 1 + context.
fn features(batch: usize, len: usize, context: usize, dtype: DType, rng: &mut Rng) -> Tensor {
    let rows = len.div_ceil(HOP) + 2 * context;
    let v: Vec<f64> = (0..batch * rows * BANDS).map(|_| -3.0 + 2.0 * rng.normal()).collect();
    Tensor::from_vec(v, (batch, rows, BANDS), &Device::Cpu).unwrap().to_dtype(dtype).unwrap()
}

fn labels(cfg: &Config, batch: usize) -> Option<Tensor> {
    (cfg.num_labels > 0)
        .then(|| Tensor::new((0..batch as u32).map(|i| i % 2).collect::<Vec<_>>(), &Device::Cpu).unwrap())
}

fn build(cfg: &Config, dtype: DType, seed: u64) -> (WaveNet, Params) {
    let params = Params::new(seed);
    // Jitter every weight: fresh biases of 0 would leave ReLUs on their kinks.
    let model = WaveNet::new(cfg, params.var_builder(dtype)).unwrap();
    let mut rng = Rng::new(seed + 100);
    for (_, var) in params.named() {
        let jitter: Vec<f64> = (0..var.elem_count()).map(|_| 0.1 * rng.normal()).collect();
        let jitter = Tensor::from_vec(jitter, var.shape().clone(), &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
        var.set(&(var.as_tensor() + jitter).unwrap()).unwrap();
    }
    (model, params)
}

#[test]
fn fused_op_equals_candles_operations_with_every_gradient() {
    for (labelled, shape) in [0, 2, 0, 2, 2].into_iter().zip(SHAPES) {
        let cfg = vocoder(labelled, shape);
        let (model, params) = build(&cfg, DType::F64, 1);
        let mut rng = Rng::new(2);
        let len = 45; // not a whole number of frames
        let tokens = check::random_tokens(3, len, 16, &mut rng).unwrap();
        let feats = features(3, len, shape.context, DType::F64, &mut rng);
        let labels = labels(&cfg, 3);
        let fused = model.logits(&tokens, labels.as_ref(), Some(&feats)).unwrap();
        let reference = model.reference_logits(&tokens, labels.as_ref(), Some(&feats)).unwrap();
        let diff = (&fused - &reference).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
        assert!(diff < 1e-12, "labels {labelled}, {shape:?}: logits differ by {diff:e}");
        let probe = Tensor::from_vec(
            (0..fused.elem_count()).map(|_| rng.normal()).collect::<Vec<f64>>(),
            fused.shape().clone(),
            &Device::Cpu,
        )
        .unwrap();
        let g_fused = (&fused * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let g_ref = (&reference * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let mut seen_local = 0;
        for (name, var) in params.named() {
            // The last layer's residual output feeds nothing: candle records no gradient for it.
            let zeros = || var.zeros_like().unwrap();
            let a = g_fused.get(&var).cloned().unwrap_or_else(zeros).flatten_all().unwrap();
            let b = g_ref.get(&var).cloned().unwrap_or_else(zeros).flatten_all().unwrap();
            let scale = b.abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap().max(1e-9);
            let err = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap() / scale;
            assert!(err < 1e-10, "labels {labelled}, {shape:?}: gradient of {name} differs by {err:e}");
            seen_local += usize::from(name.contains("local") || name.starts_with("frames"));
        }
        let frame_net = if shape.hidden > 0 { 4 } else { 2 };
        assert_eq!(seen_local, 6 + frame_net, "every layer's projection and the frame network");
        assert_eq!(params.count(), cfg.weights(), "{shape:?}: the parameters counted by the config");
    }
}

#[test]
fn gradients_match_finite_differences_at_batch_two() {
    for shape in [SHAPES[2], SHAPES[3]] {
        gradients_match_finite_differences(shape);
    }
}

fn gradients_match_finite_differences(shape: Frames) {
    let cfg = vocoder(2, shape);
    let (model, params) = build(&cfg, DType::F64, 3);
    let mut rng = Rng::new(4);
    let len = 30;
    let tokens = check::random_tokens(2, len, 16, &mut rng).unwrap();
    let mask: Vec<f64> = (0..2 * len).map(|i| if i % len < 4 { 0.0 } else { 1.0 }).collect();
    let batch = Batch {
        tokens,
        mask: Tensor::from_vec(mask, (2, len), &Device::Cpu).unwrap(),
        labels: labels(&cfg, 2),
        values: None,
        features: Some(features(2, len, shape.context, DType::F64, &mut rng)),
        dropout: None,
    };
    let (at, err) = check::gradient_check(&model, &params, &batch, 4, &mut rng).unwrap();
    assert!(err < 1e-5, "{shape:?}: relative gradient error {err:e} at {at}");
}

/// The logits of every position, `(T, V)` of sequence 0, as f64.
fn logits_of(model: &WaveNet, tokens: &Tensor, feats: &Tensor) -> Vec<Vec<f64>> {
    let l = model.logits(tokens, None, Some(feats)).unwrap();
    l.to_dtype(DType::F64).unwrap().get(0).unwrap().to_vec2::<f64>().unwrap()
}

fn same_up_to(a: &[Vec<f64>], b: &[Vec<f64>], t: usize) -> bool {
    a[..=t].iter().zip(&b[..=t]).all(|(x, y)| x.iter().zip(y).all(|(p, q)| (p - q).abs() < 1e-12))
}

#[test]
fn each_sample_sees_the_audio_before_it_and_the_features_up_to_its_look_ahead() {
    for shape in [SHAPES[0], SHAPES[1], SHAPES[3], SHAPES[4]] {
        sees_frames_ahead(shape);
    }
}

fn sees_frames_ahead(shape: Frames) {
    let cfg = vocoder(0, shape);
    let c = shape.context;
    let (model, _) = build(&cfg, DType::F64, 5);
    let mut rng = Rng::new(6);
    let len = 40;
    let tokens = check::random_tokens(1, len, 16, &mut rng).unwrap();
    let feats = features(1, len, c, DType::F64, &mut rng);
    let base = logits_of(&model, &tokens, &feats);
    for t in [0, 5, 7, 8, 17, 31, 39] {
        // Audio: changing every token from t on leaves the logits of positions ≤ t alone.
        let mut changed = tokens.to_vec2::<u32>().unwrap();
        changed[0][t..].iter_mut().for_each(|x| *x = (*x + 1 + rng.below(15) as u32) % 16);
        let other = logits_of(&model, &Tensor::new(changed, &Device::Cpu).unwrap(), &feats);
        assert!(same_up_to(&base, &other, t), "position {t} sees audio at or after itself");
        // Features: frames after ⌊t/hop⌋ + c are invisible at t (feature row = frame + c) …
        let frame = t / HOP;
        let rows = feats.dim(1).unwrap();
        let mut f = feats.to_vec3::<f64>().unwrap();
        for row in f[0].iter_mut().skip(frame + 2 * c + 1) {
            row.iter_mut().for_each(|x| *x += 1.0 + rng.uniform());
        }
        let later = logits_of(&model, &tokens, &Tensor::new(f, &Device::Cpu).unwrap());
        assert!(same_up_to(&base, &later, t), "{shape:?}: position {t} sees frames after {}", frame + c);
        // … and the look-ahead frame ⌊t/hop⌋ + c is seen.
        assert!(frame + 2 * c < rows);
        let mut f = feats.to_vec3::<f64>().unwrap();
        f[0][frame + 2 * c].iter_mut().for_each(|x| *x += 1.0);
        let ahead = logits_of(&model, &tokens, &Tensor::new(f, &Device::Cpu).unwrap());
        let moved = base[t].iter().zip(&ahead[t]).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        assert!(moved > 1e-6, "{shape:?}: position {t} does not see frame {} (moved {moved:e})", frame + c);
    }
}

#[test]
fn a_vocoder_refuses_to_run_without_features_and_others_refuse_features() {
    let (model, _) = build(&vocoder(0, SHAPES[0]), DType::F32, 7);
    let tokens = Tensor::zeros((1, 16), DType::U32, &Device::Cpu).unwrap();
    let e = model.forward(&tokens, None).unwrap_err().to_string();
    assert!(e.contains("vocoder") && e.contains("features"), "{e}");
    assert!(model.start(1, None).is_err());
    let short = features(1, 8, 1, DType::F32, &mut Rng::new(1)); // frames for 8 samples, not 16
    let e = model.logits(&tokens, None, Some(&short)).unwrap_err().to_string();
    assert!(e.contains("frames"), "{e}");
    let plain =
        WaveNet::new(&Config { local: None, ..vocoder(0, SHAPES[0]) }, Params::new(1).var_builder(DType::F32)).unwrap();
    let bad = LocalConfig { subframes: 3, ..vocoder(0, SHAPES[0]).local.unwrap() }; // 3 does not divide 8
    let e = WaveNet::new(&Config { local: Some(bad), ..vocoder(0, SHAPES[0]) }, Params::new(1).var_builder(DType::F32))
        .unwrap_err()
        .to_string();
    assert!(e.contains("sub-frames"), "{e}");
    let feats = features(1, 16, 1, DType::F32, &mut Rng::new(1));
    assert!(plain.logits(&tokens, None, Some(&feats)).unwrap_err().to_string().contains("not a vocoder"));
}

#[test]
fn engine_logits_equal_the_parallel_pass() {
    for (labelled, shape) in [0, 2, 0, 2, 2].into_iter().zip(SHAPES) {
        let cfg = vocoder(labelled, shape);
        let c = shape.context;
        let (model, _) = build(&cfg, DType::F32, 8);
        let mut rng = Rng::new(9);
        // The features of a whole input; the engine primes `lead` steps before its first sample,
        // which the parallel pass sees as a window starting `lead` samples before it, with frames
        // before the input at the floor (silence), as training windows do.
        // (Four frames of lead: with a context of 2 or 3 the first read some of the input, the
        // earliest none.)
        let (frames, lead) = (7, 4 * HOP);
        let input_len = frames * HOP;
        let mel: Vec<f32> = (0..frames * BANDS).map(|_| (-3.0 + 2.0 * rng.normal()) as f32).collect();
        let len = lead + input_len;
        let floor = wavegen::audio::mel::FLOOR.ln();
        // Window frames −c … ⌈len/hop⌉ − 1 + c relative to the window's start, i.e. input
        // frames −lead/hop − c … : the floor outside the input.
        let first = -((lead / HOP) as isize) - c as isize;
        let rows = len.div_ceil(HOP) + 2 * c;
        let window_feats: Vec<f32> = (0..rows as isize)
            .flat_map(|i| {
                let f = first + i;
                let mel = &mel;
                (0..BANDS)
                    .map(move |b| if (0..frames as isize).contains(&f) { mel[f as usize * BANDS + b] } else { floor })
            })
            .collect();
        let n = 2;
        let tokens: Vec<Vec<u32>> = (0..n).map(|_| (0..len).map(|_| rng.below(16) as u32).collect()).collect();
        let stream_labels: Vec<u32> = (0..n as u32).map(|i| i % cfg.num_labels.max(1) as u32).collect();
        let full = model
            .logits(
                &Tensor::new(tokens.clone(), &Device::Cpu).unwrap(),
                labels(&cfg, n).as_ref(),
                Some(&Tensor::from_vec(window_feats.repeat(n), (n, rows, BANDS), &Device::Cpu).unwrap()),
            )
            .unwrap()
            .to_vec3::<f32>()
            .unwrap();
        let argmax = |v: &[f32]| (0..v.len()).max_by(|&a, &b| v[a].total_cmp(&v[b])).unwrap();
        // Exact: libm's tanh and exp (1e-4); fast: the engine's approximations (1e-3).
        for (kernels, exact) in Kernels::available().into_iter().flat_map(|k| [(k, true), (k, false)]) {
            let engine = Engine::new(&model, kernels, exact).unwrap();
            let local = Arc::new(engine.condition(&mel, frames).unwrap());
            let mut streams = engine.vocoder_streams(&stream_labels, vec![local; n], lead).unwrap();
            let (mut worst, mut same_argmax) = (0f32, true);
            for t in 0..len {
                let prev: Vec<u32> = tokens.iter().map(|r| if t > 0 { r[t - 1] } else { 0 }).collect();
                let logits = engine.step(&mut streams, (t > 0).then_some(prev.as_slice()));
                for r in 0..n {
                    let got = &logits[r * 16..(r + 1) * 16];
                    worst = worst.max(got.iter().zip(&full[r][t]).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max));
                    same_argmax &= argmax(got) == argmax(&full[r][t]);
                }
            }
            let tolerance = if exact { 1e-4 } else { 1e-3 };
            assert!(
                worst <= tolerance && same_argmax,
                "labels {labelled}, {shape:?}, {} exact={exact}: engine and parallel pass differ by {worst}, \
                 same argmax {same_argmax}",
                kernels.name
            );
        }
    }
}
