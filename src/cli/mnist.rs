//! `wavegen mnist train|eval|sample|complete|score`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::builder::{PossibleValue, PossibleValuesParser};
use clap::{Args, Subcommand, ValueEnum};
use wavegen::core::sample::Method;
use wavegen::layers::nade::Activation;
use wavegen::models::{ModelConfig, Settings};
use wavegen::tasks::mnist::{self, MnistTrainOptions, Split};

use super::report::Bars;

#[derive(Debug, Args)]
pub struct MnistArgs {
    #[command(subcommand)]
    command: MnistCommand,
}

#[derive(Debug, Subcommand)]
enum MnistCommand {
    /// Train an image model (FVSBN, NADE, MADE, LSTM, GRU, transformer, PixelCNN, Gated
    /// PixelCNN) on static binarized MNIST, or RNADE on dequantised grey MNIST.
    Train(Box<TrainArgs>),
    /// Test NLL in nats per image, with a 95% confidence interval.
    Eval(EvalArgs),
    /// Sample digits into a PNG grid.
    Sample(SampleArgs),
    /// Give the top half of test digits, sample the bottom half (PNG grid: original, completions).
    Complete(CompleteArgs),
    /// NLL of every image as CSV (index,nll_nats), lowest likelihood first: anomaly scores.
    Score(ScoreArgs),
    /// Copy a checkpoint for shipping: f16 weights, unused (masked-out) weights zeroed, gzip-compressed, no optimizer.
    Compact(CompactArgs),
}

/// `--model`: the image models of the registry, with their summaries as help.
fn image_model() -> PossibleValuesParser {
    PossibleValuesParser::new(
        ModelConfig::image_models().into_iter().map(|(name, help)| PossibleValue::new(name).help(help)),
    )
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Act {
    Sigmoid,
    Relu,
}

#[derive(Debug, Args)]
struct TrainArgs {
    /// The model.
    #[arg(long, value_parser = image_model())]
    model: String,
    /// Checkpoint directory [default: checkpoints/mnist-MODEL].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Continue the run in --out (its last/ state); --epochs then extends it.
    #[arg(long)]
    resume: bool,
    /// Hidden units; for MADE a comma-separated list, one per layer [default: 500; RNADE: 100;
    /// LSTM, GRU: 256; transformer: its width, 128].
    #[arg(long, value_delimiter = ',')]
    hidden: Vec<usize>,
    /// NADE's and RNADE's hidden non-linearity [default: NADE sigmoid, RNADE relu].
    #[arg(long, value_enum)]
    activation: Option<Act>,
    /// Stacked layers: LSTM, GRU [default: 1]; transformer blocks [default: 4]; PixelCNN (the first layer and its residual
    /// blocks) [default: 16]; Gated PixelCNN [default: 12].
    #[arg(long)]
    layers: Option<usize>,
    /// Transformer: attention heads [default: 4].
    #[arg(long)]
    heads: Option<usize>,
    /// PixelCNN, Gated PixelCNN: channels of each layer [default: 64].
    #[arg(long)]
    channels: Option<usize>,
    /// PixelCNN, Gated PixelCNN: hidden units of the 1×1 output head [default: 256].
    #[arg(long)]
    head: Option<usize>,
    /// PixelCNN, Gated PixelCNN: side of the first layer's kernel, odd [default: 7]. PixelCNN sees
    /// (first-kernel − 1)/2 pixels to the right in the row above and one more per row further up,
    /// however deep: a wider first kernel shrinks its blind spot at little cost.
    #[arg(long)]
    first_kernel: Option<usize>,
    /// PixelCNN, Gated PixelCNN, transformer: precision of the training products, f32 or bf16 (bfloat16
    /// products summed in f32, on the AMX unit) [default: bf16 where the CPU has AMX].
    #[arg(long, value_enum)]
    precision: Option<super::train::PrecisionArg>,
    /// LSTM, GRU: size of each pixel value's embedding [default: 16].
    #[arg(long)]
    embedding: Option<usize>,
    /// RNADE: Gaussian components per pixel [default: 10].
    #[arg(long)]
    components: Option<usize>,
    /// MADE: number of connectivities (masks) trained in turn and averaged at test time
    /// [default: 1].
    #[arg(long)]
    masks: Option<usize>,
    /// MADE: connectivities after the first also draw a random pixel ordering.
    #[arg(long)]
    orderings: bool,
    /// MADE: direct input → output connections.
    #[arg(long)]
    direct: bool,
    /// Binary models: dynamic binarization (grey-level MNIST, each pixel drawn as 1 with
    /// probability level/255 every time an image is used) instead of the static binarized set.
    #[arg(long)]
    dynamic: bool,
    /// Epochs over the 50,000 training images (cosine learning-rate schedule over all of them).
    #[arg(long, default_value_t = 20)]
    epochs: u64,
    /// Stop after this many minutes (the best model so far is kept).
    #[arg(long)]
    minutes: Option<f64>,
    /// Stop after this many optimisation steps in all (a step is one batch; the learning-rate
    /// schedule still spans --epochs). For short, repeatable runs.
    #[arg(long)]
    steps: Option<u64>,
    /// Images per batch.
    #[arg(long, default_value_t = 100)]
    batch_size: usize,
    /// Peak learning rate (AdamW; cosine decay to a twentieth of it). With --resume, changes
    /// it: the rest of the schedule is rescaled (for a run that spiked) [default: 1e-3].
    #[arg(long)]
    lr: Option<f64>,
    /// Decoupled weight decay on the weight matrices.
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    /// L2 penalty (λ/2)·‖W‖² on the weight matrices, added to the mean per-pixel loss: a
    /// Gaussian prior of variance 1/(λ·images·pixels) over the training set.
    #[arg(long, default_value_t = 0.0)]
    l2: f64,
    /// L1 penalty λ·‖W‖₁ on the weight matrices, added to the mean per-pixel loss (a Laplace
    /// prior: pushes the weights of unrelated pixel pairs to zero).
    #[arg(long, default_value_t = 0.0)]
    l1: f64,
    /// With --l1: penalise weights above this size only logarithmically, λ·s·ln(1 + |W|/s)
    /// (the log-sum penalty of reweighted L1), so that the few strong pixel dependencies are
    /// hardly shrunk [default: plain L1].
    #[arg(long)]
    l1_log_scale: Option<f64>,
    /// Keep a moving average of the weights with this decay per step (0.999: about the last
    /// 1,000 steps); validation and the saved model use the average (Polyak averaging). With
    /// --resume, turns it on, changes it or (0) turns it off: it helps the convolutional models,
    /// but lagged the LSTM's raw weights by 7 nats [default: no averaging].
    #[arg(long)]
    average: Option<f64>,
    /// PixelCNN, Gated PixelCNN: drop each unit of a residual block's inner layer with this
    /// probability while training (0.1–0.5 against overfitting; never when evaluating or
    /// sampling). With --resume, turns it on or changes it [default: 0].
    #[arg(long)]
    dropout: Option<f64>,
    /// Seed of the weights and the data order.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Datasets folder [default: $WAVEGEN_DATA or datasets/].
    #[arg(long)]
    data: Option<PathBuf>,
    /// Print the summary as one JSON object on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct EvalArgs {
    /// Checkpoint directory.
    #[arg(long)]
    checkpoint: PathBuf,
    /// Score the validation split instead of the test split.
    #[arg(long)]
    valid: bool,
    /// Average only the first N connectivities (MADE) [default: all].
    #[arg(long)]
    masks: Option<usize>,
    /// Score the raw weights that training continues instead of their moving average (a run
    /// trained with --average; its resumable state, CHECKPOINT/last).
    #[arg(long)]
    raw_weights: bool,
    /// Datasets folder [default: $WAVEGEN_DATA or datasets/].
    #[arg(long)]
    data: Option<PathBuf>,
    /// Print one JSON object (model, split, nll_nats, images, ...) on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct SampleArgs {
    /// Checkpoint directory.
    #[arg(long)]
    checkpoint: PathBuf,
    /// Number of digits.
    #[arg(long, default_value_t = 64)]
    n: usize,
    /// Sampling temperature (1: the model's distribution).
    #[arg(long, default_value_t = 1.0)]
    temperature: f32,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// The PNG grid to write.
    #[arg(long)]
    out: PathBuf,
    /// How each pixel's distribution is computed: cached (the model's incremental state) or
    /// naive (one full pass over the pixels so far for every pixel; the same digits, slowly).
    #[arg(long, value_enum, default_value_t = SampleMethod::Cached)]
    method: SampleMethod,
    /// Print a JSON summary (with the seconds spent drawing) on stdout.
    #[arg(long)]
    json: bool,
}

/// `--method` of `mnist sample`.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum SampleMethod {
    /// The model's incremental state.
    Cached,
    /// One full pass per pixel.
    Naive,
}

#[derive(Debug, Args)]
struct CompleteArgs {
    /// Checkpoint directory.
    #[arg(long)]
    checkpoint: PathBuf,
    /// Number of test digits (one grid row each).
    #[arg(long, default_value_t = 8)]
    n: usize,
    /// Completions per digit.
    #[arg(long, default_value_t = 7)]
    per_digit: usize,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// The PNG grid to write.
    #[arg(long)]
    out: PathBuf,
    /// Datasets folder [default: $WAVEGEN_DATA or datasets/].
    #[arg(long)]
    data: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct ScoreArgs {
    /// Checkpoint directory.
    #[arg(long)]
    checkpoint: PathBuf,
    /// An IDX file of 28×28 images (grey levels are thresholded at 128) [default: the test split].
    #[arg(long)]
    images: Option<PathBuf>,
    /// Write the CSV here instead of stdout.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Datasets folder [default: $WAVEGEN_DATA or datasets/].
    #[arg(long)]
    data: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct CompactArgs {
    /// Checkpoint directory to copy.
    #[arg(long)]
    checkpoint: PathBuf,
    /// Directory of the copy.
    #[arg(long)]
    out: PathBuf,
}

pub fn run(a: MnistArgs) -> anyhow::Result<ExitCode> {
    match a.command {
        MnistCommand::Train(a) => train(*a),
        MnistCommand::Eval(a) => {
            let mut bars = Bars::new(a.json);
            let split = if a.valid { Split::Valid } else { Split::Test };
            let r = mnist::eval(&a.checkpoint, &super::data_dir(a.data), split, a.masks, a.raw_weights, &mut bars);
            bars.finish();
            let r = r?;
            if a.json {
                super::print_json(&r)?;
            } else {
                println!(
                    "{}{} {} ({}): {:.2} nats/image (95% CI {:.2} – {:.2}), {:.4} bits/dim, {} images, {} connectivit{}",
                    r.model,
                    if r.raw_weights { " (raw weights)" } else { "" },
                    r.split,
                    r.scale,
                    r.nll_nats,
                    r.ci95[0],
                    r.ci95[1],
                    r.bits_per_dim,
                    r.images,
                    r.connectivities,
                    if r.connectivities == 1 { "y" } else { "ies" }
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        MnistCommand::Sample(a) => {
            let mut bars = Bars::new(a.json);
            let method = match a.method {
                SampleMethod::Cached => Method::Cached,
                SampleMethod::Naive => Method::Naive,
            };
            let r = mnist::sample(&a.checkpoint, a.n, a.temperature, a.seed, method, &a.out, &mut bars);
            bars.finish();
            let s = r?;
            if a.json {
                super::print_json(&s)?;
            } else {
                eprintln!("wrote {} digits to {} ({:.1} s, {})", s.images, s.out.display(), s.seconds, s.method);
            }
            Ok(ExitCode::SUCCESS)
        }
        MnistCommand::Complete(a) => {
            let mut bars = Bars::new(false);
            let data = super::data_dir(a.data);
            let r = mnist::complete(&a.checkpoint, &data, a.n, a.per_digit, a.seed, &a.out, &mut bars);
            bars.finish();
            r?;
            eprintln!("wrote {} rows (test digit, then {} completions) to {}", a.n, a.per_digit, a.out.display());
            Ok(ExitCode::SUCCESS)
        }
        MnistCommand::Compact(a) => {
            let (before, after) = mnist::compact(&a.checkpoint, &a.out)?;
            eprintln!(
                "wrote {} (weights {:.1} MB, were {:.1} MB); evaluate it: the NLL moves slightly",
                a.out.display(),
                after as f64 / 1e6,
                before as f64 / 1e6
            );
            Ok(ExitCode::SUCCESS)
        }
        MnistCommand::Score(a) => {
            let mut bars = Bars::new(false);
            let r = mnist::score(&a.checkpoint, &super::data_dir(a.data), a.images.as_deref(), &mut bars);
            bars.finish();
            let mut csv = String::from("index,nll_nats\n");
            for s in r? {
                csv.push_str(&format!("{},{:.4}\n", s.index, s.nll_nats));
            }
            match &a.out {
                Some(path) => wavegen::fsutil::write_bytes_atomically(path, csv.as_bytes())?,
                None => print!("{csv}"),
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn train(a: TrainArgs) -> anyhow::Result<ExitCode> {
    let settings = Settings {
        hidden: a.hidden.clone(),
        activation: a.activation.map(|act| match act {
            Act::Sigmoid => Activation::Sigmoid,
            Act::Relu => Activation::Relu,
        }),
        layers: a.layers,
        embedding: a.embedding,
        heads: a.heads,
        channels: a.channels,
        head: a.head,
        first_kernel: a.first_kernel,
        components: a.components,
        masks: a.masks,
        orderings: a.orderings,
        direct: a.direct,
        seed: a.seed,
    };
    let model = ModelConfig::image(&a.model, wavegen::data::mnist::PIXELS, &settings)?;
    let out = a.out.unwrap_or_else(|| PathBuf::from(format!("checkpoints/mnist-{}", model.name())));
    let opts = MnistTrainOptions {
        data_dir: super::data_dir(a.data),
        out,
        resume: a.resume,
        model,
        epochs: a.epochs,
        batch_size: a.batch_size,
        lr: a.lr,
        weight_decay: a.weight_decay,
        l2: a.l2,
        l1: a.l1,
        l1_log_scale: a.l1_log_scale.unwrap_or(0.0),
        max_minutes: a.minutes,
        max_steps: a.steps,
        seed: a.seed,
        dynamic: a.dynamic,
        precision: a.precision.map(Into::into),
        average_decay: a.average,
        dropout: a.dropout,
    };
    let stop = super::stop_flag()?;
    let mut bars = Bars::new(a.json);
    let summary = mnist::train(&opts, &mut bars, stop);
    bars.finish();
    let s = summary?;
    if a.json {
        super::print_json(&s)?;
    } else {
        println!(
            "{}: {:.1} epochs ({:?}), best validation {} nats/image, {:.0} s of training; best model in {}",
            s.model,
            s.epochs,
            s.stopped,
            s.best_val_nats.map_or("-".into(), |v| format!("{v:.2}")),
            s.seconds,
            s.checkpoint.display()
        );
    }
    Ok(super::stopped_exit_code())
}
