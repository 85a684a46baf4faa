//! WaveNet speed on the CPU: generation (cached queues vs naive recomputation, at two
//! receptive fields) and training throughput of the default config.
//!
//! Run: `RAYON_NUM_THREADS=1 cargo bench --bench wavenet`. Throughput is in samples/s
//! (generated samples over all streams, or target samples per training step); divide by the
//! sample rate for the real-time factor.

use std::hint::black_box;

use candle_core::{DType, Device, Tensor};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use wavegen::core::params::Params;
use wavegen::core::sample::{self, Method, SamplerConfig};
use wavegen::models::wavenet::{Config, WaveNet};
use wavegen::rng::Rng;

fn model(cfg: &Config) -> WaveNet {
    WaveNet::new(cfg, Params::new(0).var_builder(DType::F32)).unwrap()
}

fn generation(c: &mut Criterion) {
    let mut group = c.benchmark_group("generate");
    group.sample_size(10);
    let configs =
        [("rf256", Config { layers_per_cycle: 8, cycles: 1, ..Config::default() }), ("rf2047", Config::default())];
    for (name, cfg) in configs {
        let m = model(&cfg);
        let rf = cfg.receptive_field();
        // The stepper's cost per sample does not depend on the history, so it gets a one-sample
        // prime (priming would be timed too); the naive path gets a full receptive field.
        for (method, steps, prime_len) in
            [(Method::Cached, 512, 1), (Method::Naive, if rf > 1000 { 16 } else { 64 }, rf)]
        {
            let prime = vec![vec![128u32; prime_len]];
            group.throughput(Throughput::Elements(steps as u64));
            let id = BenchmarkId::new(format!("{method:?}").to_lowercase(), name);
            group.bench_function(id, |b| {
                b.iter(|| {
                    let mut rng = Rng::new(1);
                    let out = sample::generate(
                        &m,
                        &prime,
                        None,
                        steps,
                        &SamplerConfig::default(),
                        &mut rng,
                        method,
                        &mut |_| {},
                    );
                    black_box(out.unwrap())
                })
            });
        }
    }
    group.finish();
}

/// The default real-time config (issue 3): naive, candle stepper and engine, batch 1 and 16.
fn realtime(c: &mut Criterion) {
    let mut group = c.benchmark_group("realtime");
    group.sample_size(10);
    let cfg = Config::realtime();
    let m = model(&cfg);
    let rf = cfg.receptive_field();
    let sampler = SamplerConfig::default();
    for streams in [1usize, 16] {
        // naive: a full receptive field of history; stepper: a one-sample prime (its cost per
        // sample does not depend on the history).
        let naive_steps = 8;
        group.throughput(Throughput::Elements((naive_steps * streams) as u64));
        group.bench_function(BenchmarkId::new("naive", format!("b{streams}")), |b| {
            let prime = vec![vec![128u32; rf]; streams];
            b.iter(|| {
                black_box(
                    sample::generate(
                        &m,
                        &prime,
                        None,
                        naive_steps,
                        &sampler,
                        &mut Rng::new(1),
                        Method::Naive,
                        &mut |_| {},
                    )
                    .unwrap(),
                )
            })
        });
        let steps = 256;
        group.throughput(Throughput::Elements((steps * streams) as u64));
        group.bench_function(BenchmarkId::new("stepper", format!("b{streams}")), |b| {
            let prime = vec![vec![128u32; 1]; streams];
            b.iter(|| {
                black_box(
                    sample::generate(&m, &prime, None, steps, &sampler, &mut Rng::new(1), Method::Cached, &mut |_| {})
                        .unwrap(),
                )
            })
        });
        let e = wavegen::engine::Engine::new(&m, wavegen::engine::Kernels::detect(), false).unwrap();
        let steps = 8192;
        for threads in [1usize, 2] {
            if streams == 1 && threads > 1 {
                continue;
            }
            group.throughput(Throughput::Elements((steps * streams) as u64));
            group.bench_function(BenchmarkId::new(format!("engine_{threads}t"), format!("b{streams}")), |b| {
                b.iter(|| {
                    let mut specs: Vec<_> = (0..streams)
                        .map(|i| wavegen::engine::StreamSpec {
                            sampler: sampler.clone(),
                            rng: Rng::new(i as u64),
                            label: 0,
                            local: None,
                        })
                        .collect();
                    black_box(
                        wavegen::engine::generate_parallel(&e, &mut specs, &[128], steps, threads, &mut |_| {})
                            .unwrap(),
                    )
                })
            });
        }
    }
    group.finish();
}

/// The engine's kernel sets on the default (non-real-time) config.
fn engine(c: &mut Criterion) {
    let mut group = c.benchmark_group("engine");
    group.sample_size(10);
    let cfg = Config::default();
    let m = model(&cfg);
    for kernels in wavegen::engine::Kernels::available() {
        let e = wavegen::engine::Engine::new(&m, kernels, false).unwrap();
        for streams in [1usize, 16] {
            let steps = 2048;
            group.throughput(Throughput::Elements((steps * streams) as u64));
            group.bench_function(BenchmarkId::new(kernels.name, format!("b{streams}")), |b| {
                b.iter(|| {
                    let mut specs: Vec<_> = (0..streams)
                        .map(|i| wavegen::engine::StreamSpec {
                            sampler: SamplerConfig::default(),
                            rng: Rng::new(i as u64),
                            label: 0,
                            local: None,
                        })
                        .collect();
                    black_box(wavegen::engine::generate(&e, &mut specs, &[128], steps, &mut |_| {}).unwrap())
                })
            });
        }
    }
    group.finish();
}

/// `batch` windows of random codes, each `window` targets after the receptive field as
/// (unscored) context: what the trainer feeds a step.
fn training_batch(cfg: &Config, batch: usize, window: usize, seed: u64) -> wavegen::data::Batch {
    let len = cfg.receptive_field() + window;
    let mut rng = Rng::new(seed);
    let tokens: Vec<u32> = (0..batch * len).map(|_| rng.below(256) as u32).collect();
    let tokens = Tensor::from_vec(tokens, (batch, len), &Device::Cpu).unwrap();
    let mask: Vec<f32> = (0..batch * len).map(|i| if i % len >= cfg.receptive_field() { 1.0 } else { 0.0 }).collect();
    let mask = Tensor::from_vec(mask, (batch, len), &Device::Cpu).unwrap();
    wavegen::data::Batch { tokens, mask, labels: None, values: None, features: None, dropout: None }
}

/// Target samples per second of one training step (forward, backward, clipping, AdamW) at
/// batch 4 × 4,096 target samples, each window with its receptive field as context: the fused
/// op on 1 and 2 threads (the data-parallel trainer), and candle's own operations (the path
/// before the fused op) on 1. Run with RAYON_NUM_THREADS equal to the threads measured.
fn training(c: &mut Criterion) {
    let mut group = c.benchmark_group("train_step");
    group.sample_size(10);
    for (preset, cfg) in [("default", Config::default()), ("realtime", Config::realtime())] {
        let params = Params::new(0);
        let m = WaveNet::new(&cfg, params.var_builder(DType::F32)).unwrap();
        let mut opt = wavegen::core::optim::AdamW::new(&params, Default::default()).unwrap();
        let (batch, window) = (4, 4096);
        let data = training_batch(&cfg, batch, window, 2);
        group.throughput(Throughput::Elements((batch * window) as u64));
        for threads in [1, 2] {
            group.bench_function(format!("{preset}_b4_w4096/fused_{threads}t"), |b| {
                b.iter(|| {
                    let (_, grads) = wavegen::core::train::loss_and_grads(&m, &data, threads).unwrap();
                    black_box(opt.step(&grads, 1e-4).unwrap())
                })
            });
        }
        // `--precision bf16`: the same step with the products on the AMX tile unit.
        if wavegen::layers::matmul::amx::available() {
            let m = m.clone().with_precision(wavegen::core::train::Precision::Bf16);
            for threads in [1, 2] {
                group.bench_function(format!("{preset}_b4_w4096/fused_bf16_{threads}t"), |b| {
                    b.iter(|| {
                        let (_, grads) = wavegen::core::train::loss_and_grads(&m, &data, threads).unwrap();
                        black_box(opt.step(&grads, 1e-4).unwrap())
                    })
                });
            }
        }
        group.bench_function(format!("{preset}_b4_w4096/candle_1t"), |b| {
            b.iter(|| {
                let logits = m.reference_logits(&data.tokens, None, None).unwrap();
                let nll = wavegen::core::token_nll(&logits, &data.tokens).unwrap();
                let loss = ((nll * &data.mask).unwrap().sum_all().unwrap() / (batch * window) as f64).unwrap();
                let grads = loss.backward().unwrap();
                black_box(opt.step(&grads, 1e-4).unwrap())
            })
        });
    }
    group.finish();
}

/// Throughput per target sample against window length, the same number of target samples per
/// step (16,384), default config, fused op, on one and two threads: each window also computes its
/// receptive field (2,047 positions) as context, so short windows waste most of their work.
fn training_windows(c: &mut Criterion) {
    let mut group = c.benchmark_group("train_window");
    group.sample_size(10);
    let cfg = Config::default();
    let params = Params::new(0);
    let m = WaveNet::new(&cfg, params.var_builder(DType::F32)).unwrap();
    let mut opt = wavegen::core::optim::AdamW::new(&params, Default::default()).unwrap();
    for (batch, window) in [(16, 1024), (8, 2048), (4, 4096), (2, 8192), (1, 16384)] {
        let data = training_batch(&cfg, batch, window, 3);
        group.throughput(Throughput::Elements((batch * window) as u64));
        // Two threads need at least two windows: the trainer shards a batch by rows.
        for threads in [1, 2].into_iter().filter(|&t| t <= batch) {
            group.bench_function(format!("b{batch}_w{window}/{threads}t"), |b| {
                b.iter(|| {
                    let (_, grads) = wavegen::core::train::loss_and_grads(&m, &data, threads).unwrap();
                    black_box(opt.step(&grads, 1e-4).unwrap())
                })
            });
        }
    }
    group.finish();
}

fn setup() -> Criterion {
    wavegen::init_process();
    Criterion::default().configure_from_args()
}

/// The music vocoder's config (16 kHz, 80 mel bands, hop 256, 16 layers of the real-time
/// widths, a frame network of 64 channels), the same with 8 sub-frames (rows of 32 samples),
/// and the same WaveNet without the conditioning.
fn vocoder_configs() -> [(&'static str, Config); 3] {
    use wavegen::audio::mel::MelConfig;
    use wavegen::models::wavenet::LocalConfig;
    let plain = Config { layers_per_cycle: 8, cycles: 2, ..Config::realtime() };
    let mel = MelConfig::for_rate(16_000);
    let local = |subframes| Some(LocalConfig::new(mel.clone(), 64, subframes, vec![-4.0; 80], vec![2.0; 80]));
    [
        ("plain", plain.clone()),
        ("mel", Config { local: local(1), ..plain.clone() }),
        ("mel_8_subframes", Config { local: local(8), ..plain }),
    ]
}

/// What the conditioning costs. Generation: one stream on one thread, 4,096 samples, the
/// vocoder (its per-layer projections computed once per frame) against the same WaveNet
/// unconditioned; and what projecting per sample instead would add (one (1 × R)·(R × L·2G)
/// product per sample, the kernels' own). Training: one step of 4 × 4,096 target samples (bf16
/// where the CPU has AMX, else f32), one thread.
fn vocoder(c: &mut Criterion) {
    use std::sync::Arc;
    use wavegen::engine::{Engine, Kernels, StreamSpec};
    let mut group = c.benchmark_group("vocoder");
    group.sample_size(10);
    let steps = 4096;
    let mut rng = Rng::new(4);
    let frames = steps / 256 + 1;
    let mel: Vec<f32> = (0..frames * 80).map(|_| -4.0 + 2.0 * rng.normal() as f32).collect();
    for (name, cfg) in vocoder_configs() {
        let m = model(&cfg);
        let engine = Engine::new(&m, Kernels::detect(), false).unwrap();
        let local = engine.is_vocoder().then(|| Arc::new(engine.condition(&mel, frames).unwrap()));
        group.throughput(Throughput::Elements(steps as u64));
        group.bench_function(BenchmarkId::new("engine_1t", name), |b| {
            b.iter(|| {
                let spec =
                    StreamSpec { sampler: SamplerConfig::default(), rng: Rng::new(1), label: 0, local: local.clone() };
                let mut g = wavegen::engine::Generator::new(&engine, vec![spec], &[128], 1).unwrap();
                black_box(g.next_chunk(steps).unwrap())
            })
        });
    }
    let (r, width) = (64, 16 * 2 * 32);
    let mm = Kernels::detect().matmul_acc;
    let (y, w) = (vec![0.1f32; r], vec![0.01f32; r * width]);
    let mut out = vec![0f32; width];
    group.bench_function(BenchmarkId::new("projection_per_sample_1t", "mel"), |b| {
        b.iter(|| {
            for _ in 0..steps {
                mm(&mut out, &y, &w, 1, r, width);
            }
            black_box(&out);
        })
    });
    let precision = if wavegen::layers::matmul::amx::available() {
        wavegen::core::train::Precision::Bf16
    } else {
        wavegen::core::train::Precision::F32
    };
    for (name, cfg) in vocoder_configs() {
        let params = Params::new(0);
        let m = WaveNet::new(&cfg, params.var_builder(DType::F32)).unwrap().with_precision(precision);
        let mut opt = wavegen::core::optim::AdamW::new(&params, Default::default()).unwrap();
        let (batch, window) = (4, 4096);
        // The context rounded up to whole frames, as the vocoder's windows are.
        let context = cfg.receptive_field().div_ceil(256) * 256;
        let mut data = training_batch(&Config { layers_per_cycle: 1, cycles: 1, ..cfg.clone() }, batch, 0, 2);
        let len = context + window;
        let tokens: Vec<u32> = (0..batch * len).map(|_| rng.below(256) as u32).collect();
        data.tokens = Tensor::from_vec(tokens, (batch, len), &Device::Cpu).unwrap();
        let mask: Vec<f32> = (0..batch * len).map(|i| if i % len >= context { 1.0 } else { 0.0 }).collect();
        data.mask = Tensor::from_vec(mask, (batch, len), &Device::Cpu).unwrap();
        if cfg.local.is_some() {
            let rows = len.div_ceil(256) + 2;
            let f: Vec<f32> = (0..batch * rows * 80).map(|_| -4.0 + 2.0 * rng.normal() as f32).collect();
            data.features = Some(Tensor::from_vec(f, (batch, rows, 80), &Device::Cpu).unwrap());
        }
        group.throughput(Throughput::Elements((batch * window) as u64));
        group.bench_function(BenchmarkId::new(format!("train_step_{precision}_1t"), name), |b| {
            b.iter(|| {
                let (_, grads) = wavegen::core::train::loss_and_grads(&m, &data, 1).unwrap();
                black_box(opt.step(&grads, 1e-4).unwrap())
            })
        });
    }
    group.finish();
}

criterion_group! { name = benches; config = setup(); targets = generation, realtime, engine, training, training_windows, vocoder }
criterion_main!(benches);
