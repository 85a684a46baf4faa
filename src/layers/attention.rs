//! Causal multi-head self-attention as one operation with its own backward pass, computed a
//! block of queries at a time (as FlashAttention does, Dao et al. 2022): the scores of one head
//! and 64 queries are a small matrix that stays in cache, and the `(B·H, T, T)` scores and
//! probabilities are never stored. In candle's operations a 784-pixel image needed them twice
//! per layer (150 MB a layer at batch 16), with a transpose of the heads in and out; the
//! backward pass recomputes each block's probabilities from the scores and the per-query
//! log-sum-exp kept by the forward pass.
//!
//! Query `i` sees the keys `j ≤ i`. Each head's queries, keys and values are column blocks of
//! the one `(B, T, 3D)` projection, read in place (strided views), and the output is `(B, T,
//! D)` with the heads side by side, so no transpose is needed either way.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::matmul::{Bf16, Exact, Mat, Products, Scalar, amx};
use super::{contiguous_slice, per_cpu};
use crate::Result;
use crate::core::train::Precision;
use crate::fastmath::fast_exp;

/// Queries per block.
const BLOCK: usize = 64;

/// `softmax(q kᵀ / √(D/H)) v` per head over `qkv (B, T, 3D)` (the queries, keys and values side
/// by side, each `heads` blocks of D/H columns), causally: `(B, T, D)`. In bf16 `precision`
/// (with AMX), the four products of each block take bfloat16 operands, summed in f32; the
/// softmax and the log-sum-exp stay in f32.
pub fn causal_attention(qkv: &Tensor, heads: usize, precision: Precision) -> Result<Tensor> {
    let (_b, _t, d3) = qkv.dims3()?;
    if heads == 0 || !d3.is_multiple_of(3 * heads) {
        return Err(crate::Error::Config(format!(
            "causal attention: width {d3} is not 3 × {heads} heads × a head size"
        )));
    }
    let bf16 = precision == Precision::Bf16 && amx::available();
    Ok(qkv.contiguous()?.apply_op1(CausalAttention { heads, bf16, lse: Mutex::new(None) })?)
}

/// The same in candle's operations (split heads, scores, mask, softmax, weighted sum), for the
/// tests.
pub fn causal_attention_reference(qkv: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, t, d3) = qkv.dims3()?;
    let (d, dh) = (d3 / 3, d3 / 3 / heads);
    let split = |i: usize| -> Result<Tensor> {
        let x = qkv.narrow(2, i * d, d)?.reshape((b, t, heads, dh))?.transpose(1, 2)?.contiguous()?;
        Ok(x.reshape((b * heads, t, dh))?)
    };
    let (q, k, v) = (split(0)?, split(1)?, split(2)?);
    let scores = (q.matmul(&k.t()?.contiguous()?)? / (dh as f64).sqrt())?;
    let mask: Vec<f64> = (0..t * t).map(|n| if n % t <= n / t { 0.0 } else { f64::NEG_INFINITY }).collect();
    let mask = Tensor::from_vec(mask, (t, t), qkv.device())?.to_dtype(qkv.dtype())?;
    let p = candle_nn::ops::softmax(&scores.broadcast_add(&mask)?, candle_core::D::Minus1)?;
    let out = p.matmul(&v)?.reshape((b, heads, t, dh))?.transpose(1, 2)?.contiguous()?;
    Ok(out.reshape((b, t, d))?)
}

/// The float types the op runs in (f32 for training, f64 for the gradient checks) and their
/// softmax loop.
pub trait Softmax:
    Scalar
    + Default
    + PartialOrd
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::AddAssign
    + std::ops::MulAssign
    + candle_core::WithDType
{
    /// e to the power of `self`.
    fn exp(self) -> Self;
    /// Row by row: `s = exp(scale · s − lse)` over the first `i0 + r + 1` columns of row r (the
    /// visible keys), 0 after them; writes each row's log-sum-exp into `lse` when `find_lse`.
    fn probabilities(s: &mut [Self], cols: usize, i0: usize, scale: Self, lse: &mut [f64], find_lse: bool);
}

#[inline(always)]
fn probabilities<T: Softmax>(s: &mut [T], cols: usize, i0: usize, scale: T, lse: &mut [f64], find_lse: bool) {
    for (r, (row, lse)) in s.chunks_exact_mut(cols).zip(lse.iter_mut()).enumerate() {
        let (seen, unseen) = row.split_at_mut(i0 + r + 1);
        unseen.fill(T::default());
        if find_lse {
            // exp(scale · s − max), then divided by its sum: one exponential per score.
            let max = lanes(seen, seen[0], |m, v| if v > m { v } else { m }) * scale;
            seen.iter_mut().for_each(|v| *v = (*v * scale - max).exp());
            let sum = lanes(seen, T::default(), |a, v| a + v);
            *lse = max.to_f64() + sum.to_f64().ln();
            let inv = T::from_f64(1.0 / sum.to_f64());
            seen.iter_mut().for_each(|v| *v *= inv);
        } else {
            let l = T::from_f64(*lse);
            seen.iter_mut().for_each(|v| *v = (*v * scale - l).exp());
        }
    }
}

/// `f` folded over `x` in 16 independent lanes, then across them: an order the compiler can
/// keep in vector registers (a single running fold of floats it must keep in sequence).
#[inline(always)]
fn lanes<T: Softmax>(x: &[T], init: T, f: impl Fn(T, T) -> T) -> T {
    let mut acc = [init; 16];
    let chunks = x.chunks_exact(16);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (a, &v) in acc.iter_mut().zip(chunk) {
            *a = f(*a, v);
        }
    }
    let folded = tail.iter().fold(init, |a, &v| f(a, v));
    acc.iter().fold(folded, |a, &v| f(a, v))
}

/// The f32 loop compiled for this CPU's vector unit.
mod fast {
    use super::{per_cpu, probabilities};
    per_cpu! {
        pub fn probabilities_f32(s: &mut [f32], cols: usize, i0: usize, scale: f32, lse: &mut [f64], find: bool) -> () = probabilities;
    }
}

impl Softmax for f32 {
    #[inline(always)]
    fn exp(self) -> f32 {
        fast_exp(self)
    }
    fn probabilities(s: &mut [f32], cols: usize, i0: usize, scale: f32, lse: &mut [f64], find_lse: bool) {
        fast::probabilities_f32(s, cols, i0, scale, lse, find_lse)
    }
}

impl Softmax for f64 {
    fn exp(self) -> f64 {
        f64::exp(self)
    }
    fn probabilities(s: &mut [f64], cols: usize, i0: usize, scale: f64, lse: &mut [f64], find_lse: bool) {
        probabilities(s, cols, i0, scale, lse, find_lse)
    }
}

/// The sizes: B sequences of T positions, H heads of `dh` columns, D = H · dh.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Sizes {
    b: usize,
    t: usize,
    heads: usize,
    dh: usize,
}

impl Sizes {
    /// B sequences of T positions, `heads` heads of `dh` columns.
    pub(crate) fn new(b: usize, t: usize, heads: usize, dh: usize) -> Self {
        Sizes { b, t, heads, dh }
    }

    fn of(shape: &Shape, heads: usize) -> candle_core::Result<Self> {
        let (b, t, d3) = shape.dims3()?;
        Ok(Sizes { b, t, heads, dh: d3 / 3 / heads })
    }

    fn d(&self) -> usize {
        self.heads * self.dh
    }

    /// Head `h` of sequence `b`'s queries (`part` 0), keys (1) or values (2) in `qkv`.
    fn view<T>(&self, qkv: &[T], b: usize, h: usize, part: usize) -> Mat<T> {
        let d3 = 3 * self.d();
        Mat::strided(qkv, b * self.t * d3 + part * self.d() + h * self.dh, self.t, self.dh, d3)
    }

    /// Head `h` of sequence `b` in a `(B, T, D)` tensor.
    fn head<T>(&self, x: &[T], b: usize, h: usize) -> Mat<T> {
        Mat::strided(x, b * self.t * self.d() + h * self.dh, self.t, self.dh, self.d())
    }

    /// The query blocks: (first query, queries).
    fn blocks(&self) -> impl Iterator<Item = (usize, usize)> {
        let t = self.t;
        (0..t).step_by(BLOCK).map(move |i0| (i0, BLOCK.min(t - i0)))
    }
}

/// One head's output `(T × dh)` and its queries' log-sum-exp.
fn head_forward<T: Softmax, P: Products<T>>(qkv: &[T], s: Sizes, b: usize, h: usize) -> (Vec<T>, Vec<f64>) {
    let (q, k, v) = (s.view(qkv, b, h, 0), s.view(qkv, b, h, 1), s.view(qkv, b, h, 2));
    let scale = T::from_f64(1.0 / (s.dh as f64).sqrt());
    let (mut out, mut lse) = (vec![T::default(); s.t * s.dh], vec![0f64; s.t]);
    let mut p = vec![T::default(); BLOCK * s.t];
    // Kᵀ and V prepared once; each block reads the leading keys it may see.
    let (kt, v) = (P::prepare(k.t()), P::prepare(v));
    for (i0, rows) in s.blocks() {
        let cols = i0 + rows; // the keys these queries may see
        let p = &mut p[..rows * cols];
        P::set_prepared(p, 0, q.row_range(i0, rows), &kt, cols);
        T::probabilities(p, cols, i0, scale, &mut lse[i0..cols], true);
        P::acc_prepared(&mut out, i0 * s.dh, Mat::new(p, 0, rows, cols), &v, s.dh);
    }
    (out, lse)
}

/// One head's gradients `(dq, dk, dv)`, each `(T × dh)`.
fn head_backward<T: Softmax, P: Products<T>>(
    qkv: &[T],
    out: &[T],
    dout: &[T],
    lse: &[f64],
    s: Sizes,
    b: usize,
    h: usize,
) -> [Vec<T>; 3] {
    let (q, k, v) = (s.view(qkv, b, h, 0), s.view(qkv, b, h, 1), s.view(qkv, b, h, 2));
    let d_o = s.head(dout, b, h);
    let scale = T::from_f64(1.0 / (s.dh as f64).sqrt());
    let [mut dq, mut dk, mut dv] = [0, 1, 2].map(|_| vec![T::default(); s.t * s.dh]);
    let (mut p, mut dp) = (vec![T::default(); BLOCK * s.t], vec![T::default(); BLOCK * s.t]);
    let mut lse_block = vec![0f64; BLOCK];
    let (kt, vt, k) = (P::prepare(k.t()), P::prepare(v.t()), P::prepare(k));
    for (i0, rows) in s.blocks() {
        let cols = i0 + rows;
        let (p, dp) = (&mut p[..rows * cols], &mut dp[..rows * cols]);
        P::set_prepared(p, 0, q.row_range(i0, rows), &kt, cols);
        lse_block[..rows].copy_from_slice(&lse[i0..cols]);
        T::probabilities(p, cols, i0, scale, &mut lse_block[..rows], false);
        let d_o_block = d_o.row_range(i0, rows);
        // dv += pᵀ do; dp = do vᵀ.
        P::acc(&mut dv, 0, Mat::new(p, 0, rows, cols).t(), d_o_block);
        P::set_prepared(dp, 0, d_o_block, &vt, cols);
        // ds = scale · p ⊙ (dp − Σ_c do ⊙ o), row by row (zero where p is).
        for r in 0..rows {
            let at = (b * s.t + i0 + r) * s.d() + h * s.dh;
            let dot = (at..at + s.dh).fold(T::default(), |acc, c| acc + dout[c] * out[c]);
            for (x, &pv) in dp[r * cols..(r + 1) * cols].iter_mut().zip(&p[r * cols..(r + 1) * cols]) {
                *x = pv * (*x - dot) * scale;
            }
        }
        // dq = ds k; dk += dsᵀ q.
        P::acc_prepared(&mut dq, i0 * s.dh, Mat::new(dp, 0, rows, cols), &k, s.dh);
        P::acc(&mut dk, 0, Mat::new(dp, 0, rows, cols).t(), q.row_range(i0, rows));
    }
    [dq, dk, dv]
}

struct CausalAttention {
    heads: usize,
    /// Products on the AMX unit in bf16 (f32 data only).
    bf16: bool,
    /// The forward pass's log-sum-exp of every query, `(B, H, T)`.
    lse: Mutex<Option<Vec<f64>>>,
}

/// The attention output `(B·T × D)` of `qkv (B·T × 3D)` and every query's log-sum-exp `(B, H,
/// T)`, the heads in parallel.
pub(crate) fn forward<T: Softmax, P: Products<T>>(qkv: &[T], s: Sizes) -> (Vec<T>, Vec<f64>) {
    let heads: Vec<(Vec<T>, Vec<f64>)> =
        (0..s.b * s.heads).into_par_iter().map(|bh| head_forward::<T, P>(qkv, s, bh / s.heads, bh % s.heads)).collect();
    let (d, mut out) = (s.d(), vec![T::default(); s.b * s.t * s.d()]);
    let mut lse = Vec::with_capacity(s.b * s.heads * s.t);
    for (bh, (o, l)) in heads.into_iter().enumerate() {
        let (b, h) = (bh / s.heads, bh % s.heads);
        for (t, row) in o.chunks_exact(s.dh).enumerate() {
            out[(b * s.t + t) * d + h * s.dh..][..s.dh].copy_from_slice(row);
        }
        lse.extend(l);
    }
    (out, lse)
}

/// The gradient of `qkv` from `dout`, the gradient of the [`forward`] output `out` whose
/// log-sum-exps are `lse`.
pub(crate) fn backward<T: Softmax, P: Products<T>>(qkv: &[T], out: &[T], dout: &[T], lse: &[f64], s: Sizes) -> Vec<T> {
    let grads: Vec<[Vec<T>; 3]> = (0..s.b * s.heads)
        .into_par_iter()
        .map(|bh| head_backward::<T, P>(qkv, out, dout, &lse[bh * s.t..(bh + 1) * s.t], s, bh / s.heads, bh % s.heads))
        .collect();
    let d3 = 3 * s.d();
    let mut dqkv = vec![T::default(); s.b * s.t * d3];
    for (bh, parts) in grads.iter().enumerate() {
        let (b, h) = (bh / s.heads, bh % s.heads);
        for (part, g) in parts.iter().enumerate() {
            for (t, row) in g.chunks_exact(s.dh).enumerate() {
                dqkv[(b * s.t + t) * d3 + part * s.d() + h * s.dh..][..s.dh].copy_from_slice(row);
            }
        }
    }
    dqkv
}

impl CausalAttention {
    fn forward<T: Softmax, P: Products<T>>(&self, qkv: &[T], s: Sizes) -> Vec<T> {
        let (out, lse) = forward::<T, P>(qkv, s);
        *self.lse.lock().expect("invariant: not poisoned") = Some(lse);
        out
    }

    fn backward<T: Softmax, P: Products<T>>(
        &self,
        qkv: &Tensor,
        out: &Tensor,
        dout: &Tensor,
        lse: &[f64],
    ) -> candle_core::Result<Tensor> {
        let s = Sizes::of(qkv.shape(), self.heads)?;
        let dout = dout.contiguous()?;
        let op = "causal attention";
        let dqkv = super::in_place(qkv, op, |x: &[T]| {
            super::in_place(out, op, |o: &[T]| {
                super::in_place(&dout, op, |d_o: &[T]| Ok(backward::<T, P>(x, o, d_o, lse, s)))
            })
        })?;
        super::like(dqkv, qkv)
    }
}

impl CustomOp1 for CausalAttention {
    fn name(&self) -> &'static str {
        "causal-attention"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let s = Sizes::of(layout.shape(), self.heads)?;
        let op = "causal attention";
        let out = match storage {
            CpuStorage::F32(v) if self.bf16 => {
                CpuStorage::F32(self.forward::<f32, Bf16>(contiguous_slice(v, layout, op)?, s))
            }
            CpuStorage::F32(v) => CpuStorage::F32(self.forward::<f32, Exact>(contiguous_slice(v, layout, op)?, s)),
            CpuStorage::F64(v) => CpuStorage::F64(self.forward::<f64, Exact>(contiguous_slice(v, layout, op)?, s)),
            _ => candle_core::bail!("{op}: only f32 and f64 are supported"),
        };
        Ok((out, Shape::from((s.b, s.t, s.d()))))
    }

    fn bwd(&self, qkv: &Tensor, out: &Tensor, dout: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let lse = self.lse.lock().expect("invariant: not poisoned").take();
        let Some(lse) = lse else { candle_core::bail!("causal attention: backward called twice, or before forward") };
        Ok(Some(match qkv.dtype() {
            candle_core::DType::F32 if self.bf16 => self.backward::<f32, Bf16>(qkv, out, dout, &lse)?,
            candle_core::DType::F32 => self.backward::<f32, Exact>(qkv, out, dout, &lse)?,
            candle_core::DType::F64 => self.backward::<f64, Exact>(qkv, out, dout, &lse)?,
            other => candle_core::bail!("causal attention: unsupported dtype {other:?}"),
        }))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::*;
    use crate::rng::Rng;

    /// Values and gradients equal candle's operations, for sequences shorter than a block, of
    /// exactly one, and longer than two (a ragged last block).
    #[test]
    fn matches_candle_operations_and_their_gradients() {
        let mut rng = Rng::new(5);
        for (b, t, heads, dh) in [(2, 5, 2, 3), (1, 64, 1, 4), (2, 150, 3, 2)] {
            let n = b * t * 3 * heads * dh;
            let qkv =
                Var::from_vec((0..n).map(|_| rng.normal()).collect::<Vec<f64>>(), (b, t, 3 * heads * dh), &Device::Cpu)
                    .unwrap();
            let m = b * t * heads * dh;
            let probe =
                Tensor::from_vec((0..m).map(|_| rng.normal()).collect::<Vec<f64>>(), (b, t, heads * dh), &Device::Cpu)
                    .unwrap();
            let ours = causal_attention(&qkv, heads, Precision::F32).unwrap();
            let theirs = causal_attention_reference(&qkv, heads).unwrap();
            let diff =
                |a: &Tensor, b: &Tensor| (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
            assert!(diff(&ours, &theirs) < 1e-12, "{b}×{t}, {heads} heads: {}", diff(&ours, &theirs));
            let g1 = (ours * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (theirs * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let d = diff(g1.get(&qkv).unwrap(), g2.get(&qkv).unwrap());
            assert!(d < 1e-11, "{b}×{t}, {heads} heads: gradients differ by {d}");
        }
    }

    /// In bf16 on the AMX unit (keys and values packed once per head, each block reading the
    /// keys it may see), values and gradients equal the f32 pass up to bfloat16 rounding, over
    /// ragged blocks and head sizes off the tile sizes.
    #[test]
    fn bf16_products_match_f32_within_rounding() {
        if !amx::available() {
            eprintln!("skipped: this CPU has no AMX-BF16");
            return;
        }
        let mut rng = Rng::new(6);
        for (b, t, heads, dh) in [(2, 150, 2, 32), (1, 200, 3, 20), (1, 40, 1, 48)] {
            let n = b * t * 3 * heads * dh;
            let qkv = Var::from_vec(
                (0..n).map(|_| rng.normal() as f32).collect::<Vec<f32>>(),
                (b, t, 3 * heads * dh),
                &Device::Cpu,
            )
            .unwrap();
            let m = b * t * heads * dh;
            let probe = Tensor::from_vec(
                (0..m).map(|_| rng.normal() as f32).collect::<Vec<f32>>(),
                (b, t, heads * dh),
                &Device::Cpu,
            )
            .unwrap();
            let run = |precision| {
                let out = causal_attention(&qkv, heads, precision).unwrap();
                let grads = (&out * &probe).unwrap().sum_all().unwrap().backward().unwrap();
                (out, grads.get(&qkv).unwrap().clone())
            };
            let ((o32, g32), (o16, g16)) = (run(Precision::F32), run(Precision::Bf16));
            let relative = |a: &Tensor, b: &Tensor| {
                let norm = |x: &Tensor| x.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt();
                norm(&(a - b).unwrap()) / norm(b)
            };
            let (dv, dg) = (relative(&o16, &o32), relative(&g16, &g32));
            assert!(dv > 0.0 && dv < 1e-2, "{b}×{t}, {heads}×{dh}: values differ by {dv:e} (relative L2)");
            assert!(dg > 0.0 && dg < 1e-2, "{b}×{t}, {heads}×{dh}: gradients differ by {dg:e} (relative L2)");
        }
    }
}
