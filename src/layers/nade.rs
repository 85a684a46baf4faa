//! NADE's hidden layer as one operation with its own backward pass ("The Neural Autoregressive
//! Distribution Estimator", Larochelle & Murray, 2011, <https://proceedings.mlr.press/v15/larochelle11a.html>).
//!
//! For each sequence `x (D,)` and position i: the hidden pre-activation is the running sum
//! a_0 = c, a_{i+1} = a_i + x_i·W[i] (eq. 7 of the paper: O(D·H) for all D positions, not
//! O(D²·H)), the hidden state h_i = act(a_i), and the outputs y_i = h_iᵀ V[i] (`M` numbers per
//! position: one Bernoulli logit for NADE, 3K mixture parameters for RNADE). Written as
//! plain loops: through candle the running sum would be a `(B, D, H)` tensor per step, or a
//! masked `D × D` product, which is the O(D²·H) recomputation NADE exists to avoid. The
//! backward pass runs the running sum backwards, recomputing each hidden state from it, so its
//! memory is O(B·H), not O(B·D·H).

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use serde::{Deserialize, Serialize};

use crate::Result;
use crate::fastmath::fast_exp;

/// The hidden units' non-linearity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Activation {
    /// σ(a), as in the paper.
    #[default]
    Sigmoid,
    /// max(a, 0).
    Relu,
}

impl Activation {
    /// The non-linearity in tensor ops (the steppers, which run one position at a time).
    pub fn apply(self, a: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Activation::Sigmoid => candle_nn::ops::sigmoid(a)?,
            Activation::Relu => a.relu()?,
        })
    }
}

/// `x (B, D)`, `c (H,)`, `w (D, H)`, `v (D, H, M)` → `y (B, D, M)`, where `y[b, i]` depends only
/// on `x[b, ..i]`. Gradients flow to `c`, `w` and `v` (not to `x`, which is data).
pub fn nade_outputs(x: &Tensor, c: &Tensor, w: &Tensor, v: &Tensor, act: Activation) -> Result<Tensor> {
    // c rides along as row 0 of W: candle's custom ops take at most three tensors.
    let wc = Tensor::cat(&[c.unsqueeze(0)?, w.clone()], 0)?; // (D + 1, H)
    Ok(x.contiguous()?.apply_op3(&wc.contiguous()?, &v.contiguous()?, NadeOp { act })?)
}

struct NadeOp {
    act: Activation,
}

/// The float types the op runs in: f32 (training, with a fast exponential accurate to 2e-7)
/// and f64 (finite-difference checks).
trait Real:
    Copy
    + PartialOrd
    + std::ops::AddAssign
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
{
    const ZERO: Self;
    const ONE: Self;
    fn sigmoid(self) -> Self;
}

impl Real for f32 {
    const ZERO: f32 = 0.0;
    const ONE: f32 = 1.0;
    #[inline(always)]
    fn sigmoid(self) -> f32 {
        1.0 / (1.0 + fast_exp(-self))
    }
}

impl Real for f64 {
    const ZERO: f64 = 0.0;
    const ONE: f64 = 1.0;
    #[inline(always)]
    fn sigmoid(self) -> f64 {
        1.0 / (1.0 + (-self).exp())
    }
}

/// The sizes of one call.
#[derive(Clone, Copy)]
struct Dims {
    batch: usize,
    len: usize,
    hidden: usize,
    outputs: usize,
}

#[inline(always)]
fn activate<T: Real>(a: &[T], h: &mut [T], act: Activation) {
    match act {
        Activation::Sigmoid => h.iter_mut().zip(a).for_each(|(h, &a)| *h = a.sigmoid()),
        Activation::Relu => h.iter_mut().zip(a).for_each(|(h, &a)| *h = if a > T::ZERO { a } else { T::ZERO }),
    }
}

/// dh/da expressed through h (σ' = h(1 − h); ReLU' = [h > 0]).
#[inline(always)]
fn derivative<T: Real>(h: T, act: Activation) -> T {
    match act {
        Activation::Sigmoid => h * (T::ONE - h),
        Activation::Relu => {
            if h > T::ZERO {
                T::ONE
            } else {
                T::ZERO
            }
        }
    }
}

#[inline(always)]
fn axpy<T: Real>(y: &mut [T], alpha: T, x: &[T]) {
    y.iter_mut().zip(x).for_each(|(y, &x)| *y += alpha * x);
}

/// Σ a·b with eight independent partial sums, so that the loop vectorises.
#[inline(always)]
fn dot<T: Real>(a: &[T], b: &[T]) -> T {
    let mut acc = [T::ZERO; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    let mut sum = T::ZERO;
    for (&x, &y) in ra.iter().zip(rb) {
        sum += x * y;
    }
    acc.iter().fold(sum, |s, &a| s + a)
}

/// y for every sequence. The loop over positions is outside the loop over sequences, so each
/// row of W and V is read once per batch, not once per sequence: the running pre-activations
/// of the whole batch (`B × H`) stay in cache while the weights stream past.
#[inline(always)]
fn forward<T: Real>(x: &[T], wc: &[T], v: &[T], d: Dims, act: Activation) -> Vec<T> {
    let (hid, m) = (d.hidden, d.outputs);
    let mut y = vec![T::ZERO; d.batch * d.len * m];
    let mut a: Vec<T> = wc[..hid].repeat(d.batch); // a_0 = c for every sequence
    let mut h = vec![T::ZERO; hid];
    for i in 0..d.len {
        let vi = &v[i * hid * m..(i + 1) * hid * m];
        let wi = &wc[(i + 1) * hid..(i + 2) * hid];
        for (b, ab) in a.chunks_exact_mut(hid).enumerate() {
            activate(ab, &mut h, act);
            let yi = &mut y[(b * d.len + i) * m..(b * d.len + i + 1) * m];
            if m == 1 {
                yi[0] = dot(&h, vi);
            } else {
                for (k, &hk) in h.iter().enumerate() {
                    axpy(yi, hk, &vi[k * m..(k + 1) * m]);
                }
            }
            let xi = x[b * d.len + i];
            if xi != T::ZERO {
                axpy(ab, xi, wi); // binary data: most x_i are 0
            }
        }
    }
    y
}

/// Gradients of `wc` and `v` given `dy`. Runs the positions backwards, undoing the running
/// sum (a_i = a_{i+1} − x_i·W[i]) instead of storing every hidden state, with the batch
/// inside the position loop as in [`forward`].
#[inline(always)]
fn backward<T: Real>(x: &[T], wc: &[T], v: &[T], dy: &[T], d: Dims, act: Activation) -> (Vec<T>, Vec<T>) {
    let (hid, m) = (d.hidden, d.outputs);
    let (mut dwc, mut dv) = (vec![T::ZERO; wc.len()], vec![T::ZERO; v.len()]);
    // a_D = c + Σ_j x_j W[j] for every sequence.
    let mut a: Vec<T> = wc[..hid].repeat(d.batch);
    for (b, ab) in a.chunks_exact_mut(hid).enumerate() {
        for i in 0..d.len {
            let xi = x[b * d.len + i];
            if xi != T::ZERO {
                axpy(ab, xi, &wc[(i + 1) * hid..(i + 2) * hid]);
            }
        }
    }
    let mut g = vec![T::ZERO; d.batch * hid]; // per sequence: Σ_{k > i} ∂L/∂a_k
    let mut h = vec![T::ZERO; hid];
    for i in (0..d.len).rev() {
        let vi = &v[i * hid * m..(i + 1) * hid * m];
        let (wi, dwi) = (&wc[(i + 1) * hid..(i + 2) * hid], (i + 1) * hid..(i + 2) * hid);
        let dvi = &mut dv[i * hid * m..(i + 1) * hid * m];
        for (b, (ab, gb)) in a.chunks_exact_mut(hid).zip(g.chunks_exact_mut(hid)).enumerate() {
            let xi = x[b * d.len + i];
            if xi != T::ZERO {
                axpy(&mut dwc[dwi.clone()], xi, gb); // every a_k, k > i, contains x_i·W[i]
                axpy(ab, T::ZERO - xi, wi); // now a_b = a_i
            }
            activate(ab, &mut h, act);
            let dyi = &dy[(b * d.len + i) * m..(b * d.len + i + 1) * m];
            if m == 1 {
                let dy0 = dyi[0];
                for k in 0..hid {
                    dvi[k] += dy0 * h[k];
                    gb[k] += dy0 * vi[k] * derivative(h[k], act);
                }
            } else {
                for k in 0..hid {
                    axpy(&mut dvi[k * m..(k + 1) * m], h[k], dyi);
                    gb[k] += dot(&vi[k * m..(k + 1) * m], dyi) * derivative(h[k], act);
                }
            }
        }
    }
    for gb in g.chunks_exact(hid) {
        axpy(&mut dwc[..hid], T::ONE, gb); // c feeds every a_i
    }
    (dwc, dv)
}

/// The f32 loops compiled for the widest vector unit the CPU has (found at run time), so that
/// one binary runs on any x86-64 and still uses AVX-512 or AVX2 where present.
mod fast {
    use super::super::per_cpu;
    use super::{Activation, Dims};

    per_cpu! {
        pub fn forward(x: &[f32], wc: &[f32], v: &[f32], d: Dims, act: Activation) -> Vec<f32> = super::forward::<f32>;
        pub fn backward(x: &[f32], wc: &[f32], v: &[f32], dy: &[f32], d: Dims, act: Activation) -> (Vec<f32>, Vec<f32>) = super::backward::<f32>;
    }
}

fn dims(x: &Shape, wc: &Shape, v: &Shape) -> candle_core::Result<Dims> {
    let (batch, len) = x.dims2()?;
    let (rows, hidden) = wc.dims2()?;
    let (v_len, v_hidden, outputs) = v.dims3()?;
    if rows != len + 1 || v_len != len || v_hidden != hidden {
        candle_core::bail!("nade: x {x:?}, [c; W] {wc:?} and V {v:?} do not fit together");
    }
    Ok(Dims { batch, len, hidden, outputs })
}

impl CustomOp3 for NadeOp {
    fn name(&self) -> &'static str {
        "nade"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = dims(l1.shape(), l2.shape(), l3.shape())?;
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(x), CpuStorage::F32(w), CpuStorage::F32(v)) => CpuStorage::F32(fast::forward(
                super::contiguous_slice(x, l1, "nade")?,
                super::contiguous_slice(w, l2, "nade")?,
                super::contiguous_slice(v, l3, "nade")?,
                d,
                self.act,
            )),
            (CpuStorage::F64(x), CpuStorage::F64(w), CpuStorage::F64(v)) => CpuStorage::F64(forward(
                super::contiguous_slice(x, l1, "nade")?,
                super::contiguous_slice(w, l2, "nade")?,
                super::contiguous_slice(v, l3, "nade")?,
                d,
                self.act,
            )),
            _ => candle_core::bail!("nade: inputs must all be f32 or all f64"),
        };
        Ok((out, Shape::from((d.batch, d.len, d.outputs))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        wc: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = dims(x.shape(), wc.shape(), v.shape())?;
        let flat = |t: &Tensor| t.flatten_all();
        let (dwc, dv) = match x.dtype() {
            candle_core::DType::F32 => {
                let (dwc, dv) = fast::backward(
                    &flat(x)?.to_vec1::<f32>()?,
                    &flat(wc)?.to_vec1::<f32>()?,
                    &flat(v)?.to_vec1::<f32>()?,
                    &flat(grad)?.to_vec1::<f32>()?,
                    d,
                    self.act,
                );
                (Tensor::from_vec(dwc, wc.shape(), wc.device())?, Tensor::from_vec(dv, v.shape(), v.device())?)
            }
            candle_core::DType::F64 => {
                let (dwc, dv) = backward(
                    &flat(x)?.to_vec1::<f64>()?,
                    &flat(wc)?.to_vec1::<f64>()?,
                    &flat(v)?.to_vec1::<f64>()?,
                    &flat(grad)?.to_vec1::<f64>()?,
                    d,
                    self.act,
                );
                (Tensor::from_vec(dwc, wc.shape(), wc.device())?, Tensor::from_vec(dv, v.shape(), v.device())?)
            }
            other => candle_core::bail!("nade: unsupported dtype {other:?}"),
        };
        Ok((None, Some(dwc), Some(dv)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{D, DType, Device, Var};

    /// The O(D²·H) definition in candle ops: a_i = c + Σ_{j<i} x_j W[j] as a masked product.
    fn by_definition(x: &Tensor, c: &Tensor, w: &Tensor, v: &Tensor, act: Activation) -> Tensor {
        let (_b, len) = x.dims2().unwrap();
        let strictly_before: Vec<f64> = (0..len * len).map(|k| if k % len < k / len { 1.0 } else { 0.0 }).collect(); // [i, j] = j < i
        let mask = Tensor::from_vec(strictly_before, (len, len), &Device::Cpu).unwrap();
        // a[b, i, :] = c + Σ_j mask[i, j] x[b, j] W[j]
        let xm = x.unsqueeze(1).unwrap().broadcast_mul(&mask.unsqueeze(0).unwrap()).unwrap(); // (B, D, D)
        let (b, _) = x.dims2().unwrap();
        let a = xm.reshape((b * len, len)).unwrap().matmul(w).unwrap().broadcast_add(c).unwrap(); // (B·D, H)
        let h = act.apply(&a).unwrap();
        let h = h.reshape((b, len, 1, w.dim(1).unwrap())).unwrap(); // (B, D, 1, H)
        h.broadcast_mul(&v.transpose(1, 2).unwrap().contiguous().unwrap().unsqueeze(0).unwrap()) // (B, D, M, H)
            .unwrap()
            .sum(D::Minus1)
            .unwrap()
    }

    #[test]
    fn equals_the_definition_with_its_gradients() {
        let dev = Device::Cpu;
        let (b, len, hid) = (3, 7, 5);
        for (act, m) in [(Activation::Sigmoid, 1), (Activation::Relu, 4)] {
            let x =
                Tensor::from_vec((0..b * len).map(|k| [0.0, 1.0, 0.3][k % 3]).collect::<Vec<f64>>(), (b, len), &dev)
                    .unwrap();
            let param = |shape: &[usize], scale: f64, shift: f64| {
                Var::from_tensor(
                    &Tensor::randn(0f64, 1.0, shape, &dev)
                        .unwrap()
                        .affine(scale, shift)
                        .unwrap()
                        .to_dtype(DType::F64)
                        .unwrap(),
                )
                .unwrap()
            };
            let (c, w, v) = (param(&[hid], 0.5, 0.1), param(&[len, hid], 0.7, 0.0), param(&[len, hid, m], 1.0, 0.0));
            let fused = nade_outputs(&x, &c, &w, &v, act).unwrap();
            let slow = by_definition(&x, &c, &w, &v, act);
            let diff = (&fused - &slow).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
            assert!(diff < 1e-12, "{act:?}: {diff}");
            let weights = Tensor::randn(0f64, 1.0, (b, len, m), &dev).unwrap();
            let g1 = (fused * &weights).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (slow * &weights).unwrap().sum_all().unwrap().backward().unwrap();
            for (name, var) in [("c", &c), ("W", &w), ("V", &v)] {
                let d = (g1.get(var).unwrap() - g2.get(var).unwrap())
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap();
                assert!(d < 1e-10, "{act:?} d{name}: {d}");
            }
        }
    }
}
