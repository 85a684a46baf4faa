//! `wavegen mnist train`: a run with validation every epoch, the best model kept, `last/` to
//! resume.

use super::*;

/// Peak learning rate of a new run unless one is given.
pub const DEFAULT_LR: f64 = 1e-3;

/// Everything `wavegen mnist train` needs.
#[derive(Debug, Clone)]
pub struct MnistTrainOptions {
    /// The datasets folder (holding `binarized_mnist/`).
    pub data_dir: PathBuf,
    /// Checkpoint directory.
    pub out: PathBuf,
    /// Continue `out/last` if it exists.
    pub resume: bool,
    /// The model (ignored when resuming).
    pub model: ModelConfig,
    /// Train for this many epochs in total (on resume: extends the schedule).
    pub epochs: u64,
    /// Images per batch (ignored when resuming).
    pub batch_size: usize,
    /// Peak learning rate: for a new run, [`DEFAULT_LR`] unless given; on resume, a change
    /// that rescales the rest of the schedule (the floor stays at a twentieth of the peak).
    pub lr: Option<f64>,
    /// AdamW's decoupled weight decay on matrices (ignored when resuming).
    pub weight_decay: f64,
    /// L2 penalty on the matrices, per pixel of the mean loss (ignored when resuming).
    pub l2: f64,
    /// L1 penalty on the matrices, per pixel of the mean loss (ignored when resuming).
    pub l1: f64,
    /// When positive, the L1 penalty is the log-sum penalty of this scale (ignored when resuming).
    pub l1_log_scale: f64,
    /// Stop after this many minutes of this run.
    pub max_minutes: Option<f64>,
    /// Stop at this step (counted over all runs), before the schedule's end.
    pub max_steps: Option<u64>,
    /// Seed of the weights and of the data order.
    pub seed: u64,
    /// Binary models: train on grey-level MNIST binarized afresh in every batch (dynamic
    /// binarization) instead of the static binarized split.
    pub dynamic: bool,
    /// Precision of the products of a model that has a choice (PixelCNN): for a new run,
    /// [`crate::layers::matmul::fastest_precision`] unless given; on resume, a change.
    pub precision: Option<Precision>,
    /// Decay of the moving average of the weights that is validated and kept (see
    /// [`AdamWConfig::average_decay`]): for a new run, none unless given; on resume, a change.
    pub average_decay: Option<f64>,
    /// Dropout while training (see [`TrainConfig::dropout`]): for a new run, none unless given;
    /// on resume, a change.
    pub dropout: Option<f64>,
}

/// What a training run did.
#[derive(Debug, Serialize)]
pub struct MnistTrainSummary {
    /// The checkpoint directory (best model).
    pub checkpoint: PathBuf,
    /// The model.
    pub model: String,
    /// Epochs done.
    pub epochs: f64,
    /// Why it stopped.
    pub stopped: Stop,
    /// Best validation NLL, nats per image.
    pub best_val_nats: Option<f64>,
    /// Training seconds over all runs.
    pub seconds: f64,
    /// Trainable scalars.
    pub parameters: usize,
}

/// Trains (or resumes) an image model on MNIST.
pub fn train(opts: &MnistTrainOptions, reporter: &mut dyn Reporter, stop: &AtomicBool) -> Result<MnistTrainSummary> {
    if opts.epochs > MAX_EPOCHS {
        return Err(Error::Config(format!("--epochs is {}; it must be at most {MAX_EPOCHS}", opts.epochs)));
    }
    if opts.max_steps == Some(0) {
        return Err(Error::Config("--steps must be at least 1".into()));
    }
    if !opts.resume {
        // Settings first: a bad one is reported before the dataset is read.
        opts.model.validate()?;
    }
    let last = opts.out.join(LAST);
    let (_guard, resumed) = run::take_for_training(&opts.out, &last, opts.resume)?;
    let existing = resumed.is_some();
    let mut manifest = match &resumed {
        Some(ckpt) => {
            reporter.note(&format!("resuming {} at step {}", last.display(), ckpt.manifest.state.step));
            let mut m = ckpt.manifest.clone();
            if let Some(p) = opts.precision.filter(|&p| p != m.train.precision && m.model.has_precision()) {
                reporter.note(&format!("precision: {p} (the run had {})", m.train.precision));
                m.train.precision = p;
            }
            if let Some(d) = opts.average_decay.filter(|&d| d != m.train.adamw.average_decay) {
                let had = std::mem::replace(&mut m.train.adamw.average_decay, d);
                m.train.validate()?;
                reporter.note(&match d {
                    0.0 => format!("weight averaging off: the raw weights are validated and kept (the run had {had})"),
                    _ => format!("weights averaged with decay {d} (the run had {had})"),
                });
            }
            if let Some(lr) = opts.lr.filter(|&lr| lr != m.train.lr) {
                let had = std::mem::replace(&mut m.train.lr, lr);
                m.train.min_lr = lr * train::FINAL_LR_FRACTION;
                m.train.validate()?;
                reporter.note(&format!("peak learning rate {lr} (the run had {had})"));
            }
            if let Some(p) = opts.dropout.filter(|&p| p != m.train.dropout) {
                let had = std::mem::replace(&mut m.train.dropout, p);
                m.train.validate()?;
                reporter.note(&format!("dropout {p} (the run had {had})"));
            }
            m
        }
        None => new_manifest(opts)?,
    };
    let dataset = dataset_of(&manifest).to_string();
    let (train_set, val_set, _) = splits(&dataset, &opts.data_dir)?;
    if !existing {
        let images = manifest.images.as_mut().expect("invariant: image manifest");
        images.steps_per_epoch = train_set.n.div_ceil(images.batch_size) as u64;
        manifest.train.eval_every = images.steps_per_epoch;
        manifest.train.checkpoint_every = images.steps_per_epoch;
        manifest.train.warmup_steps = images.steps_per_epoch.min(opts.epochs * images.steps_per_epoch / 10).max(1);
    }
    let images = manifest.images.clone().ok_or_else(|| Error::checkpoint(&last, "not an image model"))?;
    manifest.train.decay_steps = opts.epochs * images.steps_per_epoch;
    manifest.train.max_steps = opts.max_steps.map_or(manifest.train.decay_steps, |s| s.min(manifest.train.decay_steps));
    manifest.train.max_minutes = opts.max_minutes;

    let (mut model, params, mut opt) = run::model_and_optimizer(&manifest, resumed.as_ref(), |m, vb| {
        Ok(m.model.build(vb)?.with_precision(m.train.precision))
    })?;
    if resumed.is_none() {
        init_output_bias(&params, &train_set)?;
    }
    let precision = if manifest.model.has_precision() {
        format!(", {}", manifest.train.precision.products_here())
    } else {
        String::new()
    };
    reporter.note(&format!(
        "{}: {} parameters{precision}; {} training and {} validation images; {} steps of {} images per epoch",
        manifest.model.name(),
        params.count(),
        train_set.n,
        val_set.n,
        images.steps_per_epoch,
        images.batch_size
    ));

    let prepare = match dataset.as_str() {
        GREY => Prepare::Dequantize,
        DYNAMIC => Prepare::Binarize,
        _ => Prepare::Nothing,
    };
    let mut batches = ImageBatches::new(&train_set, &val_set, images.batch_size, prepare);
    let mut state = manifest.state.clone();
    let train_cfg = manifest.train.clone();
    let out = opts.out.clone();
    let mut save = |state: &TrainState, opt: &AdamW| -> Result<()> {
        let m = manifest.at(state, opt.t);
        let improved = state.history.last().is_some_and(|e| Some(e.val_nats) == state.best_val_nats);
        if improved || !checkpoint::exists(&out) {
            checkpoint::save(&out, &m, &params, None)?;
        }
        checkpoint::save(&out.join(LAST), &m, &params, Some(opt))
    };
    let spe = images.steps_per_epoch;
    // Per-image NLL as reported: binary nats, or nats on the 8-bit scale for grey levels.
    let correction = dequantisation(model.likelihood()).unwrap_or(0.0);
    let per_image = move |nats_per_pixel: f64| nats_per_pixel * PIXELS as f64 + correction;
    // With averaging, the training loss is the running weights' (dropout included) and
    // validation the average's: while the average lags, the two are not comparable.
    let (train_weights, val_weights) =
        if train_cfg.adamw.average_decay > 0.0 { (" (running weights)", " (weight average)") } else { ("", "") };
    let mut observe = |e: Event| match e {
        Event::Step { step, .. } => reporter.progress("epoch", (step - 1) % spe + 1, spe),
        Event::Eval(entry) => reporter.note(&format!(
            "epoch {:>5.1}  train {:.2}{train_weights}  validation {:.2}{val_weights} nats/image  ({:.0} s)",
            entry.step as f64 / spe as f64,
            per_image(entry.train_nats),
            per_image(entry.val_nats),
            entry.seconds
        )),
        Event::Saved { .. } => {}
    };
    let stopped =
        train::train(&mut model, &mut opt, &mut batches, &train_cfg, &mut state, &mut save, &mut observe, stop)?;
    Ok(MnistTrainSummary {
        checkpoint: opts.out.clone(),
        model: manifest.model.name().into(),
        epochs: state.step as f64 / spe as f64,
        stopped,
        best_val_nats: state.best_val_nats.map(per_image),
        seconds: state.seconds,
        parameters: params.count(),
    })
}

/// A fresh run's manifest; the caller fills in the epoch length once the data is loaded.
fn new_manifest(opts: &MnistTrainOptions) -> Result<Manifest> {
    if opts.batch_size == 0 || opts.epochs == 0 {
        return Err(Error::Config("--batch-size and --epochs must be at least 1".into()));
    }
    if opts.model.wavenet().is_some() {
        return Err(Error::Config("WaveNet is an audio model: train it with `wavegen train`".into()));
    }
    if opts.dynamic && is_grey(&opts.model) {
        return Err(Error::Config("--dynamic binarizes images: it is for the binary models, not RNADE".into()));
    }
    let train = TrainConfig {
        max_steps: 0,
        max_minutes: opts.max_minutes,
        lr: opts.lr.unwrap_or(DEFAULT_LR),
        min_lr: opts.lr.unwrap_or(DEFAULT_LR) * train::FINAL_LR_FRACTION,
        warmup_steps: 1,
        decay_steps: 0,
        adamw: AdamWConfig {
            weight_decay: opts.weight_decay,
            l2: opts.l2,
            l1: opts.l1,
            l1_log_scale: opts.l1_log_scale,
            average_decay: opts.average_decay.unwrap_or(0.0),
            ..AdamWConfig::default()
        },
        eval_every: 1,
        checkpoint_every: 1,
        precision: match opts.precision {
            Some(p) => p,
            None if opts.model.has_precision() => crate::layers::matmul::fastest_precision(),
            None => Precision::F32,
        },
        dropout: opts.dropout.unwrap_or(0.0),
    };
    train.validate()?;
    Ok(Manifest {
        format: FORMAT.into(),
        model: opts.model.clone(),
        seed: opts.seed,
        audio: None,
        images: Some(ImageData {
            dataset: if is_grey(&opts.model) {
                GREY
            } else if opts.dynamic {
                DYNAMIC
            } else {
                BINARIZED
            }
            .into(),
            data_dir: opts.data_dir.clone(),
            batch_size: opts.batch_size,
            steps_per_epoch: 0,
        }),
        train,
        state: TrainState::new(opts.seed),
        optimizer_steps: 0,
        files: Default::default(),
    })
}

/// Sets every image model's per-pixel output bias to the log-odds of that pixel in the
/// training data (NADE's initialisation): the first steps then learn structure, not averages.
fn init_output_bias(params: &Params, set: &Images) -> Result<()> {
    let Some((_, bias)) = params.named().into_iter().find(|(n, v)| n == "output.bias" && v.dims() == [PIXELS]) else {
        return Ok(()); // not a model of binary pixels with one output bias each
    };
    // The expected fraction of ones: of the binary pixels, or of level/255 for grey images that
    // are binarized dynamically.
    let top = if set.pixels.iter().any(|&v| v > 1) { 255.0 } else { 1.0 };
    let mut ones = vec![0f64; PIXELS];
    for i in 0..set.n {
        for (c, &v) in ones.iter_mut().zip(set.image(i)) {
            *c += v as f64 / top;
        }
    }
    let log_odds: Vec<f32> = ones
        .iter()
        .map(|&c| {
            let p = ((c + 1.0) / (set.n as f64 + 2.0)).clamp(1e-4, 1.0 - 1e-4);
            (p / (1.0 - p)).ln() as f32
        })
        .collect();
    bias.set(&Tensor::from_vec(log_odds, PIXELS, &candle_core::Device::Cpu)?.to_dtype(bias.dtype())?)?;
    Ok(())
}
