//! A whole network of shifted convolutions (PixelCNN's, Gated PixelCNN's) as one operation
//! with its own forward and backward pass, for training. As separate candle operations a layer
//! was several operations, each allocating its output, and candle's autograd adds every
//! gradient into a freshly zeroed tensor: its additions, fills and copies were about a third of
//! a training step (perf). Here a [`Network`] writes each sum in place into buffers the op keeps
//! for its backward pass, and sums the weights' gradients straight into one flat vector.
//!
//! The weights enter as one flat tensor in the network's order (candle's custom ops take at most
//! three inputs; the concatenation's backward hands each weight its part of the gradient).
//! Single threaded: the trainer runs one shard of the batch per thread. Each network is checked
//! against the same network in separate operations (values and gradients, in f64 and in bf16)
//! in `models::pixelcnn`'s tests.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};

use super::gated::Gate;
use super::matmul::{Bf16, Exact, Mat, Products, amx};
use super::shifted::{Dims, Float, bias_grads, conv, input_grads, weight_grads, zero_padding_rows};
use crate::Result;
use crate::core::train::Precision;

/// A convolution as given to a network's layout: row offsets of its taps, input and output
/// channels.
pub type ConvShape = (Vec<isize>, usize, usize);

/// One convolution of a network: its taps and sizes, and where its weight `(K, C_in, C_out)`
/// and bias `(C_out,)` start in the flat vector.
#[derive(Debug, Clone)]
pub struct ConvAt {
    offsets: Vec<isize>,
    /// Input channels.
    pub c_in: usize,
    /// Output channels.
    pub c_out: usize,
    w: usize,
    b: usize,
}

/// Places convolutions one after another in the flat vector.
#[derive(Debug, Default)]
pub struct Placer {
    /// The length so far.
    pub len: usize,
}

impl Placer {
    /// The start of the next `len` weights (a vector that is not a convolution's).
    pub fn vector(&mut self, len: usize) -> usize {
        self.len += len;
        self.len - len
    }

    /// The next convolution, weight then bias.
    pub fn place(&mut self, (offsets, c_in, c_out): &ConvShape) -> ConvAt {
        let w = self.len;
        let b = w + offsets.len() * c_in * c_out;
        self.len = b + c_out;
        ConvAt { offsets: offsets.clone(), c_in: *c_in, c_out: *c_out, w, b }
    }
}

/// The rows a network runs over: `g` sequences of `r` rows, and which of them are padding
/// (`(period, valid)`, as `shifted::Options::padding` says), whose sums are always zero.
#[derive(Debug, Clone, Copy)]
pub struct Rows {
    g: usize,
    r: usize,
    padding: (usize, usize),
}

impl Rows {
    /// The sequences and the rows of each.
    pub fn shape(&self) -> (usize, usize) {
        (self.g, self.r)
    }

    /// All rows.
    pub fn count(&self) -> usize {
        self.g * self.r
    }

    /// Zeroes the padding rows of `y` (`cols` wide).
    pub fn pad<T: Float>(&self, y: &mut [T], cols: usize) {
        zero_padding_rows(y, self.r, cols, Some(self.padding));
    }

    /// The same sequences laid out with `padding` (`(period, valid)`, the same number of
    /// periods per sequence): the rows of a network whose later layers need less padding than
    /// its first.
    pub fn with_padding(&self, padding: (usize, usize)) -> Rows {
        Rows { g: self.g, r: self.r / self.padding.0 * padding.0, padding }
    }

    /// `x` (`cols` wide, on these rows) on the rows `to`: each period's first `min(valid)` rows
    /// copied, the rest zero. `x` itself when the layouts are the same.
    pub fn relaid<T: Float>(&self, x: Vec<T>, to: Rows, cols: usize) -> Vec<T> {
        if self.padding == to.padding {
            return x;
        }
        let (from_period, to_period) = (self.padding.0 * cols, to.padding.0 * cols);
        let valid = self.padding.1.min(to.padding.1) * cols;
        let mut y = vec![T::default(); to.count() * cols];
        for (src, dst) in x.chunks_exact(from_period).zip(y.chunks_exact_mut(to_period)) {
            dst[..valid].copy_from_slice(&src[..valid]);
        }
        y
    }
}

impl ConvAt {
    fn dims(&self, rows: Rows) -> Dims {
        Dims { g: rows.g, r: rows.r, c: self.c_in, n: self.c_out }
    }

    /// The bias.
    pub fn bias<'a, T>(&self, p: &'a [T]) -> &'a [T] {
        &p[self.b..self.b + self.c_out]
    }

    /// `y = b + conv(x)`, zero at the padding rows.
    pub fn forward<T: Float, P: Products<T>>(&self, p: &[T], x: &[T], rows: Rows) -> Vec<T> {
        let mut y = biased(rows.count(), self.bias(p));
        self.accumulate::<T, P>(&mut y, p, x, rows);
        rows.pad(&mut y, self.c_out);
        y
    }

    /// `y += conv(x)`, without the bias, at every row.
    pub fn accumulate<T: Float, P: Products<T>>(&self, y: &mut [T], p: &[T], x: &[T], rows: Rows) {
        let size = self.c_in * self.c_out;
        let taps: Vec<_> = self
            .offsets
            .iter()
            .enumerate()
            .map(|(k, &o)| (o, Mat::new(p, self.w + k * size, self.c_in, self.c_out)))
            .collect();
        conv::<T, P>(y, x, self.dims(rows), (self.c_in, self.c_out), &taps, false);
    }

    /// `dp +=` the gradients of this convolution's weight and bias, from `dy` (whose padding
    /// rows it zeroes first: they are constants, so nothing flows back from them).
    pub fn grads<T: Float, P: Products<T>>(&self, dp: &mut [T], x: &[T], dy: &mut [T], rows: Rows) {
        rows.pad(dy, self.c_out);
        bias_grads(&mut dp[self.b..self.b + self.c_out], dy);
        weight_grads::<T, P>(dp, self.w, x, dy, self.dims(rows), &self.offsets);
    }

    /// `dx += dy` through the taps, transposed.
    pub fn input_grads<T: Float, P: Products<T>>(&self, dx: &mut [T], dy: &[T], p: &[T], rows: Rows) {
        input_grads::<T, P>(dx, dy, p, self.w, self.dims(rows), &self.offsets, false);
    }

    /// `dx = dy` through the taps, transposed: `dx` (a buffer reused from block to block) need
    /// not be cleared first.
    pub fn set_input_grads<T: Float, P: Products<T>>(&self, dx: &mut [T], dy: &[T], p: &[T], rows: Rows) {
        input_grads::<T, P>(dx, dy, p, self.w, self.dims(rows), &self.offsets, true);
    }
}

/// The output head both networks end with: ReLU, 1×1, ReLU, 1×1.
#[derive(Debug, Clone)]
pub struct Head {
    hidden: ConvAt,
    out: ConvAt,
}

/// What the head keeps for the backward pass: the ReLUs of its two layers' inputs.
pub struct HeadActs<T> {
    input: Vec<T>,
    hidden: Vec<T>,
}

impl Head {
    /// The head of `[hidden, out]`, placed next in the flat vector.
    pub fn place(placer: &mut Placer, [hidden, out]: &[ConvShape; 2]) -> Self {
        Head { hidden: placer.place(hidden), out: placer.place(out) }
    }

    /// Output channels (the classes).
    pub fn classes(&self) -> usize {
        self.out.c_out
    }

    /// The logits of the stream `h`.
    pub fn forward<T: Value, P: Products<T>>(&self, p: &[T], h: &[T], rows: Rows) -> (Vec<T>, HeadActs<T>) {
        let input = relu(h);
        let hidden = into_relu(self.hidden.forward::<T, P>(p, &input, rows));
        let logits = self.out.forward::<T, P>(p, &hidden, rows);
        (logits, HeadActs { input, hidden })
    }

    /// `dp +=` the head's gradients from the logits'; returns the gradient of the stream.
    pub fn backward<T: Value, P: Products<T>>(
        &self,
        dp: &mut [T],
        p: &[T],
        acts: &HeadActs<T>,
        dlogits: &[T],
        rows: Rows,
    ) -> Vec<T> {
        let mut dy = dlogits.to_vec();
        self.out.grads::<T, P>(dp, &acts.hidden, &mut dy, rows);
        let mut da = vec![T::default(); rows.count() * self.hidden.c_out];
        self.out.input_grads::<T, P>(&mut da, &dy, p, rows);
        relu_grad(&mut da, &acts.hidden);
        self.hidden.grads::<T, P>(dp, &acts.input, &mut da, rows);
        let mut dh = vec![T::default(); rows.count() * self.hidden.c_in];
        self.hidden.input_grads::<T, P>(&mut dh, &da, p, rows);
        relu_grad(&mut dh, &acts.input);
        dh
    }
}

/// `rows` copies of `bias`.
pub fn biased<T: Copy>(rows: usize, bias: &[T]) -> Vec<T> {
    let mut y = Vec::with_capacity(rows * bias.len());
    for _ in 0..rows {
        y.extend_from_slice(bias);
    }
    y
}

/// `bias` added to every row of `y`.
pub fn add_bias<T: Value>(y: &mut [T], bias: &[T]) {
    for row in y.chunks_exact_mut(bias.len()) {
        T::accumulate(row, bias);
    }
}

/// The ReLU of `x`, a copy. (Collected, not written over a cleared vector: on these
/// activations, tens of megabytes, clearing was 5% of a PixelCNN step.)
pub fn relu<T: Value>(x: &[T]) -> Vec<T> {
    T::relu(x)
}

/// The ReLU of `x`, in place.
pub fn into_relu<T: Value>(mut x: Vec<T>) -> Vec<T> {
    T::relu_in_place(&mut x);
    x
}

/// Zeroes `grad` where `out` (a ReLU's output) is not positive.
pub fn relu_grad<T: Value>(grad: &mut [T], out: &[T]) {
    T::relu_grad(grad, out)
}

#[inline(always)]
fn relu_of<T: Float>(v: T) -> T {
    // A select, not a branch, so that the loops vectorise.
    if v > T::default() { v } else { T::default() }
}

#[inline(always)]
fn relu_collect<T: Float>(x: &[T]) -> Vec<T> {
    x.iter().map(|&v| relu_of(v)).collect()
}

#[inline(always)]
fn relu_in_place<T: Float>(x: &mut [T]) {
    x.iter_mut().for_each(|v| *v = relu_of(*v));
}

#[inline(always)]
fn relu_grad_into<T: Float>(grad: &mut [T], out: &[T]) {
    grad.iter_mut().zip(out).for_each(|(g, &o)| *g = if o > T::default() { *g } else { T::default() });
}

#[inline(always)]
fn add_into<T: Float>(dst: &mut [T], src: &[T]) {
    dst.iter_mut().zip(src).for_each(|(d, &s)| *d += s);
}

#[inline(always)]
fn add_relu_grad_into<T: Float>(dst: &mut [T], grad: &[T], out: &[T]) {
    dst.iter_mut()
        .zip(grad.iter().zip(out))
        .for_each(|(d, (&g, &o))| *d += if o > T::default() { g } else { T::default() });
}

/// The f32 loops compiled for this CPU's vector unit (in the baseline's SSE they were a fifth
/// of a PixelCNN step).
mod fast {
    use super::super::per_cpu;
    use super::{add_into, add_relu_grad_into, relu_collect, relu_grad_into, relu_in_place};
    per_cpu! {
        pub fn relu_f32(x: &[f32]) -> Vec<f32> = relu_collect;
        pub fn relu_in_place_f32(x: &mut [f32]) -> () = relu_in_place;
        pub fn relu_grad_f32(grad: &mut [f32], out: &[f32]) -> () = relu_grad_into;
        pub fn add_f32(dst: &mut [f32], src: &[f32]) -> () = add_into;
        pub fn add_relu_grad_f32(dst: &mut [f32], grad: &[f32], out: &[f32]) -> () = add_relu_grad_into;
    }
}

/// The float types a network runs in (f32 for training, f64 for the gradient checks) and
/// their element-wise loops.
pub trait Value: Float + Gate + super::norm::Float + super::attention::Softmax + candle_core::WithDType {
    /// `max(x, 0)`, a new vector.
    fn relu(x: &[Self]) -> Vec<Self> {
        relu_collect(x)
    }
    /// `x = max(x, 0)`.
    fn relu_in_place(x: &mut [Self]) {
        relu_in_place(x)
    }
    /// `grad = 0` where `out ≤ 0`.
    fn relu_grad(grad: &mut [Self], out: &[Self]) {
        relu_grad_into(grad, out)
    }
    /// `dst += src`.
    fn accumulate(dst: &mut [Self], src: &[Self]) {
        add_into(dst, src)
    }
    /// `dst += grad` where `out` (a ReLU's output) is positive: a gradient through a ReLU
    /// added on, in one pass.
    fn accumulate_relu_grad(dst: &mut [Self], grad: &[Self], out: &[Self]) {
        add_relu_grad_into(dst, grad, out)
    }
}

impl Value for f32 {
    fn relu(x: &[f32]) -> Vec<f32> {
        fast::relu_f32(x)
    }
    fn relu_in_place(x: &mut [f32]) {
        fast::relu_in_place_f32(x)
    }
    fn relu_grad(grad: &mut [f32], out: &[f32]) {
        fast::relu_grad_f32(grad, out)
    }
    fn accumulate(dst: &mut [f32], src: &[f32]) {
        fast::add_f32(dst, src)
    }
    fn accumulate_relu_grad(dst: &mut [f32], grad: &[f32], out: &[f32]) {
        fast::add_relu_grad_f32(dst, grad, out)
    }
}

impl Value for f64 {}

/// A network the op runs: its forward pass keeps what its backward pass reads.
pub trait Network: Clone + Send + Sync + 'static {
    /// What the forward pass keeps, in `T`.
    type Kept<T: Value>: Send;

    /// The number of weights: the flat vector's length.
    fn weights(&self) -> usize;

    /// Channels of the input and of the output.
    fn channels(&self) -> (usize, usize);

    /// The padding rows of the input, as [`Rows`] says.
    fn padding(&self) -> (usize, usize);

    /// The padding rows of the output (the same periods per sequence as the input's).
    fn output_padding(&self) -> (usize, usize) {
        self.padding()
    }

    /// The output `(G·R' × C_out)` (on the output's rows) for the input `x (G·R × C_in)` (on
    /// `rows`), and what the backward keeps.
    fn forward<T: Value, P: Products<T>>(&self, p: &[T], x: &[T], rows: Rows) -> (Vec<T>, Self::Kept<T>);

    /// The gradient of the flat weights from that of the output (the input's is not needed);
    /// `rows` are the input's.
    fn backward<T: Value, P: Products<T>>(
        &self,
        p: &[T],
        x: &[T],
        kept: &Self::Kept<T>,
        dy: &[T],
        rows: Rows,
    ) -> Vec<T>;
}

/// What one forward pass kept, in its precision.
enum Kept<N: Network> {
    F32(N::Kept<f32>),
    F64(N::Kept<f64>),
}

struct StackOp<N: Network> {
    net: N,
    bf16: bool,
    kept: Mutex<Option<Kept<N>>>,
}

/// The precision of a run: for f32, bf16 products on the AMX unit when asked.
trait Run: Value {
    fn forward<N: Network>(op: &StackOp<N>, p: &[Self], x: &[Self], rows: Rows) -> (Vec<Self>, Kept<N>);
    fn backward<N: Network>(
        op: &StackOp<N>,
        p: &[Self],
        x: &[Self],
        kept: &Kept<N>,
        dy: &[Self],
        rows: Rows,
    ) -> Option<Vec<Self>>;
}

impl Run for f32 {
    fn forward<N: Network>(op: &StackOp<N>, p: &[f32], x: &[f32], rows: Rows) -> (Vec<f32>, Kept<N>) {
        let (y, kept) =
            if op.bf16 { op.net.forward::<f32, Bf16>(p, x, rows) } else { op.net.forward::<f32, Exact>(p, x, rows) };
        (y, Kept::F32(kept))
    }
    fn backward<N: Network>(
        op: &StackOp<N>,
        p: &[f32],
        x: &[f32],
        kept: &Kept<N>,
        dy: &[f32],
        rows: Rows,
    ) -> Option<Vec<f32>> {
        let Kept::F32(kept) = kept else { return None };
        Some(if op.bf16 {
            op.net.backward::<f32, Bf16>(p, x, kept, dy, rows)
        } else {
            op.net.backward::<f32, Exact>(p, x, kept, dy, rows)
        })
    }
}

impl Run for f64 {
    fn forward<N: Network>(op: &StackOp<N>, p: &[f64], x: &[f64], rows: Rows) -> (Vec<f64>, Kept<N>) {
        let (y, kept) = op.net.forward::<f64, Exact>(p, x, rows);
        (y, Kept::F64(kept))
    }
    fn backward<N: Network>(
        op: &StackOp<N>,
        p: &[f64],
        x: &[f64],
        kept: &Kept<N>,
        dy: &[f64],
        rows: Rows,
    ) -> Option<Vec<f64>> {
        let Kept::F64(kept) = kept else { return None };
        Some(op.net.backward::<f64, Exact>(p, x, kept, dy, rows))
    }
}

impl<N: Network> StackOp<N> {
    fn rows(&self, x: &Shape) -> candle_core::Result<Rows> {
        let (g, r, _) = x.dims3()?;
        Ok(Rows { g, r, padding: self.net.padding() })
    }

    fn run<T: Run>(&self, x: &[T], xl: &Layout, p: &[T], pl: &Layout) -> candle_core::Result<(Vec<T>, Shape)> {
        let rows = self.rows(xl.shape())?;
        let (x, p) = (super::contiguous_slice(x, xl, "conv stack")?, super::contiguous_slice(p, pl, "conv stack")?);
        let (y, kept) = T::forward(self, p, x, rows);
        *self.kept.lock().expect("invariant: not poisoned") = Some(kept);
        let out = rows.with_padding(self.net.output_padding());
        Ok((y, Shape::from((out.g, out.r, self.net.channels().1))))
    }

    fn grad<T: Run>(&self, x: &Tensor, p: &Tensor, dy: &Tensor, kept: &Kept<N>) -> candle_core::Result<Tensor> {
        let rows = self.rows(x.shape())?;
        let dy = dy.contiguous()?;
        let dp = super::in_place(x, "conv stack", |x: &[T]| {
            super::in_place(p, "conv stack", |pv: &[T]| {
                super::in_place(&dy, "conv stack", |dy: &[T]| {
                    T::backward(self, pv, x, kept, dy, rows)
                        .ok_or_else(|| candle_core::Error::Msg("conv stack: kept in another precision".into()))
                })
            })
        })?;
        super::like(dp, p)
    }
}

impl<N: Network> CustomOp2 for StackOp<N> {
    fn name(&self) -> &'static str {
        "conv-stack"
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
            _ => candle_core::bail!("conv stack: f32 or f64 operands of one type only"),
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
        let dp = match &kept {
            Some(k @ Kept::F32(_)) => self.grad::<f32>(x, p, grad, k)?,
            Some(k @ Kept::F64(_)) => self.grad::<f64>(x, p, grad, k)?,
            None => candle_core::bail!("conv stack: backward called twice, or before forward"),
        };
        Ok((None, Some(dp)))
    }
}

/// The output `(G, R, C_out)` of `net` on the padded images `x (G, R, C_in)`, its weights
/// packed in `params` in the network's order; the products in `precision` for f32 (bf16 falls
/// back to exact f32 on a CPU without AMX, as `shifted_conv` does).
pub fn conv_stack<N: Network>(net: &N, x: &Tensor, params: &Tensor, precision: Precision) -> Result<Tensor> {
    let (_g, _r, c_in) = x.dims3()?;
    if params.dims() != [net.weights()] || c_in != net.channels().0 {
        return Err(crate::Error::Config(format!(
            "conv stack: {:?} weights and {c_in} input channels for a network of {} weights and {}",
            params.dims(),
            net.weights(),
            net.channels().0
        )));
    }
    let bf16 = precision == Precision::Bf16 && amx::available();
    let op = StackOp { net: net.clone(), bf16, kept: Mutex::new(None) };
    Ok(x.contiguous()?.apply_op2(&params.contiguous()?, op)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Relaying keeps every pixel where its row and column say and zeroes the rest; back again
    /// it is the identity on zero-padded rows.
    #[test]
    fn relaid_rows_keep_the_pixels_and_zero_the_padding() {
        // 2 images of 3 rows of 4 pixels, 2 channels: 7 slots per row, then 5.
        let wide = Rows { g: 2, r: 3 * 7, padding: (7, 4) };
        let narrow = wide.with_padding((5, 4));
        assert_eq!(narrow.shape(), (2, 3 * 5));
        let mut x: Vec<f64> = (0..wide.count() * 2).map(|i| i as f64 + 1.0).collect();
        wide.pad(&mut x, 2);
        let y = wide.relaid(x.clone(), narrow, 2);
        assert_eq!(y.len(), narrow.count() * 2);
        for (i, pixel) in y.chunks_exact(2).enumerate() {
            let (image, row, col) = (i / 15, i % 15 / 5, i % 5);
            let expected = if col < 4 { &x[((image * 3 + row) * 7 + col) * 2..][..2] } else { &[0.0, 0.0][..] };
            assert_eq!(pixel, expected, "slot {i}");
        }
        assert_eq!(narrow.relaid(y, wide, 2), x);
    }
}
