//! Image models on binarized MNIST-sized inputs (784 pixels): training images/s (forward,
//! backward and AdamW step, batch 100) for FVSBN, NADE and MADE, and NADE sampling with the
//! running update. Run: `cargo bench --bench images`.

use candle_core::{DType, Device, Tensor};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use wavegen::core::masked_nll;
use wavegen::core::optim::{AdamW, AdamWConfig};
use wavegen::core::params::Params;
use wavegen::core::sample::{self, Method, SamplerConfig};
use wavegen::data::Batch;
use wavegen::layers::nade::Activation;
use wavegen::models::{ModelConfig, fvsbn, made, nade};
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
    ]
}

/// Binary images with about MNIST's density of ones (13%).
fn images(n: usize) -> Tensor {
    let mut rng = Rng::new(1);
    let v: Vec<u32> = (0..n * PIXELS).map(|_| u32::from(rng.uniform() < 0.13)).collect();
    Tensor::from_vec(v, (n, PIXELS), &Device::Cpu).unwrap()
}

fn training(c: &mut Criterion) {
    let mut group = c.benchmark_group("train_step");
    group.sample_size(10);
    let batch = 100;
    let tokens = images(batch);
    let batch_of_images = Batch {
        tokens: tokens.clone(),
        mask: Tensor::ones((batch, PIXELS), DType::F32, &Device::Cpu).unwrap(),
        labels: None,
        values: None,
    };
    group.throughput(Throughput::Elements(batch as u64));
    for (name, cfg) in models() {
        let params = Params::new(0);
        let model = cfg.build(params.var_builder(DType::F32)).unwrap();
        let mut opt = AdamW::new(&params, AdamWConfig::default()).unwrap();
        group.bench_function(name, |b| {
            b.iter(|| {
                let grads = masked_nll(&model, &batch_of_images).unwrap().backward().unwrap();
                opt.step(&grads, 1e-4).unwrap()
            })
        });
    }
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

criterion_group!(benches, training, sampling);
criterion_main!(benches);
