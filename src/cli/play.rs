//! `wavegen play`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use wavegen::audio::output::list_devices;
use wavegen::core::sample::SamplerConfig;
use wavegen::tasks::play::{PlayOptions, play};

use super::report::Bars;

#[derive(Debug, Args)]
pub struct PlayArgs {
    /// Checkpoint directory [default: the real-time music model built into wavegen].
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// Sampling temperature: below 1 is more conservative.
    #[arg(long, default_value_t = 1.0)]
    temperature: f32,
    /// Seed: the same seed gives the same audio.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Label to condition on (for models trained with --labels).
    #[arg(long)]
    label: Option<String>,
    /// Stop after this many seconds [default: until Ctrl-C].
    #[arg(long)]
    seconds: Option<f64>,
    /// Output device: any part of its name (see --list-devices) [default: the system's default].
    #[arg(long)]
    device: Option<String>,
    /// List the output devices and exit.
    #[arg(long)]
    list_devices: bool,
    /// Audio generated ahead of playback, in milliseconds: more survives slow moments.
    #[arg(long, default_value_t = 200.0)]
    latency_ms: f64,
    /// Also write what was played to this WAV file.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Exact tanh and exp instead of the fast approximations.
    #[arg(long)]
    exact: bool,
    /// With a vocoder checkpoint: play the audio it makes from this WAV's log-mel spectrogram
    /// (or from features in a .npy), as it is made. Stops at the input's end.
    #[arg(long, value_name = "IN")]
    vocode: Option<PathBuf>,
    /// Print a JSON summary on stdout.
    #[arg(long)]
    json: bool,
}

pub fn run(a: PlayArgs) -> anyhow::Result<ExitCode> {
    if a.list_devices {
        let devices = list_devices()?;
        if devices.is_empty() {
            println!("no output devices");
        }
        for d in devices {
            println!("{d}");
        }
        return Ok(ExitCode::SUCCESS);
    }
    let stop = super::stop_flag()?;
    let opts = PlayOptions {
        checkpoint: a.checkpoint,
        sampler: SamplerConfig { temperature: a.temperature, ..Default::default() },
        seed: a.seed,
        label: a.label,
        seconds: a.seconds,
        device: a.device,
        latency_ms: a.latency_ms,
        out: a.out,
        exact: a.exact,
        vocode: a.vocode,
    };
    let mut bars = Bars::new(a.json);
    let summary = play(&opts, &mut bars, stop);
    bars.finish();
    let s = summary?;
    if a.json {
        super::print_json(&s)?;
    } else {
        println!(
            "played {:.1} s on {} ({} Hz), {:.2}× real time, {} underruns{}",
            s.seconds,
            s.device,
            s.device_rate,
            s.realtime_factor,
            s.underruns,
            s.out.as_ref().map_or(String::new(), |p| format!("; wrote {}", p.display()))
        );
    }
    Ok(ExitCode::SUCCESS)
}
