//! A convolution as a sum of shifted matrix products, with its own backward pass: the fast way
//! to write PixelCNN's masked convolutions on this CPU (candle's conv2d runs at about a fifth
//! of its matmul's speed, and its conv1d gradients are wrong for batches, see
//! `shared/notes/candle-cpu.md`).
//!
//! `x (G, R, C_in)` holds G independent sequences of R rows; tap k reads the row `offsets[k]`
//! away: `y[g, r] = b + Σ_k x[g, r + offsets[k]] · w[k]`, rows outside `0..R` counting as zero.
//! A 2-D convolution over images laid out row after row (with zero columns after each image
//! row, so that a horizontal shift never wraps onto a pixel) is one such sum: the tap at (dy,
//! dx) reads the row `dy·stride + dx` away. A mask is simply the choice of taps, so masked-out
//! weights are never stored or multiplied.
//!
//! Fused with it, because each would otherwise be a candle operation over the whole activation
//! (an allocation, a pass, and another in the backward): the bias, a ReLU of the input, and
//! zeros at the padding rows (so the padding stays zero through a stack without masks).
//!
//! Backward: `dx[g, r] = Σ_k dy[g, r − o_k] · w[k]ᵀ` (the same sum with negated offsets and
//! transposed weights), `dw[k] = Σ_r x[g, r + o_k]ᵀ dy[g, r]` and `db = Σ_r dy[g, r]`, each as
//! whole-matrix products by [`Products`] (f32/f64 exactly, or bf16 on the AMX tile unit).

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};

use super::matmul::{Bf16, Exact, Mat, Products, Scalar, amx};
use super::{contiguous_slice, in_place, like};
use crate::Result;
use crate::core::train::Precision;

/// How a [`shifted_conv`] runs besides its taps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Options {
    /// Precision of the products of f32 tensors (bf16 falls back to f32 on a CPU without AMX;
    /// f64 is always exact).
    pub precision: Precision,
    /// Apply a ReLU to the input first.
    pub relu_input: bool,
    /// Padding rows, whose output is zero: `(period, valid)` makes row r padding when
    /// `r % period ≥ valid`.
    pub padding: Option<(usize, usize)>,
}

impl Options {
    /// Exact products, no ReLU, no padding.
    pub fn plain() -> Self {
        Options { precision: Precision::F32, relu_input: false, padding: None }
    }

    fn is_padding(&self, row: usize) -> bool {
        self.padding.is_some_and(|(period, valid)| row % period >= valid)
    }
}

/// `y (G, R, C_out)` with `y[g, r] = b + Σ_k x'[g, r + offsets[k]] · w[k]`: `x (G, R, C_in)` (x'
/// its ReLU if asked), `w (K, C_in, C_out)`, `b (C_out,)`, rows outside the sequence zero, and
/// zero at padding rows.
pub fn shifted_conv(x: &Tensor, w: &Tensor, b: &Tensor, offsets: &[isize], options: Options) -> Result<Tensor> {
    let (_g, _r, c_in) = x.dims3()?;
    let (k, w_in, n) = w.dims3()?;
    if k != offsets.len() || w_in != c_in || b.dims() != [n] {
        return Err(crate::Error::Config(format!(
            "shifted_conv: {k} weight taps of {w_in} × {n} and {:?} biases for {} offsets of {c_in} channels",
            b.dims(),
            offsets.len()
        )));
    }
    let bf16 = options.precision == Precision::Bf16 && amx::available();
    let op = ShiftedConv { offsets: offsets.to_vec(), bf16, options };
    Ok(x.contiguous()?.apply_op3(&w.contiguous()?, &b.contiguous()?, op)?)
}

/// The same in candle's operations (ReLU, pad, narrow, matmul, mask), for the tests.
pub fn shifted_conv_reference(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    offsets: &[isize],
    options: Options,
) -> Result<Tensor> {
    let (g, r, c_in) = x.dims3()?;
    let n = w.dim(2)?;
    let x = if options.relu_input { x.relu()? } else { x.clone() };
    let mut y = b.reshape((1, n))?.broadcast_as((g * r, n))?.contiguous()?;
    for (k, &o) in offsets.iter().enumerate() {
        let reach = o.unsigned_abs();
        if reach >= r {
            continue;
        }
        // Row r reads row r + o: pad the far side, then take the window that starts at o.
        let padded = if o >= 0 { x.pad_with_zeros(1, 0, reach)? } else { x.pad_with_zeros(1, reach, 0)? };
        let start = if o >= 0 { reach } else { 0 };
        let shifted = padded.narrow(1, start, r)?.contiguous()?.reshape((g * r, c_in))?;
        y = (y + shifted.matmul(&w.get(k)?.contiguous()?)?)?;
    }
    let keep: Vec<f64> = (0..r).map(|row| if options.is_padding(row) { 0.0 } else { 1.0 }).collect();
    let keep = Tensor::from_vec(keep, (1, r, 1), x.device())?.to_dtype(x.dtype())?;
    Ok(y.reshape((g, r, n))?.broadcast_mul(&keep)?)
}

/// The sizes of one convolution: G sequences of R rows, C inputs, N outputs.
#[derive(Debug, Clone, Copy)]
pub(super) struct Dims {
    pub g: usize,
    pub r: usize,
    pub c: usize,
    pub n: usize,
}

/// The AMX unit sums at most this many taps in one pass.
const TAPS_PER_PASS: usize = 16;

/// `y[g] += Σ_k x[g, · + o_k] · w_k` for every sequence, `w_k` the views `taps`, or `=` with
/// `overwrite` (then `y` need not be cleared); `x` and `y` have `x_cols` and `y_cols` columns.
pub(super) fn conv<T: Scalar + Default, P: Products<T>>(
    y: &mut [T],
    x: &[T],
    d: Dims,
    (x_cols, y_cols): (usize, usize),
    taps: &[(isize, Mat<T>)],
    overwrite: bool,
) {
    for g in 0..d.g {
        let xs = Mat::new(x, g * d.r * x_cols, d.r, x_cols);
        for (i, pass) in taps.chunks(TAPS_PER_PASS).enumerate() {
            if overwrite && i == 0 {
                P::conv_set(y, g * d.r * y_cols, xs, pass);
            } else {
                P::conv_acc(y, g * d.r * y_cols, xs, pass);
            }
        }
    }
}

/// The float types the op runs on.
pub trait Float: Scalar + Default + PartialOrd + std::ops::AddAssign + candle_core::WithDType {}
impl Float for f32 {}
impl Float for f64 {}

/// x', the input the products read: `x`, or its ReLU (a copy) if asked.
fn input<'a, T: Float>(x: &'a [T], options: &Options) -> std::borrow::Cow<'a, [T]> {
    if options.relu_input {
        std::borrow::Cow::Owned(x.iter().map(|&v| if v > T::default() { v } else { T::default() }).collect())
    } else {
        std::borrow::Cow::Borrowed(x)
    }
}

/// Zeroes the padding rows of `y` (`cols` wide, sequences of `d.r` rows).
fn zero_padding<T: Float>(y: &mut [T], d: Dims, cols: usize, options: &Options) {
    zero_padding_rows(y, d.r, cols, options.padding);
}

/// Zeroes the rows of `y` (`cols` wide, sequences of `r` rows) that `padding` (see
/// [`Options::padding`]) names.
pub(super) fn zero_padding_rows<T: Float>(y: &mut [T], r: usize, cols: usize, padding: Option<(usize, usize)>) {
    let Some((period, valid)) = padding else { return };
    for (i, row) in y.chunks_exact_mut(cols).enumerate() {
        if (i % r) % period >= valid {
            row.fill(T::default());
        }
    }
}

/// `db += Σ_r dy[r]` over the rows of `dy` (`db.len()` wide).
pub(super) fn bias_grads<T: Float>(db: &mut [T], dy: &[T]) {
    for row in dy.chunks_exact(db.len()) {
        db.iter_mut().zip(row).for_each(|(a, &v)| *a += v);
    }
}

/// `dw[at + k·C·N ..] += Σ_r x[g, r + o_k]ᵀ dy[g, r]` for every tap k: the weight gradients of
/// the convolution `y = Σ_k x[· + o_k] w_k` of `x (G·R × C)` with `dy (G·R × N)`.
pub(super) fn weight_grads<T: Float, P: Products<T>>(
    dw: &mut [T],
    at: usize,
    x: &[T],
    dy: &[T],
    d: Dims,
    offsets: &[isize],
) {
    for g in 0..d.g {
        let (xs, ys) = (Mat::new(x, g * d.r * d.c, d.r, d.c), Mat::new(dy, g * d.r * d.n, d.r, d.n));
        P::conv_weight_acc(dw, at, xs, ys, offsets);
    }
}

/// `dx[g, r + o_k] += dy[g, r] · w_kᵀ` for every tap k, `w` the weights `(K, C, N)` at `w_at`:
/// the input gradient of the same convolution (the sum with negated offsets and transposed
/// taps). With `overwrite`, `=`: `dx` need not be cleared.
pub(super) fn input_grads<T: Float, P: Products<T>>(
    dx: &mut [T],
    dy: &[T],
    w: &[T],
    w_at: usize,
    d: Dims,
    offsets: &[isize],
    overwrite: bool,
) {
    let back: Vec<_> =
        offsets.iter().enumerate().map(|(k, &o)| (-o, Mat::new(w, w_at + k * d.c * d.n, d.c, d.n).t())).collect();
    conv::<T, P>(dx, dy, d, (d.n, d.c), &back, overwrite);
}

fn forward<T: Float, P: Products<T>>(
    x: &[T],
    w: &[T],
    b: &[T],
    d: Dims,
    offsets: &[isize],
    options: &Options,
) -> Vec<T> {
    let mut y: Vec<T> = Vec::with_capacity(d.g * d.r * d.n);
    for _ in 0..d.g * d.r {
        y.extend_from_slice(b);
    }
    let taps: Vec<_> = offsets.iter().enumerate().map(|(k, &o)| (o, Mat::new(w, k * d.c * d.n, d.c, d.n))).collect();
    conv::<T, P>(&mut y, &input(x, options), d, (d.c, d.n), &taps, false);
    zero_padding(&mut y, d, d.n, options);
    y
}

/// `(dx, dw, db)` from `dy`.
fn backward<T: Float, P: Products<T>>(
    x: &[T],
    w: &[T],
    dy: &[T],
    d: Dims,
    offsets: &[isize],
    options: &Options,
) -> (Vec<T>, Vec<T>, Vec<T>) {
    // Padding rows' outputs are constant zeros: nothing flows back from them.
    let mut dy_kept;
    let dy = if options.padding.is_some() {
        dy_kept = dy.to_vec();
        zero_padding(&mut dy_kept, d, d.n, options);
        &dy_kept[..]
    } else {
        dy
    };
    let mut db = vec![T::default(); d.n];
    bias_grads(&mut db, dy);
    let mut dx = vec![T::default(); x.len()];
    input_grads::<T, P>(&mut dx, dy, w, 0, d, offsets, false);
    if options.relu_input {
        dx.iter_mut().zip(x).for_each(|(g, &v)| {
            if v <= T::default() {
                *g = T::default();
            }
        });
    }
    let mut dw = vec![T::default(); w.len()];
    weight_grads::<T, P>(&mut dw, 0, &input(x, options), dy, d, offsets);
    (dx, dw, db)
}

struct ShiftedConv {
    offsets: Vec<isize>,
    bf16: bool,
    options: Options,
}

impl ShiftedConv {
    fn dims(&self, x: &Shape, w: &Shape) -> candle_core::Result<Dims> {
        let (g, r, c) = x.dims3()?;
        let (_k, _c, n) = w.dims3()?;
        Ok(Dims { g, r, c, n })
    }
}

impl CustomOp3 for ShiftedConv {
    fn name(&self) -> &'static str {
        "shifted-conv"
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
        let d = self.dims(xl.shape(), wl.shape())?;
        let (op, o, opt) = ("shifted-conv", &self.offsets, &self.options);
        let y = match (xs, ws, bs) {
            (CpuStorage::F32(x), CpuStorage::F32(w), CpuStorage::F32(b)) => {
                let (x, w, b) =
                    (contiguous_slice(x, xl, op)?, contiguous_slice(w, wl, op)?, contiguous_slice(b, bl, op)?);
                CpuStorage::F32(if self.bf16 {
                    forward::<f32, Bf16>(x, w, b, d, o, opt)
                } else {
                    forward::<f32, Exact>(x, w, b, d, o, opt)
                })
            }
            (CpuStorage::F64(x), CpuStorage::F64(w), CpuStorage::F64(b)) => {
                let (x, w, b) =
                    (contiguous_slice(x, xl, op)?, contiguous_slice(w, wl, op)?, contiguous_slice(b, bl, op)?);
                CpuStorage::F64(forward::<f64, Exact>(x, w, b, d, o, opt))
            }
            _ => candle_core::bail!("{op}: f32 or f64 operands of one type only"),
        };
        Ok((y, Shape::from((d.g, d.r, d.n))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = self.dims(x.shape(), w.shape())?;
        let (op, o, opt) = ("shifted-conv", &self.offsets, &self.options);
        let dy = dy.contiguous()?;
        macro_rules! grads {
            ($t:ty, $p:ty) => {
                in_place(x, op, |xv: &[$t]| {
                    in_place(w, op, |wv: &[$t]| {
                        in_place(&dy, op, |g: &[$t]| {
                            let (dx, dw, db) = backward::<$t, $p>(xv, wv, g, d, o, opt);
                            Ok((like(dx, x)?, like(dw, w)?, like(db, b)?))
                        })
                    })
                })?
            };
        }
        let (dx, dw, db) = match x.dtype() {
            candle_core::DType::F32 if self.bf16 => grads!(f32, Bf16),
            candle_core::DType::F32 => grads!(f32, Exact),
            candle_core::DType::F64 => grads!(f64, Exact),
            other => candle_core::bail!("{op}: unsupported dtype {other:?}"),
        };
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Var};

    use super::*;
    use crate::rng::Rng;

    fn random(shape: (usize, usize, usize), rng: &mut Rng) -> Tensor {
        let n = shape.0 * shape.1 * shape.2;
        let v: Vec<f64> = (0..n).map(|_| rng.normal()).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap()
    }

    /// Values and all gradients equal candle's operations, for offsets of both signs, one past
    /// the sequence, more taps than one AMX pass sums, with and without ReLU and padding.
    #[test]
    fn matches_candle_operations_and_their_gradients() {
        let mut rng = Rng::new(3);
        let offsets: Vec<isize> = vec![-9, -8, -3, -1, 0, 1, 2, 7, 40, -3, 5, 0, -2, -4, -5, -6, -7, 3, 4];
        let x = Var::from_tensor(&random((3, 11, 5), &mut rng)).unwrap();
        let w = Var::from_tensor(&random((offsets.len(), 5, 4), &mut rng)).unwrap();
        let b = Var::from_tensor(&random((1, 1, 4), &mut rng).flatten_all().unwrap()).unwrap();
        let probe = random((3, 11, 4), &mut rng);
        for (relu_input, padding) in [(false, None), (true, Some((4, 3))), (false, Some((5, 1)))] {
            let options = Options { relu_input, padding, ..Options::plain() };
            let ours = shifted_conv(&x, &w, &b, &offsets, options).unwrap();
            let theirs = shifted_conv_reference(&x, &w, &b, &offsets, options).unwrap();
            assert!(max_diff(&ours, &theirs) < 1e-12, "{options:?}");
            let g_ours = (ours * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let g_theirs = (theirs * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            for v in [&x, &w, &b] {
                let (a, b) = (g_ours.get(v).unwrap(), g_theirs.get(v).unwrap());
                assert!(max_diff(a, b) < 1e-12, "{options:?}: gradients differ by {}", max_diff(a, b));
            }
        }
    }

    /// In bf16 the products round their operands to 8 bits of mantissa: within about 1%.
    #[test]
    fn bf16_products_stay_close_to_f32() {
        if !amx::available() {
            return;
        }
        let mut rng = Rng::new(4);
        let offsets: Vec<isize> = (-20..0).collect();
        let x = random((2, 40, 33), &mut rng).to_dtype(DType::F32).unwrap();
        let w = random((offsets.len(), 33, 17), &mut rng).to_dtype(DType::F32).unwrap();
        let b = Tensor::zeros(17, DType::F32, &Device::Cpu).unwrap();
        let exact = shifted_conv(&x, &w, &b, &offsets, Options::plain()).unwrap();
        let bf16 =
            shifted_conv(&x, &w, &b, &offsets, Options { precision: Precision::Bf16, ..Options::plain() }).unwrap();
        let scale = exact.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        let err = (&exact - &bf16).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(err < 0.02 * scale, "bf16 differs by {err} at scale {scale}");
    }
}
