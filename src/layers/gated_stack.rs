//! Gated PixelCNN's whole network (its gated layers and its head) as one operation with its own
//! forward and backward pass, for training. As separate operations a layer was eight candle
//! operations, each allocating its output, and candle's autograd adds every gradient into a
//! freshly zeroed tensor: its additions, fills and copies were about a third of a training
//! step (perf). Here each layer's sums are written in place into buffers the op keeps for its
//! backward pass, and the gradients of the weights are summed straight into one flat vector.
//!
//! A layer, on the padded layout of `layers::shifted` (every sum below is zero at padding rows):
//!
//! - `v_pre = b_v + conv_v(v)`, `h_pre = b_h + conv_h(h) + b_link + link(v_pre)` (the link
//!   reads the vertical stack one image row up);
//! - `v' = gate(v_pre)`, `h' = b_r + gate(h_pre) · W_r`, plus `h` after the first layer.
//!
//! The head is ReLU, 1×1, ReLU, 1×1 of the last `h'`. The weights enter as one flat tensor in
//! [`StackLayout`]'s order (candle's custom ops take at most three inputs; the concatenation's
//! backward hands each weight its part of the gradient). Single threaded: the trainer runs one
//! shard of the batch per thread. Checked against the same network in separate operations
//! (values and gradients, in f64) in `models::pixelcnn`'s tests.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};

use super::gated::Gate;
use super::matmul::{Bf16, Exact, Mat, Products, amx};
use super::shifted::{Dims, Float, bias_grads, conv, input_grads, weight_grads, zero_padding_rows};
use crate::Result;
use crate::core::train::Precision;

/// One convolution of the stack: the row offsets of its taps, its sizes, and where its weight
/// `(K, C_in, C_out)` and bias `(C_out,)` start in the flat vector.
#[derive(Debug, Clone)]
pub struct ConvAt {
    offsets: Vec<isize>,
    c_in: usize,
    c_out: usize,
    w: usize,
    b: usize,
}

impl ConvAt {
    fn dims(&self, g: usize, r: usize) -> Dims {
        Dims { g, r, c: self.c_in, n: self.c_out }
    }

    fn bias<'a, T>(&self, p: &'a [T]) -> &'a [T] {
        &p[self.b..self.b + self.c_out]
    }

    fn taps<T>(&self, p: &[T]) -> Vec<(isize, Mat<T>)> {
        let size = self.c_in * self.c_out;
        self.offsets
            .iter()
            .enumerate()
            .map(|(k, &o)| (o, Mat::new(p, self.w + k * size, self.c_in, self.c_out)))
            .collect()
    }
}

/// The network's shape, and where each weight lies in the flat vector: per layer the vertical,
/// horizontal, link and residual convolutions (weight, then bias), then the head's two.
#[derive(Debug, Clone)]
pub struct StackLayout {
    layers: Vec<[ConvAt; 4]>,
    head: [ConvAt; 2],
    /// Padding rows, as in [`super::shifted::Options::padding`].
    padding: (usize, usize),
    /// Total length of the flat vector.
    pub len: usize,
}

/// A convolution as given to [`StackLayout::new`]: row offsets, input and output channels.
pub type ConvShape = (Vec<isize>, usize, usize);

impl StackLayout {
    /// The layout of `layers` ([vertical, horizontal, link, residual] each) and `head` ([hidden,
    /// out]), on rows whose padding is `(period, valid)`.
    pub fn new(layers: &[[ConvShape; 4]], head: &[ConvShape; 2], padding: (usize, usize)) -> Self {
        let mut at = 0;
        let mut place = |(offsets, c_in, c_out): &ConvShape| {
            let w = at;
            let b = w + offsets.len() * c_in * c_out;
            at = b + c_out;
            ConvAt { offsets: offsets.clone(), c_in: *c_in, c_out: *c_out, w, b }
        };
        let layers = layers.iter().map(|convs| convs.each_ref().map(&mut place)).collect();
        let head = head.each_ref().map(&mut place);
        StackLayout { layers, head, padding, len: at }
    }

    fn channels(&self) -> usize {
        self.layers[0][3].c_out
    }
}

/// What one layer keeps for the backward pass, each `(G·R × width)`.
struct LayerActs<T> {
    v_pre: Vec<T>,
    h_pre: Vec<T>,
    v_out: Vec<T>,
    gated_h: Vec<T>,
    h_out: Vec<T>,
}

/// Everything the backward pass reads besides the input and the weights.
struct Activations<T> {
    layers: Vec<LayerActs<T>>,
    /// ReLU of the last layer's `h'`, the head's input.
    head_in: Vec<T>,
    /// ReLU of the head's hidden layer.
    hidden: Vec<T>,
}

/// `rows` copies of `bias`.
fn biased<T: Copy>(rows: usize, bias: &[T]) -> Vec<T> {
    let mut y = Vec::with_capacity(rows * bias.len());
    for _ in 0..rows {
        y.extend_from_slice(bias);
    }
    y
}

fn relu<T: Float>(x: &[T]) -> Vec<T> {
    x.iter().map(|&v| if v > T::default() { v } else { T::default() }).collect()
}

/// Zeroes `grad` where `out` (a ReLU's output) is not positive.
fn relu_grad<T: Float>(grad: &mut [T], out: &[T]) {
    grad.iter_mut().zip(out).for_each(|(g, &o)| {
        if o <= T::default() {
            *g = T::default();
        }
    });
}

/// The network on `x (G·R × C_in)`: logits `(G·R × V)` and the activations.
fn forward<T: Float + Gate, P: Products<T>>(
    l: &StackLayout,
    p: &[T],
    x: &[T],
    g: usize,
    r: usize,
) -> (Vec<T>, Activations<T>) {
    let (rows, c) = (g * r, l.channels());
    let pad = |y: &mut [T], cols: usize| zero_padding_rows(y, r, cols, Some(l.padding));
    let mut layers: Vec<LayerActs<T>> = Vec::with_capacity(l.layers.len());
    for (i, [vertical, horizontal, link, residual]) in l.layers.iter().enumerate() {
        let (v_in, h_in) = match layers.last() {
            Some(prev) => (&prev.v_out[..], &prev.h_out[..]),
            None => (x, x),
        };
        let two_c = vertical.c_out;
        let mut v_pre = biased(rows, vertical.bias(p));
        conv::<T, P>(&mut v_pre, v_in, vertical.dims(g, r), (vertical.c_in, two_c), &vertical.taps(p));
        pad(&mut v_pre, two_c);
        // Both biases at once: the sum of two zero-padded sums is the padded sum.
        let both: Vec<T> = horizontal.bias(p).iter().zip(link.bias(p)).map(|(&a, &b)| a + b).collect();
        let mut h_pre = biased(rows, &both);
        conv::<T, P>(&mut h_pre, h_in, horizontal.dims(g, r), (horizontal.c_in, two_c), &horizontal.taps(p));
        conv::<T, P>(&mut h_pre, &v_pre, link.dims(g, r), (two_c, two_c), &link.taps(p));
        pad(&mut h_pre, two_c);
        let mut v_out = vec![T::default(); rows * c];
        T::gate(&v_pre, &mut v_out, c);
        let mut gated_h = vec![T::default(); rows * c];
        T::gate(&h_pre, &mut gated_h, c);
        let mut h_out = biased(rows, residual.bias(p));
        conv::<T, P>(&mut h_out, &gated_h, residual.dims(g, r), (c, c), &residual.taps(p));
        pad(&mut h_out, c);
        if i > 0 {
            h_out.iter_mut().zip(h_in).for_each(|(o, &h)| *o += h);
        }
        layers.push(LayerActs { v_pre, h_pre, v_out, gated_h, h_out });
    }
    let [hidden, out] = &l.head;
    let head_in = relu(&layers.last().expect("invariant: at least one layer").h_out);
    let mut a = biased(rows, hidden.bias(p));
    conv::<T, P>(&mut a, &head_in, hidden.dims(g, r), (hidden.c_in, hidden.c_out), &hidden.taps(p));
    pad(&mut a, hidden.c_out);
    let hidden_relu = relu(&a);
    drop(a);
    let mut logits = biased(rows, out.bias(p));
    conv::<T, P>(&mut logits, &hidden_relu, out.dims(g, r), (out.c_in, out.c_out), &out.taps(p));
    pad(&mut logits, out.c_out);
    (logits, Activations { layers, head_in, hidden: hidden_relu })
}

/// The gradient of the flat weights from that of the logits.
fn backward<T: Float + Gate, P: Products<T>>(
    l: &StackLayout,
    p: &[T],
    x: &[T],
    acts: &Activations<T>,
    dlogits: &[T],
    g: usize,
    r: usize,
) -> Vec<T> {
    let (rows, c) = (g * r, l.channels());
    let pad = |y: &mut [T], cols: usize| zero_padding_rows(y, r, cols, Some(l.padding));
    let mut dp = vec![T::default(); p.len()];
    // A sum's gradient, then its weights' and bias's: padding rows are constant zeros, so
    // nothing flows back from them.
    let weights = |conv: &ConvAt, input: &[T], dy: &mut [T], dp: &mut [T]| {
        pad(dy, conv.c_out);
        bias_grads(&mut dp[conv.b..conv.b + conv.c_out], dy);
        weight_grads::<T, P>(dp, conv.w, input, dy, conv.dims(g, r), &conv.offsets);
    };
    let [hidden, out] = &l.head;
    let mut dy = dlogits.to_vec();
    weights(out, &acts.hidden, &mut dy, &mut dp);
    let mut da = vec![T::default(); rows * hidden.c_out];
    input_grads::<T, P>(&mut da, &dy, p, out.w, out.dims(g, r), &out.offsets);
    relu_grad(&mut da, &acts.hidden);
    weights(hidden, &acts.head_in, &mut da, &mut dp);
    let mut dh = vec![T::default(); rows * c];
    input_grads::<T, P>(&mut dh, &da, p, hidden.w, hidden.dims(g, r), &hidden.offsets);
    relu_grad(&mut dh, &acts.head_in);
    drop(da);
    // The last layer's vertical output feeds nothing.
    let mut dv = vec![T::default(); rows * c];
    for (i, [vertical, horizontal, link, residual]) in l.layers.iter().enumerate().rev() {
        let a = &acts.layers[i];
        let (v_in, h_in) = if i > 0 { (&acts.layers[i - 1].v_out[..], &acts.layers[i - 1].h_out[..]) } else { (x, x) };
        let two_c = vertical.c_out;
        // h' = residual(gated_h) + h: the residual's gradients; dh itself flows on to h.
        weights(residual, &a.gated_h, &mut dh, &mut dp);
        let mut d_gated = vec![T::default(); rows * c];
        input_grads::<T, P>(&mut d_gated, &dh, p, residual.w, residual.dims(g, r), &residual.offsets);
        let mut dh_pre = vec![T::default(); rows * two_c];
        T::gate_grad(&a.h_pre, &d_gated, &mut dh_pre, c);
        drop(d_gated);
        // h_pre = horizontal(h) + link(v_pre).
        pad(&mut dh_pre, two_c);
        bias_grads(&mut dp[horizontal.b..horizontal.b + two_c], &dh_pre);
        bias_grads(&mut dp[link.b..link.b + two_c], &dh_pre);
        weight_grads::<T, P>(&mut dp, horizontal.w, h_in, &dh_pre, horizontal.dims(g, r), &horizontal.offsets);
        weight_grads::<T, P>(&mut dp, link.w, &a.v_pre, &dh_pre, link.dims(g, r), &link.offsets);
        let mut dv_pre = vec![T::default(); rows * two_c];
        T::gate_grad(&a.v_pre, &dv, &mut dv_pre, c);
        input_grads::<T, P>(&mut dv_pre, &dh_pre, p, link.w, link.dims(g, r), &link.offsets);
        weights(vertical, v_in, &mut dv_pre, &mut dp);
        if i == 0 {
            break; // the image's gradient is not needed
        }
        // Into the previous layer's outputs: dh keeps the residual path's share.
        input_grads::<T, P>(&mut dh, &dh_pre, p, horizontal.w, horizontal.dims(g, r), &horizontal.offsets);
        dv.fill(T::default());
        input_grads::<T, P>(&mut dv, &dv_pre, p, vertical.w, vertical.dims(g, r), &vertical.offsets);
    }
    dp
}

/// The activations of one forward pass, in its precision.
enum Kept {
    F32(Activations<f32>),
    F64(Activations<f64>),
}

struct StackOp {
    layout: StackLayout,
    bf16: bool,
    kept: Mutex<Option<Kept>>,
}

/// The products' way for `T`: bf16 on the AMX unit when asked (f32 only), else exact.
trait Run: Float + Gate + candle_core::WithDType {
    fn forward(op: &StackOp, p: &[Self], x: &[Self], g: usize, r: usize) -> (Vec<Self>, Activations<Self>);
    fn backward(
        op: &StackOp,
        p: &[Self],
        x: &[Self],
        a: &Activations<Self>,
        dy: &[Self],
        g: usize,
        r: usize,
    ) -> Vec<Self>;
    fn keep(acts: Activations<Self>) -> Kept;
}

impl Run for f32 {
    fn forward(op: &StackOp, p: &[f32], x: &[f32], g: usize, r: usize) -> (Vec<f32>, Activations<f32>) {
        if op.bf16 {
            forward::<f32, Bf16>(&op.layout, p, x, g, r)
        } else {
            forward::<f32, Exact>(&op.layout, p, x, g, r)
        }
    }
    fn backward(op: &StackOp, p: &[f32], x: &[f32], a: &Activations<f32>, dy: &[f32], g: usize, r: usize) -> Vec<f32> {
        if op.bf16 {
            backward::<f32, Bf16>(&op.layout, p, x, a, dy, g, r)
        } else {
            backward::<f32, Exact>(&op.layout, p, x, a, dy, g, r)
        }
    }
    fn keep(acts: Activations<f32>) -> Kept {
        Kept::F32(acts)
    }
}

impl Run for f64 {
    fn forward(op: &StackOp, p: &[f64], x: &[f64], g: usize, r: usize) -> (Vec<f64>, Activations<f64>) {
        forward::<f64, Exact>(&op.layout, p, x, g, r)
    }
    fn backward(op: &StackOp, p: &[f64], x: &[f64], a: &Activations<f64>, dy: &[f64], g: usize, r: usize) -> Vec<f64> {
        backward::<f64, Exact>(&op.layout, p, x, a, dy, g, r)
    }
    fn keep(acts: Activations<f64>) -> Kept {
        Kept::F64(acts)
    }
}

impl StackOp {
    fn run<T: Run>(&self, x: &[T], xl: &Layout, p: &[T], pl: &Layout) -> candle_core::Result<(Vec<T>, Shape)> {
        let (g, r, _) = xl.shape().dims3()?;
        let (x, p) = (super::contiguous_slice(x, xl, "gated stack")?, super::contiguous_slice(p, pl, "gated stack")?);
        let (logits, acts) = T::forward(self, p, x, g, r);
        *self.kept.lock().expect("invariant: not poisoned") = Some(T::keep(acts));
        Ok((logits, Shape::from((g, r, self.layout.head[1].c_out))))
    }

    fn grad<T: Run>(&self, x: &Tensor, p: &Tensor, dy: &Tensor, acts: &Activations<T>) -> candle_core::Result<Tensor> {
        let (g, r, _) = x.dims3()?;
        let dy = dy.contiguous()?;
        let dp = super::in_place(x, "gated stack", |x: &[T]| {
            super::in_place(p, "gated stack", |pv: &[T]| {
                super::in_place(&dy, "gated stack", |dy: &[T]| Ok(T::backward(self, pv, x, acts, dy, g, r)))
            })
        })?;
        super::like(dp, p)
    }
}

impl CustomOp2 for StackOp {
    fn name(&self) -> &'static str {
        "gated-stack"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        match (s1, s2) {
            (CpuStorage::F32(x), CpuStorage::F32(p)) => self.run(x, l1, p, l2).map(|(y, s)| (CpuStorage::F32(y), s)),
            (CpuStorage::F64(x), CpuStorage::F64(p)) => self.run(x, l1, p, l2).map(|(y, s)| (CpuStorage::F64(y), s)),
            _ => candle_core::bail!("gated stack: f32 or f64 operands of one type only"),
        }
    }

    fn bwd(
        &self,
        x: &Tensor,
        p: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let kept = self.kept.lock().expect("invariant: not poisoned").take();
        let dp = match kept {
            Some(Kept::F32(acts)) => self.grad(x, p, grad, &acts)?,
            Some(Kept::F64(acts)) => self.grad(x, p, grad, &acts)?,
            None => candle_core::bail!("gated stack: backward called twice, or before forward"),
        };
        Ok((None, Some(dp)))
    }
}

/// The logits `(G, R, V)` of the network `layout` on the padded images `x (G, R, C_in)`, the
/// weights packed in `params` as [`StackLayout`] says; the products in `precision` for f32
/// (bf16 falls back to exact f32 on a CPU without AMX, as `shifted_conv` does).
pub fn gated_stack(layout: &StackLayout, x: &Tensor, params: &Tensor, precision: Precision) -> Result<Tensor> {
    let (_g, _r, c_in) = x.dims3()?;
    if params.dims() != [layout.len] || c_in != layout.layers[0][0].c_in {
        return Err(crate::Error::Config(format!(
            "gated stack: {:?} weights and {c_in} input channels for a layout of {} weights and {}",
            params.dims(),
            layout.len,
            layout.layers[0][0].c_in
        )));
    }
    let bf16 = precision == Precision::Bf16 && amx::available();
    let op = StackOp { layout: layout.clone(), bf16, kept: Mutex::new(None) };
    Ok(x.contiguous()?.apply_op2(&params.contiguous()?, op)?)
}
