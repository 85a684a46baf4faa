//! Image models on binarized MNIST-sized inputs (784 pixels): training images/s (forward,
//! backward and AdamW step, batch 100) for FVSBN, NADE, MADE, the LSTM and the GRU, NADE computed the
//! naive way for comparison, NADE sampling with the running update, the PixelCNNs and the
//! transformer, cached against naive sampling, and one masked convolution against candle's
//! conv2d. Run: `cargo bench
//! --bench images` (`RAYON_NUM_THREADS=1` for one core).

use candle_core::{DType, Device, Tensor};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use wavegen::core::optim::{AdamW, AdamWConfig};
use wavegen::core::params::Params;
use wavegen::core::sample::{self, Method, SamplerConfig};
use wavegen::core::train::{Precision, loss_and_grads};
use wavegen::data::Batch;
use wavegen::layers::dropout::Dropout;
use wavegen::layers::nade::Activation;
use wavegen::models::{ModelConfig, fvsbn, made, nade, pixelcnn, rnn};
use wavegen::rng::Rng;

const PIXELS: usize = 784;

fn models() -> Vec<(&'static str, ModelConfig)> {
    vec![
        ("fvsbn", ModelConfig::Fvsbn(fvsbn::Config { pixels: PIXELS })),
        ("nade-500", ModelConfig::Nade(nade::Config { pixels: PIXELS, hidden: 500, activation: Activation::Sigmoid })),
        (
            "made-500",
            ModelConfig::Made(made::Config {
                pixels: PIXELS,
                hidden: vec![500],
                direct: false,
                masks: 1,
                orderings: false,
                mask_seed: 0,
            }),
        ),
        (
            "lstm-128",
            ModelConfig::Lstm(rnn::Config { classes: 2, embedding: 16, hidden: 128, layers: 1, length: Some(PIXELS) }),
        ),
        (
            "gru-128",
            ModelConfig::Gru(rnn::Config { classes: 2, embedding: 16, hidden: 128, layers: 1, length: Some(PIXELS) }),
        ),
        (
            "lstm-256",
            ModelConfig::Lstm(rnn::Config { classes: 2, embedding: 16, hidden: 256, layers: 1, length: Some(PIXELS) }),
        ),
    ]
}

/// Binary images with about MNIST's density of ones (13%).
fn images(n: usize) -> Tensor {
    let mut rng = Rng::new(1);
    let v: Vec<u32> = (0..n * PIXELS).map(|_| u32::from(rng.uniform() < 0.13)).collect();
    Tensor::from_vec(v, (n, PIXELS), &Device::Cpu).unwrap()
}

/// A training batch of `n` such images, every pixel counted.
fn image_batch(n: usize) -> Batch {
    Batch {
        tokens: images(n),
        mask: Tensor::ones((n, PIXELS), DType::F32, &Device::Cpu).unwrap(),
        labels: None,
        values: None,
        features: None,
        dropout: None,
    }
}

/// One training step (forward, backward, AdamW) of `model`, data-parallel over `threads`.
fn train_step(model: &wavegen::models::Model, opt: &mut AdamW, batch: &Batch, threads: usize) {
    let (_, grads) = loss_and_grads(model, batch, threads).unwrap();
    opt.step(&grads, 1e-4).unwrap();
}

/// Benchmarks training steps of `models` (name, config, precision) on batches of `batch`
/// images, as `mnist train` runs them: one shard of the batch per rayon thread; with
/// `dropout` > 0, dropping units as `--dropout` does.
fn bench_train_steps(c: &mut Criterion, batch: usize, models: Vec<(String, ModelConfig, Precision)>, dropout: f64) {
    let mut group = c.benchmark_group("train_step");
    group.sample_size(10);
    let mut batch_of_images = image_batch(batch);
    batch_of_images.dropout = (dropout > 0.0).then_some(Dropout { rate: dropout, seed: 1, first: 0 });
    group.throughput(Throughput::Elements(batch as u64));
    let threads = rayon::current_num_threads();
    for (name, cfg, precision) in models {
        let params = Params::new(0);
        let model = cfg.build(params.var_builder(DType::F32)).unwrap().with_precision(precision);
        let mut opt = AdamW::new(&params, AdamWConfig::default()).unwrap();
        group.bench_function(name, |b| b.iter(|| train_step(&model, &mut opt, &batch_of_images, threads)));
    }
    group.finish();
}

fn training(c: &mut Criterion) {
    let models = models().into_iter().map(|(name, cfg)| (name.to_string(), cfg, Precision::F32)).collect();
    bench_train_steps(c, 100, models, 0.0);
}

/// NADE the naive way, for comparison: every a_i = c + Σ_{j<i} x_j W[j] recomputed as one
/// masked `(B·D, D) × (D, H)` product (O(D²·H) per image), in candle ops.
fn naive_nade(c: &mut Criterion) {
    let mut group = c.benchmark_group("train_step");
    group.sample_size(10);
    let (batch, hidden) = (10, 500);
    let dev = Device::Cpu;
    let tokens = images(batch);
    let x = tokens.to_dtype(DType::F32).unwrap();
    let before: Vec<f32> = (0..PIXELS * PIXELS).map(|k| if k % PIXELS < k / PIXELS { 1.0 } else { 0.0 }).collect();
    let before = Tensor::from_vec(before, (PIXELS, PIXELS), &dev).unwrap(); // [i, j] = j < i
    let params = Params::new(0);
    let vb = params.var_builder(DType::F32);
    let w = vb.get_with_hints((PIXELS, hidden), "w", candle_nn::Init::Randn { mean: 0.0, stdev: 0.03 }).unwrap();
    let v = vb.get_with_hints((PIXELS, hidden), "v", candle_nn::Init::Randn { mean: 0.0, stdev: 0.04 }).unwrap();
    let mut opt = AdamW::new(&params, AdamWConfig::default()).unwrap();
    group.throughput(Throughput::Elements(batch as u64));
    group.bench_function("nade-500 naive (masked product)", |b| {
        b.iter(|| {
            let xm = x.unsqueeze(1).unwrap().broadcast_mul(&before.unsqueeze(0).unwrap()).unwrap(); // (B, D, D)
            let a = xm.reshape((batch * PIXELS, PIXELS)).unwrap().matmul(&w).unwrap(); // (B·D, H)
            let h = candle_nn::ops::sigmoid(&a).unwrap().reshape((batch, PIXELS, hidden)).unwrap();
            let s = h.broadcast_mul(&v.unsqueeze(0).unwrap()).unwrap().sum(2).unwrap(); // (B, D)
            // −log σ(±s): the Bernoulli NLL of the pixels.
            let sign = x.affine(2.0, -1.0).unwrap();
            let nll = candle_nn::ops::sigmoid(&(s * sign).unwrap()).unwrap().log().unwrap().neg().unwrap();
            let grads = nll.mean_all().unwrap().backward().unwrap();
            opt.step(&grads, 1e-4).unwrap()
        })
    });
    group.finish();
}

fn sampling(c: &mut Criterion) {
    let mut group = c.benchmark_group("sample");
    group.sample_size(10);
    let n = 64;
    group.throughput(Throughput::Elements(n as u64));
    let cfg = ModelConfig::Nade(nade::Config { pixels: PIXELS, hidden: 500, activation: Activation::Sigmoid });
    let params = Params::new(0);
    let model = cfg.build(params.var_builder(DType::F32)).unwrap();
    group.bench_function("nade-500 running update", |b| {
        b.iter(|| {
            let mut rng = Rng::new(2);
            let prime = vec![vec![]; n];
            sample::generate(
                &model,
                &prime,
                None,
                PIXELS,
                &SamplerConfig::default(),
                &mut rng,
                Method::Cached,
                &mut |_| {},
            )
            .unwrap()
        })
    });
    group.finish();
}

/// The size of the PyTorch peer: 12 layers (the first and 11 more) of 64 channels, a head of
/// 256.
fn pixelcnn_64x12() -> pixelcnn::Config {
    pixelcnn::Config {
        classes: 2,
        height: 28,
        width: 28,
        channels: 64,
        layers: 11,
        first_kernel: 7,
        kernel: 3,
        head: 256,
    }
}

/// The convolutional models at the size of the PyTorch peer (`benches/peers/pixelcnn_train.py`):
/// 12 layers of 64 channels, batch 64, data-parallel over the rayon threads as `mnist train`
/// runs them, in f32 and (with AMX) bf16.
fn convolutional(c: &mut Criterion) {
    let cfg = pixelcnn_64x12();
    let mut models = vec![];
    for (name, cfg) in [
        ("gated-pixelcnn-64x12", ModelConfig::GatedPixelCnn(cfg.clone())),
        ("pixelcnn-64x12", ModelConfig::PixelCnn(cfg)),
    ] {
        for precision in [Precision::F32, Precision::Bf16] {
            if precision == Precision::F32 || wavegen::layers::matmul::amx::available() {
                models.push((format!("{name} {precision}"), cfg.clone(), precision));
            }
        }
    }
    bench_train_steps(c, 64, models, 0.0);
    // What dropout costs: its masks are hashed per unit, in the forward and the backward pass.
    let precision = if wavegen::layers::matmul::amx::available() { Precision::Bf16 } else { Precision::F32 };
    let gated = ModelConfig::GatedPixelCnn(pixelcnn_64x12());
    bench_train_steps(c, 64, vec![(format!("gated-pixelcnn-64x12 {precision} dropout 0.2"), gated, precision)], 0.2);
}

/// The transformer (4 blocks of 128, 4 heads) at batch 16, data-parallel over the rayon
/// threads as `mnist train` runs it.
fn attention(c: &mut Criterion) {
    let cfg = ModelConfig::image("transformer", PIXELS, &wavegen::models::Settings::default()).unwrap();
    let mut models = vec![("transformer-128x4 f32".to_string(), cfg.clone(), Precision::F32)];
    if wavegen::layers::matmul::amx::available() {
        models.push(("transformer-128x4 bf16".to_string(), cfg, Precision::Bf16));
    }
    bench_train_steps(c, 16, models, 0.0);
}

/// Sampling 64 digits with the cached stepper against the naive way (one full parallel pass
/// per pixel), for the first 14 pixels (naive sampling of whole digits takes minutes per
/// sample; for PixelCNN its cost per pixel is constant, for the transformer it grows with the
/// prefix, so a few pixels understate the transformer's ratio), and whole digits cached.
fn cached_sampling(c: &mut Criterion) {
    let mut group = c.benchmark_group("sample_64");
    group.sample_size(10);
    let n = 64;
    let models = [
        ("gated-pixelcnn-64x12", ModelConfig::GatedPixelCnn(pixelcnn_64x12())),
        ("pixelcnn-64x12", ModelConfig::PixelCnn(pixelcnn_64x12())),
        (
            "transformer-128x4",
            ModelConfig::image("transformer", PIXELS, &wavegen::models::Settings::default()).unwrap(),
        ),
    ];
    for (name, cfg) in models {
        let params = Params::new(0);
        let model = cfg.build(params.var_builder(DType::F32)).unwrap();
        for (method, pixels) in [(Method::Cached, 14), (Method::Naive, 14), (Method::Cached, PIXELS)] {
            group.bench_function(format!("{name} {method:?} {pixels} px"), |b| {
                b.iter(|| {
                    let mut rng = Rng::new(2);
                    let prime = vec![vec![]; n];
                    sample::generate(
                        &model,
                        &prime,
                        None,
                        pixels,
                        &SamplerConfig::default(),
                        &mut rng,
                        method,
                        &mut |_| {},
                    )
                    .unwrap()
                })
            });
        }
    }
    group.finish();
}

/// One masked 3×3 convolution (mask B, 64 → 64 channels, 64 images of 28 × 28), forward and
/// forward + backward: the shifted matrix products PixelCNN uses (`layers::shifted`: 5 taps,
/// rows of 28 + 1 slots) against candle's `conv2d` with the mask applied to its weights (all 9
/// taps, as a dense convolution must). Run it with `RAYON_NUM_THREADS=1` to compare one core
/// against one core (`init_process` already keeps candle's own pool to one thread).
fn masked_conv(c: &mut Criterion) {
    use candle_core::Var;
    use wavegen::layers::shifted::{Options, shifted_conv};
    let (n, side, ch) = (64, 28, 64);
    let stride = side + 1;
    let dev = Device::Cpu;
    let mut group = c.benchmark_group("masked_conv_3x3");
    group.sample_size(10);
    group.throughput(Throughput::Elements(n as u64));
    // mask B: the row above (three taps) and the pixel to the left and the pixel itself
    let taps: [(isize, isize); 5] = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 0)];
    let offsets: Vec<isize> = taps.iter().map(|&(dy, dx)| dy * stride as isize + dx).collect();
    let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (n, side * stride, ch), &dev).unwrap()).unwrap();
    let w = Var::from_tensor(&Tensor::randn(0f32, 0.1, (taps.len(), ch, ch), &dev).unwrap()).unwrap();
    let b = Tensor::zeros(ch, DType::F32, &dev).unwrap();
    let opts = Options { padding: Some((stride, side)), ..Options::plain() };
    let ours = || shifted_conv(&x, &w, &b, &offsets, opts).unwrap();
    group.bench_function("shifted products f32, forward", |bench| bench.iter(ours));
    group.bench_function("shifted products f32, forward + backward", |bench| {
        bench.iter(|| ours().sum_all().unwrap().backward().unwrap())
    });
    let mut mask = vec![0f32; 9];
    for (dy, dx) in taps {
        mask[((dy + 1) * 3 + dx + 1) as usize] = 1.0;
    }
    let mask = Tensor::from_vec(mask, (1, 1, 3, 3), &dev).unwrap();
    let xi = Var::from_tensor(&Tensor::randn(0f32, 1.0, (n, ch, side, side), &dev).unwrap()).unwrap();
    let wi = Var::from_tensor(&Tensor::randn(0f32, 0.1, (ch, ch, 3, 3), &dev).unwrap()).unwrap();
    let candle = || xi.conv2d(&wi.broadcast_mul(&mask).unwrap(), 1, 1, 1, 1).unwrap();
    group.bench_function("candle conv2d f32, forward", |bench| bench.iter(candle));
    group.bench_function("candle conv2d f32, forward + backward", |bench| {
        bench.iter(|| candle().sum_all().unwrap().backward().unwrap())
    });
    group.finish();
}

/// The process set-up `wavegen` itself runs (`wavegen::init_process`), before any benchmark.
fn setup() -> Criterion {
    wavegen::init_process();
    Criterion::default().configure_from_args()
}

criterion_group! {
    name = benches;
    config = setup();
    targets = training, naive_nade, sampling, convolutional, attention, cached_sampling, masked_conv
}
criterion_main!(benches);
