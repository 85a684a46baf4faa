//! MNIST as token sequences: the IDX file format (raw or gzip), the static binarized MNIST of
//! Larochelle & Murray (2011; 50k/10k/10k, the split the density-estimation literature reports
//! on) and grey-level MNIST (60k/10k, with labels). An image is 784 tokens in raster order.

use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use super::{Batch, BatchSource};
use crate::rng::Rng;
use crate::{Error, Result};

/// The contents of an IDX file of unsigned bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct Idx {
    /// The dimensions, outermost first (e.g. `[60000, 28, 28]`).
    pub dims: Vec<usize>,
    /// The values, row-major.
    pub data: Vec<u8>,
}

/// The largest IDX file read (raw or inflated): 1 GiB.
const MAX_IDX_BYTES: u64 = 1 << 30;

/// Reads an IDX file of unsigned bytes (type code 0x08), gzip-compressed or not, checking the
/// magic number, the type, the dimensions and that the length matches them exactly.
pub fn read_idx(path: &Path) -> Result<Idx> {
    let bad = |reason: String| Error::Dataset { path: path.to_path_buf(), reason };
    let raw = crate::fsutil::read_regular(path, MAX_IDX_BYTES)?;
    let bytes = if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        // Bounded: a damaged or hostile file must not inflate without limit.
        flate2::read::GzDecoder::new(raw.as_slice())
            .take(MAX_IDX_BYTES + 1)
            .read_to_end(&mut out)
            .map_err(|e| bad(format!("broken gzip data: {e}")))?;
        if out.len() as u64 > MAX_IDX_BYTES {
            return Err(bad(format!("inflates to more than {MAX_IDX_BYTES} bytes: not an MNIST file")));
        }
        out
    } else {
        raw
    };
    if bytes.len() < 4 || bytes[0] != 0 || bytes[1] != 0 {
        return Err(bad(
            "not an IDX file (it must start with two zero bytes, a type code and a dimension count)".into()
        ));
    }
    if bytes[2] != 0x08 {
        return Err(bad(format!("IDX type code 0x{:02x}: only unsigned bytes (0x08) are supported", bytes[2])));
    }
    let ndims = bytes[3] as usize;
    let header = 4 + 4 * ndims;
    if ndims == 0 || bytes.len() < header {
        return Err(bad(format!("{ndims} dimensions but the file is only {} bytes long", bytes.len())));
    }
    let dims: Vec<usize> = (0..ndims)
        .map(|i| u32::from_be_bytes(bytes[4 + 4 * i..8 + 4 * i].try_into().expect("4 bytes")) as usize)
        .collect();
    let expected = dims.iter().try_fold(1usize, |p, &d| p.checked_mul(d)).unwrap_or(usize::MAX);
    let actual = bytes.len() - header;
    if actual != expected {
        return Err(bad(format!(
            "dimensions {dims:?} need {expected} bytes of data, the file has {actual} (truncated or corrupt)"
        )));
    }
    Ok(Idx { dims, data: bytes[header..].to_vec() })
}

/// A set of 28×28 images (and labels, when the set has them).
#[derive(Debug, Clone)]
pub struct Images {
    /// `n × 784` pixel values (0/1 for binarized sets, 0–255 for grey levels).
    pub pixels: Vec<u8>,
    /// Digit labels, for grey-level MNIST.
    pub labels: Option<Vec<u8>>,
    /// The number of images.
    pub n: usize,
}

/// Pixels per image.
pub const PIXELS: usize = 28 * 28;

impl Images {
    /// Image `i` as 784 tokens.
    pub fn image(&self, i: usize) -> &[u8] {
        &self.pixels[i * PIXELS..(i + 1) * PIXELS]
    }

    /// One stochastic binarization: each pixel is 1 with probability level/255.
    pub fn sample_binary(&self, rng: &mut Rng) -> Images {
        let pixels = self.pixels.iter().map(|&v| u8::from(rng.uniform() * 255.0 < v as f64)).collect();
        Images { pixels, labels: self.labels.clone(), n: self.n }
    }

    /// Grey levels (any value above 1) thresholded at 128; binary images stay as they are.
    pub fn binarize(&mut self) {
        if self.pixels.iter().any(|&v| v > 1) {
            self.pixels.iter_mut().for_each(|v| *v = u8::from(*v >= 128));
        }
    }
}

fn images(path: &Path, binary: bool) -> Result<Images> {
    let idx = read_idx(path)?;
    if idx.dims.len() != 3 || idx.dims[1] != 28 || idx.dims[2] != 28 {
        return Err(Error::Dataset {
            path: path.into(),
            reason: format!("dimensions {:?}, expected [n, 28, 28]", idx.dims),
        });
    }
    if binary && let Some(v) = idx.data.iter().find(|&&v| v > 1) {
        return Err(Error::Dataset {
            path: path.into(),
            reason: format!("pixel value {v} in a binarized set (expected 0 or 1)"),
        });
    }
    Ok(Images { n: idx.dims[0], pixels: idx.data, labels: None })
}

fn locate(dir: &Path, name: &str) -> Result<PathBuf> {
    let gz = dir.join(format!("{name}.gz"));
    let plain = dir.join(name);
    if gz.is_file() {
        Ok(gz)
    } else if plain.is_file() {
        Ok(plain)
    } else {
        Err(Error::Dataset {
            path: gz,
            reason: "missing: point --data or WAVEGEN_DATA at the datasets folder (see datasets/README.md)".into(),
        })
    }
}

/// The static binarized MNIST splits: (train 50k, validation 10k, test 10k). Each split is
/// sorted by digit in the file: shuffle before training.
pub fn binarized(data_dir: &Path) -> Result<(Images, Images, Images)> {
    let dir = data_dir.join("binarized_mnist");
    let load = |split: &str| images(&locate(&dir, &format!("binarized_mnist_{split}-images-idx3-ubyte"))?, true);
    Ok((load("train")?, load("valid")?, load("test")?))
}

/// Grey-level MNIST with labels: (train 60k, test 10k).
pub fn grey(data_dir: &Path) -> Result<(Images, Images)> {
    let dir = data_dir.join("mnist");
    let load = |prefix: &str| -> Result<Images> {
        let mut set = images(&locate(&dir, &format!("{prefix}-images-idx3-ubyte"))?, false)?;
        let label_path = locate(&dir, &format!("{prefix}-labels-idx1-ubyte"))?;
        let labels = read_idx(&label_path)?;
        if labels.dims != [set.n] {
            return Err(Error::Dataset {
                path: label_path,
                reason: format!("{:?} labels for {} images", labels.dims, set.n),
            });
        }
        set.labels = Some(labels.data);
        Ok(set)
    };
    Ok((load("train")?, load("t10k")?))
}

/// Grey-level MNIST split for density estimation: (train: the first 50k training images,
/// validation: the last 10k, test: the 10k test images). A smaller training file (a test
/// fixture) gives its last sixth to validation.
pub fn grey_splits(data_dir: &Path) -> Result<(Images, Images, Images)> {
    let (all, test) = grey(data_dir)?;
    if all.n < 2 {
        return Err(Error::Dataset {
            path: data_dir.join("mnist"),
            reason: format!("the training set holds {} images: at least 2 are needed (one to validate)", all.n),
        });
    }
    let cut = all.n - (all.n / 6).clamp(1, 10_000);
    let part = |from: usize, to: usize| Images {
        pixels: all.pixels[from * PIXELS..to * PIXELS].to_vec(),
        labels: all.labels.as_ref().map(|l| l[from..to].to_vec()),
        n: to - from,
    };
    Ok((part(0, cut), part(cut, all.n), test))
}

/// Reads an IDX file of 28×28 images (binary or grey levels), e.g. to score.
pub fn read_images(path: &Path) -> Result<Images> {
    images(path, false)
}

/// Training batches drawn at random from one split (the generator saved in the checkpoint
/// makes resuming exact), validation batches covering another split once.
pub struct ImageBatches<'a> {
    train: &'a Images,
    val: &'a Images,
    batch_size: usize,
    prepare: Prepare,
}

/// What is done to the images of each batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prepare {
    /// Nothing: the pixels are the tokens.
    Nothing,
    /// Grey levels also carried as real values (see [`dequantize`]), for RNADE.
    Dequantize,
    /// Training images binarized afresh each time they are drawn (dynamic binarization);
    /// validation images are expected binary already.
    Binarize,
}

impl<'a> ImageBatches<'a> {
    /// Batches of `batch_size` images, prepared as `prepare` says.
    pub fn new(train: &'a Images, val: &'a Images, batch_size: usize, prepare: Prepare) -> Self {
        ImageBatches { train, val, batch_size, prepare }
    }
}

/// Replaces grey levels by binary pixels, each 1 with probability level/255.
pub fn binarize_batch(mut batch: Batch, rng: &mut Rng) -> Result<Batch> {
    let levels = batch.tokens.flatten_all()?.to_vec1::<u32>()?;
    let bits: Vec<u32> = levels.iter().map(|&l| u32::from(rng.uniform() * 255.0 < l as f64)).collect();
    batch.tokens = Tensor::from_vec(bits, batch.tokens.shape(), &Device::Cpu)?;
    Ok(batch)
}

/// Adds the real values x = (level + u)/256, u ~ U(0, 1) from `rng`, to a batch of 8-bit images:
/// the dequantised data a density model (RNADE) is trained and scored on.
pub fn dequantize(mut batch: Batch, rng: &mut Rng) -> Result<Batch> {
    let levels = batch.tokens.flatten_all()?.to_vec1::<u32>()?;
    let values: Vec<f32> = levels.iter().map(|&l| ((l as f64 + rng.uniform()) / 256.0) as f32).collect();
    batch.values = Some(Tensor::from_vec(values, batch.tokens.shape(), &Device::Cpu)?);
    Ok(batch)
}

/// The images at `indices` as one batch of 784-token sequences.
pub fn batch_of(set: &Images, indices: impl Iterator<Item = usize>) -> Result<Batch> {
    let rows: Vec<Vec<u32>> = indices.map(|i| set.image(i).iter().map(|&v| v as u32).collect()).collect();
    let mask = vec![vec![1.0f32; PIXELS]; rows.len()];
    Batch::from_rows(&rows, &mask, None, &Device::Cpu)
}

impl BatchSource for ImageBatches<'_> {
    fn train_batch(&mut self, rng: &mut Rng) -> Result<Batch> {
        let batch = batch_of(self.train, (0..self.batch_size).map(|_| rng.below(self.train.n)))?;
        match self.prepare {
            Prepare::Nothing => Ok(batch),
            Prepare::Dequantize => dequantize(batch, rng),
            Prepare::Binarize => binarize_batch(batch, rng),
        }
    }

    /// Validation batches of the training batch size: an evaluation pass keeps its graph alive
    /// as a training step does, so this bounds its memory the same way.
    fn val_batches(&self) -> Result<Vec<Batch>> {
        let chunk = self.batch_size.max(1);
        let mut noise = Rng::derived(0, "validation dequantisation"); // the same noise every time
        (0..self.val.n)
            .step_by(chunk)
            .map(|s| {
                let batch = batch_of(self.val, s..(s + chunk).min(self.val.n))?;
                if self.prepare == Prepare::Dequantize { dequantize(batch, &mut noise) } else { Ok(batch) }
            })
            .collect()
    }
}

/// Writes images (784 values each: 0/1, or grey levels when `grey`) as a PNG grid of `cols`
/// columns, each pixel drawn `scale`×`scale`, white digits on black with 2-pixel gaps.
pub fn write_grid(path: &Path, images: &[Vec<u8>], cols: usize, scale: usize, grey: bool) -> Result<()> {
    let cols = cols.clamp(1, images.len().max(1));
    let rows = images.len().div_ceil(cols);
    let (gap, cell) = (2, 28 * scale);
    let (width, height) = (cols * (cell + gap) + gap, rows * (cell + gap) + gap);
    let mut pixels = vec![64u8; width * height]; // grey gaps
    for (n, img) in images.iter().enumerate() {
        let (x0, y0) = (gap + (n % cols) * (cell + gap), gap + (n / cols) * (cell + gap));
        for y in 0..cell {
            for x in 0..cell {
                let v = img[(y / scale) * 28 + x / scale];
                pixels[(y0 + y) * width + x0 + x] = if grey { v } else { v.min(1) * 255 };
            }
        }
    }
    crate::fsutil::write_png(path, width, height, &pixels, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn idx_bytes(dims: &[u32], data: &[u8]) -> Vec<u8> {
        let mut b = vec![0, 0, 0x08, dims.len() as u8];
        for d in dims {
            b.extend_from_slice(&d.to_be_bytes());
        }
        b.extend_from_slice(data);
        b
    }

    #[test]
    fn reads_raw_and_gzip_and_names_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("a.idx");
        std::fs::write(&raw, idx_bytes(&[2, 3], &[1, 2, 3, 4, 5, 6])).unwrap();
        assert_eq!(read_idx(&raw).unwrap(), Idx { dims: vec![2, 3], data: vec![1, 2, 3, 4, 5, 6] });
        let gz = dir.path().join("a.idx.gz");
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        std::io::Write::write_all(&mut enc, &idx_bytes(&[2, 3], &[1, 2, 3, 4, 5, 6])).unwrap();
        std::fs::write(&gz, enc.finish().unwrap()).unwrap();
        assert_eq!(read_idx(&gz).unwrap().data, vec![1, 2, 3, 4, 5, 6]);

        let cases: [(&str, Vec<u8>, &str); 4] = [
            ("magic", b"PK\x03\x04 not idx".to_vec(), "not an IDX file"),
            ("type", vec![0, 0, 0x0d, 1, 0, 0, 0, 1, 0, 0, 0, 0], "type code 0x0d"),
            ("short", idx_bytes(&[2, 3], &[1, 2, 3]), "truncated"),
            ("long", idx_bytes(&[1, 2], &[1, 2, 3]), "the file has 3"),
        ];
        for (name, bytes, needle) in cases {
            let p = dir.path().join(name);
            std::fs::write(&p, bytes).unwrap();
            let err = read_idx(&p).unwrap_err().to_string();
            assert!(err.contains(needle) && err.contains(name), "{name}: {err}");
        }
        let missing = locate(dir.path(), "nothing-here").unwrap_err().to_string();
        assert!(missing.contains("WAVEGEN_DATA"), "{missing}");
    }

    #[test]
    fn dequantised_values_stay_inside_their_level() {
        let set = Images { pixels: (0..2 * PIXELS).map(|i| (i * 7 % 256) as u8).collect(), labels: None, n: 2 };
        let batch = dequantize(batch_of(&set, 0..2).unwrap(), &mut Rng::new(3)).unwrap();
        let levels = batch.tokens.flatten_all().unwrap().to_vec1::<u32>().unwrap();
        let values = batch.values.unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (&l, &v) in levels.iter().zip(&values) {
            let x = v as f64 * 256.0;
            assert!(x >= l as f64 && x < l as f64 + 1.0, "level {l}, value {v}");
        }
        let spread =
            values.iter().zip(&levels).map(|(&v, &l)| v as f64 * 256.0 - l as f64).sum::<f64>() / values.len() as f64;
        assert!((spread - 0.5).abs() < 0.05, "uniform noise has mean 1/2: {spread}");
    }
}
