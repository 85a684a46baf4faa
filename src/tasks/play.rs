//! `wavegen play`: generate with the streaming engine on a generator thread and play through
//! the speakers as it is made. The generator resamples to the device rate (rubato) and fills a
//! lock-free ring; the device callback only reads from it.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rubato::audioadapter_buffers::direct::InterleavedSlice;
use rubato::{Fft, FixedSync, Resampler};
use serde::Serialize;

use super::{AudioModel, Reporter};
use crate::audio::{mulaw, output, wav};
use crate::core::sample::SamplerConfig;
use crate::engine::{Conditioning, Engine, Kernels};
use crate::rng::Rng;
use crate::{Error, Result};

/// Everything `wavegen play` needs.
#[derive(Debug, Clone)]
pub struct PlayOptions {
    /// Checkpoint directory (None: the embedded default model).
    pub checkpoint: Option<PathBuf>,
    /// Temperature, top-k, top-p.
    pub sampler: SamplerConfig,
    /// Seed of the sampler.
    pub seed: u64,
    /// Global-conditioning label.
    pub label: Option<String>,
    /// Stop after this many seconds (None: until Ctrl-C).
    pub seconds: Option<f64>,
    /// Output device (a substring of its name), or the default one.
    pub device: Option<String>,
    /// Audio buffered before playback starts, in milliseconds.
    pub latency_ms: f64,
    /// Also write what was played to this WAV file.
    pub out: Option<PathBuf>,
    /// Use exact tanh/exp instead of the fast approximations.
    pub exact: bool,
    /// With a vocoder: the WAV or `.npy` features to turn into audio as it plays.
    pub vocode: Option<PathBuf>,
}

/// What was played.
#[derive(Debug, Serialize)]
pub struct PlaySummary {
    /// The device.
    pub device: String,
    /// The device's sample rate.
    pub device_rate: u32,
    /// The model's sample rate.
    pub model_rate: u32,
    /// Seconds played.
    pub seconds: f64,
    /// Callbacks that found the buffer short.
    pub underruns: u64,
    /// Generation speed over real time, counting only the time spent generating (not waiting
    /// for room in the buffer); above 1 is faster than real time.
    pub realtime_factor: f64,
    /// The kernels the engine used.
    pub kernels: &'static str,
    /// Where the played audio was written.
    pub out: Option<PathBuf>,
}

/// One status line's worth of numbers, for the reporter.
#[derive(Debug, Clone, Copy)]
pub struct PlayStatus {
    /// Generation speed over real time so far.
    pub realtime_factor: f64,
    /// Fraction of the ring that is full.
    pub buffer_fill: f64,
    /// Underruns so far.
    pub underruns: u64,
    /// Seconds played so far.
    pub seconds: f64,
}

/// Plays until `seconds` have been played or `stop` is raised.
pub fn play(opts: &PlayOptions, reporter: &mut dyn Reporter, stop: &AtomicBool) -> Result<PlaySummary> {
    opts.sampler.validate()?;
    if !(opts.latency_ms > 0.0 && opts.latency_ms.is_finite()) {
        return Err(Error::Config(format!("--latency-ms must be positive, got {}", opts.latency_ms)));
    }
    let m = AudioModel::open(opts.checkpoint.as_deref())?;
    let model_rate = m.audio().settings.sample_rate;
    let label = m.label_index(opts.label.as_deref())?.unwrap_or(0);
    let engine = Engine::new(&m.model, Kernels::detect(), opts.exact)?;
    let kernels = engine.kernels().name;
    let source = opts.checkpoint.clone().unwrap_or_else(|| PathBuf::from(super::embedded::NAME));
    // A vocoder plays its input's length (or less, with --seconds); other models play on.
    let (local, input_samples) = match (&opts.vocode, engine.is_vocoder()) {
        (Some(path), true) => {
            let input = super::vocode::read_input(path, &super::vocode::vocoder_settings(&m, &source)?)?;
            (Some(Arc::new(engine.condition(&input.mel.values, input.mel.frames)?)), Some(input.samples as u64))
        }
        (Some(_), false) => {
            return Err(Error::checkpoint(
                &source,
                "not a vocoder (trained without --condition mel): play it without --vocode",
            ));
        }
        (None, true) => {
            return Err(Error::checkpoint(
                &source,
                "a vocoder: give it something to vocode with --vocode IN.wav (or features as .npy)",
            ));
        }
        (None, false) => (None, None),
    };

    // The device first: its rate decides the resampling.
    let latency_s = opts.latency_ms / 1000.0;
    let device = output::Device::open(opts.device.as_deref(), latency_s)?;
    let device_rate = device.sample_rate();
    let prebuffer = ((latency_s * device_rate as f64) as usize).max(256);
    let capacity = prebuffer * 2 + 4096;
    let (producer, consumer) = rtrb::RingBuffer::<f32>::new(capacity);
    reporter.note(&format!(
        "playing on {:?} at {device_rate} Hz (model {model_rate} Hz), {:.0} ms buffer, {kernels} kernels",
        device.name(),
        opts.latency_ms
    ));

    let total = match (opts.seconds.map(|s| (s * model_rate as f64).round() as u64), input_samples) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    let recording = Arc::new(Mutex::new(Vec::<f32>::new()));
    let done = Arc::new(AtomicBool::new(false));
    let generated = Arc::new(AtomicU64::new(0));
    let busy_us = Arc::new(AtomicU64::new(0));
    let pushed = Arc::new(AtomicU64::new(0));
    let generator = {
        let (recording, done, generated, pushed, busy_us) =
            (recording.clone(), done.clone(), generated.clone(), pushed.clone(), busy_us.clone());
        let sampler = opts.sampler.clone();
        let record = opts.out.is_some();
        let seed = opts.seed;
        let source = source.clone();
        std::thread::Builder::new()
            .name("generator".into())
            .spawn(move || -> Result<()> {
                let result = run_generator(
                    &engine,
                    local,
                    sampler,
                    seed,
                    label,
                    model_rate,
                    device_rate,
                    total,
                    producer,
                    record,
                    &recording,
                    &generated,
                    &pushed,
                    &busy_us,
                    &source,
                );
                done.store(true, Ordering::SeqCst);
                result
            })
            .map_err(|e| Error::Audio(format!("cannot start the generator thread: {e}")))?
    };

    // Pre-buffer, then start the device.
    let wait_start = Instant::now();
    while !done.load(Ordering::SeqCst) && !stop.load(Ordering::SeqCst) && consumer.slots() < prebuffer {
        if wait_start.elapsed() > Duration::from_secs(30) {
            break; // far slower than real time: play what there is, with underruns
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    // What was played goes to the file as it is played: memory stays bounded however long.
    let mut recorder = match &opts.out {
        Some(path) => Some(wav::PcmWriter::open_ended(path, model_rate, 1)?),
        None => None,
    };
    let mut recorded = 0usize;
    let mut record_played = |played_samples: usize, recorder: &mut Option<wav::PcmWriter>| -> Result<()> {
        let Some(w) = recorder else { return Ok(()) };
        let mut rec = recording.lock().expect("invariant: not poisoned");
        let n = played_samples.saturating_sub(recorded).min(rec.len());
        w.write(&[&rec[..n]])?;
        rec.drain(..n);
        recorded += n;
        Ok(())
    };
    let out = device.start(consumer)?;
    let counters = out.counters.clone();
    let played_model = |played: u64| (played as f64 * model_rate as f64 / device_rate as f64) as u64;
    let mut last_status = Instant::now();
    let (mut last_played, mut last_progress) = (0, Instant::now());
    loop {
        let played = counters.played.load(Ordering::Relaxed);
        // A device that stops asking for samples (a server gone away) must not hang us.
        if played != last_played {
            (last_played, last_progress) = (played, Instant::now());
        } else if last_progress.elapsed() > Duration::from_secs(5) {
            out.stop();
            stop.store(true, Ordering::SeqCst);
            let _ = generator.join();
            return Err(Error::Audio(format!(
                "the output device stopped taking samples after {:.1} s",
                played as f64 / device_rate as f64
            )));
        }
        let finished = done.load(Ordering::SeqCst) && played >= pushed.load(Ordering::SeqCst);
        if stop.load(Ordering::SeqCst) || finished {
            break;
        }
        if last_status.elapsed() > Duration::from_millis(250) {
            record_played(played_model(played) as usize, &mut recorder)?;
            let gen_samples = generated.load(Ordering::Relaxed) as f64;
            let status = PlayStatus {
                realtime_factor: gen_samples
                    / model_rate as f64
                    / (busy_us.load(Ordering::Relaxed) as f64 * 1e-6).max(1e-9),
                buffer_fill: pushed.load(Ordering::Relaxed).saturating_sub(played) as f64 / capacity as f64,
                underruns: counters.underruns.load(Ordering::Relaxed),
                seconds: played as f64 / device_rate as f64,
            };
            reporter.live(&format!(
                "{:6.1} s  {:.2}× real time  buffer {:3.0}%  underruns {}",
                status.seconds,
                status.realtime_factor,
                100.0 * status.buffer_fill,
                status.underruns
            ));
            last_status = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    stop.store(true, Ordering::SeqCst);
    let played = counters.played.load(Ordering::Relaxed);
    let device_name = out.device.clone();
    // The generator stops at its next chunk once it sees that the consumer is gone.
    out.stop();
    done.store(true, Ordering::SeqCst);
    generator.join().map_err(|_| Error::Audio("the generator thread panicked".into()))??;
    // The last callback finds the ring short once generation has ended: that is the end, not an underrun.
    let underruns = counters.underruns.load(Ordering::Relaxed).saturating_sub(u64::from(total.is_some()));
    let generated_samples = generated.load(Ordering::Relaxed);
    record_played(played_model(played) as usize, &mut recorder)?;
    if let Some(w) = recorder {
        w.finish()?;
    }
    Ok(PlaySummary {
        device: device_name,
        device_rate,
        model_rate,
        seconds: played as f64 / device_rate as f64,
        underruns,
        realtime_factor: generated_samples as f64
            / model_rate as f64
            / (busy_us.load(Ordering::Relaxed) as f64 * 1e-6).max(1e-9),
        kernels,
        out: opts.out.clone(),
    })
}

#[allow(clippy::too_many_arguments)]
fn run_generator(
    engine: &Engine,
    local: Option<Arc<Conditioning>>,
    sampler: SamplerConfig,
    seed: u64,
    label: u32,
    model_rate: u32,
    device_rate: u32,
    total: Option<u64>,
    mut producer: rtrb::Producer<f32>,
    record: bool,
    recording: &Mutex<Vec<f32>>,
    generated: &AtomicU64,
    pushed: &AtomicU64,
    busy_us: &AtomicU64,
    source: &std::path::Path,
) -> Result<()> {
    const CHUNK: usize = 256;
    // A vocoder's input starts after the priming below (one step from nothing, then silence).
    let lead = engine.config().receptive_field();
    let mut streams = match local {
        Some(local) => engine.vocoder_streams(&[label], vec![local], lead)?,
        None => engine.streams(&[label])?,
    };
    let mut rng = Rng::derived(seed, "sample");
    let classes = engine.config().classes;
    // Start from one receptive field of silence, as training windows do.
    let silence = [mulaw::silence() as u32];
    let mut logits = engine.step(&mut streams, None);
    for _ in 0..engine.config().receptive_field() {
        logits = engine.step(&mut streams, Some(&silence));
    }
    let mut resampler = if model_rate != device_rate {
        Some(
            Fft::<f32>::new(model_rate as usize, device_rate as usize, CHUNK, 1, FixedSync::Input)
                .map_err(|e| Error::Config(format!("cannot resample {model_rate} Hz to {device_rate} Hz: {e}")))?,
        )
    } else {
        None
    };
    let mut chunk = vec![0f32; CHUNK];
    let mut resampled = vec![0f32; resampler.as_ref().map_or(0, |r| r.output_frames_max())];
    let mut made = 0u64;
    let mut flushed = false;
    loop {
        let n = total.map_or(CHUNK, |t| (t - made).min(CHUNK as u64) as usize);
        if n == 0 {
            // Push one chunk of silence through the resampler so that its delay line empties.
            if flushed || resampler.is_none() {
                return Ok(());
            }
            flushed = true;
        }
        let work = Instant::now();
        let mut prev = [0u32];
        for slot in chunk.iter_mut().take(n) {
            if !logits[..classes].iter().all(|x| x.is_finite()) {
                return Err(Error::checkpoint(
                    source,
                    "the model produced NaN or infinite logits: its weights are damaged or it diverged in training",
                ));
            }
            prev[0] = sampler.sample(&logits[..classes], &mut rng);
            *slot = mulaw::decode(prev[0] as u8);
            logits = engine.step(&mut streams, Some(&prev));
        }
        chunk[n..].fill(0.0);
        made += n as u64;
        busy_us.fetch_add(work.elapsed().as_micros() as u64, Ordering::Relaxed);
        generated.store(made, Ordering::Relaxed);
        if record {
            recording.lock().expect("invariant: not poisoned").extend_from_slice(&chunk[..n]);
        }
        let out: &[f32] = match &mut resampler {
            None => &chunk[..n],
            Some(r) => {
                let input = InterleavedSlice::new(&chunk, 1, CHUNK).expect("invariant: sized for one channel");
                let len = resampled.len();
                let mut output =
                    InterleavedSlice::new_mut(&mut resampled, 1, len).expect("invariant: sized for one channel");
                let (_, produced) = r
                    .process_into_buffer(&input, &mut output, None)
                    .map_err(|e| Error::Config(format!("resampling: {e}")))?;
                &resampled[..produced]
            }
        };
        // Wait for room; give up when the player has gone away.
        let mut rest = out;
        while !rest.is_empty() {
            if producer.is_abandoned() {
                return Ok(()); // playback stopped: nothing more to make
            }
            let (done_part, left) = producer.push_partial_slice(rest);
            pushed.fetch_add(done_part.len() as u64, Ordering::SeqCst);
            rest = left;
            if !rest.is_empty() {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }
}
