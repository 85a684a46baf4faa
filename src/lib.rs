//! wavegen: autoregressive generative models of audio and images, centred on WaveNet.
//!
//! The data flows through the modules in this order:
//! - [`audio`]: WAV in and out, resampling, μ-law coding, signal measurements;
//! - [`data`]: folders of WAV files as memory-mapped code corpora, file splits, batches;
//! - [`core`]: the [`core::Autoregressive`] trait every model implements, and what is written
//!   once for all of them: the training loop, the optimizer, the sampler, checkpoints and the
//!   property checks (causality, cached = parallel, finite-difference gradients);
//! - [`layers`] and [`models`]: the networks, one file per model;
//! - [`tasks`]: what the commands do (train, generate, eval, info), called by the CLI.
//!
//! The binary (`src/main.rs`, `src/cli/`) only parses arguments and calls [`tasks`].
#![warn(missing_docs)]

pub mod audio;
pub mod core;
pub mod data;
pub mod engine;
mod error;
pub mod fastmath;
pub mod fsutil;
pub mod layers;
pub mod models;
pub mod rng;
pub mod tasks;

pub use error::{Error, Result};

/// Makes glibc keep freed memory for reuse instead of returning it to the OS. A training step
/// allocates and frees gigabytes of tensors; by default glibc maps blocks above 128 KiB afresh
/// each time, and on a virtual machine the page faults that follow cost more than the
/// arithmetic. Call once at start-up, before other threads exist.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before threads start.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20); // the largest glibc accepts
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}
