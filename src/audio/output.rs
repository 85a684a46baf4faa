//! Audio out through cpal. The device callback only copies mono samples from a lock-free
//! single-producer/single-consumer ring (rtrb) into the device buffer, duplicating them over
//! the device's channels: no locks, no allocation, no I/O. When the ring runs dry it plays
//! silence and counts an underrun.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use cpal::traits::{DeviceTrait, HostTrait, StreamTrait};

use crate::{Error, Result};

/// Stops the ALSA library from printing its own diagnostics on stderr (eight lines of
/// configuration noise on a machine without a sound card): the error wavegen reports is the
/// one line that says what to do. Called before cpal touches ALSA.
fn silence_alsa_diagnostics() {
    #[cfg(target_os = "linux")]
    {
        use std::ffi::{c_char, c_int};
        type Handler = unsafe extern "C" fn(*const c_char, c_int, *const c_char, c_int, *const c_char, ...);
        #[link(name = "asound")]
        unsafe extern "C" {
            fn snd_lib_error_set_handler(handler: Option<Handler>) -> c_int;
        }
        unsafe extern "C" fn ignore(_: *const c_char, _: c_int, _: *const c_char, _: c_int, _: *const c_char) {}
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            // SAFETY: ALSA calls the handler as a C variadic function; stable Rust cannot define
            // one, so a function of the five fixed parameters stands in. On the Linux ABIs
            // (System V x86-64, AArch64 AAPCS) the fixed arguments of a variadic call are
            // passed exactly as in a plain call, and the callee never reads the rest.
            unsafe {
                let handler: Handler = std::mem::transmute(
                    ignore as unsafe extern "C" fn(*const c_char, c_int, *const c_char, c_int, *const c_char),
                );
                snd_lib_error_set_handler(Some(handler));
            }
        });
    }
}

/// Names of the output devices of the default host.
pub fn list_devices() -> Result<Vec<String>> {
    silence_alsa_diagnostics();
    let host = cpal::default_host();
    let devices = host.output_devices().map_err(|e| Error::Audio(format!("cannot list output devices: {e}")))?;
    Ok(devices.map(|d| d.to_string()).collect())
}

/// Counters shared between the callback and the rest of the program.
#[derive(Debug, Default)]
pub struct Counters {
    /// Mono frames handed to the device.
    pub played: AtomicU64,
    /// Callbacks that found fewer frames in the ring than the device asked for.
    pub underruns: AtomicU64,
}

/// An open output stream fed from a ring.
pub struct Output {
    stream: cpal::Stream,
    /// The device's sample rate.
    pub sample_rate: u32,
    /// The device's channel count.
    pub channels: u16,
    /// The device's name.
    pub device: String,
    /// Played frames and underruns.
    pub counters: Arc<Counters>,
}

/// The device and its configuration, before a stream is built: known first so that the
/// generator can resample to the device rate.
pub struct Device {
    device: cpal::Device,
    config: cpal::StreamConfig,
    name: String,
}

impl Device {
    /// Opens `name` (a substring of a device name), or the default output device.
    pub fn open(name: Option<&str>, latency_s: f64) -> Result<Self> {
        silence_alsa_diagnostics();
        let host = cpal::default_host();
        let device = match name {
            None => host.default_output_device().ok_or_else(|| {
                Error::Audio(
                    "no audio output device found: `wavegen generate --out FILE` writes the audio to a file instead; see also --list-devices".into(),
                )
            })?,
            Some(wanted) => host
                .output_devices()
                .map_err(|e| Error::Audio(format!("cannot list output devices: {e}")))?
                .find(|d| d.to_string().contains(wanted))
                .ok_or_else(|| Error::Audio(format!("no output device named like {wanted:?}: see --list-devices")))?,
        };
        let name = device.to_string();
        let supported = device.default_output_config().map_err(|e| {
            Error::Audio(format!(
                "output device {name:?} is not available ({e}): `wavegen generate --out FILE` writes the audio to a file instead; see also --list-devices"
            ))
        })?;
        // The device's period: about a quarter of the latency, so that its buffer (two to four
        // periods) fills from the pre-buffered ring without running it dry. Drivers differ in
        // what they take (ALSA over JACK wants whole JACK periods after its own rate
        // conversion), so candidates are tried with a silent stream that is never started.
        let mut config = supported.config();
        let quarter = (latency_s * config.sample_rate as f64 / 4.0).max(256.0) as u32;
        let candidates = [quarter.next_power_of_two() / 2, quarter / 768 * 768, quarter / 256 * 256, 1024, 1536, 3072];
        let works = |size: cpal::BufferSize| {
            let probe = cpal::StreamConfig { buffer_size: size, ..config };
            device
                .build_output_stream::<f32, _, _>(
                    probe,
                    |d: &mut [f32], _: &cpal::OutputCallbackInfo| d.fill(0.0),
                    |_| {},
                    None,
                )
                .is_ok()
        };
        config.buffer_size = candidates
            .into_iter()
            .filter(|&p| p >= 256)
            .map(cpal::BufferSize::Fixed)
            .find(|&size| works(size))
            .unwrap_or(cpal::BufferSize::Default);
        Ok(Device { device, config, name })
    }

    /// The device's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The device's sample rate.
    pub fn sample_rate(&self) -> u32 {
        self.config.sample_rate
    }

    /// Starts playing from `ring` (mono samples at the device rate).
    pub fn start(self, mut ring: rtrb::Consumer<f32>) -> Result<Output> {
        let channels = self.config.channels.max(1) as usize;
        let counters = Arc::new(Counters::default());
        let shared = counters.clone();
        let callback = move |data: &mut [f32], _: &cpal::OutputCallbackInfo| {
            let frames = data.len() / channels;
            let available = ring.slots().min(frames);
            let chunk = ring.read_chunk(available).expect("invariant: at most the available slots");
            let (a, b) = chunk.as_slices();
            for (frame, &x) in data.chunks_exact_mut(channels).zip(a.iter().chain(b)) {
                frame.fill(x);
            }
            chunk.commit_all();
            if available < frames {
                data[available * channels..].fill(0.0);
                shared.underruns.fetch_add(1, Ordering::Relaxed);
            }
            shared.played.fetch_add(available as u64, Ordering::Relaxed);
        };
        let name = self.name.clone();
        let stream = self
            .device
            .build_output_stream::<f32, _, _>(self.config, callback, |e| eprintln!("audio output error: {e}"), None)
            .map_err(|e| Error::Audio(format!("cannot open a stream on {name:?}: {e}")))?;
        stream.play().map_err(|e| Error::Audio(format!("cannot start {name:?}: {e}")))?;
        Ok(Output {
            stream,
            sample_rate: self.config.sample_rate,
            channels: self.config.channels,
            device: self.name,
            counters,
        })
    }
}

impl Output {
    /// Stops the stream.
    pub fn stop(self) {
        let _ = self.stream.pause();
    }
}
