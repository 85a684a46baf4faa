//! Layer normalisation over the last axis as one operation with its own backward pass. candle's
//! fused `layer_norm` has no backward pass, and written in its operations it is about ten
//! passes over the activations, each allocating (mean, centre, square, mean, add, sqrt, divide,
//! scale, shift, and as many again backward): a fifth of a transformer's training step.
//!
//! `y = (x − μ) / √(σ² + ε) · w + b` per row, μ and σ² the row's mean and (biased) variance.
//! Backward, with `x̂` the normalised row and `g = dy · w`: `dx = (g − mean(g) − x̂ ·
//! mean(g · x̂)) / √(σ² + ε)`, `dw = Σ_rows dy · x̂`, `db = Σ_rows dy`.

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};

use super::{contiguous_slice, in_place, like};
use crate::Result;

/// ε, as PyTorch's default.
pub const EPS: f64 = 1e-5;

/// The layer norm of `x (…, D)` with `weight (D,)` and `bias (D,)`.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let d = x.dims().last().copied().unwrap_or(0);
    if weight.dims() != [d] || bias.dims() != [d] {
        return Err(crate::Error::Config(format!(
            "layer norm: weight {:?} and bias {:?} for rows of {d}",
            weight.dims(),
            bias.dims()
        )));
    }
    Ok(x.contiguous()?.apply_op3(&weight.contiguous()?, &bias.contiguous()?, LayerNorm)?)
}

/// The same in candle's operations, for the tests.
pub fn layer_norm_reference(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    use candle_core::D;
    let centred = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centred.broadcast_div(&(var + EPS)?.sqrt()?)?;
    Ok(normed.broadcast_mul(weight)?.broadcast_add(bias)?)
}

/// The float types the op runs in: f32 for training, f64 for the gradient checks.
pub trait Float:
    Copy
    + Default
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::AddAssign
    + candle_core::WithDType
{
}
impl Float for f32 {}
impl Float for f64 {}

/// The sum of `x` in 16 independent lanes (an order the compiler can vectorise).
#[inline(always)]
fn sum<T: Float>(x: impl Iterator<Item = T>) -> T {
    let mut acc = [T::default(); 16];
    for (i, v) in x.enumerate() {
        acc[i % 16] += v;
    }
    acc.iter().fold(T::default(), |a, &v| a + v)
}

/// The row's mean and 1 / √(σ² + ε).
#[inline(always)]
fn moments<T: Float>(row: &[T]) -> (T, T) {
    let n = row.len() as f64;
    let mean = sum(row.iter().copied()).to_f64() / n;
    let m = T::from_f64(mean);
    let var = sum(row.iter().map(|&v| (v - m) * (v - m))).to_f64() / n;
    (m, T::from_f64(1.0 / (var + EPS).sqrt()))
}

/// The layer norm of the rows of `x` (each as long as `w`).
pub(crate) fn forward<T: Float>(x: &[T], w: &[T], b: &[T]) -> Vec<T> {
    let mut y = vec![T::default(); x.len()];
    for (row, out) in x.chunks_exact(w.len()).zip(y.chunks_exact_mut(w.len())) {
        let (mean, rstd) = moments(row);
        for (((o, &v), &w), &b) in out.iter_mut().zip(row).zip(w).zip(b) {
            *o = (v - mean) * rstd * w + b;
        }
    }
    y
}

/// `(dx, dw, db)` from `dy`, the gradient of [`forward`]'s output.
pub(crate) fn backward<T: Float>(x: &[T], w: &[T], dy: &[T]) -> (Vec<T>, Vec<T>, Vec<T>) {
    let d = w.len();
    let (mut dx, mut dw, mut db) = (vec![T::default(); x.len()], vec![T::default(); d], vec![T::default(); d]);
    let mut xhat = vec![T::default(); d];
    for ((row, g), out) in x.chunks_exact(d).zip(dy.chunks_exact(d)).zip(dx.chunks_exact_mut(d)) {
        let (mean, rstd) = moments(row);
        xhat.iter_mut().zip(row).for_each(|(h, &v)| *h = (v - mean) * rstd);
        for i in 0..d {
            dw[i] += g[i] * xhat[i];
            db[i] += g[i];
        }
        let inv_n = T::from_f64(1.0 / d as f64);
        let g_mean = sum(g.iter().zip(w).map(|(&g, &w)| g * w)) * inv_n;
        let gx_mean = sum(g.iter().zip(w).zip(&xhat).map(|((&g, &w), &h)| g * w * h)) * inv_n;
        for i in 0..d {
            out[i] = (g[i] * w[i] - g_mean - xhat[i] * gx_mean) * rstd;
        }
    }
    (dx, dw, db)
}

struct LayerNorm;

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "layer-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let op = "layer norm";
        let y = match (xs, ws, bs) {
            (CpuStorage::F32(x), CpuStorage::F32(w), CpuStorage::F32(b)) => CpuStorage::F32(forward(
                contiguous_slice(x, xl, op)?,
                contiguous_slice(w, wl, op)?,
                contiguous_slice(b, bl, op)?,
            )),
            (CpuStorage::F64(x), CpuStorage::F64(w), CpuStorage::F64(b)) => CpuStorage::F64(forward(
                contiguous_slice(x, xl, op)?,
                contiguous_slice(w, wl, op)?,
                contiguous_slice(b, bl, op)?,
            )),
            _ => candle_core::bail!("{op}: f32 or f64 operands of one type only"),
        };
        Ok((y, xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let op = "layer norm";
        let dy = dy.contiguous()?;
        macro_rules! grads {
            ($t:ty) => {
                in_place(x, op, |xv: &[$t]| {
                    in_place(w, op, |wv: &[$t]| {
                        in_place(&dy, op, |g: &[$t]| {
                            let (dx, dw, db) = backward(xv, wv, g);
                            Ok((like(dx, x)?, like(dw, w)?, like(db, b)?))
                        })
                    })
                })?
            };
        }
        let (dx, dw, db) = match x.dtype() {
            candle_core::DType::F32 => grads!(f32),
            candle_core::DType::F64 => grads!(f64),
            other => candle_core::bail!("{op}: unsupported dtype {other:?}"),
        };
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::*;
    use crate::rng::Rng;

    #[test]
    fn matches_candle_operations_and_their_gradients() {
        let mut rng = Rng::new(9);
        let mut random = |shape: &[usize]| {
            let n = shape.iter().product();
            Var::from_vec((0..n).map(|_| rng.normal()).collect::<Vec<f64>>(), shape, &Device::Cpu).unwrap()
        };
        let (x, w, b) = (random(&[2, 3, 37]), random(&[37]), random(&[37]));
        let probe = random(&[2, 3, 37]);
        let ours = layer_norm(&x, &w, &b).unwrap();
        let theirs = layer_norm_reference(&x, &w, &b).unwrap();
        let diff =
            |a: &Tensor, b: &Tensor| (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
        assert!(diff(&ours, &theirs) < 1e-12);
        let g1 = (ours * probe.as_tensor()).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (theirs * probe.as_tensor()).unwrap().sum_all().unwrap().backward().unwrap();
        for v in [&x, &w, &b] {
            let d = diff(g1.get(v).unwrap(), g2.get(v).unwrap());
            assert!(d < 1e-12, "gradients differ by {d}");
        }
    }
}
