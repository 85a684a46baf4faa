use candle_core::{DType, Device, Tensor};
use wavegen::core::params::Params;
use wavegen::models::wavenet::{Config, WaveNet};
use wavegen::rng::Rng;
fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (batch, window, steps, threads): (usize, usize, usize, usize) =
        (args[1].parse().unwrap(), args[2].parse().unwrap(), args[3].parse().unwrap(), args[4].parse().unwrap());
    let cfg = if args.get(5).map(|s| s.as_str()) == Some("realtime") { Config::realtime() } else { Config::default() };
    wavegen::init_process();
    let params = Params::new(0);
    let m = WaveNet::new(&cfg, params.var_builder(DType::F32)).unwrap();
    let mut opt = wavegen::core::optim::AdamW::new(&params, Default::default()).unwrap();
    let len = cfg.receptive_field() + window;
    let mut rng = Rng::new(2);
    let tokens: Vec<u32> = (0..batch * len).map(|_| rng.below(256) as u32).collect();
    let tokens = Tensor::from_vec(tokens, (batch, len), &Device::Cpu).unwrap();
    let mask: Vec<f32> = (0..batch * len).map(|i| if i % len >= cfg.receptive_field() { 1.0 } else { 0.0 }).collect();
    let mask = Tensor::from_vec(mask, (batch, len), &Device::Cpu).unwrap();
    let data = wavegen::data::Batch { tokens, mask, labels: None, values: None };
    let (_, g) = wavegen::core::train::loss_and_grads(&m, &data, threads).unwrap();
    opt.step(&g, 1e-4).unwrap();
    let t = std::time::Instant::now();
    for _ in 0..steps {
        let (_, g) = wavegen::core::train::loss_and_grads(&m, &data, threads).unwrap();
        opt.step(&g, 1e-4).unwrap();
    }
    let s = t.elapsed().as_secs_f64();
    println!("batch {batch} window {window} threads {threads}: {:.0} target samples/s wall", (steps * batch * window) as f64 / s);
}
