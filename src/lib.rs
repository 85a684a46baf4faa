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
/// frees and allocates again activations of up to hundreds of MB; by default each large one is
/// a fresh mapping whose pages fault in on first touch, which cost a tenth of a Gated PixelCNN
/// step and a third of an LSTM's (perf; LSTM-128 on one thread 60.6 → 85.9 images/s). So: no
/// mappings at all (glibc caps the mapping threshold at 32 MiB, below an LSTM's gate
/// activations), every block from the heap, which is never trimmed; the process keeps its peak
/// size. And one heap for every thread: a second thread's arena grows in heaps of at most 64
/// MiB, so glibc maps a larger block there whatever the settings, and unmaps it on free. The
/// trainer's shard threads (new ones each step) did exactly that with the transformer's 80 MB
/// MLP activations at batch 100: 78,000 page faults a second, and 0.23 steps/s against
/// 0.29–0.32 with the one heap (session 19, `strace` and `perf stat` on the running trainer).
/// Runs once however often it is called (`core::train` calls it too, for library users).
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        // SAFETY: mallopt only changes the allocator's policy (under its own lock).
        ONCE.call_once(|| unsafe {
            libc::mallopt(libc::M_MMAP_MAX, 0);
            // −1: never (mallopt(3)). `i32::MAX` was 2 GiB, which the transformer's activations
            // at batch 100 pass: the heap was trimmed after each step and faulted back in
            // during the next, 200,000 faults a second and a sixth of the time in the kernel
            // (session 20).
            libc::mallopt(libc::M_TRIM_THRESHOLD, -1);
            libc::mallopt(libc::M_TOP_PAD, 64 << 20);
            libc::mallopt(libc::M_ARENA_MAX, 1);
        });
    }
}

/// Makes this thread's float arithmetic treat subnormal numbers as zero (x86's FTZ and DAZ
/// flags; aarch64's FZ). Weights and Adam moments that only an L2 penalty moves, such as
/// those under a mask, shrink geometrically into the subnormal range, where each operation
/// costs ~100 cycles: training slowed 4× after a few epochs. Numbers below 1.2e-38 matter to
/// nothing here.
pub fn flush_subnormals_to_zero() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: reads and writes this thread's MXCSR, setting only the FTZ (15) and DAZ (6) bits.
    unsafe {
        let mut csr: u32 = 0;
        std::arch::asm!("stmxcsr [{}]", in(reg) &mut csr, options(nostack, preserves_flags));
        csr |= (1 << 15) | (1 << 6);
        std::arch::asm!("ldmxcsr [{}]", in(reg) &csr, options(nostack, preserves_flags, readonly));
    }
    #[cfg(target_arch = "aarch64")]
    // SAFETY: sets only the FZ bit (24) of this thread's FPCR.
    unsafe {
        let mut fpcr: u64;
        std::arch::asm!("mrs {}, fpcr", out(reg) fpcr, options(nomem, nostack, preserves_flags));
        fpcr |= 1 << 24;
        std::arch::asm!("msr fpcr, {}", in(reg) fpcr, options(nomem, nostack, preserves_flags));
    }
}

/// Process set-up for the command-line tool and the benches: [`keep_freed_memory`],
/// [`flush_subnormals_to_zero`] on this thread and on every thread of the global rayon pool
/// (which candle's kernels use; built here, sized from `RAYON_NUM_THREADS` as usual), and
/// candle's element-wise operations kept on their caller's thread. Call once at start-up,
/// before other threads exist.
pub fn init_process() {
    // wavegen runs one shard of a batch per thread itself (`core::train`). candle 0.11 also
    // splits each large element-wise operation over a pool of its own, which takes one caller
    // at a time behind a lock and spins between operations: with two shards on two cores, the
    // shards queued behind each other and the spinning took 15% of a transformer step (perf).
    // A pool of one thread runs every operation where it is called. Matrix products still use
    // the rayon pool.
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // SAFETY: set before any other thread exists (the documented contract of this function).
        unsafe { std::env::set_var("CANDLE_NUM_THREADS", "1") };
    }
    keep_freed_memory();
    flush_subnormals_to_zero();
    // An error means the pool exists already (a second call): nothing to do.
    let _ = rayon::ThreadPoolBuilder::new().start_handler(|_| flush_subnormals_to_zero()).build_global();
}
