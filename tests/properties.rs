//! The core's properties, run over every registered model configuration: causality, cached
//! stepping equal to the parallel pass, gradients equal to finite differences (batch ≥ 2),
//! and naive generation equal to cached generation.

use candle_core::{DType, Device, Tensor};
use wavegen::core::check;
use wavegen::core::params::Params;
use wavegen::core::sample::{self, Method, SamplerConfig};
use wavegen::models::wavenet::{Config, WaveNet};
use wavegen::rng::Rng;

/// The registry: every model configuration the properties run over.
fn wavenets() -> Vec<(&'static str, Config)> {
    let base = Config {
        residual_channels: 6,
        gate_channels: 5,
        skip_channels: 7,
        head_channels: 9,
        classes: 16,
        ..Config::tiny()
    };
    vec![
        ("k2, 1 cycle", Config { layers_per_cycle: 3, cycles: 1, kernel_width: 2, ..base.clone() }),
        ("k2, 3 cycles", Config { layers_per_cycle: 2, cycles: 3, kernel_width: 2, ..base.clone() }),
        ("k3, 2 cycles", Config { layers_per_cycle: 3, cycles: 2, kernel_width: 3, ..base.clone() }),
        ("k4, labels", Config { layers_per_cycle: 2, cycles: 1, kernel_width: 4, num_labels: 3, ..base.clone() }),
    ]
}

fn build(cfg: &Config, dtype: DType, seed: u64) -> (WaveNet, Params) {
    let params = Params::new(seed);
    let model = WaveNet::new(cfg, params.var_builder(dtype)).unwrap();
    (model, params)
}

fn labels_for(cfg: &Config, batch: usize) -> Option<Tensor> {
    (cfg.num_labels > 0).then(|| {
        Tensor::new((0..batch as u32).map(|i| i % cfg.num_labels as u32).collect::<Vec<_>>(), &Device::Cpu).unwrap()
    })
}

#[test]
fn causality_holds_for_every_model() {
    for (name, cfg) in wavenets() {
        let (model, _) = build(&cfg, DType::F32, 3);
        let mut rng = Rng::new(5);
        let tokens = check::random_tokens(2, 24, cfg.classes, &mut rng).unwrap();
        let labels = labels_for(&cfg, 2);
        if let Err(why) = check::causality(&model, &tokens, labels.as_ref()).unwrap() {
            panic!("{name}: {why}");
        }
    }
}

#[test]
fn causality_check_catches_a_model_that_sees_the_present() {
    // A model whose logits at t read token t: the check must fail on it.
    struct Peeking(WaveNet);
    impl wavegen::core::Autoregressive for Peeking {
        type State = ();
        fn vocab_size(&self) -> usize {
            self.0.vocab_size()
        }
        fn receptive_field(&self) -> Option<usize> {
            None
        }
        fn forward(&self, tokens: &Tensor, labels: Option<&Tensor>) -> wavegen::Result<Tensor> {
            let (b, t) = tokens.dims2()?;
            let shifted_left =
                Tensor::cat(&[tokens.narrow(1, 1, t - 1)?, Tensor::zeros((b, 1), DType::U32, &Device::Cpu)?], 1)?;
            self.0.forward(&shifted_left, labels)
        }
        fn start(&self, _: usize, _: Option<&Tensor>) -> wavegen::Result<()> {
            Ok(())
        }
        fn step(&self, _: &mut (), _: Option<&Tensor>) -> wavegen::Result<Tensor> {
            unimplemented!()
        }
    }
    let (model, _) = build(&wavenets()[0].1, DType::F32, 3);
    let tokens = check::random_tokens(1, 12, 16, &mut Rng::new(1)).unwrap();
    assert!(check::causality(&Peeking(model), &tokens, None).unwrap().is_err());
}

#[test]
fn cached_stepping_equals_the_parallel_pass() {
    for (name, cfg) in wavenets() {
        let (model, _) = build(&cfg, DType::F32, 4);
        let mut rng = Rng::new(6);
        let len = cfg.receptive_field() + 20; // past the receptive field, so the queues wrap
        let tokens = check::random_tokens(3, len, cfg.classes, &mut rng).unwrap();
        let labels = labels_for(&cfg, 3);
        let diff = check::stepper_vs_forward(&model, &tokens, labels.as_ref()).unwrap();
        assert!(diff < 1e-4, "{name}: stepper and parallel logits differ by {diff}");
    }
}

#[test]
fn gradients_match_finite_differences_at_batch_two() {
    for (name, cfg) in wavenets() {
        let (model, params) = build(&cfg, DType::F64, 7);
        let mut rng = Rng::new(8);
        let tokens = check::random_tokens(2, 20, cfg.classes, &mut rng).unwrap();
        // Mask out the first positions, as training does for the context.
        let mask: Vec<f64> = (0..40).map(|i| if i % 20 < 4 { 0.0 } else { 1.0 }).collect();
        let mask = Tensor::from_vec(mask, (2, 20), &Device::Cpu).unwrap();
        let labels = labels_for(&cfg, 2);
        let (at, err) = check::gradient_check(&model, &params, &tokens, &mask, labels.as_ref(), 4, &mut rng).unwrap();
        assert!(err < 1e-5, "{name}: relative gradient error {err:e} at {at}");
    }
}

#[test]
fn naive_generation_equals_cached_generation_for_the_same_seed() {
    for (name, cfg) in wavenets() {
        let (model, _) = build(&cfg, DType::F32, 9);
        let labels = labels_for(&cfg, 2);
        let prime = vec![vec![1u32, 2, 3, 4, 5], vec![5, 4, 3, 2, 1]];
        let sampler = SamplerConfig::default();
        let run = |method| {
            let mut rng = Rng::new(10);
            sample::generate(&model, &prime, labels.as_ref(), 60, &sampler, &mut rng, method, &mut |_| {}).unwrap()
        };
        let cached = run(Method::Cached);
        assert_eq!(cached, run(Method::Naive), "{name}");
        assert_eq!(cached, run(Method::Cached), "{name}: same seed, same output");
        let distinct: std::collections::HashSet<u32> = cached[0].iter().copied().collect();
        assert!(distinct.len() > 3, "{name}: sampling is not degenerate");
    }
}
