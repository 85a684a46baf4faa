//! `wavegen eval` and `wavegen info`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use wavegen::tasks::{eval, info};

use super::report::Bars;

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Checkpoint directory.
    #[arg(long)]
    checkpoint: PathBuf,
    /// WAV files or folders of them.
    #[arg(required_unless_present = "held_out")]
    paths: Vec<PathBuf>,
    /// Score the files the checkpoint held out of its training (its validation files).
    #[arg(long, conflicts_with = "paths")]
    held_out: bool,
    /// Label to condition on (for models trained with --labels).
    #[arg(long)]
    label: Option<String>,
    /// Print per-file and total bits per sample as one JSON object on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct InfoArgs {
    /// Checkpoint directory [default: the default model built into wavegen].
    dir: Option<PathBuf>,
    /// Checkpoint directory (the same as the positional argument).
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// Print everything as one JSON object on stdout.
    #[arg(long)]
    json: bool,
}

pub fn run_eval(a: EvalArgs) -> anyhow::Result<ExitCode> {
    let mut bars = Bars::new(a.json);
    let report = eval::eval(&a.checkpoint, &a.paths, a.label.as_deref(), &mut bars);
    bars.finish();
    let report = report?;
    if a.json {
        super::print_json(&report)?;
    } else {
        for f in &report.files {
            println!("{:.4}\t{}\t{}", f.bits_per_sample, f.samples, f.path.display());
        }
        println!("{:.4}\t{}\ttotal (bits/sample, samples)", report.bits_per_sample, report.samples);
        for l in &report.by_level {
            let range = match l.to_db {
                Some(to) => format!("{} to {to} dB", l.above_db),
                None => format!("below {} dB", l.above_db),
            };
            let bits = l.bits_per_sample.map_or("-".into(), |b| format!("{b:.4}"));
            println!(
                "{bits}\t{}\tin {}-ms blocks {range} from their file's loudest ({:.0}% of samples)",
                l.samples,
                wavegen::tasks::eval::LEVEL_BLOCK_MS,
                100.0 * l.share
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn run_info(a: InfoArgs) -> anyhow::Result<ExitCode> {
    let dir = a.checkpoint.or(a.dir);
    let i = info(dir.as_deref())?;
    if a.json {
        super::print_json(&i)?;
        return Ok(ExitCode::SUCCESS);
    }
    let m = &i.manifest;
    let name = dir.as_ref().map_or(wavegen::tasks::embedded::NAME.into(), |d| d.display().to_string());
    println!("checkpoint      {name}");
    // A vocoder's band statistics are 2 × bands numbers: the model line leaves them to --json.
    match &m.model {
        wavegen::models::ModelConfig::Wavenet(cfg) if cfg.local.is_some() => {
            let local = cfg.local.as_ref().expect("invariant: matched");
            let shown = wavegen::models::wavenet::Config { local: None, ..cfg.clone() };
            println!("model           Wavenet({})", format!("{shown:?}").replace(", local: None", ""));
            println!("vocoder         {}", local.describe());
        }
        model => println!("model           {model:?}"),
    }
    println!("parameters      {}", i.parameters);
    if let Some(audio) = &m.audio {
        if let (Some(rf), Some(ms)) = (i.receptive_field_samples, i.receptive_field_ms) {
            println!("receptive field {rf} samples ({ms:.1} ms at {} Hz)", audio.settings.sample_rate);
        }
        println!(
            "data            {} ({} training files, {} validation files{})",
            audio.train_dir.display(),
            audio.train_files.len(),
            audio.val_files.len(),
            audio.val_dir.as_ref().map_or(String::new(), |d| format!(" from {}", d.display()))
        );
        if !audio.labels.is_empty() {
            println!("labels          {}", audio.labels.join(", "));
        }
    }
    if let Some(images) = &m.images {
        println!("data            {} MNIST from {}", images.dataset, images.data_dir.display());
    }
    println!("trained         {} steps, {:.0} s, {} positions", m.state.step, m.state.seconds, m.state.tokens_seen);
    println!(
        "schedule        learning rate {} to {}, cosine over {} steps after {} of warm-up",
        m.train.lr, m.train.min_lr, m.train.decay_steps, m.train.warmup_steps
    );
    if m.train.adamw.average_decay > 0.0 {
        println!("weights         moving average, decay {} per step", m.train.adamw.average_decay);
    }
    if m.train.dropout > 0.0 {
        println!("dropout         {} while training", m.train.dropout);
    }
    let unit = if m.audio.is_some() { "sample" } else { "pixel" };
    match i.last_val_bits_per_sample {
        Some(b) => println!("validation NLL  {b:.4} bits/{unit} (last evaluation)"),
        None => println!("validation NLL  - (never evaluated)"),
    }
    Ok(ExitCode::SUCCESS)
}
