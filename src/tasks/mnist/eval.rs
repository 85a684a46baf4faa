//! `wavegen mnist eval` and `score`: the log-likelihood of images, per image and over a split
//! (MADE's connectivities as an ensemble).

use super::*;
use crate::core::train::in_parallel;

/// The log-probability (nats) of each image of `set` under the model's selected connectivity:
/// of the binary image, or for grey levels of the 8-bit image (the dequantised density, with
/// the same noise on every call, moved to the 8-bit scale). `chunk` images go through each
/// forward pass: the pass keeps its whole graph alive (candle tracks every result of a trainable
/// weight), so the run's training batch size bounds the memory as a training step does.
pub fn log_probs(model: &Model, set: &Images, chunk: usize, reporter: &mut dyn Reporter) -> Result<Vec<f64>> {
    let chunk = chunk.max(1);
    let correction = dequantisation(model.likelihood());
    let mut noise = Rng::derived(0, "evaluation dequantisation");
    let mut out = Vec::with_capacity(set.n);
    let shift = correction.unwrap_or(0.0);
    // Chunks a pair per thread at a time (each chunk on its own thread, as the trainer's shards).
    let threads = rayon::current_num_threads();
    let starts: Vec<usize> = (0..set.n).step_by(chunk).collect();
    for group in starts.chunks(threads.max(1)) {
        reporter.progress("scoring", group[0] as u64, set.n as u64);
        // The noise is drawn in image order, before the parallel part.
        let batches = group
            .iter()
            .map(|&start| {
                let batch = batch_of(set, start..(start + chunk).min(set.n))?;
                if correction.is_some() { mnist::dequantize(batch, &mut noise) } else { Ok(batch) }
            })
            .collect::<Result<Vec<_>>>()?;
        for nll in in_parallel(&batches, threads, |b| model.position_nll(b)) {
            out.extend(nll?.sum(1)?.to_dtype(DType::F64)?.to_vec1::<f64>()?.into_iter().map(|n| -n - shift));
        }
    }
    reporter.progress("scoring", set.n as u64, set.n as u64);
    Ok(out)
}

/// The log-probability of each image under the ensemble of the first `masks` connectivities:
/// log((1/K) Σ_k p_k(x)), computed stably (log-mean-exp of probabilities, never of logits).
pub fn ensemble_log_probs(
    model: &Model,
    set: &Images,
    masks: usize,
    chunk: usize,
    reporter: &mut dyn Reporter,
) -> Result<Vec<f64>> {
    let k = masks.clamp(1, model.connectivities());
    let mut model = model.clone();
    let mut per_mask = Vec::with_capacity(k);
    for m in 0..k {
        model.select_connectivity(m);
        per_mask.push(log_probs(&model, set, chunk, reporter)?);
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
    /// Whether these are the raw weights of a run that averages them.
    pub raw_weights: bool,
}

/// Which split to score.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// The 10k validation images.
    Valid,
    /// The 10k test images.
    Test,
}

/// The test (or validation) NLL of a checkpoint; with `raw_weights`, of the raw weights of a
/// run that averages them (see [`ImageModel::load_raw`]).
pub fn eval(
    dir: &Path,
    data_dir: &Path,
    split: Split,
    masks: Option<usize>,
    raw_weights: bool,
    reporter: &mut dyn Reporter,
) -> Result<MnistEvalReport> {
    let m = if raw_weights { ImageModel::load_raw(dir)? } else { ImageModel::load(dir)? };
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
    let nll: Vec<f64> =
        ensemble_log_probs(&m.model, set, k, m.eval_chunk(), reporter)?.into_iter().map(|lp| -lp).collect();
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
        raw_weights,
    })
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
    let lp = ensemble_log_probs(&m.model, &set, m.model.connectivities(), m.eval_chunk(), reporter)?;
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
                log_probs(&model, &set, 3, &mut Silent).unwrap()
            })
            .collect();
        assert!(per_mask[0] != per_mask[1], "the connectivities differ");
        let ensemble = ensemble_log_probs(&model, &set, 3, 3, &mut Silent).unwrap();
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
