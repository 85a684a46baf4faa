//! `wavegen mel`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use wavegen::tasks::features::{self, MelOptions};

#[derive(Debug, Args)]
pub struct MelArgs {
    /// The WAV file (any rate, depth and channel count; mixed to mono).
    input: PathBuf,
    /// Where to write the features: float32 .npy of shape (frames, bands).
    #[arg(long, short)]
    out: PathBuf,
    /// Resample to this rate first, Hz [default: the file's own].
    #[arg(long)]
    sample_rate: Option<u32>,
    /// FFT size and window length, a power of two [default: about 64 ms: 512 at 8 kHz, 1024 at 16 kHz].
    #[arg(long)]
    n_fft: Option<usize>,
    /// Samples between frames [default: a quarter of --n-fft].
    #[arg(long)]
    hop: Option<usize>,
    /// Mel bands [default: 80 at 16 kHz and above, 64 below].
    #[arg(long)]
    mel_bands: Option<usize>,
    /// Lowest filter frequency, Hz [default: 0].
    #[arg(long)]
    fmin: Option<f64>,
    /// Highest filter frequency, Hz [default: half the rate].
    #[arg(long)]
    fmax: Option<f64>,
    /// Print one JSON object on stdout.
    #[arg(long)]
    json: bool,
}

pub fn run(a: MelArgs) -> anyhow::Result<ExitCode> {
    let opts = MelOptions {
        sample_rate: a.sample_rate,
        n_fft: a.n_fft,
        hop: a.hop,
        bands: a.mel_bands,
        fmin: a.fmin,
        fmax: a.fmax,
    };
    let s = features::mel(&a.input, &a.out, &opts)?;
    if a.json {
        println!("{}", serde_json::to_string(&s)?);
    } else {
        let c = &s.config;
        println!(
            "{}: {} frames × {} bands ({:.2} s at {} Hz; FFT {}, hop {}, {}–{} Hz)",
            s.out.display(),
            s.frames,
            c.bands,
            s.seconds,
            c.sample_rate,
            c.n_fft,
            c.hop,
            c.fmin,
            c.fmax
        );
    }
    Ok(ExitCode::SUCCESS)
}
