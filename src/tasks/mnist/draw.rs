//! `wavegen mnist sample` and `complete`: digits drawn by the cached stepper (or naively) into
//! PNG grids.

use super::*;

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
