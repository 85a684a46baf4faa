//! The streaming inference engine: WaveNet generation without tensor operations, for real
//! time. [`kernels`] holds the arithmetic, chosen by CPU feature at run time; [`wavenet`] the
//! cached dilated-convolution queues of many streams at once.

use crate::core::sample::SamplerConfig;
use crate::rng::Rng;

pub mod kernels;
pub mod wavenet;

pub use kernels::Kernels;
pub use wavenet::{Engine, Streams};

/// One stream to generate: its sampler, its generator and its label.
#[derive(Debug, Clone)]
pub struct StreamSpec {
    /// Temperature, top-k, top-p.
    pub sampler: SamplerConfig,
    /// This stream's generator.
    pub rng: Rng,
    /// Its global-conditioning label (0 when the model has none).
    pub label: u32,
}

/// Generates `steps` codes for each stream on `threads` threads (streams are split between
/// them; each stream's output does not depend on the split). `progress` is reported by the
/// first group only.
pub fn generate_parallel(
    engine: &Engine,
    specs: &mut [StreamSpec],
    prime: &[u32],
    steps: usize,
    threads: usize,
    progress: &mut dyn FnMut(usize),
) -> crate::Result<Vec<Vec<u32>>> {
    let threads = threads.clamp(1, specs.len().max(1));
    if threads == 1 {
        return generate(engine, specs, prime, steps, progress);
    }
    let per = specs.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let mut groups = specs.chunks_mut(per);
        let first = groups.next().expect("invariant: at least one stream");
        let others: Vec<_> =
            groups.map(|g| scope.spawn(move || generate(engine, g, prime, steps, &mut |_| {}))).collect();
        let mut out = generate(engine, first, prime, steps, progress)?;
        for handle in others {
            out.extend(handle.join().map_err(|_| crate::Error::Config("a generator thread panicked".into()))??);
        }
        Ok(out)
    })
}

/// Generates `steps` codes for each stream after feeding the shared `prime`; `progress(done)`
/// is called with 0 once primed, then every 1,024 steps.
pub fn generate(
    engine: &Engine,
    specs: &mut [StreamSpec],
    prime: &[u32],
    steps: usize,
    progress: &mut dyn FnMut(usize),
) -> crate::Result<Vec<Vec<u32>>> {
    let n = specs.len();
    let labels: Vec<u32> = specs.iter().map(|s| s.label).collect();
    let mut streams = engine.streams(&labels)?;
    let classes = engine.config().classes;
    let mut prev = vec![0u32; n];
    let mut logits = engine.step(&mut streams, None);
    for &code in prime {
        prev.fill(code);
        logits = engine.step(&mut streams, Some(&prev));
    }
    progress(0);
    let mut out = vec![Vec::with_capacity(steps); n];
    for i in 0..steps {
        for (r, spec) in specs.iter_mut().enumerate() {
            prev[r] = spec.sampler.sample(&logits[r * classes..(r + 1) * classes], &mut spec.rng);
            out[r].push(prev[r]);
        }
        if i + 1 < steps {
            logits = engine.step(&mut streams, Some(&prev));
        }
        if i % 1024 == 1023 {
            progress(i + 1);
        }
    }
    progress(steps);
    Ok(out)
}
