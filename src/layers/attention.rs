//! Causal softmax of attention scores as one operation with its own backward pass: the scale,
//! the causal mask and the softmax in one pass over the `T_q × T_k` scores. In candle's
//! operations it would be six passes and allocations, and its `exp` is libm's, one element at
//! a time (the scores are the largest tensors of a transformer over 784 pixels).

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};

use super::{contiguous_slice, per_cpu};
use crate::Result;
use crate::fastmath::fast_exp;

/// `softmax(scale · s)` over the last axis of `scores (…, T_q, T_k)`, where query i (the last
/// T_q of T_k positions) sees the keys j ≤ i + T_k − T_q, and the rest get probability 0.
pub fn causal_softmax(scores: &Tensor, scale: f64) -> Result<Tensor> {
    Ok(scores.contiguous()?.apply_op1(CausalSoftmax { scale })?)
}

/// The same in candle's operations, for the tests.
pub fn causal_softmax_reference(scores: &Tensor, scale: f64) -> Result<Tensor> {
    let dims = scores.dims();
    let (tq, tk) = (dims[dims.len() - 2], dims[dims.len() - 1]);
    let mask: Vec<f64> =
        (0..tq * tk).map(|k| if k % tk <= k / tk + tk - tq { 0.0 } else { f64::NEG_INFINITY }).collect();
    let mask = Tensor::from_vec(mask, (tq, tk), scores.device())?.to_dtype(scores.dtype())?;
    Ok(candle_nn::ops::softmax(&(scores * scale)?.broadcast_add(&mask)?, candle_core::D::Minus1)?)
}

struct CausalSoftmax {
    scale: f64,
}

struct CausalSoftmaxGrad {
    scale: f64,
}

trait Float:
    Copy
    + Default
    + PartialOrd
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::AddAssign
    + std::ops::DivAssign
    + std::ops::MulAssign
{
    fn exp(self) -> Self;
}

impl Float for f32 {
    #[inline(always)]
    fn exp(self) -> f32 {
        fast_exp(self)
    }
}

impl Float for f64 {
    fn exp(self) -> f64 {
        f64::exp(self)
    }
}

/// The (T_q, T_k) of the last two axes.
fn sizes(shape: &Shape) -> candle_core::Result<(usize, usize)> {
    match shape.dims() {
        [.., tq, tk] if tq <= tk => Ok((*tq, *tk)),
        d => candle_core::bail!("causal softmax: scores of shape {d:?} need T_q ≤ T_k"),
    }
}

#[inline(always)]
fn forward<T: Float>(s: &[T], tq: usize, tk: usize, scale: T) -> Vec<T> {
    let mut p = vec![T::default(); s.len()];
    for (k, (row, out)) in s.chunks_exact(tk).zip(p.chunks_exact_mut(tk)).enumerate() {
        let seen = k % tq + tk - tq + 1;
        let (row, out) = (&row[..seen], &mut out[..seen]);
        let max = row.iter().fold(row[0], |m, &v| if v > m { v } else { m });
        let mut sum = T::default();
        for (o, &v) in out.iter_mut().zip(row) {
            *o = ((v - max) * scale).exp();
            sum += *o;
        }
        out.iter_mut().for_each(|o| *o /= sum);
    }
    p
}

/// dS = scale · P ⊙ (dP − Σ_j dP_j P_j), row by row.
#[inline(always)]
fn backward<T: Float>(p: &[T], dp: &[T], tk: usize, scale: T) -> Vec<T> {
    let mut ds = vec![T::default(); p.len()];
    for ((p, dp), ds) in p.chunks_exact(tk).zip(dp.chunks_exact(tk)).zip(ds.chunks_exact_mut(tk)) {
        let mut dot = T::default();
        p.iter().zip(dp).for_each(|(&a, &b)| dot += a * b);
        for ((d, &a), &b) in ds.iter_mut().zip(p).zip(dp) {
            *d = a * (b - dot) * scale;
        }
    }
    ds
}

/// The f32 loops compiled for this CPU's vector unit.
mod fast {
    use super::{backward, forward, per_cpu};
    per_cpu! {
        pub fn forward_f32(s: &[f32], tq: usize, tk: usize, scale: f32) -> Vec<f32> = forward;
        pub fn backward_f32(p: &[f32], dp: &[f32], tk: usize, scale: f32) -> Vec<f32> = backward;
    }
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "causal-softmax"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (tq, tk) = sizes(layout.shape())?;
        let op = "causal softmax";
        let p = match storage {
            CpuStorage::F32(v) => {
                CpuStorage::F32(fast::forward_f32(contiguous_slice(v, layout, op)?, tq, tk, self.scale as f32))
            }
            CpuStorage::F64(v) => CpuStorage::F64(forward(contiguous_slice(v, layout, op)?, tq, tk, self.scale)),
            _ => candle_core::bail!("{op}: only f32 and f64 are supported"),
        };
        Ok((p, layout.shape().clone()))
    }

    fn bwd(&self, _scores: &Tensor, p: &Tensor, dp: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(p.apply_op2_no_bwd(&dp.contiguous()?, &CausalSoftmaxGrad { scale: self.scale })?))
    }
}

impl CustomOp2 for CausalSoftmaxGrad {
    fn name(&self) -> &'static str {
        "causal-softmax-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (_tq, tk) = sizes(l1.shape())?;
        let op = "causal softmax";
        let ds = match (s1, s2) {
            (CpuStorage::F32(p), CpuStorage::F32(d)) => CpuStorage::F32(fast::backward_f32(
                contiguous_slice(p, l1, op)?,
                contiguous_slice(d, l2, op)?,
                tk,
                self.scale as f32,
            )),
            (CpuStorage::F64(p), CpuStorage::F64(d)) => {
                CpuStorage::F64(backward(contiguous_slice(p, l1, op)?, contiguous_slice(d, l2, op)?, tk, self.scale))
            }
            _ => candle_core::bail!("{op}: unsupported dtypes"),
        };
        Ok((ds, l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::*;
    use crate::rng::Rng;

    /// Values and gradients equal candle's scale, mask and softmax, for square scores (training)
    /// and for the last queries of a longer key sequence (a cache).
    #[test]
    fn matches_masked_softmax_and_its_gradient() {
        let mut rng = Rng::new(5);
        for (tq, tk) in [(6, 6), (2, 7), (1, 5)] {
            let n = 3 * tq * tk;
            let s =
                Var::from_vec((0..n).map(|_| rng.normal()).collect::<Vec<f64>>(), (3, tq, tk), &Device::Cpu).unwrap();
            let probe = Tensor::from_vec((0..n).map(|_| rng.normal()).collect::<Vec<f64>>(), (3, tq, tk), &Device::Cpu)
                .unwrap();
            let ours = causal_softmax(&s, 0.7).unwrap();
            let theirs = causal_softmax_reference(&s, 0.7).unwrap();
            let diff =
                |a: &Tensor, b: &Tensor| (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
            assert!(diff(&ours, &theirs) < 1e-12, "{tq}×{tk}");
            let g1 = (ours * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (theirs * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            assert!(diff(g1.get(&s).unwrap(), g2.get(&s).unwrap()) < 1e-12, "{tq}×{tk} gradient");
        }
    }
}
