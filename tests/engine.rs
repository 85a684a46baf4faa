//! The streaming engine against the candle model: the same logits (≤ 1e-3, same argmax) for
//! every kernel width, with and without labels, random and trained weights, exact and fast
//! activations, every kernel set this CPU has; and, with exact activations, the same audio as
//! the candle stepper for the same seed.

use candle_core::{DType, Device, Tensor};
use wavegen::core::Autoregressive;
use wavegen::core::params::Params;
use wavegen::core::sample::{self, Method, SamplerConfig};
use wavegen::engine::{self, Engine, Kernels, StreamSpec};
use wavegen::models::wavenet::{Config, WaveNet};
use wavegen::rng::Rng;

fn configs() -> Vec<(&'static str, Config)> {
    let base =
        Config { residual_channels: 16, gate_channels: 12, skip_channels: 70, head_channels: 40, ..Config::tiny() };
    vec![
        ("k2", Config { layers_per_cycle: 5, cycles: 2, kernel_width: 2, ..base.clone() }),
        ("k3", Config { layers_per_cycle: 3, cycles: 2, kernel_width: 3, ..base.clone() }),
        ("k2 labels", Config { layers_per_cycle: 4, cycles: 1, kernel_width: 2, num_labels: 3, ..base.clone() }),
        ("k4 labels", Config { layers_per_cycle: 2, cycles: 2, kernel_width: 4, num_labels: 2, ..base }),
    ]
}

/// Worst |engine − candle| over all positions of 3 streams, and whether every argmax agrees.
fn compare(model: &WaveNet, engine: &Engine, len: usize, seed: u64) -> (f32, bool) {
    let n = 3;
    let mut rng = Rng::new(seed);
    let rows: Vec<Vec<u32>> = (0..n).map(|_| (0..len).map(|_| rng.below(256) as u32).collect()).collect();
    let labels: Vec<u32> = (0..n as u32).map(|i| i % model.cfg.num_labels.max(1) as u32).collect();
    let label_tensor = (model.cfg.num_labels > 0).then(|| Tensor::new(labels.clone(), &Device::Cpu).unwrap());
    let full = model
        .forward(&Tensor::new(rows.clone(), &Device::Cpu).unwrap(), label_tensor.as_ref())
        .unwrap()
        .to_vec3::<f32>()
        .unwrap();
    let mut streams = engine.streams(&labels).unwrap();
    let (mut worst, mut same_argmax) = (0f32, true);
    let argmax = |v: &[f32]| (0..v.len()).max_by(|&a, &b| v[a].total_cmp(&v[b])).unwrap();
    for t in 0..len {
        let prev: Vec<u32> = rows.iter().map(|r| if t > 0 { r[t - 1] } else { 0 }).collect();
        let logits = engine.step(&mut streams, (t > 0).then_some(prev.as_slice()));
        for r in 0..n {
            let got = &logits[r * 256..(r + 1) * 256];
            let want = &full[r][t];
            worst = worst.max(got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max));
            same_argmax &= argmax(got) == argmax(want);
        }
    }
    (worst, same_argmax)
}

#[test]
fn engine_logits_equal_the_parallel_pass_for_random_weights() {
    for (name, cfg) in configs() {
        let model = WaveNet::new(&cfg, Params::new(3).var_builder(DType::F32)).unwrap();
        for kernels in Kernels::available() {
            for exact in [true, false] {
                let engine = Engine::new(&model, kernels, exact).unwrap();
                let (worst, same) = compare(&model, &engine, cfg.receptive_field() + 40, 5);
                assert!(
                    worst <= 1e-3 && same,
                    "{name}, {} exact={exact}: max diff {worst}, same argmax {same}",
                    kernels.name
                );
            }
        }
    }
}

#[test]
fn engine_logits_equal_the_parallel_pass_for_the_trained_model() {
    let m = wavegen::tasks::AudioModel::load(
        &std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("checkpoints/fsdd"),
    )
    .unwrap();
    for exact in [true, false] {
        let engine = Engine::new(&m.model, Kernels::detect(), exact).unwrap();
        let (worst, same) = compare(&m.model, &engine, m.model.cfg.receptive_field() + 200, 6);
        assert!(worst <= 1e-3 && same, "exact={exact}: max diff {worst}, same argmax {same}");
    }
}

#[test]
fn with_exact_activations_the_engine_makes_the_same_audio_as_the_stepper() {
    for (name, cfg) in configs() {
        let model = WaveNet::new(&cfg, Params::new(4).var_builder(DType::F32)).unwrap();
        let label = if cfg.num_labels > 0 { 1 } else { 0 };
        let labels = (cfg.num_labels > 0).then(|| Tensor::new(&[label], &Device::Cpu).unwrap());
        let prime: Vec<u32> = (0..50).map(|i| (i * 11 % 256) as u32).collect();
        let sampler = SamplerConfig { temperature: 0.9, ..Default::default() };
        let stepper = sample::generate(
            &model,
            std::slice::from_ref(&prime),
            labels.as_ref(),
            300,
            &sampler,
            &mut Rng::new(8),
            Method::Cached,
            &mut |_| {},
        )
        .unwrap();
        let engine = Engine::new(&model, Kernels::detect(), true).unwrap();
        let mut specs = [StreamSpec { sampler: sampler.clone(), rng: Rng::new(8), label, local: None }];
        let fast = engine::generate(&engine, &mut specs, &prime, 300, &mut |_| {}).unwrap();
        assert_eq!(stepper, fast, "{name}");
    }
}

#[test]
fn fast_activations_leave_every_sampling_distribution_unchanged() {
    // Total-variation distance between the distributions the sampler draws from, exact vs
    // fast activations, at every step of a long sequence of the trained model.
    let m = wavegen::tasks::AudioModel::load(
        &std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("checkpoints/fsdd"),
    )
    .unwrap();
    let exact = Engine::new(&m.model, Kernels::detect(), true).unwrap();
    let fast = Engine::new(&m.model, Kernels::detect(), false).unwrap();
    let (mut se, mut sf) = (exact.streams(&[0]).unwrap(), fast.streams(&[0]).unwrap());
    let sampler = SamplerConfig::default();
    let mut rng = Rng::new(12);
    let mut prev: Option<[u32; 1]> = None;
    let mut worst: f64 = 0.0;
    for _ in 0..3000 {
        let pe = sampler.distribution(exact.step(&mut se, prev.as_ref().map(|p| p.as_slice())));
        let lf = fast.step(&mut sf, prev.as_ref().map(|p| p.as_slice())).to_vec();
        let pf = sampler.distribution(&lf);
        worst = worst.max(0.5 * pe.iter().zip(&pf).map(|(a, b)| (a - b).abs()).sum::<f64>());
        prev = Some([sampler.sample(&lf, &mut rng)]);
    }
    assert!(worst < 1e-3, "total-variation distance up to {worst:e}");
}
