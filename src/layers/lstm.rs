//! The recurrence of an LSTM layer as one operation with its own backward pass (Hochreiter &
//! Schmidhuber, 1997; the gate layout of PyTorch's `nn.LSTM`).
//!
//! The input half of every gate pre-activation, `x_t W_ih + b` for all t, is one 2-D product
//! that the caller makes with candle (whose 2-D matmul and its gradient are right on this CPU).
//! What is left is sequential: for t = 0 … T−1, from h_{−1} = c_{−1} = 0,
//!
//! ```text
//! z_t = pre_t + h_{t−1} W_hh                      (B, 4H): the gates i, f, g, o side by side
//! i, f, o = σ(z_i), σ(z_f), σ(z_o);  g = tanh(z_g)
//! c_t = f ⊙ c_{t−1} + i ⊙ g;         h_t = o ⊙ tanh(c_t)
//! ```
//!
//! Through candle this is T small products and a dozen element-wise ops per step, each a
//! tensor with its own allocation and its own node in the autograd graph; here it is one
//! `(B, H) × (H, 4H)` product (the `gemm` crate) and one fused loop per step. The backward pass
//! recomputes the forward pass (storing the gates and cells of every step: `5·B·T·H` numbers)
//! and then runs back through time.

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};

use super::matmul::{Exact, Mat, Products, Scalar};
use crate::Result;
use crate::fastmath::fast_exp;

/// `pre (B, T, 4H)`, `w_hh (H, 4H)` → `h (B, T, H)`: the hidden states of an LSTM layer whose
/// gate pre-activations from the input are `pre`. Gradients flow to both.
pub fn lstm_recurrence(pre: &Tensor, w_hh: &Tensor) -> Result<Tensor> {
    Ok(pre.contiguous()?.apply_op2(&w_hh.contiguous()?, LstmOp)?)
}

struct LstmOp;

/// The float types the op runs in: f32 (training) and f64 (finite-difference checks).
trait Real:
    Scalar + PartialOrd + std::ops::Add<Output = Self> + std::ops::Sub<Output = Self> + std::ops::Mul<Output = Self>
{
    const ZERO: Self;
    fn sigmoid(self) -> Self;
    fn tanh(self) -> Self;
}

// f32 through `fast_exp` (plain arithmetic, so the gate loops vectorise; libm's tanh was most of
// the op's time): tanh(x) = 2σ(2x) − 1, off by at most a few 1e-7.
impl Real for f32 {
    const ZERO: f32 = 0.0;
    #[inline(always)]
    fn sigmoid(self) -> f32 {
        1.0 / (1.0 + fast_exp(-self))
    }
    #[inline(always)]
    fn tanh(self) -> f32 {
        2.0 / (1.0 + fast_exp(-2.0 * self)) - 1.0
    }
}

impl Real for f64 {
    const ZERO: f64 = 0.0;
    #[inline(always)]
    fn sigmoid(self) -> f64 {
        1.0 / (1.0 + (-self).exp())
    }
    #[inline(always)]
    fn tanh(self) -> f64 {
        f64::tanh(self)
    }
}

#[inline(always)]
fn sigmoid_all<T: Real>(x: &mut [T]) {
    x.iter_mut().for_each(|v| *v = v.sigmoid());
}

#[inline(always)]
fn tanh_all<T: Real>(x: &mut [T]) {
    x.iter_mut().for_each(|v| *v = v.tanh());
}

/// The sizes of one call.
#[derive(Clone, Copy)]
struct Dims {
    batch: usize,
    len: usize,
    hidden: usize,
}

/// What the forward pass leaves for the backward one: per step (rows `t·B + b`), the gate
/// activations `(i, f, g, o)` and the cell, and the hidden state in `(B, T, H)` order.
struct Trace<T> {
    gates: Vec<T>,
    cells: Vec<T>,
    hidden: Vec<T>,
}

#[inline(always)]
fn forward<T: Real>(pre: &[T], w_hh: &[T], d: Dims, keep: bool) -> Trace<T> {
    let (b, h, len) = (d.batch, d.hidden, d.len);
    let g4 = 4 * h;
    let mut hidden = vec![T::ZERO; b * len * h];
    let mut gates = if keep { vec![T::ZERO; len * b * g4] } else { Vec::new() };
    let mut cells = if keep { vec![T::ZERO; len * b * h] } else { Vec::new() };
    let (mut h_prev, mut c) = (vec![T::ZERO; b * h], vec![T::ZERO; b * h]);
    let mut z = vec![T::ZERO; b * g4];
    for t in 0..len {
        // z = pre_t + h_{t−1} W_hh (pre_t is row t of every sequence: a strided view).
        for r in 0..b {
            z[r * g4..(r + 1) * g4].copy_from_slice(&pre[(r * len + t) * g4..(r * len + t + 1) * g4]);
        }
        if t > 0 {
            Exact::acc(&mut z, 0, Mat::new(&h_prev, 0, b, h), Mat::new(w_hh, 0, h, g4));
        }
        for r in 0..b {
            // The four gates as separate slices, zipped: no index arithmetic, so it vectorises.
            let (zi, rest) = z[r * g4..(r + 1) * g4].split_at_mut(h);
            let (zf, rest) = rest.split_at_mut(h);
            let (zg, zo) = rest.split_at_mut(h);
            let (cr, hr) = (&mut c[r * h..(r + 1) * h], &mut h_prev[r * h..(r + 1) * h]);
            // One simple pass per function, which vectorises (one loop doing all of them did not).
            sigmoid_all(zi);
            sigmoid_all(zf);
            tanh_all(zg);
            sigmoid_all(zo);
            for (((c, &i), &f), &g) in cr.iter_mut().zip(zi.iter()).zip(zf.iter()).zip(zg.iter()) {
                *c = f * *c + i * g;
            }
            hr.copy_from_slice(cr);
            tanh_all(hr);
            for (hk, &o) in hr.iter_mut().zip(zo.iter()) {
                *hk = *hk * o;
            }
            hidden[(r * len + t) * h..(r * len + t + 1) * h].copy_from_slice(hr);
        }
        if keep {
            gates[t * b * g4..(t + 1) * b * g4].copy_from_slice(&z);
            cells[t * b * h..(t + 1) * b * h].copy_from_slice(&c);
        }
    }
    Trace { gates, cells, hidden }
}

/// Gradients of `pre` and `w_hh` given `dh (B, T, H)`: back through time from the last step.
#[inline(always)]
fn backward<T: Real>(pre: &[T], w_hh: &[T], dh_out: &[T], d: Dims) -> (Vec<T>, Vec<T>) {
    let (b, h, len) = (d.batch, d.hidden, d.len);
    let g4 = 4 * h;
    let trace = forward(pre, w_hh, d, true);
    let mut dpre = vec![T::ZERO; pre.len()];
    let mut dw = vec![T::ZERO; w_hh.len()];
    let mut dh = vec![T::ZERO; b * h]; // ∂L/∂h_t through h_{t+1}'s gates
    let mut dc = vec![T::ZERO; b * h]; // ∂L/∂c_t through c_{t+1}
    let mut dz = vec![T::ZERO; b * g4];
    let mut h_prev = vec![T::ZERO; b * h];
    let one = T::ONE;
    for t in (0..len).rev() {
        let gates = &trace.gates[t * b * g4..(t + 1) * b * g4];
        let cells = &trace.cells[t * b * h..(t + 1) * b * h];
        let zeros = vec![T::ZERO; h];
        let mut tc = vec![T::ZERO; h];
        for r in 0..b {
            let (gi, rest) = gates[r * g4..(r + 1) * g4].split_at(h);
            let (gf, rest) = rest.split_at(h);
            let (gg, go) = rest.split_at(h);
            let (dzi, rest) = dz[r * g4..(r + 1) * g4].split_at_mut(h);
            let (dzf, rest) = rest.split_at_mut(h);
            let (dzg, dzo) = rest.split_at_mut(h);
            let cr = &cells[r * h..(r + 1) * h];
            let c_prev =
                if t > 0 { &trace.cells[(t - 1) * b * h + r * h..(t - 1) * b * h + (r + 1) * h] } else { &zeros };
            let dh_from_out = &dh_out[(r * len + t) * h..(r * len + t + 1) * h];
            let (dhr, dcr) = (&dh[r * h..(r + 1) * h], &mut dc[r * h..(r + 1) * h]);
            let gates = gi.iter().zip(gf).zip(gg).zip(go);
            let grads = dzi.iter_mut().zip(dzf.iter_mut()).zip(dzg.iter_mut()).zip(dzo.iter_mut());
            tc.copy_from_slice(cr);
            tanh_all(&mut tc);
            let states = tc.iter().zip(c_prev).zip(dhr).zip(dh_from_out).zip(dcr.iter_mut());
            for ((((&i, &f), &g), &o), ((((di, df), dg), d_o), ((((&tc, &cp), &dh1), &dh2), dc))) in
                gates.zip(grads.zip(states))
            {
                let dht = dh1 + dh2;
                let dct = *dc + dht * o * (one - tc * tc);
                *di = dct * g * i * (one - i);
                *df = dct * cp * f * (one - f);
                *dg = dct * i * (one - g * g);
                *d_o = dht * tc * o * (one - o);
                *dc = dct * f;
            }
            dpre[(r * len + t) * g4..(r * len + t + 1) * g4].copy_from_slice(&dz[r * g4..(r + 1) * g4]);
        }
        // dh_{t−1} = dz W_hhᵀ and dW_hh += h_{t−1}ᵀ dz (nothing reaches h_{−1} = 0).
        dh.iter_mut().for_each(|x| *x = T::ZERO);
        if t > 0 {
            for r in 0..b {
                h_prev[r * h..(r + 1) * h].copy_from_slice(&trace.hidden[(r * len + t - 1) * h..(r * len + t) * h]);
            }
            Exact::acc(&mut dh, 0, Mat::new(&dz, 0, b, g4), Mat::new(w_hh, 0, h, g4).t());
            Exact::acc(&mut dw, 0, Mat::new(&h_prev, 0, b, h).t(), Mat::new(&dz, 0, b, g4));
        }
    }
    (dpre, dw)
}

/// The f32 loops compiled for the widest vector unit the CPU has (found at run time).
mod fast {
    use super::Dims;

    macro_rules! with_features {
        ($name:ident, $features:literal) => {
            #[cfg(target_arch = "x86_64")]
            mod $name {
                use super::super::{Dims, Trace, backward, forward};
                #[target_feature(enable = $features)]
                pub unsafe fn fwd(pre: &[f32], w: &[f32], d: Dims) -> Trace<f32> {
                    forward(pre, w, d, false)
                }
                #[target_feature(enable = $features)]
                pub unsafe fn bwd(pre: &[f32], w: &[f32], dh: &[f32], d: Dims) -> (Vec<f32>, Vec<f32>) {
                    backward(pre, w, dh, d)
                }
            }
        };
    }
    with_features!(avx512, "avx512f,avx2,fma");
    with_features!(avx2, "avx2,fma");

    #[cfg(target_arch = "x86_64")]
    fn level() -> u8 {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx512f") && has!("avx2") && has!("fma") {
            2
        } else if has!("avx2") && has!("fma") {
            1
        } else {
            0
        }
    }

    pub fn forward(pre: &[f32], w: &[f32], d: Dims) -> Vec<f32> {
        #[cfg(target_arch = "x86_64")]
        match level() {
            // SAFETY: the features were detected on this CPU.
            2 => return unsafe { avx512::fwd(pre, w, d) }.hidden,
            1 => return unsafe { avx2::fwd(pre, w, d) }.hidden,
            _ => {}
        }
        super::forward(pre, w, d, false).hidden
    }

    pub fn backward(pre: &[f32], w: &[f32], dh: &[f32], d: Dims) -> (Vec<f32>, Vec<f32>) {
        #[cfg(target_arch = "x86_64")]
        match level() {
            // SAFETY: the features were detected on this CPU.
            2 => return unsafe { avx512::bwd(pre, w, dh, d) },
            1 => return unsafe { avx2::bwd(pre, w, dh, d) },
            _ => {}
        }
        super::backward(pre, w, dh, d)
    }
}

fn dims(pre: &Shape, w_hh: &Shape) -> candle_core::Result<Dims> {
    let (batch, len, g4) = pre.dims3()?;
    let (hidden, w_cols) = w_hh.dims2()?;
    if g4 != 4 * hidden || w_cols != g4 {
        candle_core::bail!("lstm: pre {pre:?} and W_hh {w_hh:?} do not fit together (expected (B, T, 4H) and (H, 4H))");
    }
    Ok(Dims { batch, len, hidden })
}

impl CustomOp2 for LstmOp {
    fn name(&self) -> &'static str {
        "lstm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = dims(l1.shape(), l2.shape())?;
        use super::contiguous_slice as slice;
        let out = match (s1, s2) {
            (CpuStorage::F32(p), CpuStorage::F32(w)) => {
                CpuStorage::F32(fast::forward(slice(p, l1, "lstm")?, slice(w, l2, "lstm")?, d))
            }
            (CpuStorage::F64(p), CpuStorage::F64(w)) => {
                CpuStorage::F64(forward(slice(p, l1, "lstm")?, slice(w, l2, "lstm")?, d, false).hidden)
            }
            _ => candle_core::bail!("lstm: inputs must both be f32 or both f64"),
        };
        Ok((out, Shape::from((d.batch, d.len, d.hidden))))
    }

    fn bwd(
        &self,
        pre: &Tensor,
        w_hh: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let d = dims(pre.shape(), w_hh.shape())?;
        let flat = |t: &Tensor| t.flatten_all();
        let (dpre, dw) = match pre.dtype() {
            candle_core::DType::F32 => {
                let (dp, dw) = fast::backward(
                    &flat(pre)?.to_vec1::<f32>()?,
                    &flat(w_hh)?.to_vec1::<f32>()?,
                    &flat(grad)?.to_vec1::<f32>()?,
                    d,
                );
                (Tensor::from_vec(dp, pre.shape(), pre.device())?, Tensor::from_vec(dw, w_hh.shape(), w_hh.device())?)
            }
            candle_core::DType::F64 => {
                let (dp, dw) = backward(
                    &flat(pre)?.to_vec1::<f64>()?,
                    &flat(w_hh)?.to_vec1::<f64>()?,
                    &flat(grad)?.to_vec1::<f64>()?,
                    d,
                );
                (Tensor::from_vec(dp, pre.shape(), pre.device())?, Tensor::from_vec(dw, w_hh.shape(), w_hh.device())?)
            }
            other => candle_core::bail!("lstm: unsupported dtype {other:?}"),
        };
        Ok((Some(dpre), Some(dw)))
    }
}

/// The same recurrence in candle's operations (one product and a few element-wise ops per
/// step), for the model's `forward_reference`: the property tests compare the two, values
/// and gradients.
pub fn lstm_recurrence_reference(pre: &Tensor, w_hh: &Tensor) -> Result<Tensor> {
    let (b, len, g4) = pre.dims3()?;
    let h = g4 / 4;
    let mut h_prev = Tensor::zeros((b, h), pre.dtype(), pre.device())?;
    let mut c = Tensor::zeros((b, h), pre.dtype(), pre.device())?;
    let mut outs = Vec::with_capacity(len);
    for t in 0..len {
        let z = (pre.narrow(1, t, 1)?.squeeze(1)? + h_prev.matmul(w_hh)?)?; // (B, 4H)
        let i = candle_nn::ops::sigmoid(&z.narrow(1, 0, h)?)?;
        let f = candle_nn::ops::sigmoid(&z.narrow(1, h, h)?)?;
        let g = z.narrow(1, 2 * h, h)?.tanh()?;
        let o = candle_nn::ops::sigmoid(&z.narrow(1, 3 * h, h)?)?;
        c = ((f * &c)? + (i * g)?)?;
        h_prev = (o * c.tanh()?)?;
        outs.push(h_prev.unsqueeze(1)?);
    }
    Ok(Tensor::cat(&outs, 1)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    #[test]
    fn equals_candles_operations_with_their_gradients() {
        let dev = Device::Cpu;
        let (b, len, h) = (3, 6, 5);
        let pre = Var::from_tensor(&Tensor::randn(0f64, 1.0, (b, len, 4 * h), &dev).unwrap()).unwrap();
        let w = Var::from_tensor(&(Tensor::randn(0f64, 1.0, (h, 4 * h), &dev).unwrap() * 0.5).unwrap()).unwrap();
        let fused = lstm_recurrence(&pre, &w).unwrap();
        let slow = lstm_recurrence_reference(&pre, &w).unwrap();
        let diff = (&fused - &slow).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
        assert!(diff < 1e-12, "values differ by {diff}");
        let weights = Tensor::randn(0f64, 1.0, (b, len, h), &dev).unwrap();
        let g1 = (fused * &weights).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (&slow * &weights).unwrap().sum_all().unwrap().backward().unwrap();
        for (name, var) in [("pre", &pre), ("W_hh", &w)] {
            let d = (g1.get(var).unwrap() - g2.get(var).unwrap())
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            assert!(d < 1e-10, "d{name} differs by {d}");
        }
        // And in f32 the op agrees with its f64 self.
        let f32_out = lstm_recurrence(&pre.to_dtype(DType::F32).unwrap(), &w.to_dtype(DType::F32).unwrap()).unwrap();
        let d = (f32_out.to_dtype(DType::F64).unwrap() - &slow).unwrap().abs().unwrap().max_all().unwrap();
        assert!(d.to_scalar::<f64>().unwrap() < 1e-5);
    }
}
