//! Properties every model of the core must have, written once and run over every model by the
//! tests: causality, cached stepping equal to the parallel pass, and gradients equal to finite
//! differences (candle 0.11 computes some gradients wrongly on the CPU, so each model's
//! formulation is checked, at batch ≥ 2).

use candle_core::{DType, Device, Tensor};

use super::params::Params;
use super::{Autoregressive, masked_nll};
use crate::Result;
use crate::data::Batch;
use crate::rng::Rng;

/// Random tokens `(B, T)` in `0..vocab`.
pub fn random_tokens(batch: usize, len: usize, vocab: usize, rng: &mut Rng) -> Result<Tensor> {
    let v: Vec<u32> = (0..batch * len).map(|_| rng.below(vocab) as u32).collect();
    Ok(Tensor::from_vec(v, (batch, len), &Device::Cpu)?)
}

fn to_rows(t: &Tensor) -> Result<Vec<Vec<Vec<f64>>>> {
    Ok(t.to_dtype(DType::F64)?.to_vec3::<f64>()?)
}

/// Changes the token at each position in turn (in the model's ordering: the k-th generated)
/// and checks that no logit at a position generated up to it moves, while the logits of the
/// next one do (so the check cannot pass on a model that ignores its input). Returns a
/// description of the first violation.
pub fn causality<M: Autoregressive>(
    model: &M,
    tokens: &Tensor,
    labels: Option<&Tensor>,
) -> Result<std::result::Result<(), String>> {
    let (_b, len) = tokens.dims2()?;
    let order = generation_order(model, len)?;
    let base = to_rows(&model.forward(tokens, labels)?)?;
    let mut rows = tokens.to_vec2::<u32>()?;
    let mut moved_next = 0;
    for (k, &t) in order.iter().enumerate() {
        let old = rows[0][t];
        rows[0][t] = (old + 1) % model.vocab_size() as u32;
        let changed = Tensor::new(rows.clone(), &Device::Cpu)?;
        let out = to_rows(&model.forward(&changed, labels)?)?;
        rows[0][t] = old;
        for &s in &order[..=k] {
            let diff = max_abs_diff(&base[0][s], &out[0][s]);
            if diff > 0.0 {
                return Ok(Err(format!("changing token {t} changed the logits at position {s} by {diff:e}")));
            }
        }
        if k + 1 < len && max_abs_diff(&base[0][order[k + 1]], &out[0][order[k + 1]]) > 0.0 {
            moved_next += 1;
        }
        for other in 1..base.len() {
            if max_abs_diff(&base[other][t], &out[other][t]) > 0.0 {
                return Ok(Err(format!("changing sequence 0 changed sequence {other}")));
            }
        }
    }
    if moved_next == 0 && len > 1 {
        return Ok(Err("no logit depends on the previous token: the check would be vacuous".into()));
    }
    Ok(Ok(()))
}

/// The model's generation order of `len` positions, checked to be a permutation.
fn generation_order<M: Autoregressive>(model: &M, len: usize) -> Result<Vec<usize>> {
    let order = model.ordering().unwrap_or_else(|| (0..len).collect());
    let mut seen = vec![false; len];
    if order.len() != len || !order.iter().all(|&p| p < len && !std::mem::replace(&mut seen[p], true)) {
        return Err(crate::Error::Config(format!("the model's ordering is not a permutation of {len} positions")));
    }
    Ok(order)
}

/// The largest absolute difference between the parallel logits and those of the stepper fed
/// the same tokens (in the model's ordering).
pub fn stepper_vs_forward<M: Autoregressive>(model: &M, tokens: &Tensor, labels: Option<&Tensor>) -> Result<f64> {
    let (b, len) = tokens.dims2()?;
    let order = generation_order(model, len)?;
    let full = to_rows(&model.forward(tokens, labels)?)?;
    let rows = tokens.to_vec2::<u32>()?;
    let mut state = model.start(b, labels)?;
    let mut worst: f64 = 0.0;
    for k in 0..len {
        let prev = if k == 0 {
            None
        } else {
            Some(Tensor::new(rows.iter().map(|r| r[order[k - 1]]).collect::<Vec<u32>>(), &Device::Cpu)?)
        };
        let step = model.step(&mut state, prev.as_ref())?.to_dtype(DType::F64)?.to_vec2::<f64>()?;
        for i in 0..b {
            worst = worst.max(max_abs_diff(&step[i], &full[i][order[k]]));
        }
    }
    Ok(worst)
}

/// The largest absolute difference between the parallel logits and those [`Autoregressive::prefill`]
/// gives after the first `prefix` tokens (in the model's ordering), for every prefix length
/// in `prefixes`.
pub fn prefill_vs_forward<M: Autoregressive>(
    model: &M,
    tokens: &Tensor,
    labels: Option<&Tensor>,
    prefixes: &[usize],
) -> Result<f64> {
    let (b, len) = tokens.dims2()?;
    let order = generation_order(model, len)?;
    let full = to_rows(&model.forward(tokens, labels)?)?;
    let rows = tokens.to_vec2::<u32>()?;
    let mut worst: f64 = 0.0;
    for &t in prefixes.iter().filter(|&&t| t < len) {
        let prefix: Vec<u32> = rows.iter().flat_map(|r| order[..t].iter().map(|&p| r[p])).collect();
        let prefix = Tensor::from_vec(prefix, (b, t), &Device::Cpu)?;
        let mut state = model.start(b, labels)?;
        let next = model.prefill(&mut state, &prefix)?.to_dtype(DType::F64)?.to_vec2::<f64>()?;
        for i in 0..b {
            worst = worst.max(max_abs_diff(&next[i], &full[i][order[t]]));
        }
    }
    Ok(worst)
}

fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
}

/// Compares the gradient of the mean NLL of `batch` ([`masked_nll`]) with central finite
/// differences at `per_tensor` random entries of every parameter (the model must be built in
/// f64 from `params`). Returns the worst entry and its relative error
/// |g − g_fd| / max(|g| + |g_fd|, 1e-4).
///
/// Every parameter is first jittered by N(0, 0.05²): freshly initialised biases are exactly 0,
/// which puts ReLUs exactly on their kink (at the first position every input is 0), where a
/// finite difference measures half a derivative and the check would fail for no fault.
pub fn gradient_check<M: Autoregressive>(
    model: &M,
    params: &Params,
    batch: &Batch,
    per_tensor: usize,
    rng: &mut Rng,
) -> Result<(String, f64)> {
    let loss_of = || -> Result<f64> { Ok(masked_nll(model, batch)?.to_dtype(DType::F64)?.to_scalar::<f64>()?) };
    for (_, var) in params.named() {
        let jitter: Vec<f64> = (0..var.elem_count()).map(|_| 0.05 * rng.normal()).collect();
        let jitter = Tensor::from_vec(jitter, var.shape().clone(), &Device::Cpu)?.to_dtype(var.dtype())?;
        var.set(&(var.as_tensor() + jitter)?)?;
    }
    let grads = masked_nll(model, batch)?.backward()?;
    let eps = 1e-6;
    let mut worst = (String::new(), 0.0f64);
    for (name, var) in params.named() {
        let shape = var.shape().clone();
        let analytic = match grads.get(&var) {
            Some(g) => g.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?,
            None => vec![0.0; shape.elem_count()],
        };
        let values = var.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        for _ in 0..per_tensor {
            let i = rng.below(values.len());
            let probe = |delta: f64| -> Result<f64> {
                let mut v = values.clone();
                v[i] += delta;
                var.set(&Tensor::from_vec(v, shape.clone(), &Device::Cpu)?.to_dtype(var.dtype())?)?;
                loss_of()
            };
            let numeric = (probe(eps)? - probe(-eps)?) / (2.0 * eps);
            var.set(&Tensor::from_vec(values.clone(), shape.clone(), &Device::Cpu)?.to_dtype(var.dtype())?)?;
            let error = (analytic[i] - numeric).abs() / (analytic[i].abs() + numeric.abs()).max(1e-4);
            if error > worst.1 {
                worst = (format!("{name}[{i}]: autograd {:e}, finite difference {numeric:e}", analytic[i]), error);
            }
        }
    }
    Ok(worst)
}

/// For a model whose `forward` has a hand-written backward pass: compares its logits and the
/// gradient of the mean NLL of `batch` for every parameter with candle's autograd of
/// [`Autoregressive::forward_reference`]. Returns `None` for a model without a reference, else
/// the largest logit difference and the worst parameter with its relative gradient error
/// max |g − g_ref| / max(max |g_ref|, 1e-6).
pub fn fused_vs_reference<M: Autoregressive>(
    model: &M,
    params: &Params,
    batch: &Batch,
) -> Result<Option<(f64, String, f64)>> {
    let labels = batch.labels.as_ref();
    let Some(reference) = model.forward_reference(&batch.tokens, labels) else { return Ok(None) };
    let reference = reference?;
    let fused = model.forward(&batch.tokens, labels)?;
    let logit_diff = (&fused - &reference)?.abs()?.max_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    let loss = |logits: &Tensor| -> Result<Tensor> {
        let nll = super::token_nll(logits, &batch.tokens)?;
        let mask = batch.mask.to_dtype(nll.dtype())?;
        let count = mask.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?.max(1.0);
        Ok(((nll * mask)?.sum_all()? / count)?)
    };
    let g_ref = loss(&reference)?.backward()?;
    // Both of the model's own paths: the loss from its logits, and its own per-position NLL.
    let g_logits = loss(&fused)?.backward()?;
    let g_nll = super::masked_nll(model, batch)?.backward()?;
    let mut worst = (String::new(), 0.0f64);
    for ((name, var), g_fused) in params.named().into_iter().flat_map(|nv| [(nv.clone(), &g_logits), (nv, &g_nll)]) {
        let get = |g: &candle_core::backprop::GradStore| -> Result<Vec<f64>> {
            Ok(match g.get(&var) {
                Some(t) => t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?,
                None => vec![0.0; var.elem_count()],
            })
        };
        let (a, b) = (get(g_fused)?, get(&g_ref)?);
        let scale = b.iter().fold(0.0f64, |m, x| m.max(x.abs())).max(1e-6);
        let err = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max) / scale;
        if err > worst.1 || worst.0.is_empty() {
            worst = (name, err);
        }
    }
    Ok(Some((logit_diff, worst.0, worst.1)))
}
