//! A model's named parameters: a candle `VarMap` whose fresh variables are drawn from a seeded
//! generator (candle's CPU generator cannot be seeded), so that the same seed gives the same
//! initial weights on every run, and whose safetensors I/O names the tensor at fault.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::{Init, VarBuilder, VarMap};

use crate::rng::Rng;
use crate::{Error, Result};

/// Named trainable tensors.
#[derive(Clone)]
pub struct Params {
    varmap: VarMap,
    seed: u64,
}

/// The backend behind [`Params::var_builder`]: returns the existing variable of a name, or
/// creates it from `Rng::derived(seed, name)`, which makes each tensor's initial value depend
/// only on the seed and its name (not on the order the model asks for them).
struct SeededBackend {
    varmap: VarMap,
    seed: u64,
}

impl candle_nn::var_builder::SimpleBackend for SeededBackend {
    fn get(&self, shape: Shape, name: &str, init: Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let mut vars = self.varmap.data().lock().expect("invariant: lock not poisoned");
        if let Some(var) = vars.get(name) {
            if var.shape() != &shape {
                candle_core::bail!("shape mismatch for {name}: {:?} exists, {:?} requested", var.shape(), shape);
            }
            return Ok(var.as_tensor().clone());
        }
        let mut rng = Rng::derived(self.seed, name);
        let n = shape.elem_count();
        let values: Vec<f64> = match init {
            Init::Const(c) => vec![c; n],
            Init::Randn { mean, stdev } => (0..n).map(|_| mean + stdev * rng.normal()).collect(),
            Init::Uniform { lo, up } => (0..n).map(|_| lo + (up - lo) * rng.uniform()).collect(),
            other => candle_core::bail!("{name}: initialiser {other:?} is not supported by the seeded parameter store"),
        };
        let var = Var::from_tensor(&Tensor::from_vec(values, shape, dev)?.to_dtype(dtype)?)?;
        let tensor = var.as_tensor().clone();
        vars.insert(name.to_string(), var);
        Ok(tensor)
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> candle_core::Result<Tensor> {
        let vars = self.varmap.data().lock().expect("invariant: lock not poisoned");
        match vars.get(name) {
            Some(v) => Ok(v.as_tensor().clone()),
            None => candle_core::bail!("no parameter named {name}"),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.varmap.data().lock().expect("invariant: lock not poisoned").contains_key(name)
    }
}

impl Params {
    /// An empty store whose fresh parameters are drawn from `seed`.
    pub fn new(seed: u64) -> Self {
        Params { varmap: VarMap::new(), seed }
    }

    /// A `VarBuilder` that creates (or returns) parameters in this store.
    pub fn var_builder(&self, dtype: DType) -> VarBuilder<'static> {
        VarBuilder::from_backend(
            Box::new(SeededBackend { varmap: self.varmap.clone(), seed: self.seed }),
            dtype,
            Device::Cpu,
        )
    }

    /// All parameters, sorted by name.
    pub fn named(&self) -> Vec<(String, Var)> {
        let vars = self.varmap.data().lock().expect("invariant: lock not poisoned");
        let mut all: Vec<(String, Var)> = vars.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// The total number of scalars.
    pub fn count(&self) -> usize {
        self.named().iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// The current values, by name (for saving).
    pub fn tensors(&self) -> Vec<(String, Tensor)> {
        self.named().into_iter().map(|(k, v)| (k, v.as_tensor().clone())).collect()
    }

    /// Replaces every parameter's value with the tensor of the same name in `tensors`; fails,
    /// naming the tensor, if one is missing, extra, or of another shape.
    pub fn assign(&self, tensors: &HashMap<String, Tensor>, source: &Path) -> Result<()> {
        let named = self.named();
        for (name, var) in &named {
            let t = tensors.get(name).ok_or_else(|| {
                Error::checkpoint(
                    source,
                    format!("tensor {name} is missing (was the checkpoint made by another model or version?)"),
                )
            })?;
            if t.shape() != var.shape() {
                return Err(Error::checkpoint(
                    source,
                    format!("tensor {name} has shape {:?}, the model config needs {:?}", t.dims(), var.dims()),
                ));
            }
            let t = t.to_dtype(var.dtype())?;
            let finite = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?.iter().all(|x| x.is_finite());
            if !finite {
                return Err(Error::checkpoint(
                    source,
                    format!(
                        "tensor {name} holds NaN or infinite values (training diverged): use an earlier checkpoint, or retrain with a lower --lr"
                    ),
                ));
            }
            var.set(&t)?;
        }
        if let Some(extra) = tensors.keys().filter(|k| !named.iter().any(|(n, _)| n == *k)).min() {
            return Err(Error::checkpoint(
                source,
                format!("tensor {extra} is not part of the model described by config.json"),
            ));
        }
        Ok(())
    }
}

/// Serialises named tensors (and string metadata) as safetensors bytes.
pub fn safetensors_bytes(tensors: &[(String, Tensor)], metadata: HashMap<String, String>) -> Result<Vec<u8>> {
    let views: Vec<(&str, &Tensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    safetensors::serialize(views, Some(metadata)).map_err(|e| Error::Config(format!("serialising tensors: {e}")))
}

/// Parses the bytes of a safetensors file (gzip-compressed if `path`'s name ends in `.gz`)
/// into named tensors and its metadata; `path` names the file in errors.
pub fn parse_safetensors(
    path: &Path,
    mut bytes: Vec<u8>,
) -> Result<(HashMap<String, Tensor>, HashMap<String, String>)> {
    if path.extension().is_some_and(|e| e == "gz") {
        // Bounded: a small damaged or hostile file must not inflate without limit.
        const MAX_INFLATED: u64 = 4 << 30;
        let mut raw = Vec::new();
        let inflated = std::io::Read::read_to_end(
            &mut std::io::Read::take(flate2::read::GzDecoder::new(bytes.as_slice()), MAX_INFLATED + 1),
            &mut raw,
        )
        .map_err(|e| Error::checkpoint(path, format!("not a readable gzip file: {e}")))?;
        if inflated as u64 > MAX_INFLATED {
            return Err(Error::checkpoint(path, "inflates to more than 4 GiB: not a wavegen weights file"));
        }
        bytes = raw;
    }
    let unreadable = |e: String| Error::checkpoint(path, format!("not a readable safetensors file: {e}"));
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| unreadable(e.to_string()))?;
    let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).map_err(|e| unreadable(e.to_string()))?;
    Ok((tensors, header.metadata().clone().unwrap_or_default()))
}
