//! `wavegen vocode`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use wavegen::core::sample::SamplerConfig;
use wavegen::tasks::vocode::{VocodeOptions, vocode};

use super::report::Bars;

#[derive(Debug, Args)]
pub struct VocodeArgs {
    /// A WAV file (copy synthesis: analysed with the vocoder's own settings), or a .npy of
    /// log-mel features (frames, bands) made with the same analysis (`wavegen mel`).
    input: PathBuf,
    /// The vocoder: a checkpoint trained with `wavegen train DIR --condition mel`.
    #[arg(long)]
    checkpoint: PathBuf,
    /// Output WAV file (16-bit PCM at the vocoder's rate): as long as the input WAV, or
    /// (frames − 1) × hop samples for features.
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
    /// Label to condition on (for vocoders trained with --labels too).
    #[arg(long)]
    label: Option<String>,
    /// Exact tanh and exp in the engine instead of the fast approximations.
    #[arg(long)]
    exact: bool,
    /// Measure the result against the input WAV (log-spectral distance, mel-cepstral
    /// distortion), beside Griffin-Lim from the same features (written to OUT-griffin-lim.wav)
    /// and the input through μ-law coding.
    #[arg(long)]
    compare: bool,
    /// Griffin-Lim iterations for --compare.
    #[arg(long, default_value_t = 100)]
    griffin_lim_iterations: usize,
    /// Print the summary as one JSON object on stdout.
    #[arg(long)]
    json: bool,
}

pub fn run(a: VocodeArgs) -> anyhow::Result<ExitCode> {
    let opts = VocodeOptions {
        checkpoint: a.checkpoint,
        input: a.input,
        out: a.out,
        sampler: SamplerConfig { temperature: a.temperature, top_k: a.top_k, top_p: a.top_p },
        seed: a.seed,
        label: a.label,
        exact: a.exact,
        compare: a.compare,
        griffin_lim_iterations: a.griffin_lim_iterations,
    };
    let mut bars = Bars::new(0, a.json);
    let summary = vocode(&opts, &mut bars);
    bars.finish();
    let s = summary?;
    if a.json {
        super::print_json(&s)?;
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "wrote {} ({:.2} s at {} Hz from {} frames): {:.0} samples/s, {:.2}× real time on one core ({})",
        s.out.display(),
        s.seconds,
        s.sample_rate,
        s.frames,
        s.samples_per_second,
        s.realtime_factor,
        s.kernels
    );
    if let Some(c) = &s.comparison {
        println!("distance from the original   log-spectral (dB)   mel-cepstral (dB)");
        for (name, d) in [
            ("WaveNet vocoder", c.wavenet),
            ("Griffin-Lim", c.griffin_lim),
            ("μ-law of the original", c.mulaw_original),
        ] {
            println!("  {name:<26} {:>17.2}   {:>17.2}", d.lsd_db, d.mcd_db);
        }
        println!("Griffin-Lim audio: {}", c.griffin_lim_out.display());
    }
    Ok(ExitCode::SUCCESS)
}
