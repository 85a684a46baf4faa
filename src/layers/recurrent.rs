//! The recurrences of LSTM and GRU layers, each as one operation with its own backward pass
//! (Hochreiter & Schmidhuber, 1997; Cho et al., 2014; the gate layouts of PyTorch's `nn.LSTM`
//! and `nn.GRU`).
//!
//! The input half of every gate pre-activation, `x_t W_ih + b` for all t, is one 2-D product
//! that the caller makes with candle (whose 2-D matmul and its gradient are right on this CPU).
//! What is left is sequential: for t = 0 … T−1, from h_{−1} = c_{−1} = 0,
//!
//! ```text
//! LSTM: z_t = pre_t + h_{t−1} W_hh                 (B, 4H): the gates i, f, g, o side by side
//!       i, f, o = σ(z_i), σ(z_f), σ(z_o);  g = tanh(z_g)
//!       c_t = f ⊙ c_{t−1} + i ⊙ g;         h_t = o ⊙ tanh(c_t)
//! GRU:  u_t = h_{t−1} W_hh                         (B, 3H): r, z and the candidate's share
//!       r = σ(pre_r + u_r);  z = σ(pre_z + u_z);  n = tanh(pre_n + r ⊙ (u_n + b_hn))
//!       h_t = (1 − z) ⊙ n + z ⊙ h_{t−1}
//! ```
//!
//! Through candle this is T small products and a dozen element-wise ops per step, each a
//! tensor with its own allocation and its own node in the autograd graph; here it is one
//! `(B, H) × (H, GH)` product (the `gemm` crate) and a few vectorised passes per step. The
//! backward pass recomputes the forward pass, keeping what each step needs, and then runs back
//! through time.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};

use super::matmul::{Exact, Mat, Products, Scalar};
use super::{in_place, like};
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
/// activations (LSTM: i, f, g, o; GRU: r, z, n and u_n + b_hn) and the LSTM's cell, and the
/// hidden state in `(B, T, H)` order.
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

/// The f32 loops compiled for the widest vector unit the CPU has (found at run time), so that
/// one binary runs on any x86-64 and still uses AVX-512 or AVX2 where present.
mod fast {
    use super::super::per_cpu;
    use super::{Dims, GruGrads, Trace};

    per_cpu! {
        pub fn lstm_forward(pre: &[f32], w: &[f32], d: Dims, keep: bool) -> Trace<f32> = super::forward::<f32>;
        pub fn lstm_backward(pre: &[f32], w: &[f32], dh: &[f32], d: Dims) -> (Vec<f32>, Vec<f32>) = super::backward::<f32>;
        pub fn gru_forward(pre: &[f32], w: &[f32], b: &[f32], d: Dims, keep: bool) -> Trace<f32> = super::gru_forward::<f32>;
        pub fn gru_backward(pre: &[f32], w: &[f32], b: &[f32], dh: &[f32], d: Dims) -> GruGrads<f32> = super::gru_backward::<f32>;
    }
}

/// The GRU's gradients: of `pre`, `W_hh` and `b_hn`.
type GruGrads<T> = (Vec<T>, Vec<T>, Vec<T>);

/// `pre (B, T, 3H)`, `w_hh (H, 3H)`, `b_hn (H,)` → `h (B, T, H)`: the hidden states of a GRU
/// layer whose gate pre-activations from the input (biases included) are `pre`. Gradients flow
/// to all three.
pub fn gru_recurrence(pre: &Tensor, w_hh: &Tensor, b_hn: &Tensor) -> Result<Tensor> {
    Ok(pre.contiguous()?.apply_op3(&w_hh.contiguous()?, &b_hn.contiguous()?, GruOp)?)
}

struct GruOp;

#[inline(always)]
fn gru_forward<T: Real>(pre: &[T], w_hh: &[T], b_hn: &[T], d: Dims, keep: bool) -> Trace<T> {
    let (b, h, len) = (d.batch, d.hidden, d.len);
    let g3 = 3 * h;
    let mut hidden = vec![T::ZERO; b * len * h];
    let mut gates = if keep { vec![T::ZERO; len * b * 4 * h] } else { Vec::new() };
    let mut h_prev = vec![T::ZERO; b * h];
    let mut u = vec![T::ZERO; b * g3];
    for t in 0..len {
        u.iter_mut().for_each(|x| *x = T::ZERO);
        if t > 0 {
            Exact::acc(&mut u, 0, Mat::new(&h_prev, 0, b, h), Mat::new(w_hh, 0, h, g3));
        }
        for r in 0..b {
            let p = &pre[(r * len + t) * g3..(r * len + t + 1) * g3];
            let (ur, uz, un) =
                (&u[r * g3..r * g3 + h], &u[r * g3 + h..r * g3 + 2 * h], &u[r * g3 + 2 * h..(r + 1) * g3]);
            // rg, zg, ng, q: r, z, n and u_n + b_hn of this row, side by side.
            let mut row = vec![T::ZERO; 4 * h];
            let (rg, rest) = row.split_at_mut(h);
            let (zg, rest) = rest.split_at_mut(h);
            let (ng, q) = rest.split_at_mut(h);
            for k in 0..h {
                rg[k] = p[k] + ur[k];
                zg[k] = p[h + k] + uz[k];
                q[k] = un[k] + b_hn[k];
            }
            sigmoid_all(rg);
            sigmoid_all(zg);
            for k in 0..h {
                ng[k] = p[2 * h + k] + rg[k] * q[k];
            }
            tanh_all(ng);
            let hr = &mut h_prev[r * h..(r + 1) * h];
            for k in 0..h {
                hr[k] = (T::ONE - zg[k]) * ng[k] + zg[k] * hr[k];
            }
            hidden[(r * len + t) * h..(r * len + t + 1) * h].copy_from_slice(hr);
            if keep {
                gates[(t * b + r) * 4 * h..(t * b + r + 1) * 4 * h].copy_from_slice(&row);
            }
        }
    }
    Trace { gates, cells: Vec::new(), hidden }
}

#[inline(always)]
fn gru_backward<T: Real>(pre: &[T], w_hh: &[T], b_hn: &[T], dh_out: &[T], d: Dims) -> GruGrads<T> {
    let (b, h, len) = (d.batch, d.hidden, d.len);
    let g3 = 3 * h;
    let trace = gru_forward(pre, w_hh, b_hn, d, true);
    let (mut dpre, mut dw, mut db) = (vec![T::ZERO; pre.len()], vec![T::ZERO; w_hh.len()], vec![T::ZERO; h]);
    let mut dh = vec![T::ZERO; b * h]; // ∂L/∂h_t through step t + 1
    let mut du = vec![T::ZERO; b * g3];
    let mut h_prev = vec![T::ZERO; b * h];
    let one = T::ONE;
    for t in (0..len).rev() {
        for r in 0..b {
            let row = &trace.gates[(t * b + r) * 4 * h..(t * b + r + 1) * 4 * h];
            let (rg, zg, ng, q) = (&row[..h], &row[h..2 * h], &row[2 * h..3 * h], &row[3 * h..]);
            let hp = &mut h_prev[r * h..(r + 1) * h];
            if t > 0 {
                hp.copy_from_slice(&trace.hidden[(r * len + t - 1) * h..(r * len + t) * h]);
            } else {
                hp.iter_mut().for_each(|x| *x = T::ZERO);
            }
            let dpr = &mut dpre[(r * len + t) * g3..(r * len + t + 1) * g3];
            let dur = &mut du[r * g3..(r + 1) * g3];
            let dhr = &mut dh[r * h..(r + 1) * h];
            for k in 0..h {
                let dht = dhr[k] + dh_out[(r * len + t) * h + k];
                let (rk, zk, nk) = (rg[k], zg[k], ng[k]);
                let dan = dht * (one - zk) * (one - nk * nk);
                let dar = dan * q[k] * rk * (one - rk);
                let daz = dht * (hp[k] - nk) * zk * (one - zk);
                (dpr[k], dpr[h + k], dpr[2 * h + k]) = (dar, daz, dan);
                (dur[k], dur[h + k], dur[2 * h + k]) = (dar, daz, dan * rk);
                db[k] = db[k] + dan * rk;
                dhr[k] = dht * zk; // the direct path h_{t−1} → h_t
            }
        }
        // dh_{t−1} += du W_hhᵀ and dW_hh += h_{t−1}ᵀ du (nothing reaches h_{−1} = 0).
        if t > 0 {
            Exact::acc(&mut dh, 0, Mat::new(&du, 0, b, g3), Mat::new(w_hh, 0, h, g3).t());
            Exact::acc(&mut dw, 0, Mat::new(&h_prev, 0, b, h).t(), Mat::new(&du, 0, b, g3));
        }
    }
    (dpre, dw, db)
}

fn gru_dims(pre: &Shape, w_hh: &Shape, b_hn: &Shape) -> candle_core::Result<Dims> {
    let d = dims(pre, w_hh, 3, "gru")?;
    if b_hn.dims1()? != d.hidden {
        candle_core::bail!("gru: b_hn {b_hn:?} does not fit W_hh {w_hh:?} (expected (H,))");
    }
    Ok(d)
}

impl CustomOp3 for GruOp {
    fn name(&self) -> &'static str {
        "gru"
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
        use super::contiguous_slice as slice;
        let d = gru_dims(l1.shape(), l2.shape(), l3.shape())?;
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(p), CpuStorage::F32(w), CpuStorage::F32(bias)) => CpuStorage::F32(
                fast::gru_forward(slice(p, l1, "gru")?, slice(w, l2, "gru")?, slice(bias, l3, "gru")?, d, false).hidden,
            ),
            (CpuStorage::F64(p), CpuStorage::F64(w), CpuStorage::F64(bias)) => CpuStorage::F64(
                gru_forward(slice(p, l1, "gru")?, slice(w, l2, "gru")?, slice(bias, l3, "gru")?, d, false).hidden,
            ),
            _ => candle_core::bail!("gru: inputs must all be f32 or all f64"),
        };
        Ok((out, Shape::from((d.batch, d.len, d.hidden))))
    }

    fn bwd(
        &self,
        pre: &Tensor,
        w_hh: &Tensor,
        b_hn: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = gru_dims(pre.shape(), w_hh.shape(), b_hn.shape())?;
        let grad = grad.contiguous()?;
        macro_rules! grads {
            ($t:ty, $backward:path) => {
                in_place(pre, "gru", |p: &[$t]| {
                    in_place(w_hh, "gru", |w: &[$t]| {
                        in_place(b_hn, "gru", |bias: &[$t]| {
                            in_place(&grad, "gru", |g: &[$t]| {
                                let (dp, dw, db) = $backward(p, w, bias, g, d);
                                Ok((like(dp, pre)?, like(dw, w_hh)?, like(db, b_hn)?))
                            })
                        })
                    })
                })?
            };
        }
        let (dp, dw, db) = match pre.dtype() {
            candle_core::DType::F32 => grads!(f32, fast::gru_backward),
            candle_core::DType::F64 => grads!(f64, gru_backward::<f64>),
            other => candle_core::bail!("gru: unsupported dtype {other:?}"),
        };
        Ok((Some(dp), Some(dw), Some(db)))
    }
}

/// The GRU recurrence in candle's operations, for the model's `forward_reference`.
pub fn gru_recurrence_reference(pre: &Tensor, w_hh: &Tensor, b_hn: &Tensor) -> Result<Tensor> {
    let (b, len, g3) = pre.dims3()?;
    let h = g3 / 3;
    let mut h_prev = Tensor::zeros((b, h), pre.dtype(), pre.device())?;
    let mut outs = Vec::with_capacity(len);
    for t in 0..len {
        let (p, u) = (pre.narrow(1, t, 1)?.squeeze(1)?, h_prev.matmul(w_hh)?); // (B, 3H) each
        let (_r, z, n) = gru_gates(&p, &u, b_hn, h)?;
        h_prev = ((z.affine(-1.0, 1.0)? * &n)? + (&z * &h_prev)?)?; // (1 − z) ⊙ n + z ⊙ h
        outs.push(h_prev.unsqueeze(1)?);
    }
    Ok(Tensor::cat(&outs, 1)?)
}

/// r, z and n of one GRU step from the input part `p` and the recurrent part `u` (both
/// `(B, 3H)`), in candle's operations (the stepper uses it too).
pub fn gru_gates(p: &Tensor, u: &Tensor, b_hn: &Tensor, h: usize) -> Result<(Tensor, Tensor, Tensor)> {
    let r = candle_nn::ops::sigmoid(&(p.narrow(1, 0, h)? + u.narrow(1, 0, h)?)?)?;
    let z = candle_nn::ops::sigmoid(&(p.narrow(1, h, h)? + u.narrow(1, h, h)?)?)?;
    let q = u.narrow(1, 2 * h, h)?.broadcast_add(b_hn)?;
    let n = (p.narrow(1, 2 * h, h)? + (&r * q)?)?.tanh()?;
    Ok((r, z, n))
}

/// The sizes of a call with `gates` gate blocks, checked.
fn dims(pre: &Shape, w_hh: &Shape, gates: usize, op: &str) -> candle_core::Result<Dims> {
    let (batch, len, width) = pre.dims3()?;
    let (hidden, w_cols) = w_hh.dims2()?;
    if width != gates * hidden || w_cols != width {
        candle_core::bail!(
            "{op}: pre {pre:?} and W_hh {w_hh:?} do not fit together (expected (B, T, {gates}H) and (H, {gates}H))"
        );
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
        let d = dims(l1.shape(), l2.shape(), 4, "lstm")?;
        use super::contiguous_slice as slice;
        let out = match (s1, s2) {
            (CpuStorage::F32(p), CpuStorage::F32(w)) => {
                CpuStorage::F32(fast::lstm_forward(slice(p, l1, "lstm")?, slice(w, l2, "lstm")?, d, false).hidden)
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
        let d = dims(pre.shape(), w_hh.shape(), 4, "lstm")?;
        let grad = grad.contiguous()?;
        // The inputs are read where they lie (copies of them cost page faults); only the
        // gradients are new.
        macro_rules! grads {
            ($t:ty, $backward:path) => {
                in_place(pre, "lstm", |p: &[$t]| {
                    in_place(w_hh, "lstm", |w: &[$t]| {
                        in_place(&grad, "lstm", |g: &[$t]| {
                            let (dp, dw) = $backward(p, w, g, d);
                            Ok((like(dp, pre)?, like(dw, w_hh)?))
                        })
                    })
                })?
            };
        }
        let (dpre, dw) = match pre.dtype() {
            candle_core::DType::F32 => grads!(f32, fast::lstm_backward),
            candle_core::DType::F64 => grads!(f64, backward::<f64>),
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

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap()
    }

    /// A variable of N(0, scale²) entries.
    fn random(shape: &[usize], scale: f64) -> Var {
        Var::from_tensor(&(Tensor::randn(0f64, 1.0, shape, &Device::Cpu).unwrap() * scale).unwrap()).unwrap()
    }

    /// `op` (the hand-written op) equals `reference` (candle's operations) on `vars` in values
    /// and in the gradients of a random weighting of its outputs, and in f32 within 1e-5.
    fn check(op: impl Fn(&[Tensor]) -> Tensor, reference: impl Fn(&[Tensor]) -> Tensor, vars: &[(&str, Var)]) {
        let inputs: Vec<Tensor> = vars.iter().map(|(_, v)| v.as_tensor().clone()).collect();
        let (fused, slow) = (op(&inputs), reference(&inputs));
        assert!(max_diff(&fused, &slow) < 1e-12, "values differ by {}", max_diff(&fused, &slow));
        let weights = Tensor::randn(0f64, 1.0, fused.shape(), &Device::Cpu).unwrap();
        let g1 = (&fused * &weights).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (&slow * &weights).unwrap().sum_all().unwrap().backward().unwrap();
        for (name, var) in vars {
            let d = max_diff(g1.get(var).unwrap(), g2.get(var).unwrap());
            assert!(d < 1e-10, "d{name} differs by {d}");
        }
        let in_f32: Vec<Tensor> = inputs.iter().map(|t| t.to_dtype(DType::F32).unwrap()).collect();
        assert!(max_diff(&op(&in_f32).to_dtype(DType::F64).unwrap(), &slow) < 1e-5, "f32 differs from f64");
    }

    #[test]
    fn the_lstm_equals_candles_operations_with_their_gradients() {
        let (b, len, h) = (3, 6, 5);
        check(
            |x| lstm_recurrence(&x[0], &x[1]).unwrap(),
            |x| lstm_recurrence_reference(&x[0], &x[1]).unwrap(),
            &[("pre", random(&[b, len, 4 * h], 1.0)), ("W_hh", random(&[h, 4 * h], 0.5))],
        );
    }

    #[test]
    fn the_gru_equals_candles_operations_with_their_gradients() {
        let (b, len, h) = (3, 6, 5);
        check(
            |x| gru_recurrence(&x[0], &x[1], &x[2]).unwrap(),
            |x| gru_recurrence_reference(&x[0], &x[1], &x[2]).unwrap(),
            &[("pre", random(&[b, len, 3 * h], 1.0)), ("W_hh", random(&[h, 3 * h], 0.5)), ("b_hn", random(&[h], 1.0))],
        );
    }
}
