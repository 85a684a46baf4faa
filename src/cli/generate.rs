//! `wavegen generate`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use wavegen::core::sample::SamplerConfig;
use wavegen::tasks::generate::{GenerateOptions, generate};

use super::report::Bars;

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Checkpoint directory.
    #[arg(long)]
    checkpoint: PathBuf,
    /// Seconds of audio to generate.
    #[arg(long, default_value_t = 2.0)]
    seconds: f64,
    /// Output WAV file (16-bit PCM at the model rate).
    #[arg(long)]
    out: PathBuf,
    /// Sampling temperature: below 1 is more conservative, 0 always takes the likeliest code.
    #[arg(long, default_value_t = 1.0)]
    temperature: f32,
    /// Sample only from the k likeliest codes.
    #[arg(long)]
    top_k: Option<usize>,
    /// Sample only from the likeliest codes whose probability adds up to p.
    #[arg(long)]
    top_p: Option<f32>,
    /// Seed: the same seed gives the same audio.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Start from the end of this WAV file instead of silence.
    #[arg(long)]
    prime: Option<PathBuf>,
    /// Label to condition on (for models trained with --labels).
    #[arg(long)]
    label: Option<String>,
    /// Recompute the whole receptive field for every sample (slow; for comparison).
    #[arg(long)]
    naive: bool,
    /// Print a JSON summary on stdout.
    #[arg(long)]
    json: bool,
}

pub fn run(a: GenerateArgs) -> anyhow::Result<ExitCode> {
    let opts = GenerateOptions {
        checkpoint: a.checkpoint,
        seconds: a.seconds,
        out: Some(a.out),
        sampler: SamplerConfig {
            temperature: a.temperature,
            top_k: a.top_k,
            top_p: a.top_p,
        },
        seed: a.seed,
        prime: a.prime,
        label: a.label,
        naive: a.naive,
    };
    let mut bars = Bars::new(0, a.json);
    let summary = generate(&opts, &mut bars);
    bars.finish();
    let s = summary?;
    if a.json {
        super::print_json(&s)?;
    } else {
        println!(
            "wrote {} ({:.2} s at {} Hz): {:.0} samples/s, {:.3}× real time ({})",
            s.out
                .as_ref()
                .map_or("-".into(), |p| p.display().to_string()),
            s.seconds,
            s.sample_rate,
            s.samples_per_second,
            s.realtime_factor,
            s.method
        );
    }
    Ok(ExitCode::SUCCESS)
}
