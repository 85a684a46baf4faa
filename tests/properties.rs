//! The core's properties, run over every registered model (`ModelConfig::examples`: WaveNet,
//! FVSBN, NADE, MADE): causality in the model's ordering, cached stepping equal to the
//! parallel pass, gradients equal to finite differences (batch ≥ 2), naive generation equal to
//! cached generation, learning a toy distribution whose NLL is known, and that the weights a
//! model reports as unused (what `mnist compact` zeroes) really are.

use candle_core::{DType, Device, Tensor};
use wavegen::core::Autoregressive;
use wavegen::core::check;
use wavegen::core::optim::{AdamW, AdamWConfig};
use wavegen::core::params::Params;
use wavegen::core::sample::{self, Method, SamplerConfig};
use wavegen::core::train::{self, Stop, TrainConfig, TrainState};
use wavegen::data::{Batch, BatchSource};
use wavegen::models::{Model, ModelConfig};
use wavegen::rng::Rng;

fn build(cfg: &ModelConfig, dtype: DType, seed: u64) -> (Model, Params) {
    let params = Params::new(seed);
    let model = cfg.build(params.var_builder(dtype)).unwrap();
    (model, params)
}

/// A sequence length that suits the model: the image models' pixel count, or `default`.
fn length(cfg: &ModelConfig, default: usize) -> usize {
    cfg.sequence_len().unwrap_or(default)
}

fn labels_for(model: &Model, batch: usize) -> Option<Tensor> {
    let n = model.num_labels() as u32;
    (n > 0).then(|| Tensor::new((0..batch as u32).map(|i| i % n).collect::<Vec<_>>(), &Device::Cpu).unwrap())
}

/// Runs `check` on every connectivity of the model.
fn for_each_connectivity(model: &Model, mut check: impl FnMut(&Model, usize)) {
    for k in 0..model.connectivities() {
        let mut model = model.clone();
        model.select_connectivity(k);
        check(&model, k);
    }
}

#[test]
fn causality_holds_for_every_model() {
    for (name, cfg) in ModelConfig::examples() {
        let (model, _) = build(&cfg, DType::F32, 3);
        let mut rng = Rng::new(5);
        let tokens = check::random_tokens(2, length(&cfg, 24), model.vocab_size(), &mut rng).unwrap();
        let labels = labels_for(&model, 2);
        for_each_connectivity(&model, |model, k| {
            if let Err(why) = check::causality(model, &tokens, labels.as_ref()).unwrap() {
                panic!("{name}, connectivity {k}: {why}");
            }
        });
    }
}

#[test]
fn causality_check_catches_a_model_that_sees_the_present() {
    // A model whose logits at t read token t: the check must fail on it.
    struct Peeking(Model);
    impl Autoregressive for Peeking {
        type State = ();
        fn vocab_size(&self) -> usize {
            self.0.vocab_size()
        }
        fn dependency_window(&self) -> Option<usize> {
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
    for (name, cfg) in ModelConfig::examples() {
        let (model, _) = build(&cfg, DType::F32, 3);
        let tokens = check::random_tokens(1, length(&cfg, 12), model.vocab_size(), &mut Rng::new(1)).unwrap();
        let labels = labels_for(&model, 1);
        assert!(check::causality(&Peeking(model), &tokens, labels.as_ref()).unwrap().is_err(), "{name}");
    }
}

/// What `mnist compact` relies on: zeroing the weights a model reports as unused
/// (`Model::weight_masks`) changes no logit of any connectivity.
#[test]
fn zeroing_unused_weights_changes_no_logit() {
    let mut zeroed_somewhere = false;
    for (name, cfg) in ModelConfig::examples() {
        let (model, params) = build(&cfg, DType::F32, 8);
        // Every weight non-zero (some start at 0), so an ignored one would show.
        let mut rng = Rng::new(9);
        for (_, var) in params.named() {
            let values: Vec<f32> = (0..var.elem_count()).map(|_| rng.normal() as f32 * 0.5).collect();
            var.set(&Tensor::from_vec(values, var.shape(), &Device::Cpu).unwrap()).unwrap();
        }
        let tokens = check::random_tokens(2, length(&cfg, 24), model.vocab_size(), &mut rng).unwrap();
        let labels = labels_for(&model, 2);
        let all_logits = || -> Vec<Vec<f32>> {
            let mut out = vec![];
            for_each_connectivity(&model, |model, _| {
                let l = model.forward(&tokens, labels.as_ref()).unwrap();
                out.push(l.flatten_all().unwrap().to_vec1::<f32>().unwrap());
            });
            out
        };
        let before = all_logits();
        let named = params.named();
        for (weight, mask) in model.weight_masks().unwrap() {
            let var = &named.iter().find(|(n, _)| *n == weight).unwrap_or_else(|| panic!("{name}: no {weight}")).1;
            zeroed_somewhere |= mask.min_all().unwrap().to_scalar::<f32>().unwrap() == 0.0;
            var.set(&(var.as_tensor() * &mask).unwrap()).unwrap();
        }
        assert_eq!(all_logits(), before, "{name}: zeroing unused weights changed the logits");
    }
    assert!(zeroed_somewhere, "no model reported an unused weight: the check would be vacuous");
}

#[test]
fn prefill_gives_the_parallel_logits_after_the_prefix() {
    for (name, cfg) in ModelConfig::examples() {
        let (model, _) = build(&cfg, DType::F32, 5);
        let mut rng = Rng::new(9);
        let len = length(&cfg, model.dependency_window().unwrap_or(0) + 20);
        let tokens = check::random_tokens(2, len, model.vocab_size(), &mut rng).unwrap();
        let labels = labels_for(&model, 2);
        for_each_connectivity(&model, |model, k| {
            let diff = check::prefill_vs_forward(model, &tokens, labels.as_ref(), &[0, 1, len / 2, len - 1]).unwrap();
            assert!(diff < 1e-4, "{name}, connectivity {k}: prefill and parallel logits differ by {diff}");
        });
    }
}

#[test]
fn cached_stepping_equals_the_parallel_pass() {
    for (name, cfg) in ModelConfig::examples() {
        let (model, _) = build(&cfg, DType::F32, 4);
        let mut rng = Rng::new(6);
        // Past the receptive field, so that WaveNet's queues wrap.
        let len = length(&cfg, model.dependency_window().unwrap_or(0) + 20);
        let tokens = check::random_tokens(3, len, model.vocab_size(), &mut rng).unwrap();
        let labels = labels_for(&model, 3);
        for_each_connectivity(&model, |model, k| {
            let diff = check::stepper_vs_forward(model, &tokens, labels.as_ref()).unwrap();
            assert!(diff < 1e-4, "{name}, connectivity {k}: stepper and parallel logits differ by {diff}");
        });
    }
}

#[test]
fn gradients_match_finite_differences_at_batch_two() {
    for (name, cfg) in ModelConfig::examples() {
        let (mut model, params) = build(&cfg, DType::F64, 7);
        let mut rng = Rng::new(8);
        let len = length(&cfg, 20);
        let tokens = check::random_tokens(2, len, model.vocab_size(), &mut rng).unwrap();
        // Mask out the first positions, as audio training does for the context.
        let mask: Vec<f64> = (0..2 * len).map(|i| if i % len < 4 { 0.0 } else { 1.0 }).collect();
        let mask = Tensor::from_vec(mask, (2, len), &Device::Cpu).unwrap();
        // Real values behind the tokens (dequantised): models of real values (RNADE) score
        // these, and so have the gradient of their density checked; the others ignore them.
        let v = model.vocab_size() as f64;
        let values: Vec<f64> = tokens
            .flatten_all()
            .unwrap()
            .to_vec1::<u32>()
            .unwrap()
            .iter()
            .map(|&t| (t as f64 + rng.uniform()) / v)
            .collect();
        let values = Some(Tensor::from_vec(values, (2, len), &Device::Cpu).unwrap());
        let batch = Batch { tokens, mask, labels: labels_for(&model, 2), values, features: None, dropout: None };
        model.select_connectivity(model.connectivities() - 1);
        let (at, err) = check::gradient_check(&model, &params, &batch, 4, &mut rng).unwrap();
        assert!(err < 1e-5, "{name}: relative gradient error {err:e} at {at}");
    }
}

#[test]
fn hand_written_backward_passes_equal_candles_autograd_at_batch_three() {
    let mut checked = 0;
    for (name, cfg) in ModelConfig::examples() {
        for dtype in [DType::F64, DType::F32] {
            let (model, params) = build(&cfg, dtype, 11);
            let mut rng = Rng::new(12);
            let len = length(&cfg, 37);
            let tokens = check::random_tokens(3, len, model.vocab_size(), &mut rng).unwrap();
            let mask: Vec<f32> = (0..3 * len).map(|i| if i % len < 5 { 0.0 } else { 1.0 }).collect();
            let mask = Tensor::from_vec(mask, (3, len), &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
            let batch =
                Batch { tokens, mask, labels: labels_for(&model, 3), values: None, features: None, dropout: None };
            let Some((logits, at, err)) = check::fused_vs_reference(&model, &params, &batch).unwrap() else { continue };
            let tolerance = if dtype == DType::F64 { 1e-10 } else { 1e-4 };
            assert!(logits < tolerance, "{name} ({dtype:?}): logits differ by {logits:e}");
            assert!(err < tolerance, "{name} ({dtype:?}): gradient of {at} differs by {err:e} (relative)");
            checked += 1;
        }
    }
    assert!(checked >= 8, "every WaveNet example, in f32 and f64: {checked}");
}

/// `--precision bf16`: the same loss and gradients as f32 up to bfloat16 rounding of the
/// products' operands (8 significant bits), for every WaveNet example at batch 3. Checked where
/// the CPU has AMX-BF16; elsewhere the run refuses bf16 (also checked).
#[test]
fn bf16_products_give_the_f32_loss_and_gradients_within_bfloat16_rounding() {
    use wavegen::core::train::Precision;
    let mut checked = 0;
    for (name, cfg) in ModelConfig::examples() {
        let (Model::Wavenet(model), params) = build(&cfg, DType::F32, 13) else { continue };
        let mut rng = Rng::new(14);
        let tokens = check::random_tokens(3, 300, model.cfg.classes, &mut rng).unwrap();
        let mask = Tensor::ones((3, 300), DType::F32, &Device::Cpu).unwrap();
        let labels = (model.cfg.num_labels > 0).then(|| Tensor::new(&[0u32, 1, 0], &Device::Cpu).unwrap());
        let batch = Batch { tokens, mask, labels, values: None, features: None, dropout: None };
        let bf16 = model.clone().with_precision(Precision::Bf16);
        let exact = wavegen::core::masked_nll(&model, &batch).unwrap();
        let rounded = match wavegen::core::masked_nll(&bf16, &batch) {
            Ok(loss) => loss,
            Err(e) if !wavegen::layers::matmul::amx::available() => {
                assert!(e.to_string().contains("AMX-BF16"), "{name}: {e}");
                continue;
            }
            Err(e) => panic!("{name}: {e}"),
        };
        let (l32, l16) = (exact.to_scalar::<f32>().unwrap(), rounded.to_scalar::<f32>().unwrap());
        assert!((l32 - l16).abs() < 2e-3 * l32, "{name}: loss {l16} in bf16 vs {l32}");
        assert_ne!(l32, l16, "{name}: the bf16 path computed in f32");
        let (g32, g16) = (exact.backward().unwrap(), rounded.backward().unwrap());
        let (mut diff, mut norm) = (0.0f64, 0.0f64);
        for var in params.named().into_iter().map(|(_, v)| v) {
            let get = |g: &candle_core::backprop::GradStore| -> Vec<f32> {
                g.get(&var).map_or(vec![0.0; var.elem_count()], |t| t.flatten_all().unwrap().to_vec1().unwrap())
            };
            for (a, b) in get(&g16).iter().zip(get(&g32)) {
                diff += ((a - b) as f64).powi(2);
                norm += (b as f64).powi(2);
            }
        }
        let relative = (diff / norm).sqrt();
        // Measured 1.1–2.4e-2 on these examples at random weights: each operand carries a
        // relative rounding error up to 2⁻⁹, and sums that cancel magnify it.
        assert!(relative < 5e-2, "{name}: bf16 gradients differ from f32 by {relative:e} (relative L2)");
        checked += 1;
    }
    assert!(checked >= 4 || !wavegen::layers::matmul::amx::available(), "every WaveNet example: {checked}");
}

#[test]
fn naive_generation_equals_cached_generation_for_the_same_seed() {
    for (name, cfg) in ModelConfig::examples() {
        let (model, _) = build(&cfg, DType::F32, 9);
        let labels = labels_for(&model, 2);
        let v = model.vocab_size() as u32;
        let prime: Vec<Vec<u32>> = vec![(1..6).map(|i| i % v).collect(), (1..6).rev().map(|i| i % v).collect()];
        let steps = length(&cfg, 65) - prime[0].len();
        let sampler = SamplerConfig::default();
        let run = |method| {
            let mut rng = Rng::new(10);
            sample::generate(&model, &prime, labels.as_ref(), steps, &sampler, &mut rng, method, &mut |_| {}).unwrap()
        };
        let cached = run(Method::Cached);
        assert_eq!(cached, run(Method::Naive), "{name}");
        assert_eq!(cached, run(Method::Cached), "{name}: same seed, same output");
        let distinct: std::collections::HashSet<u32> = cached.concat().into_iter().collect();
        assert!(distinct.len() >= 2.min(v as usize), "{name}: sampling is not degenerate");
    }
}

/// Four equally likely sequences: two free bits, then each token copies the one two places
/// back. The best possible NLL is ln 4 nats per sequence.
struct FourPatterns {
    batch: Batch,
}

impl FourPatterns {
    fn new(len: usize) -> Self {
        let rows: Vec<Vec<u32>> =
            (0..4u32).map(|p| (0..len).map(|t| if t % 2 == 0 { p & 1 } else { p >> 1 }).collect()).collect();
        let mask = vec![vec![1.0f32; len]; 4];
        FourPatterns { batch: Batch::from_rows(&rows, &mask, None, &Device::Cpu).unwrap() }
    }
}

impl BatchSource for FourPatterns {
    fn train_batch(&mut self, _rng: &mut Rng) -> wavegen::Result<Batch> {
        Ok(self.batch.clone())
    }
    fn val_batches(&self) -> wavegen::Result<Vec<Batch>> {
        Ok(vec![self.batch.clone()])
    }
}

#[test]
fn every_model_learns_a_toy_distribution_to_its_known_nll() {
    for (name, cfg) in ModelConfig::examples() {
        if cfg.wavenet().is_some_and(|c| c.num_labels > 0) {
            continue; // the toy data has no labels
        }
        let (mut model, params) = build(&cfg, DType::F32, 11);
        let len = length(&cfg, 12);
        let mut data = FourPatterns::new(len);
        let mut opt = AdamW::new(&params, AdamWConfig::default()).unwrap();
        let steps = 400;
        let tc = TrainConfig {
            max_steps: steps,
            lr: 0.1,
            min_lr: 0.01,
            warmup_steps: 10,
            decay_steps: steps,
            eval_every: steps,
            checkpoint_every: steps,
            ..TrainConfig::default()
        };
        let mut state = TrainState::new(1);
        let stop = std::sync::atomic::AtomicBool::new(false);
        let why =
            train::train(&mut model, &mut opt, &mut data, &tc, &mut state, &mut |_, _| Ok(()), &mut |_| {}, &stop)
                .unwrap();
        assert!(matches!(why, Stop::Steps));
        // The NLL of the whole sequence, in nats: at best ln 4 (two free bits).
        let per_sequence = train::evaluate(&model, &data.val_batches().unwrap()).unwrap() * len as f64;
        let best = 4f64.ln();
        eprintln!("{name}: {per_sequence:.4} nats per sequence (best {best:.4})");
        assert!(per_sequence >= best - 1e-3, "{name}: {per_sequence} nats is below the entropy {best}");
        assert!(per_sequence < best + 0.1, "{name}: learned only {per_sequence} nats per sequence, best is {best}");
    }
}

/// Dropout, for the models that have it: the masks come from the step, so a run split in two
/// (its state carried over, as a resume does) ends with the same weights as one run, and they
/// differ from those of a run without dropout. A model without dropout refuses a rate.
#[test]
fn dropout_is_drawn_from_the_step_and_refused_by_models_without_it() {
    let run = |cfg: &ModelConfig, dropout: f64, split: bool| -> wavegen::Result<Vec<Vec<f32>>> {
        let (mut model, params) = build(cfg, DType::F32, 11);
        let mut data = FourPatterns::new(length(cfg, 12));
        let mut opt = AdamW::new(&params, AdamWConfig::default())?;
        let mut tc =
            TrainConfig { max_steps: 30, lr: 0.05, decay_steps: 30, eval_every: 10, dropout, ..Default::default() };
        let mut state = TrainState::new(1);
        let stop = std::sync::atomic::AtomicBool::new(false);
        for end in if split { vec![13, 30] } else { vec![30] } {
            tc.max_steps = end;
            train::train(&mut model, &mut opt, &mut data, &tc, &mut state, &mut |_, _| Ok(()), &mut |_| {}, &stop)?;
        }
        params.named().iter().map(|(_, v)| Ok(v.flatten_all()?.to_vec1::<f32>()?)).collect()
    };
    let mut with_dropout = 0;
    for (name, cfg) in ModelConfig::examples() {
        let (model, _) = build(&cfg, DType::F32, 11);
        if !model.has_dropout() {
            let refused = run(&cfg, 0.3, false).unwrap_err().to_string();
            assert!(refused.contains("no dropout"), "{name}: {refused}");
            continue;
        }
        with_dropout += 1;
        let whole = run(&cfg, 0.3, false).unwrap();
        assert_eq!(whole, run(&cfg, 0.3, true).unwrap(), "{name}: a split run drew other masks");
        assert_ne!(whole, run(&cfg, 0.0, false).unwrap(), "{name}: dropout changed nothing");
    }
    assert!(with_dropout >= 2, "PixelCNN and Gated PixelCNN have dropout");
}

/// The pixels whose change moves the logits of pixel `target` of a `height × width` image.
fn influencers(model: &Model, height: usize, width: usize, target: usize) -> Vec<usize> {
    let mut rng = Rng::new(12);
    let tokens = check::random_tokens(1, height * width, 2, &mut rng).unwrap();
    let base = model.forward(&tokens, None).unwrap().get(0).unwrap().get(target).unwrap();
    let mut rows = tokens.to_vec2::<u32>().unwrap();
    (0..height * width)
        .filter(|&p| {
            rows[0][p] ^= 1;
            let changed = Tensor::new(rows.clone(), &Device::Cpu).unwrap();
            rows[0][p] ^= 1;
            let out = model.forward(&changed, None).unwrap().get(0).unwrap().get(target).unwrap();
            (&out - &base).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() > 0.0
        })
        .collect()
}

/// Gated PixelCNN has no blind spot: every earlier pixel within its reach (rows above, columns
/// either side, and the row so far) influences a pixel's logits, and no other pixel does. The
/// same check finds PixelCNN's blind spot (up and to the right), so it can fail.
#[test]
fn gated_pixelcnn_sees_every_earlier_pixel_within_reach() {
    use wavegen::models::pixelcnn::{Config, GatedPixelCnn};
    let cfg = Config { classes: 2, height: 7, width: 9, channels: 4, layers: 2, first_kernel: 3, kernel: 3, head: 5 };
    let (up, side) = GatedPixelCnn::reach(&cfg);
    let (row, col) = (5, 4);
    let target = row * cfg.width + col;
    let within = |p: usize| {
        let (r, c) = (p / cfg.width, p % cfg.width);
        p < target && row - r.min(row) <= up && c.abs_diff(col) <= side
    };
    let expected: Vec<usize> = (0..cfg.height * cfg.width).filter(|&p| within(p)).collect();
    assert!(expected.len() > 30, "the reach covers several rows: {}", expected.len());
    let (gated, params) = build(&ModelConfig::GatedPixelCnn(cfg.clone()), DType::F32, 13);
    // Biases start at 0; move them off it so that no unit is exactly off.
    for (_, var) in params.named() {
        var.set(&(var.as_tensor() + 0.1).unwrap()).unwrap();
    }
    assert_eq!(influencers(&gated, cfg.height, cfg.width, target), expected);

    let (plain, _) = build(&ModelConfig::PixelCnn(Config { layers: 3, ..cfg.clone() }), DType::F32, 13);
    let seen = influencers(&plain, cfg.height, cfg.width, target);
    let (r, c) = (row - 2, col + 3); // two rows up, three right: within reach, in the blind spot
    assert!(within(r * cfg.width + c) && !seen.contains(&(r * cfg.width + c)), "PixelCNN's blind spot");
}

/// PixelCNN's blind spot has the shape `--first-kernel`'s help gives: with a first kernel of
/// radius r and L blocks of 3×3, the row d above is seen up to r + min(d − 1, L) pixels to the
/// right, and r + L to the left, up to r + L rows; the current row r + L pixels back.
#[test]
fn pixelcnn_sees_the_row_above_as_far_right_as_its_first_kernel() {
    use wavegen::models::pixelcnn::Config;
    for first_kernel in [3, 5, 7] {
        let cfg =
            Config { classes: 2, height: 10, width: 15, channels: 8, layers: 2, first_kernel, kernel: 3, head: 8 };
        let (r, layers) = (first_kernel / 2, cfg.layers);
        let (row, col) = (8, 5);
        let target = row * cfg.width + col;
        let expected: Vec<usize> = (0..target)
            .filter(|&p| {
                let (d, c) = (row - p / cfg.width, p % cfg.width);
                let right = if d == 0 { 0 } else { r + (d - 1).min(layers) };
                d <= r + layers && col - c.min(col) <= r + layers && c.saturating_sub(col) <= right
            })
            .collect();
        let (plain, params) = build(&ModelConfig::PixelCnn(cfg.clone()), DType::F32, 13);
        for (_, var) in params.named() {
            var.set(&(var.as_tensor() + 0.1).unwrap()).unwrap();
        }
        assert_eq!(influencers(&plain, cfg.height, cfg.width, target), expected, "first kernel {first_kernel}");
    }
}
