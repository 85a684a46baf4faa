//! `wavegen generate`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use wavegen::core::sample::SamplerConfig;
use wavegen::tasks::generate::{GenerateOptions, Method, generate};

use super::report::Bars;

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Checkpoint directory [default: the real-time music model built into wavegen].
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// Seconds of audio to generate.
    #[arg(long, default_value_t = 2.0)]
    seconds: f64,
    /// Output WAV file (16-bit PCM at the model rate).
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    sampling: Sampling,
    /// Start from the end of this WAV file instead of silence.
    #[arg(long)]
    prime: Option<PathBuf>,
    /// Label to condition on (for models trained with --labels).
    #[arg(long)]
    label: Option<String>,
    /// How to compute: engine (fast f32 kernels), stepper (cached queues on candle tensors)
    /// or naive (the whole receptive field recomputed for every sample).
    #[arg(long, value_enum, default_value = "engine")]
    method: MethodArg,
    /// The same as --method naive.
    #[arg(long)]
    naive: bool,
    /// Generate this many independent streams together (seeds SEED, SEED+1, …); one file each
    /// (OUT-0.wav, …) unless --multichannel.
    #[arg(long, default_value_t = 1)]
    streams: usize,
    /// Write the streams as the channels of one file.
    #[arg(long)]
    multichannel: bool,
    /// Exact tanh and exp in the engine instead of the fast approximations.
    #[arg(long)]
    exact: bool,
    /// Also draw a log-magnitude spectrogram of the (first) stream to this PNG.
    #[arg(long)]
    spectrogram: Option<PathBuf>,
    /// Print a JSON summary on stdout.
    #[arg(long)]
    json: bool,
}

/// How codes are drawn, shared by `generate` and `vocode`.
#[derive(Debug, Args)]
pub struct Sampling {
    /// Sampling temperature: below 1 is more conservative, 0 always takes the likeliest code.
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f32,
    /// Sample only from the k likeliest codes.
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Sample only from the likeliest codes whose probability adds up to p.
    #[arg(long)]
    pub top_p: Option<f32>,
    /// Seed: the same seed gives the same audio.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl Sampling {
    /// The sampler these flags describe.
    pub fn sampler(&self) -> SamplerConfig {
        SamplerConfig { temperature: self.temperature, top_k: self.top_k, top_p: self.top_p }
    }
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum MethodArg {
    Engine,
    Stepper,
    Naive,
}

pub fn run(a: GenerateArgs, threads: Option<usize>) -> anyhow::Result<ExitCode> {
    let opts = GenerateOptions {
        checkpoint: a.checkpoint,
        seconds: a.seconds,
        out: Some(a.out),
        sampler: a.sampling.sampler(),
        seed: a.sampling.seed,
        prime: a.prime,
        label: a.label,
        method: match (a.naive, a.method) {
            (true, _) | (_, MethodArg::Naive) => Method::Naive,
            (_, MethodArg::Stepper) => Method::Stepper,
            (_, MethodArg::Engine) => Method::Engine,
        },
        streams: a.streams,
        multichannel: a.multichannel,
        exact: a.exact,
        spectrogram: a.spectrogram,
        threads: threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
        keep: false,
    };
    let mut bars = Bars::new(a.json);
    let summary = generate(&opts, &mut bars);
    bars.finish();
    let s = summary?;
    if a.json {
        super::print_json(&s)?;
    } else {
        let files: Vec<String> = s.out.iter().map(|p| p.display().to_string()).collect();
        println!(
            "wrote {} ({:.2} s at {} Hz, {} stream(s)): {:.0} samples/s, {:.2}× real time ({:?}{})",
            files.join(", "),
            s.seconds,
            s.sample_rate,
            s.streams,
            s.samples_per_second,
            s.realtime_factor,
            s.method,
            s.kernels.map_or(String::new(), |k| format!(", {k}"))
        );
    }
    Ok(ExitCode::SUCCESS)
}
