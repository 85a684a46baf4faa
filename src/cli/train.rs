//! `wavegen train`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::builder::{PossibleValue, PossibleValuesParser};
use clap::{Args, ValueEnum};
use wavegen::core::optim::AdamWConfig;
use wavegen::core::train::{Precision, TrainConfig};
use wavegen::data::wav_folder::AudioSettings;
use wavegen::models::{ModelConfig, Settings, wavenet};
use wavegen::tasks::train::{AudioModelSpec, TrainOptions, train};

use super::report::Bars;

/// `--model`: WaveNet and the registry's sequence models for audio.
fn audio_model() -> PossibleValuesParser {
    let wavenet = PossibleValue::new("wavenet").help("WaveNet (the presets and flags below)");
    let others = ModelConfig::audio_models().into_iter().map(|(name, help)| PossibleValue::new(name).help(help));
    PossibleValuesParser::new(std::iter::once(wavenet).chain(others))
}

/// Named model sizes.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Preset {
    /// 4 layers, 8 channels: 50 steps in seconds (smoke tests).
    Tiny,
    /// 2 cycles of 10 layers, 32 residual/gate and 128 skip/head channels.
    Default,
    /// 1 cycle of 12 layers (receptive field 4,096), 32 residual/gate, 64 skip/head channels:
    /// the model `wavegen play` runs in real time.
    Realtime,
}

/// `--condition`.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Condition {
    /// A log-mel spectrogram (a vocoder).
    Mel,
}

/// `--precision`.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum PrecisionArg {
    /// Exact f32 products.
    F32,
    /// bfloat16 products summed in f32 (AMX).
    Bf16,
}

impl From<PrecisionArg> for Precision {
    fn from(p: PrecisionArg) -> Self {
        match p {
            PrecisionArg::F32 => Precision::F32,
            PrecisionArg::Bf16 => Precision::Bf16,
        }
    }
}

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Folder of WAV files, searched recursively [default: DATA/fsdd/recordings; with --resume,
    /// the checkpoint's folder].
    dir: Option<PathBuf>,
    /// Checkpoint directory to write (model.safetensors, optimizer.safetensors, config.json).
    #[arg(long)]
    out: PathBuf,
    /// Continue the checkpoint in --out (weights, optimizer, step, data position).
    #[arg(long)]
    resume: bool,
    /// The model: WaveNet, or a sequence model of the core read over each window from its
    /// start (for comparison; `generate` and `play` run WaveNets).
    #[arg(long, value_parser = audio_model(), default_value = "wavenet")]
    model: String,
    /// WaveNet's size; the WaveNet flags below override single settings.
    #[arg(long, value_enum, default_value = "default")]
    preset: Preset,
    /// LSTM, GRU: hidden units [default: 256]; transformer: width [default: 128].
    #[arg(long)]
    hidden: Option<usize>,
    /// LSTM, GRU: stacked layers [default: 1]; transformer: blocks [default: 4].
    #[arg(long)]
    layers: Option<usize>,
    /// Transformer: attention heads [default: 4].
    #[arg(long)]
    heads: Option<usize>,
    /// LSTM, GRU: size of each μ-law code's embedding [default: 32].
    #[arg(long)]
    embedding: Option<usize>,
    /// Train until this many steps in total [default: 2000, tiny: 50; with --resume, the run's own
    /// end].
    #[arg(long)]
    steps: Option<u64>,
    /// Stop after this many minutes of this run (a checkpoint is written on stopping).
    #[arg(long)]
    minutes: Option<f64>,
    /// Length of the cosine learning-rate decay in steps [default: --steps]. With --resume it moves
    /// the end of the decay (a warm restart); without it, a resumed run keeps its schedule.
    #[arg(long)]
    decay_steps: Option<u64>,
    /// Peak learning rate.
    #[arg(long, default_value_t = 2e-3)]
    lr: f64,
    /// Windows per batch [default: 16,384 / --window; tiny: 4]. Each thread trains on whole
    /// windows, so use at least as many windows as --threads.
    #[arg(long)]
    batch_size: Option<usize>,
    /// Target samples per window. Each window also carries the receptive field as context, so
    /// long windows waste less (2 × 8,192 trains 1.3× faster per sample than 8 × 2,048), but
    /// past the end of a file a window is padding [default: the median file length rounded up
    /// to a power of two, 1,024–8,192; tiny: 256].
    #[arg(long)]
    window: Option<usize>,
    /// Precision of the training products: f32, or bf16 (bfloat16 products summed in f32, on
    /// CPUs with AMX-BF16; weights and optimizer stay f32) [default: bf16 where the CPU has
    /// AMX-BF16, else f32; with --resume, the run's].
    #[arg(long, value_enum)]
    precision: Option<PrecisionArg>,
    /// Keep a moving average of the weights with this decay per step (0.999: about the last
    /// 1,000 steps); validation and the saved model use the average (Polyak averaging). With
    /// --resume, turns it on or changes it [default: no averaging].
    #[arg(long)]
    average: Option<f64>,
    /// Fraction of the files held out for validation (chosen from the file names).
    #[arg(long, default_value_t = 0.05)]
    val_fraction: f64,
    /// Use this folder for validation instead of holding files out.
    #[arg(long)]
    val_dir: Option<PathBuf>,
    /// Validation windows per evaluation.
    #[arg(long, default_value_t = 48)]
    val_windows: usize,
    /// Evaluate every N steps [default: 100, tiny: 25].
    #[arg(long)]
    eval_every: Option<u64>,
    /// Checkpoint every N steps [default: 100, tiny: 25].
    #[arg(long)]
    checkpoint_every: Option<u64>,
    /// Condition on a label: the name of each file's first-level subfolder.
    #[arg(long)]
    labels: bool,
    /// Train a vocoder: condition the WaveNet on the log-mel spectrogram of its own audio
    /// (computed once and cached with the decoded corpus; `wavegen vocode` then turns features
    /// into audio). Works with --labels.
    #[arg(long, value_enum)]
    condition: Option<Condition>,
    /// With --condition mel: mel bands [default: 80 at 16 kHz and above, 64 below].
    #[arg(long, requires = "condition")]
    mel_bands: Option<usize>,
    /// With --condition mel: FFT size and window, a power of two [default: about 64 ms].
    #[arg(long, requires = "condition")]
    n_fft: Option<usize>,
    /// With --condition mel: samples between frames, the upsampling factor [default: --n-fft / 4].
    #[arg(long, requires = "condition")]
    hop: Option<usize>,
    /// With --condition mel: lowest filter frequency, Hz [default: 0].
    #[arg(long, requires = "condition")]
    fmin: Option<f64>,
    /// With --condition mel: highest filter frequency, Hz [default: half the rate].
    #[arg(long, requires = "condition")]
    fmax: Option<f64>,
    /// With --condition mel: channels of the frame network's output (R per row).
    #[arg(long, default_value_t = 64, requires = "condition")]
    cond_channels: usize,
    /// With --condition mel: frames the frame network reads on either side of each frame
    /// (2c + 1 at a time). It is the vocoder's look-ahead: sample t sees the features up to
    /// frame ⌊t / hop⌋ + c.
    #[arg(long, default_value_t = 1, requires = "condition")]
    frame_context: usize,
    /// With --condition mel: channels of a hidden layer in the frame network (two tanh layers
    /// instead of one); 0 for none.
    #[arg(long, default_value_t = 0, requires = "condition")]
    frame_hidden: usize,
    /// With --condition mel: rows the frame network gives each frame, a learned upsampling by
    /// this factor before each row is repeated over its hop / K samples (must divide --hop).
    /// 1 repeats one row over the whole hop.
    #[arg(long, default_value_t = 1, requires = "condition")]
    subframes: usize,
    /// Also train on copies of the training files played this many times faster, pitch and
    /// tempo together (speed perturbation: `0.9,1.1` triples the data; a vocoder's features are
    /// computed from each copy). 1 stands for the files as recorded, always trained on; the
    /// validation files are never copied. With --resume it replaces the run's list (`1` turns
    /// it off) [default: none; with --resume, the run's].
    #[arg(long, value_delimiter = ',', num_args = 1..)]
    speed_perturbation: Option<Vec<f64>>,
    /// Model sample rate in Hz (files are resampled to it).
    #[arg(long, default_value_t = 16000)]
    sample_rate: u32,
    /// Trim leading/trailing audio quieter than this many dB below the file's peak.
    #[arg(long, default_value_t = 40.0)]
    trim_db: f32,
    /// Layers per dilation cycle (dilations 1, 2, 4, …).
    #[arg(long)]
    layers_per_cycle: Option<usize>,
    /// Dilation cycles.
    #[arg(long)]
    cycles: Option<usize>,
    /// Width of the dilated convolutions.
    #[arg(long)]
    kernel_width: Option<usize>,
    /// Residual channels.
    #[arg(long)]
    residual_channels: Option<usize>,
    /// Gate channels.
    #[arg(long)]
    gate_channels: Option<usize>,
    /// Skip channels.
    #[arg(long)]
    skip_channels: Option<usize>,
    /// Head channels.
    #[arg(long)]
    head_channels: Option<usize>,
    /// Seed of the initial weights and of the data order.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Data folder for the default dataset [env: WAVEGEN_DATA; default: datasets].
    #[arg(long)]
    data: Option<PathBuf>,
    /// Where decoded corpora are cached [env: WAVEGEN_CACHE; default: ~/.cache/wavegen].
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// Print the final summary as one JSON object on stdout.
    #[arg(long)]
    json: bool,
}

fn cache_dir(flag: Option<PathBuf>) -> PathBuf {
    flag.or_else(|| std::env::var_os("WAVEGEN_CACHE").map(PathBuf::from))
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("wavegen")))
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/wavegen")))
        .unwrap_or_else(|| std::env::temp_dir().join("wavegen-cache"))
}

pub fn run(a: TrainArgs) -> anyhow::Result<ExitCode> {
    let tiny = matches!(a.preset, Preset::Tiny);
    let mut model = match a.preset {
        Preset::Tiny => wavenet::Config::tiny(),
        Preset::Default => wavenet::Config::default(),
        Preset::Realtime => wavenet::Config::realtime(),
    };
    let overrides = [
        (&mut model.layers_per_cycle, a.layers_per_cycle),
        (&mut model.cycles, a.cycles),
        (&mut model.kernel_width, a.kernel_width),
        (&mut model.residual_channels, a.residual_channels),
        (&mut model.gate_channels, a.gate_channels),
        (&mut model.skip_channels, a.skip_channels),
        (&mut model.head_channels, a.head_channels),
    ];
    for (field, value) in overrides {
        if let Some(v) = value {
            *field = v;
        }
    }
    let steps = a.steps.unwrap_or(if tiny { 50 } else { 2000 });
    let every = if tiny { 25 } else { 100 };
    let train_cfg = TrainConfig {
        max_steps: steps,
        max_minutes: a.minutes,
        lr: a.lr,
        min_lr: a.lr * wavegen::core::train::FINAL_LR_FRACTION,
        warmup_steps: (steps / 50).clamp(1, 200),
        decay_steps: a.decay_steps.unwrap_or(steps),
        adamw: AdamWConfig { average_decay: a.average.unwrap_or(0.0), ..AdamWConfig::default() },
        eval_every: a.eval_every.unwrap_or(every),
        checkpoint_every: a.checkpoint_every.unwrap_or(every),
        precision: a.precision.map_or_else(wavegen::layers::matmul::fastest_precision, Precision::from),
        dropout: 0.0,
    };
    let opts = TrainOptions {
        // On resume the checkpoint knows its folder; a DIR given then replaces it.
        data_dir: match (a.dir, a.resume) {
            (Some(dir), _) => Some(dir),
            (None, true) => None,
            (None, false) => Some(super::data_dir(a.data).join("fsdd/recordings")),
        },
        val_dir: a.val_dir,
        val_fraction: a.val_fraction,
        out: a.out,
        resume: a.resume,
        change_steps: if a.resume { a.steps } else { None },
        reschedule_decay: if a.resume { a.decay_steps } else { None },
        change_precision: if a.resume { a.precision.map(Precision::from) } else { None },
        change_average: if a.resume { a.average } else { None },
        speed_perturbation: a.speed_perturbation.map(|s| s.into_iter().filter(|&x| x != 1.0).collect()),
        model: if a.model == "wavenet" {
            AudioModelSpec::Wavenet(model)
        } else {
            let settings = Settings {
                hidden: a.hidden.into_iter().collect(),
                layers: a.layers,
                heads: a.heads,
                embedding: a.embedding,
                seed: a.seed,
                ..Settings::default()
            };
            AudioModelSpec::Sequence { name: a.model, settings }
        },
        labels: a.labels,
        condition: match a.condition {
            None => None,
            Some(Condition::Mel) => {
                let mel = wavegen::tasks::features::mel_config(
                    a.sample_rate,
                    &wavegen::tasks::features::MelOptions {
                        sample_rate: Some(a.sample_rate),
                        n_fft: a.n_fft,
                        hop: a.hop,
                        bands: a.mel_bands,
                        fmin: a.fmin,
                        fmax: a.fmax,
                    },
                )?;
                Some(wavegen::tasks::train::VocoderOptions {
                    mel,
                    channels: a.cond_channels,
                    subframes: a.subframes,
                    context: a.frame_context,
                    hidden: a.frame_hidden,
                })
            }
        },
        audio: AudioSettings { sample_rate: a.sample_rate, trim_db: a.trim_db, ..AudioSettings::default() },
        train: train_cfg,
        window: a.window.or(tiny.then_some(256)),
        batch_size: a.batch_size.or(tiny.then_some(4)),
        max_val_windows: a.val_windows,
        seed: a.seed,
        cache_dir: cache_dir(a.cache_dir),
    };
    let stop = super::stop_flag()?;
    let mut bars = Bars::new(a.json);
    let summary = train(&opts, &mut bars, stop);
    bars.finish();
    let summary = summary?;
    if a.json {
        super::print_json(&summary)?;
    } else {
        println!(
            "{} steps ({:?}), validation {} bits/sample (best {}), {:.0} s of training; checkpoint in {}",
            summary.steps,
            summary.stopped,
            summary.val_bits_per_sample.map_or("-".into(), |b| format!("{b:.4}")),
            summary.best_val_bits_per_sample.map_or("-".into(), |b| format!("{b:.4}")),
            summary.seconds,
            summary.checkpoint.display()
        );
    }
    Ok(super::stopped_exit_code())
}
