//! The command line: clap definitions and one `run` that dispatches to the library. Files in
//! this folder parse, validate and resolve defaults, then call one function of
//! `wavegen::tasks`; they hold no model code.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod data;
mod eval;
mod features;
mod generate;
mod mnist;
mod play;
mod report;
mod train;
mod vocode;

/// Autoregressive generative models of audio (WaveNet) and images, on the CPU.
#[derive(Debug, Parser)]
#[command(name = "wavegen", version, about, long_about = None)]
pub struct Cli {
    /// Threads for tensor operations and for the engine's streams (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once; boxing would only add noise
enum Command {
    /// Train a WaveNet on a folder of WAV files (any rate, depth, channels).
    Train(train::TrainArgs),
    /// Generate audio from a checkpoint and write it as WAV.
    Generate(generate::GenerateArgs),
    /// Generate in real time and play through the speakers.
    Play(play::PlayArgs),
    /// Score WAV files under a checkpoint: NLL in bits per sample.
    Eval(eval::EvalArgs),
    /// Describe a checkpoint: config, parameters, receptive field, training.
    Info(eval::InfoArgs),
    /// Datasets: download them (`data fetch`), or see which are present (`data list`).
    Data(data::DataArgs),
    /// A WAV file's log-mel spectrogram as .npy (the features a vocoder is conditioned on).
    Mel(features::MelArgs),
    /// Audio from a log-mel spectrogram (a WAV's, or a .npy) with a vocoder checkpoint.
    Vocode(vocode::VocodeArgs),
    /// Print a shell completion script: `wavegen completions bash > ~/.local/share/bash-completion/completions/wavegen`.
    Completions(data::CompletionsArgs),
    /// The image models on MNIST (FVSBN, NADE, MADE, LSTM, GRU, transformer, PixelCNN, Gated PixelCNN on binarized digits; RNADE on grey levels): train, eval, sample, complete, score, compact.
    Mnist(mnist::MnistArgs),
}

/// Runs the parsed command.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    if let Some(n) = cli.threads {
        // Each thread costs a stack and start-up time; more than this is a typo, not a machine.
        const MAX_THREADS: usize = 1024;
        anyhow::ensure!((1..=MAX_THREADS).contains(&n), "--threads is {n}; it must be from 1 to {MAX_THREADS}");
        // candle's CPU kernels use the global rayon pool, sized from this variable when first used.
        // SAFETY: set before any other thread exists.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", n.to_string()) };
    }
    wavegen::init_process();
    match cli.command {
        Command::Train(args) => train::run(args),
        Command::Generate(args) => generate::run(args, cli.threads),
        Command::Play(args) => play::run(args),
        Command::Eval(args) => eval::run_eval(args),
        Command::Info(args) => eval::run_info(args),
        Command::Mnist(args) => mnist::run(args),
        Command::Data(args) => data::run(args),
        Command::Mel(args) => features::run(args),
        Command::Vocode(args) => vocode::run(args),
        Command::Completions(args) => data::completions(args),
    }
}

/// The data folder: `--data`, else `$WAVEGEN_DATA`, else `datasets/`.
pub fn data_dir(flag: Option<PathBuf>) -> PathBuf {
    flag.or_else(|| std::env::var_os("WAVEGEN_DATA").map(PathBuf::from)).unwrap_or_else(|| PathBuf::from("datasets"))
}

/// Prints a summary as one JSON object on stdout.
pub fn print_json<T: serde::Serialize>(value: &T) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    serde_json::to_writer(&mut out, value)?;
    writeln!(out)?;
    Ok(())
}

/// The flag raised by the first Ctrl-C, SIGTERM or SIGHUP: the library finishes its step,
/// writes a checkpoint and stops cleanly. A second signal exits at once with 128 + its number,
/// but never during a checkpoint commit: it waits for the commit to finish first.
pub fn stop_flag() -> anyhow::Result<&'static std::sync::atomic::AtomicBool> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    use std::sync::atomic::{AtomicBool, Ordering};
    static STOP: AtomicBool = AtomicBool::new(false);
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])?;
    std::thread::Builder::new().name("signals".into()).spawn(move || {
        for signal in signals.forever() {
            SIGNAL.store(signal, Ordering::SeqCst);
            if STOP.swap(true, Ordering::SeqCst) {
                // Held until exit, so no commit can start either.
                let _commit = wavegen::core::checkpoint::COMMIT.lock();
                std::process::exit(128 + signal);
            }
            eprintln!("\nstopping after this step (send the signal again to quit at once)");
        }
    })?;
    Ok(&STOP)
}

static SIGNAL: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

/// The exit code of a run that a signal stopped: 128 + the signal's number (130 for Ctrl-C,
/// 143 for SIGTERM, 129 for SIGHUP); success if none did.
pub fn stopped_exit_code() -> ExitCode {
    match SIGNAL.load(std::sync::atomic::Ordering::SeqCst) {
        0 => ExitCode::SUCCESS,
        signal => ExitCode::from((128 + signal) as u8),
    }
}
