//! The streaming inference engine: WaveNet generation without tensor operations, for real
//! time. [`kernels`] holds the arithmetic, chosen by CPU feature at run time; [`wavenet`] the
//! cached dilated-convolution queues of many streams at once.

use crate::core::sample::SamplerConfig;
use crate::rng::Rng;

pub mod kernels;
pub mod wavenet;

pub use kernels::Kernels;
pub use wavenet::{Conditioning, Engine, Streams};

/// One stream to generate: its sampler, its generator and its label.
#[derive(Debug, Clone)]
pub struct StreamSpec {
    /// Temperature, top-k, top-p.
    pub sampler: SamplerConfig,
    /// This stream's generator.
    pub rng: Rng,
    /// Its global-conditioning label (0 when the model has none).
    pub label: u32,
    /// A vocoder's features for this stream, from [`Engine::condition`]; `None` for other models.
    pub local: Option<std::sync::Arc<Conditioning>>,
}

/// Streams being generated, in chunks of any length: the state of every stream carries over
/// from one chunk to the next, so a long generation runs in the memory of one chunk. Streams
/// are split into groups, one per thread; a stream's output does not depend on the split.
pub struct Generator<'e> {
    engine: &'e Engine,
    groups: Vec<Group>,
}

/// The streams one thread advances.
struct Group {
    specs: Vec<StreamSpec>,
    streams: Streams,
    prev: Vec<u32>,
}

impl Group {
    /// Samples `steps` codes per stream into `out` (one Vec per stream), advancing the state.
    fn run(&mut self, engine: &Engine, steps: usize, out: &mut [Vec<u32>]) -> crate::Result<()> {
        let classes = engine.config().classes;
        for _ in 0..steps {
            let logits = self.streams.logits();
            if !logits.iter().all(|x| x.is_finite()) {
                return Err(crate::Error::Config(
                    "the model produced NaN or infinite logits: its weights are damaged or it diverged in training"
                        .into(),
                ));
            }
            for (r, spec) in self.specs.iter_mut().enumerate() {
                self.prev[r] = spec.sampler.sample(&logits[r * classes..(r + 1) * classes], &mut spec.rng);
                out[r].push(self.prev[r]);
            }
            engine.step(&mut self.streams, Some(&self.prev));
        }
        Ok(())
    }
}

impl<'e> Generator<'e> {
    /// Starts `specs.len()` streams on `threads` threads, each fed the shared `prime` first.
    pub fn new(engine: &'e Engine, specs: Vec<StreamSpec>, prime: &[u32], threads: usize) -> crate::Result<Self> {
        let threads = threads.clamp(1, specs.len().max(1));
        let per = specs.len().div_ceil(threads).max(1);
        let mut groups = Vec::new();
        let mut specs = specs;
        while !specs.is_empty() {
            let rest = specs.split_off(per.min(specs.len()));
            let labels: Vec<u32> = specs.iter().map(|s| s.label).collect();
            let streams = if engine.is_vocoder() {
                // The priming comes before the features' first sample.
                let local = specs.iter().map(|s| s.local.clone()).collect::<Option<Vec<_>>>().ok_or_else(|| {
                    crate::Error::Config("this model is a vocoder: every stream needs mel features".into())
                })?;
                engine.vocoder_streams(&labels, local, prime.len())?
            } else {
                engine.streams(&labels)?
            };
            groups.push(Group { prev: vec![0; specs.len()], specs, streams });
            specs = rest;
        }
        if groups.is_empty() {
            return Err(crate::Error::Config("at least one stream".into()));
        }
        let prime_group = |g: &mut Group| {
            engine.step(&mut g.streams, None);
            for &code in prime {
                g.prev.fill(code);
                engine.step(&mut g.streams, Some(&g.prev));
            }
        };
        std::thread::scope(|scope| {
            for g in groups.iter_mut() {
                scope.spawn(move || prime_group(g));
            }
        });
        Ok(Generator { engine, groups })
    }

    /// The next `steps` codes of every stream, in the order of the specs.
    pub fn next_chunk(&mut self, steps: usize) -> crate::Result<Vec<Vec<u32>>> {
        let engine = self.engine;
        let mut outs: Vec<Vec<Vec<u32>>> =
            self.groups.iter().map(|g| vec![Vec::with_capacity(steps); g.specs.len()]).collect();
        if self.groups.len() == 1 {
            self.groups[0].run(engine, steps, &mut outs[0])?;
        } else {
            std::thread::scope(|scope| {
                let handles: Vec<_> = self
                    .groups
                    .iter_mut()
                    .zip(outs.iter_mut())
                    .map(|(g, out)| scope.spawn(move || g.run(engine, steps, out)))
                    .collect();
                handles.into_iter().try_for_each(|h| {
                    h.join().map_err(|_| crate::Error::Config("a generator thread panicked".into()))?
                })
            })?;
        }
        Ok(outs.into_iter().flatten().collect())
    }
}

/// Generates `steps` codes for each stream on `threads` threads; `progress(done)` is called
/// with 0 once primed, then every 1,024 steps.
pub fn generate_parallel(
    engine: &Engine,
    specs: &mut [StreamSpec],
    prime: &[u32],
    steps: usize,
    threads: usize,
    progress: &mut dyn FnMut(usize),
) -> crate::Result<Vec<Vec<u32>>> {
    let mut generator = Generator::new(engine, specs.to_vec(), prime, threads)?;
    progress(0);
    let mut out = vec![Vec::with_capacity(steps); specs.len()];
    let mut done = 0;
    while done < steps {
        let n = (steps - done).min(1024);
        for (o, chunk) in out.iter_mut().zip(generator.next_chunk(n)?) {
            o.extend(chunk);
        }
        done += n;
        progress(done);
    }
    // The specs' generators continue where the streams stopped.
    for (spec, g) in specs.iter_mut().zip(generator.groups.iter().flat_map(|g| g.specs.iter())) {
        spec.rng = g.rng.clone();
    }
    Ok(out)
}

/// [`generate_parallel`] on the calling thread.
pub fn generate(
    engine: &Engine,
    specs: &mut [StreamSpec],
    prime: &[u32],
    steps: usize,
    progress: &mut dyn FnMut(usize),
) -> crate::Result<Vec<Vec<u32>>> {
    generate_parallel(engine, specs, prime, steps, 1, progress)
}
