//! `wavegen vocode`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use wavegen::tasks::vocode::{VocodeOptions, vocode};

use super::report::Bars;

#[derive(Debug, Args)]
pub struct VocodeArgs {
    /// WAV files (copy synthesis: analysed with the vocoder's own settings), folders of them,
    /// or .npy files of log-mel features (frames, bands) made with the same analysis (`wavegen
    /// mel`).
    #[arg(required_unless_present = "held_out")]
    inputs: Vec<PathBuf>,
    /// Vocode the files the checkpoint held out of its training (its validation files).
    #[arg(long, conflicts_with = "inputs")]
    held_out: bool,
    /// The vocoder: a checkpoint trained with `wavegen train DIR --condition mel`.
    #[arg(long)]
    checkpoint: PathBuf,
    /// Output WAV file (16-bit PCM at the vocoder's rate: as long as the input WAV, or
    /// (frames − 1) × hop samples for features); for several inputs, a folder of them.
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    sampling: super::generate::Sampling,
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
    /// With --compare: also draw the original's, Griffin-Lim's and the vocoder's spectrograms,
    /// one above the other, as OUT.png (one per output).
    #[arg(long, requires = "compare")]
    spectrograms: bool,
    /// Print the summary as one JSON object on stdout.
    #[arg(long)]
    json: bool,
}

pub fn run(a: VocodeArgs) -> anyhow::Result<ExitCode> {
    let opts = VocodeOptions {
        checkpoint: a.checkpoint,
        inputs: a.inputs,
        out: a.out,
        sampler: a.sampling.sampler(),
        seed: a.sampling.seed,
        label: a.label,
        exact: a.exact,
        compare: a.compare,
        griffin_lim_iterations: a.griffin_lim_iterations,
        spectrograms: a.spectrograms,
    };
    let mut bars = Bars::new(a.json);
    let summary = vocode(&opts, &mut bars);
    bars.finish();
    let s = summary?;
    if a.json {
        super::print_json(&s)?;
        return Ok(ExitCode::SUCCESS);
    }
    for f in &s.files {
        println!(
            "wrote {} ({:.2} s at {} Hz from {} frames): {:.2}× real time on one core ({})",
            f.out.display(),
            f.seconds,
            f.sample_rate,
            f.frames,
            f.realtime_factor,
            f.kernels
        );
        if let Some(c) = &f.comparison {
            print_distances(&[
                ("WaveNet vocoder", c.wavenet),
                ("Griffin-Lim", c.griffin_lim),
                ("μ-law of the original", c.mulaw_original),
            ]);
        }
    }
    if let (Some(mean), true) = (&s.mean, s.files.len() > 1) {
        println!("mean over {} files, {:.2}× real time:", s.files.len(), s.realtime_factor);
        print_distances(&[
            ("WaveNet vocoder", mean.wavenet),
            ("Griffin-Lim", mean.griffin_lim),
            ("μ-law of the original", mean.mulaw_original),
        ]);
    }
    Ok(ExitCode::SUCCESS)
}

fn print_distances(rows: &[(&str, wavegen::tasks::vocode::Distances)]) {
    println!("  {:<24} {:>18} {:>18}", "distance from original", "log-spectral (dB)", "mel-cepstral (dB)");
    for (name, d) in rows {
        println!("  {name:<24} {:>18.2} {:>18.2}", d.lsd_db, d.mcd_db);
    }
}
