//! LSTM and GRU layers, each as one operation with its own backward pass (Hochreiter &
//! Schmidhuber, 1997; Cho et al., 2014; the gate layouts of PyTorch's `nn.LSTM` and `nn.GRU`).
//!
//! The input half of every gate pre-activation, `pre_t = x_t W_ih + b` for all t, is one 2-D
//! product over all positions, made inside the operation. What is left is sequential: for t =
//! 0 … T−1, from h_{−1} = c_{−1} = 0,
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
//! `(B, H) × (H, GH)` product (the `gemm` crate) and a few vectorised passes per step. When
//! gradients are tracked, the forward pass keeps what each step's backward needs (the gates
//! and cells); the backward pass runs back through time from them.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};

use super::matmul::{Exact, Mat, Products, Scalar};
use super::{contiguous_slice, in_place, like};
use crate::Result;
use crate::fastmath::fast_exp;

/// The float types the op runs in: f32 (training) and f64 (finite-difference checks).
trait Real:
    Scalar
    + PartialOrd
    + std::ops::Add<Output = Self>
    + std::ops::AddAssign
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
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

/// Gradients of `pre` and `w_hh` given `dh (B, T, H)` and the forward pass's `trace`: back
/// through time from the last step.
#[inline(always)]
fn backward<T: Real>(trace: &Trace<T>, w_hh: &[T], dh_out: &[T], d: Dims) -> (Vec<T>, Vec<T>) {
    let (b, h, len) = (d.batch, d.hidden, d.len);
    let g4 = 4 * h;
    let mut dpre = vec![T::ZERO; b * len * g4];
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
        pub fn lstm_backward(trace: &Trace<f32>, w: &[f32], dh: &[f32], d: Dims) -> (Vec<f32>, Vec<f32>) = super::backward::<f32>;
        pub fn gru_forward(pre: &[f32], w: &[f32], b: &[f32], d: Dims, keep: bool) -> Trace<f32> = super::gru_forward::<f32>;
        pub fn gru_backward(trace: &Trace<f32>, w: &[f32], dh: &[f32], d: Dims) -> GruGrads<f32> = super::gru_backward::<f32>;
    }
}

/// The GRU's gradients: of `pre`, `W_hh` and `b_hn`.
type GruGrads<T> = (Vec<T>, Vec<T>, Vec<T>);

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
fn gru_backward<T: Real>(trace: &Trace<T>, w_hh: &[T], dh_out: &[T], d: Dims) -> GruGrads<T> {
    let (b, h, len) = (d.batch, d.hidden, d.len);
    let g3 = 3 * h;
    let (mut dpre, mut dw, mut db) = (vec![T::ZERO; b * len * g3], vec![T::ZERO; w_hh.len()], vec![T::ZERO; h]);
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
                db[k] += dan * rk;
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

/// Which recurrence a layer runs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kind {
    /// LSTM: gates i, f, g, o.
    Lstm,
    /// GRU: gates r, z, n, and b_hn.
    Gru,
}

impl Kind {
    /// Gate blocks per hidden unit.
    fn gates(self) -> usize {
        match self {
            Kind::Lstm => 4,
            Kind::Gru => 3,
        }
    }
}

/// `x (B, T, I)` → `h (B, T, H)`: a whole recurrent layer, its input product `x W_ih + bias`
/// (`W_ih (I, G·H)`, `bias (G·H,)`) made inside the operation, then the recurrence with `w_hh
/// (H, G·H)` (and the GRU's `b_hn (H,)`). Gradients flow to every input. The gate
/// pre-activations never become a tensor: through candle, their gradient (B·T·G·H values) was
/// zeroed, added into and copied again, a fifth of an LSTM's step (perf).
pub fn recurrent_layer(
    kind: Kind,
    x: &Tensor,
    w_ih: &Tensor,
    bias: &Tensor,
    w_hh: &Tensor,
    b_hn: Option<&Tensor>,
) -> Result<Tensor> {
    let (_b, _t, input) = x.dims3()?;
    let (hidden, cols) = w_hh.dims2()?;
    let gh = kind.gates() * hidden;
    let b_ok = match (kind, b_hn) {
        (Kind::Lstm, None) => true,
        (Kind::Gru, Some(b)) => b.dims() == [hidden],
        _ => false,
    };
    if w_ih.dims() != [input, gh] || bias.dims() != [gh] || cols != gh || !b_ok {
        return Err(crate::Error::Config(format!(
            "recurrent layer ({kind:?}): x {:?}, W_ih {:?}, bias {:?}, W_hh {:?}, b_hn {:?} do not fit together",
            x.dims(),
            w_ih.dims(),
            bias.dims(),
            w_hh.dims(),
            b_hn.map(|b| b.dims().to_vec())
        )));
    }
    let mut parts = vec![w_ih.flatten_all()?, bias.clone(), w_hh.flatten_all()?];
    parts.extend(b_hn.cloned());
    let flat = Tensor::cat(&parts, 0)?;
    // Keep the forward pass's gates for the backward one only when there will be one.
    let keep = x.track_op() || flat.track_op();
    let op = LayerOp { kind, input, hidden, keep, trace: Mutex::new(None) };
    Ok(x.contiguous()?.apply_op2(&flat, op)?)
}

/// A layer's weights in the flat vector: W_ih, bias, W_hh, then the GRU's b_hn.
struct LayerOp {
    kind: Kind,
    input: usize,
    hidden: usize,
    keep: bool,
    trace: Mutex<Option<Kept>>,
}

/// A forward pass's trace, in its precision.
enum Kept {
    F32(Trace<f32>),
    F64(Trace<f64>),
}

/// The recurrences of a float type: f32's compiled for this CPU, f64's plain.
trait Cells: Real + candle_core::WithDType {
    fn lstm_forward(pre: &[Self], w: &[Self], d: Dims, keep: bool) -> Trace<Self>;
    fn lstm_backward(trace: &Trace<Self>, w: &[Self], dh: &[Self], d: Dims) -> (Vec<Self>, Vec<Self>);
    fn gru_forward(pre: &[Self], w: &[Self], b: &[Self], d: Dims, keep: bool) -> Trace<Self>;
    fn gru_backward(trace: &Trace<Self>, w: &[Self], dh: &[Self], d: Dims) -> GruGrads<Self>;
    fn wrap(trace: Trace<Self>) -> Kept;
    fn unwrap(kept: &Kept) -> Option<&Trace<Self>>;
}

impl Cells for f32 {
    fn lstm_forward(pre: &[f32], w: &[f32], d: Dims, keep: bool) -> Trace<f32> {
        fast::lstm_forward(pre, w, d, keep)
    }
    fn lstm_backward(trace: &Trace<f32>, w: &[f32], dh: &[f32], d: Dims) -> (Vec<f32>, Vec<f32>) {
        fast::lstm_backward(trace, w, dh, d)
    }
    fn gru_forward(pre: &[f32], w: &[f32], b: &[f32], d: Dims, keep: bool) -> Trace<f32> {
        fast::gru_forward(pre, w, b, d, keep)
    }
    fn gru_backward(trace: &Trace<f32>, w: &[f32], dh: &[f32], d: Dims) -> GruGrads<f32> {
        fast::gru_backward(trace, w, dh, d)
    }
    fn wrap(trace: Trace<f32>) -> Kept {
        Kept::F32(trace)
    }
    fn unwrap(kept: &Kept) -> Option<&Trace<f32>> {
        if let Kept::F32(t) = kept { Some(t) } else { None }
    }
}

impl Cells for f64 {
    fn lstm_forward(pre: &[f64], w: &[f64], d: Dims, keep: bool) -> Trace<f64> {
        forward(pre, w, d, keep)
    }
    fn lstm_backward(trace: &Trace<f64>, w: &[f64], dh: &[f64], d: Dims) -> (Vec<f64>, Vec<f64>) {
        backward(trace, w, dh, d)
    }
    fn gru_forward(pre: &[f64], w: &[f64], b: &[f64], d: Dims, keep: bool) -> Trace<f64> {
        gru_forward(pre, w, b, d, keep)
    }
    fn gru_backward(trace: &Trace<f64>, w: &[f64], dh: &[f64], d: Dims) -> GruGrads<f64> {
        gru_backward(trace, w, dh, d)
    }
    fn wrap(trace: Trace<f64>) -> Kept {
        Kept::F64(trace)
    }
    fn unwrap(kept: &Kept) -> Option<&Trace<f64>> {
        if let Kept::F64(t) = kept { Some(t) } else { None }
    }
}

impl LayerOp {
    fn dims(&self, x: &Shape) -> candle_core::Result<Dims> {
        let (batch, len, _) = x.dims3()?;
        Ok(Dims { batch, len, hidden: self.hidden })
    }

    /// Where W_ih, the bias, W_hh and b_hn start in the flat vector.
    fn offsets(&self) -> [usize; 4] {
        let gh = self.kind.gates() * self.hidden;
        let bias = self.input * gh;
        [0, bias, bias + gh, bias + gh + self.hidden * gh]
    }

    /// The trace of the recurrence over `x`, with the weights `p`.
    fn trace<T: Cells>(&self, x: &[T], p: &[T], d: Dims, keep: bool) -> Trace<T> {
        let (gh, rows) = (self.kind.gates() * self.hidden, d.batch * d.len);
        let [w_ih, bias, w_hh, b_hn] = self.offsets();
        let mut pre = Vec::with_capacity(rows * gh);
        for _ in 0..rows {
            pre.extend_from_slice(&p[bias..bias + gh]);
        }
        Exact::acc(&mut pre, 0, Mat::new(x, 0, rows, self.input), Mat::new(p, w_ih, self.input, gh));
        let w = &p[w_hh..w_hh + self.hidden * gh];
        match self.kind {
            Kind::Lstm => T::lstm_forward(&pre, w, d, keep),
            Kind::Gru => T::gru_forward(&pre, w, &p[b_hn..b_hn + self.hidden], d, keep),
        }
    }

    fn run<T: Cells>(&self, xs: &[T], xl: &Layout, ps: &[T], pl: &Layout) -> candle_core::Result<Vec<T>> {
        let d = self.dims(xl.shape())?;
        let (x, p) = (contiguous_slice(xs, xl, "recurrent layer")?, contiguous_slice(ps, pl, "recurrent layer")?);
        let mut trace = self.trace(x, p, d, self.keep);
        let hidden = std::mem::take(&mut trace.hidden);
        if self.keep {
            trace.hidden = hidden.clone();
            *self.trace.lock().expect("invariant: not poisoned") = Some(T::wrap(trace));
        }
        Ok(hidden)
    }

    /// `(dx, dp)` from the gradient of the hidden states.
    fn grads<T: Cells>(&self, x: &[T], p: &[T], dh: &[T], d: Dims, kept: Option<&Kept>) -> (Vec<T>, Vec<T>) {
        let recomputed;
        let trace = match kept.and_then(T::unwrap) {
            Some(t) => t,
            None => {
                recomputed = self.trace(x, p, d, true);
                &recomputed
            }
        };
        let (gh, rows) = (self.kind.gates() * self.hidden, d.batch * d.len);
        let [w_ih, bias, w_hh, b_hn] = self.offsets();
        let w = &p[w_hh..w_hh + self.hidden * gh];
        let mut dp = vec![T::ZERO; p.len()];
        let dpre = match self.kind {
            Kind::Lstm => {
                let (dpre, dw) = T::lstm_backward(trace, w, dh, d);
                dp[w_hh..w_hh + dw.len()].copy_from_slice(&dw);
                dpre
            }
            Kind::Gru => {
                let (dpre, dw, db) = T::gru_backward(trace, w, dh, d);
                dp[w_hh..w_hh + dw.len()].copy_from_slice(&dw);
                dp[b_hn..b_hn + db.len()].copy_from_slice(&db);
                dpre
            }
        };
        // pre = x W_ih + bias: dW_ih = xᵀ dpre, dbias = Σ_rows dpre, dx = dpre W_ihᵀ.
        let (xm, dm) = (Mat::new(x, 0, rows, self.input), Mat::new(&dpre, 0, rows, gh));
        Exact::acc(&mut dp, w_ih, xm.t(), dm);
        for row in dpre.chunks_exact(gh) {
            dp[bias..bias + gh].iter_mut().zip(row).for_each(|(a, &v)| *a += v);
        }
        let mut dx = vec![T::ZERO; x.len()];
        Exact::acc(&mut dx, 0, dm, Mat::new(p, w_ih, self.input, gh).t());
        (dx, dp)
    }

    fn grad_tensors<T: Cells>(
        &self,
        x: &Tensor,
        p: &Tensor,
        dh: &Tensor,
        kept: Option<&Kept>,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let d = self.dims(x.shape())?;
        let dh = dh.contiguous()?;
        let op = "recurrent layer";
        in_place(x, op, |xv: &[T]| {
            in_place(p, op, |pv: &[T]| {
                in_place(&dh, op, |g: &[T]| {
                    let (dx, dp) = self.grads(xv, pv, g, d, kept);
                    Ok((like(dx, x)?, like(dp, p)?))
                })
            })
        })
    }
}

impl CustomOp2 for LayerOp {
    fn name(&self) -> &'static str {
        "recurrent-layer"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = self.dims(l1.shape())?;
        let out = match (s1, s2) {
            (CpuStorage::F32(x), CpuStorage::F32(p)) => CpuStorage::F32(self.run(x, l1, p, l2)?),
            (CpuStorage::F64(x), CpuStorage::F64(p)) => CpuStorage::F64(self.run(x, l1, p, l2)?),
            _ => candle_core::bail!("recurrent layer: inputs must both be f32 or both f64"),
        };
        Ok((out, Shape::from((d.batch, d.len, d.hidden))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        p: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let kept = self.trace.lock().expect("invariant: not poisoned").take();
        let (dx, dp) = match x.dtype() {
            candle_core::DType::F32 => self.grad_tensors::<f32>(x, p, grad, kept.as_ref())?,
            candle_core::DType::F64 => self.grad_tensors::<f64>(x, p, grad, kept.as_ref())?,
            other => candle_core::bail!("recurrent layer: unsupported dtype {other:?}"),
        };
        Ok((Some(dx), Some(dp)))
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

    /// The input product and the recurrence in candle's operations.
    fn reference_layer(kind: Kind, x: &[Tensor]) -> Tensor {
        let (b, t, i) = x[0].dims3().unwrap();
        let pre = x[0].reshape((b * t, i)).unwrap().matmul(&x[1]).unwrap().broadcast_add(&x[2]).unwrap();
        let pre = pre.reshape((b, t, x[1].dim(1).unwrap())).unwrap();
        match kind {
            Kind::Lstm => lstm_recurrence_reference(&pre, &x[3]).unwrap(),
            Kind::Gru => gru_recurrence_reference(&pre, &x[3], &x[4]).unwrap(),
        }
    }

    #[test]
    fn the_lstm_layer_equals_candles_operations_with_their_gradients() {
        let (b, len, i, h) = (3, 6, 4, 5);
        check(
            |x| recurrent_layer(Kind::Lstm, &x[0], &x[1], &x[2], &x[3], None).unwrap(),
            |x| reference_layer(Kind::Lstm, x),
            &[
                ("x", random(&[b, len, i], 1.0)),
                ("W_ih", random(&[i, 4 * h], 0.5)),
                ("bias", random(&[4 * h], 0.5)),
                ("W_hh", random(&[h, 4 * h], 0.5)),
            ],
        );
    }

    #[test]
    fn the_gru_layer_equals_candles_operations_with_their_gradients() {
        let (b, len, i, h) = (3, 6, 4, 5);
        check(
            |x| recurrent_layer(Kind::Gru, &x[0], &x[1], &x[2], &x[3], Some(&x[4])).unwrap(),
            |x| reference_layer(Kind::Gru, x),
            &[
                ("x", random(&[b, len, i], 1.0)),
                ("W_ih", random(&[i, 3 * h], 0.5)),
                ("bias", random(&[3 * h], 0.5)),
                ("W_hh", random(&[h, 3 * h], 0.5)),
                ("b_hn", random(&[h], 1.0)),
            ],
        );
    }
}
