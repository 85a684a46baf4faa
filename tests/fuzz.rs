//! Mutation fuzzing of every loader, on stable Rust: byte-level mutations and truncations of
//! a valid WAV, IDX (raw and gzip), config.json and model.safetensors go through the code that
//! reads each, which must return `Ok` or a clean `Err`: never panic, abort or ask for a huge
//! allocation. Seeded: a failure prints the case that reproduces it.
//!
//! The default run does a few thousand cases; `cargo test --release --test fuzz -- --ignored`
//! runs 20 times as many.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};

use wavegen::rng::Rng;

/// No single allocation may exceed this: a loader that trusts a size field in a damaged file
/// would ask for gigabytes here.
const ALLOCATION_CAP: usize = 1 << 30;

struct Capped;

// SAFETY: forwards to the system allocator; only refuses requests above the cap.
unsafe impl GlobalAlloc for Capped {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() > ALLOCATION_CAP {
            // Cannot panic in an allocator: say what happened and stop the test process.
            let msg = format!("fuzz: an allocation of {} bytes (cap {ALLOCATION_CAP})\n", layout.size());
            // SAFETY: writes a buffer to stderr.
            unsafe { libc::write(2, msg.as_ptr().cast(), msg.len()) };
            std::process::abort();
        }
        // SAFETY: the caller's layout, forwarded.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: memory from `System.alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Capped = Capped;

/// One random mutation of `bytes`.
fn mutate(bytes: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut b = bytes.to_vec();
    let rounds = 1 + rng.below(4);
    for _ in 0..rounds {
        if b.is_empty() {
            b.push(rng.below(256) as u8);
            continue;
        }
        let i = rng.below(b.len());
        match rng.below(8) {
            0 => b[i] ^= 1 << rng.below(8),
            1 => b[i] = rng.below(256) as u8,
            2 => b[i] = [0x00, 0xff, 0x7f, 0x80, 0x01][rng.below(5)],
            3 => b.truncate(i),
            4 => {
                let end = (i + 1 + rng.below(16)).min(b.len());
                b.drain(i..end);
            }
            5 => {
                let insert: Vec<u8> = (0..1 + rng.below(8)).map(|_| rng.below(256) as u8).collect();
                b.splice(i..i, insert);
            }
            6 => {
                // A 32-bit field set to an extreme (sizes, counts, rates live in such fields).
                let end = (i + 4).min(b.len());
                let v = [0u32, 1, u32::MAX, 0x7fff_ffff, 0x8000_0000][rng.below(5)].to_le_bytes();
                b[i..end].copy_from_slice(&v[..end - i]);
            }
            _ => {
                let end = (i + 1 + rng.below(64)).min(b.len());
                let chunk = b[i..end].to_vec();
                b.splice(i..i, chunk);
            }
        }
    }
    b
}

/// Mutations of JSON text that keep it JSON half the time: one or two of its numbers replaced
/// by extremes (sizes, rates, counts), so the settings' checks are reached, not just the parser.
fn mutate_json(text: &str, rng: &mut Rng) -> Vec<u8> {
    if rng.below(2) == 0 {
        return mutate(text.as_bytes(), rng);
    }
    let extremes =
        ["0", "-1", "-5", "1e9", "1e300", "18446744073709551615", "99999999999", "0.5", "null", "[]", "\"x\""];
    let bytes = text.as_bytes();
    let mut numbers = Vec::new(); // (start, end) of each run of number characters
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i].is_ascii_digit() && (i == 0 || !bytes[i - 1].is_ascii_alphabetic()) {
            let start = i;
            while i < bytes.len() && (bytes[i].is_ascii_digit() || b".e-".contains(&bytes[i])) {
                i += 1;
            }
            numbers.push((start, i));
        } else {
            i += 1;
        }
    }
    let mut out = text.to_string();
    let mut picks: Vec<(usize, usize)> = (0..1 + rng.below(2)).map(|_| numbers[rng.below(numbers.len())]).collect();
    picks.sort();
    picks.dedup();
    for &(start, end) in picks.iter().rev() {
        out.replace_range(start..end, extremes[rng.below(extremes.len())]);
    }
    out.into_bytes()
}

/// Runs `load` on `cases` mutations; fails listing every case that panicked. Returns how many
/// inputs loaded (`load` returned true) and how many were refused with an error.
fn fuzz(
    name: &str,
    seed: u64,
    cases: usize,
    make: impl Fn(&mut Rng) -> Vec<u8>,
    load: impl Fn(&[u8]) -> bool,
) -> (usize, usize) {
    let mut rng = Rng::derived(seed, name);
    let (mut loaded, mut refused, mut panics) = (0, 0, Vec::new());
    // Panics are caught and listed by case; keep their messages off the output meanwhile.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    for case in 0..cases {
        let bytes = make(&mut rng);
        match std::panic::catch_unwind(AssertUnwindSafe(|| load(&bytes))) {
            Ok(true) => loaded += 1,
            Ok(false) => refused += 1,
            Err(_) => panics.push(case),
        }
    }
    std::panic::set_hook(default_hook);
    assert!(panics.is_empty(), "{name}: cases {panics:?} of seed {seed} panicked");
    eprintln!("fuzz {name}: {cases} mutations, {loaded} loaded, {refused} refused with an error");
    (loaded, refused)
}

struct Fixtures {
    _dir: tempfile::TempDir,
    root: PathBuf,
    wav: Vec<u8>,
    idx: Vec<u8>,
    idx_gz: Vec<u8>,
    config: String,
    weights: Vec<u8>,
}

fn fixtures() -> Fixtures {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let wav_path = root.join("x.wav");
    common::write_wav(&wav_path, &common::sine(300.0, 8000, 0.05, 0.5), 8000, 2, 16, false);
    let mut idx = vec![0, 0, 0x08, 3, 0, 0, 0, 2, 0, 0, 0, 28, 0, 0, 0, 28];
    idx.extend((0..2 * 784).map(|i| (i % 2) as u8));
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut gz, &idx).unwrap();
    // A tiny trained checkpoint, flattened (no checksums) so mutations reach the parsers.
    let data = common::periodic_folder(&root, 2, 16, 8000, 0.2);
    let ckpt = root.join("ckpt");
    let mut opts = common::tiny_options(&data, &ckpt, 2);
    opts.train.eval_every = 1;
    wavegen::tasks::train::train(&opts, &mut wavegen::tasks::Silent, &std::sync::atomic::AtomicBool::new(false))
        .unwrap();
    let committed = wavegen::tasks::run::open(&ckpt).unwrap();
    let mut manifest = committed.manifest.clone();
    manifest.files.clear();
    Fixtures {
        wav: std::fs::read(&wav_path).unwrap(),
        idx_gz: gz.finish().unwrap(),
        idx,
        config: serde_json::to_string_pretty(&manifest).unwrap(),
        weights: std::fs::read(committed.dir.join("model.safetensors")).unwrap(),
        _dir: dir,
        root,
    }
}

/// A flat checkpoint folder of `config` and `weights`, opened through everything `info` does.
fn load_checkpoint(dir: &Path, config: &[u8], weights: &[u8]) -> bool {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), config).unwrap();
    std::fs::write(dir.join("model.safetensors"), weights).unwrap();
    let info = wavegen::tasks::info(Some(dir)).is_ok();
    wavegen::tasks::AudioModel::load(dir).is_ok() && info
}

fn run_all(cases: usize, seed: u64) {
    let f = fixtures();
    let settings = wavegen::data::wav_folder::AudioSettings { sample_rate: 16000, ..Default::default() };
    let wav_path = f.root.join("m.wav");
    let idx_path = f.root.join("m.idx");
    let counts = [
        fuzz(
            "wav",
            seed,
            cases,
            |r| mutate(&f.wav, r),
            |b| {
                std::fs::write(&wav_path, b).unwrap();
                match wavegen::audio::wav::read_mono(&wav_path) {
                    Ok(audio) => {
                        let _ = settings.encode(&audio);
                        settings.encode_for_scoring(&audio).is_ok()
                    }
                    Err(_) => false,
                }
            },
        ),
        fuzz(
            "idx",
            seed,
            cases,
            |r| mutate(&f.idx, r),
            |b| {
                std::fs::write(&idx_path, b).unwrap();
                wavegen::data::mnist::read_images(&idx_path).is_ok()
            },
        ),
        fuzz(
            "idx.gz",
            seed,
            cases,
            |r| mutate(&f.idx_gz, r),
            |b| {
                std::fs::write(&idx_path, b).unwrap();
                wavegen::data::mnist::read_images(&idx_path).is_ok()
            },
        ),
        fuzz(
            "config.json",
            seed,
            cases,
            |r| mutate_json(&f.config, r),
            |b| load_checkpoint(&f.root.join("fuzz-config"), b, &f.weights),
        ),
        fuzz(
            "model.safetensors",
            seed,
            cases,
            |r| mutate(&f.weights, r),
            |b| load_checkpoint(&f.root.join("fuzz-weights"), f.config.as_bytes(), b),
        ),
    ];
    let total: usize = counts.iter().map(|c| c.0 + c.1).sum();
    eprintln!("fuzz: {total} mutated inputs through 5 loaders (seed {seed}): no panic, no allocation over 1 GiB");
}

#[test]
fn mutated_inputs_never_panic_or_allocate_without_bound() {
    run_all(1000, 1);
}

#[test]
#[ignore = "long: 20 times the default number of cases"]
fn mutated_inputs_never_panic_long_run() {
    run_all(16_000, 2);
}
