//! `wavegen mnist …`: the image models on static binarized MNIST. Train (validation NLL every
//! epoch, the best model kept), evaluate (test NLL in nats per image with a confidence
//! interval; MADE's connectivities as an ensemble), sample and complete digits as PNG grids,
//! and score images by their likelihood.
//!
//! A checkpoint directory holds the best model on the validation split; its `last/`
//! subdirectory holds the latest state with the optimizer, which `--resume` continues.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use candle_core::{DType, Tensor};
use serde::Serialize;

use super::Reporter;
use super::run::{self, ImageData, Manifest};
use crate::core::checkpoint::{self, FORMAT};
use crate::core::optim::{AdamW, AdamWConfig};
use crate::core::params::Params;
use crate::core::sample::{self, Method, SamplerConfig};
use crate::core::train::{self, Event, Precision, Stop, TrainConfig, TrainState};
use crate::core::{Autoregressive, Likelihood};
use crate::data::mnist::{self, ImageBatches, Images, PIXELS, Prepare, batch_of};
use crate::models::{Model, ModelConfig};
use crate::rng::Rng;
use crate::{Error, Result};

const LAST: &str = "last";
/// Images sampled together.
const SAMPLING_GROUP: usize = 100;
/// The most images a grid of samples or completions may hold.
const MAX_GRID_IMAGES: usize = 10_000;
/// The most epochs a run may ask for.
const MAX_EPOCHS: u64 = 100_000;

/// Whether a model is of grey levels (a density over dequantised 8-bit MNIST: RNADE) rather
/// than binary pixels.
fn is_grey(model: &ModelConfig) -> bool {
    dequantisation(model.likelihood()).is_some()
}

/// The datasets, as `config.json` names them.
const BINARIZED: &str = "binarized";
const GREY: &str = "grey";
const DYNAMIC: &str = "dynamic";

/// (train, validation, test) of a dataset: static binarized MNIST; grey-level MNIST (the last
/// 10k training images as validation); or, for dynamic binarization, grey-level training
/// images (binarized afresh in each batch) with validation and test binarized once, from a
/// fixed seed.
fn splits(dataset: &str, data_dir: &Path) -> Result<(Images, Images, Images)> {
    match dataset {
        GREY => mnist::grey_splits(data_dir),
        DYNAMIC => {
            let (train, val, test) = mnist::grey_splits(data_dir)?;
            let mut rng = Rng::derived(0, "fixed binarization of the evaluation images");
            let (val, test) = (val.sample_binary(&mut rng), test.sample_binary(&mut rng));
            Ok((train, val, test))
        }
        _ => mnist::binarized(data_dir),
    }
}

fn dataset_of(manifest: &Manifest) -> &str {
    manifest.images.as_ref().map_or(BINARIZED, |i| i.dataset.as_str())
}

/// For a density over dequantised data of L levels, D·ln L: log p(quantised image) =
/// log p(dequantised image) − D·ln L, the density on [0, 1]^D moved to the scale of the 8-bit
/// data, comparable with discrete models. `None` for a categorical model (binary pixels).
fn dequantisation(likelihood: Likelihood) -> Option<f64> {
    match likelihood {
        Likelihood::Categorical => None,
        Likelihood::Density { levels } => Some(PIXELS as f64 * (levels as f64).ln()),
    }
}

/// A trained image model.
pub struct ImageModel {
    /// config.json.
    pub manifest: Manifest,
    /// The network.
    pub model: Model,
    /// Its parameters.
    pub params: Params,
}

impl ImageModel {
    /// Loads the checkpoint directory `dir` (or a file in it).
    pub fn load(dir: &Path) -> Result<Self> {
        let (manifest, model, params) = run::load(dir, |manifest, vb| {
            if manifest.images.is_none() {
                return Err(Error::checkpoint(
                    dir,
                    format!("holds a {} model trained on audio, not an image model", manifest.model.name()),
                ));
            }
            manifest.model.build(vb)
        })?;
        Ok(ImageModel { manifest, model, params })
    }
}

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
    /// Peak learning rate (ignored when resuming).
    pub lr: f64,
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
    /// Seed of the weights and of the data order.
    pub seed: u64,
    /// Binary models: train on grey-level MNIST binarized afresh in every batch (dynamic
    /// binarization) instead of the static binarized split.
    pub dynamic: bool,
    /// Precision of the products of a model that has a choice (PixelCNN): for a new run,
    /// [`crate::layers::matmul::fastest_precision`] unless given; on resume, a change.
    pub precision: Option<Precision>,
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
    manifest.train.max_steps = opts.epochs * images.steps_per_epoch;
    manifest.train.decay_steps = manifest.train.max_steps;
    manifest.train.max_minutes = opts.max_minutes;

    let (mut model, params, mut opt) =
        run::model_and_optimizer(&manifest, resumed.as_ref(), |m, vb| Ok(m.model.build(vb)?.with_precision(m.train.precision)))?;
    if resumed.is_none() {
        init_output_bias(&params, &train_set)?;
    }
    let precision = if manifest.model.has_precision() { format!(", {} products", manifest.train.precision) } else { String::new() };
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
    let mut observe = |e: Event| match e {
        Event::Step { step, .. } => reporter.progress("epoch", (step - 1) % spe + 1, spe),
        Event::Eval(entry) => reporter.note(&format!(
            "epoch {:>5.1}  train {:.2}  validation {:.2} nats/image  ({:.0} s)",
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
        lr: opts.lr,
        min_lr: opts.lr / 20.0,
        warmup_steps: 1,
        decay_steps: 0,
        adamw: AdamWConfig {
            weight_decay: opts.weight_decay,
            l2: opts.l2,
            l1: opts.l1,
            l1_log_scale: opts.l1_log_scale,
            ..AdamWConfig::default()
        },
        eval_every: 1,
        checkpoint_every: 1,
        precision: match opts.precision {
            Some(p) => p,
            None if opts.model.has_precision() => crate::layers::matmul::fastest_precision(),
            None => Precision::F32,
        },
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

/// The log-probability (nats) of each image of `set` under the model's selected connectivity:
/// of the binary image, or for grey levels of the 8-bit image (the dequantised density, with
/// the same noise on every call, moved to the 8-bit scale).
pub fn log_probs(model: &Model, set: &Images, reporter: &mut dyn Reporter) -> Result<Vec<f64>> {
    let chunk = 500;
    let correction = dequantisation(model.likelihood());
    let mut noise = Rng::derived(0, "evaluation dequantisation");
    let mut out = Vec::with_capacity(set.n);
    for start in (0..set.n).step_by(chunk) {
        reporter.progress("scoring", start as u64, set.n as u64);
        let mut batch = batch_of(set, start..(start + chunk).min(set.n))?;
        if correction.is_some() {
            batch = mnist::dequantize(batch, &mut noise)?;
        }
        let nll = model.position_nll(&batch)?; // (B, 784)
        let shift = correction.unwrap_or(0.0);
        out.extend(nll.sum(1)?.to_dtype(DType::F64)?.to_vec1::<f64>()?.into_iter().map(|n| -n - shift));
    }
    reporter.progress("scoring", set.n as u64, set.n as u64);
    Ok(out)
}

/// The log-probability of each image under the ensemble of the first `masks` connectivities:
/// log((1/K) Σ_k p_k(x)), computed stably (log-mean-exp of probabilities, never of logits).
pub fn ensemble_log_probs(model: &Model, set: &Images, masks: usize, reporter: &mut dyn Reporter) -> Result<Vec<f64>> {
    let k = masks.clamp(1, model.connectivities());
    let mut model = model.clone();
    let mut per_mask = Vec::with_capacity(k);
    for m in 0..k {
        model.select_connectivity(m);
        per_mask.push(log_probs(&model, set, reporter)?);
    }
    Ok((0..set.n)
        .map(|i| {
            let max = per_mask.iter().map(|lp| lp[i]).fold(f64::NEG_INFINITY, f64::max);
            max + (per_mask.iter().map(|lp| (lp[i] - max).exp()).sum::<f64>() / k as f64).ln()
        })
        .collect())
}

/// `wavegen mnist eval`'s report.
#[derive(Debug, Serialize)]
pub struct MnistEvalReport {
    /// The model kind.
    pub model: String,
    /// The checkpoint.
    pub checkpoint: PathBuf,
    /// `test` or `valid`.
    pub split: String,
    /// Images scored.
    pub images: usize,
    /// Mean NLL, nats per image (of binary images; for grey levels of the 8-bit images, with
    /// the dequantisation correction).
    pub nll_nats: f64,
    /// What `nll_nats` measures: `binary` or `8-bit (dequantised)`.
    pub scale: String,
    /// Standard error of the mean.
    pub std_error: f64,
    /// 95% confidence interval of the mean (normal approximation).
    pub ci95: [f64; 2],
    /// The same NLL in bits per pixel (per dimension).
    pub bits_per_dim: f64,
    /// Connectivities averaged (MADE's masks; 1 for other models).
    pub connectivities: usize,
}

/// Which split to score.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// The 10k validation images.
    Valid,
    /// The 10k test images.
    Test,
}

/// The test (or validation) NLL of a checkpoint.
pub fn eval(
    dir: &Path,
    data_dir: &Path,
    split: Split,
    masks: Option<usize>,
    reporter: &mut dyn Reporter,
) -> Result<MnistEvalReport> {
    let m = ImageModel::load(dir)?;
    let (_, valid, test) = splits(dataset_of(&m.manifest), data_dir)?;
    let set = if split == Split::Test { &test } else { &valid };
    if set.n == 0 {
        return Err(Error::Dataset {
            path: data_dir.to_path_buf(),
            reason: format!(
                "the {} split holds no images: nothing to evaluate",
                if split == Split::Test { "test" } else { "validation" }
            ),
        });
    }
    let k = masks.unwrap_or(m.model.connectivities()).clamp(1, m.model.connectivities());
    let nll: Vec<f64> = ensemble_log_probs(&m.model, set, k, reporter)?.into_iter().map(|lp| -lp).collect();
    let n = nll.len() as f64;
    let mean = nll.iter().sum::<f64>() / n;
    let var = nll.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    let se = (var / n).sqrt();
    Ok(MnistEvalReport {
        model: m.manifest.model.name().into(),
        checkpoint: dir.to_path_buf(),
        split: if split == Split::Test { "test" } else { "valid" }.into(),
        images: set.n,
        nll_nats: mean,
        scale: if is_grey(&m.manifest.model) { "8-bit (dequantised)" } else { "binary" }.into(),
        std_error: se,
        ci95: [mean - 1.96 * se, mean + 1.96 * se],
        bits_per_dim: mean / PIXELS as f64 / std::f64::consts::LN_2,
        connectivities: k,
    })
}

/// Draws `n` images (the given prefix of each, then the rest), in raster order.
fn draw_images(
    model: &Model,
    prefixes: &[Vec<u32>],
    temperature: f32,
    seed: u64,
    method: Method,
    reporter: &mut dyn Reporter,
) -> Result<Vec<Vec<u8>>> {
    let mut model = model.clone();
    model.select_connectivity(0); // left to right, so that a prefix is the top of the image
    let model = &model;
    let sampler = SamplerConfig { temperature, ..SamplerConfig::default() };
    sampler.validate()?;
    let given = prefixes.first().map_or(0, |p| p.len());
    let steps = PIXELS - given;
    let mut rng = Rng::derived(seed, "mnist samples");
    // In groups: the sampler's memory grows with the images drawn together (megabytes each).
    let mut drawn = Vec::with_capacity(prefixes.len());
    for (g, group) in prefixes.chunks(SAMPLING_GROUP).enumerate() {
        let before = g * SAMPLING_GROUP;
        drawn.extend(sample::generate(model, group, None, steps, &sampler, &mut rng, method, &mut |done| {
            let done = (before * steps + done * group.len()) as u64;
            reporter.progress("sampling pixels", done, (prefixes.len() * steps) as u64)
        })?);
    }
    let order = model.ordering().unwrap_or_else(|| (0..PIXELS).collect());
    Ok(prefixes
        .iter()
        .zip(drawn)
        .map(|(p, d)| {
            let mut img = vec![0u8; PIXELS];
            for (k, v) in p.iter().chain(&d).enumerate() {
                img[order[k]] = *v as u8;
            }
            img
        })
        .collect())
}

/// Writes a copy of the checkpoint `dir` into `out` for shipping: the weights as f16 (half the
/// bytes; the NLL moves by hundredths of a nat, so evaluate the copy), those that no
/// connectivity uses set to 0 (about half of FVSBN's and MADE's, which the gzip of the weights
/// file then nearly removes), no optimizer state (the copy cannot be resumed), config.json and any
/// train.log. Returns the bytes of the weights before and after.
pub fn compact(dir: &Path, out: &Path) -> Result<(u64, u64)> {
    let m = ImageModel::load(dir)?;
    if checkpoint::resolve_dir(out) == checkpoint::resolve_dir(dir) {
        return Err(Error::Config("--out must differ from --checkpoint (the original stays as it is)".into()));
    }
    let masks = m.model.weight_masks()?;
    let weights = m
        .params
        .tensors()
        .into_iter()
        .map(|(name, t)| {
            let t = match masks.iter().find(|(n, _)| *n == name) {
                Some((_, mask)) => (t * mask)?,
                None => t,
            };
            Ok((name, t.to_dtype(DType::F16)?))
        })
        .collect::<Result<Vec<_>>>()?;
    let _guard = checkpoint::WriteGuard::acquire(out)?;
    checkpoint::save_shipping_copy(out, &m.manifest, &weights)?;
    let dir = checkpoint::resolve_dir(dir);
    let log = dir.join("train.log");
    if log.is_file() {
        let bytes = crate::fsutil::read_regular(&log, 64 << 20)?;
        crate::fsutil::write_bytes_atomically(&out.join("train.log"), &bytes)?;
    }
    let size = |d: &Path| -> Result<u64> {
        let file = run::open(d)?.weights_file();
        Ok(std::fs::metadata(&file).map_err(|e| Error::io(&file, e))?.len())
    };
    Ok((size(&dir)?, size(out)?))
}

/// Samples `n` digits into a PNG grid.
pub fn sample(
    dir: &Path,
    n: usize,
    temperature: f32,
    seed: u64,
    method: Method,
    out: &Path,
    reporter: &mut dyn Reporter,
) -> Result<SampleSummary> {
    crate::models::within("--n", n, 1, MAX_GRID_IMAGES)?;
    let m = ImageModel::load(dir)?;
    let started = std::time::Instant::now();
    let images = draw_images(&m.model, &vec![vec![]; n], temperature, seed, method, reporter)?;
    let seconds = started.elapsed().as_secs_f64();
    let grey = is_grey(&m.manifest.model);
    mnist::write_grid(out, &images, (n as f64).sqrt().ceil() as usize, 2, grey)?;
    Ok(SampleSummary {
        images: n,
        method: match method {
            Method::Cached => "cached",
            Method::Naive => "naive",
        }
        .into(),
        seconds,
        out: out.to_path_buf(),
    })
}

/// What `mnist sample` reports.
#[derive(Debug, Serialize)]
pub struct SampleSummary {
    /// Digits drawn.
    pub images: usize,
    /// `cached` (the model's incremental state) or `naive` (one full pass per pixel).
    pub method: String,
    /// Seconds spent drawing them (not loading the model or writing the grid).
    pub seconds: f64,
    /// The PNG grid.
    pub out: PathBuf,
}

/// Completes the bottom half of `digits` test digits, `per_digit` times each: row r of the
/// grid is test digit r, then its completions.
pub fn complete(
    dir: &Path,
    data_dir: &Path,
    digits: usize,
    per_digit: usize,
    seed: u64,
    out: &Path,
    reporter: &mut dyn Reporter,
) -> Result<Vec<Vec<u8>>> {
    crate::models::within("--n", digits, 1, MAX_GRID_IMAGES)?;
    crate::models::within("--per-digit", per_digit, 1, MAX_GRID_IMAGES)?;
    if digits * (per_digit + 1) > MAX_GRID_IMAGES {
        return Err(Error::Config(format!(
            "--n {digits} × (--per-digit {per_digit} + 1) is {} images, more than the {MAX_GRID_IMAGES} a grid may hold",
            digits * (per_digit + 1)
        )));
    }
    let m = ImageModel::load(dir)?;
    let (_, _, test) = splits(dataset_of(&m.manifest), data_dir)?;
    if test.n == 0 {
        return Err(Error::Dataset { path: data_dir.to_path_buf(), reason: "the test split holds no images".into() });
    }
    // Spread the chosen digits over the (digit-sorted) test split.
    let chosen: Vec<usize> = (0..digits).map(|i| (2 * i + 1) * test.n / (2 * digits)).collect();
    let half = PIXELS / 2;
    let prefixes: Vec<Vec<u32>> = chosen
        .iter()
        .flat_map(|&i| std::iter::repeat_n(test.image(i)[..half].iter().map(|&v| v as u32).collect(), per_digit))
        .collect();
    let completed = draw_images(&m.model, &prefixes, 1.0, seed, Method::Cached, reporter)?;
    let mut grid = Vec::new();
    for (r, &i) in chosen.iter().enumerate() {
        grid.push(test.image(i).to_vec());
        grid.extend_from_slice(&completed[r * per_digit..(r + 1) * per_digit]);
    }
    mnist::write_grid(out, &grid, per_digit + 1, 2, is_grey(&m.manifest.model))?;
    Ok(grid)
}

/// One image's score.
#[derive(Debug, Serialize)]
pub struct ImageScore {
    /// Its index in the file.
    pub index: usize,
    /// Its NLL in nats.
    pub nll_nats: f64,
}

/// Scores every image of `images` (default: the test split), lowest likelihood first.
pub fn score(
    dir: &Path,
    data_dir: &Path,
    images: Option<&Path>,
    reporter: &mut dyn Reporter,
) -> Result<Vec<ImageScore>> {
    let given = images.map(mnist::read_images).transpose()?; // a bad file is reported first
    let m = ImageModel::load(dir)?;
    let set = match given {
        Some(mut set) => {
            if !is_grey(&m.manifest.model) {
                set.binarize();
            }
            set
        }
        None => splits(dataset_of(&m.manifest), data_dir)?.2,
    };
    let lp = ensemble_log_probs(&m.model, &set, m.model.connectivities(), reporter)?;
    let mut scores: Vec<ImageScore> =
        lp.iter().enumerate().map(|(index, &lp)| ImageScore { index, nll_nats: -lp }).collect();
    scores.sort_by(|a, b| b.nll_nats.total_cmp(&a.nll_nats));
    Ok(scores)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::made;
    use crate::tasks::Silent;

    #[test]
    fn the_ensemble_averages_probabilities_not_logits() {
        let cfg = ModelConfig::Made(made::Config {
            pixels: PIXELS,
            hidden: vec![8],
            direct: true,
            masks: 3,
            orderings: true,
            mask_seed: 5,
        });
        let params = Params::new(2);
        let mut model = cfg.build(params.var_builder(DType::F32)).unwrap();
        let mut rng = Rng::new(4);
        let set =
            Images { pixels: (0..4 * PIXELS).map(|_| u8::from(rng.uniform() < 0.2)).collect(), labels: None, n: 4 };
        let per_mask: Vec<Vec<f64>> = (0..3)
            .map(|k| {
                model.select_connectivity(k);
                log_probs(&model, &set, &mut Silent).unwrap()
            })
            .collect();
        assert!(per_mask[0] != per_mask[1], "the connectivities differ");
        let ensemble = ensemble_log_probs(&model, &set, 3, &mut Silent).unwrap();
        for i in 0..set.n {
            // Directly: ln of the mean probability (about e^−550 for these images: still an f64).
            let mean_p = per_mask.iter().map(|lp| lp[i].exp()).sum::<f64>() / 3.0;
            assert!(mean_p > 0.0);
            let expected = mean_p.ln();
            assert!((ensemble[i] - expected).abs() < 1e-9, "{} vs {expected}", ensemble[i]);
            let mean_log = per_mask.iter().map(|lp| lp[i]).sum::<f64>() / 3.0;
            assert!(ensemble[i] >= mean_log, "log-mean-exp is at least the mean log-probability");
        }
    }
}
