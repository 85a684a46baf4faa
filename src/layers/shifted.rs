//! A convolution as a sum of shifted matrix products, with its own backward pass: the fast way
//! to write PixelCNN's masked convolutions on this CPU (candle's conv2d runs at about a fifth
//! of its matmul's speed, and its conv1d gradients are wrong for batches, see
//! `shared/notes/candle-cpu.md`).
//!
//! `x (G, R, C_in)` holds G independent sequences of R rows; tap k reads the row `offsets[k]`
//! away: `y[g, r] = Σ_k x[g, r + offsets[k]] · w[k]`, rows outside `0..R` counting as zero. A 2-D
//! convolution over images laid out row after row (with zero columns between the rows, so that
//! a horizontal shift never wraps onto a pixel) is one such sum: the tap at (dy, dx) reads the
//! row `dy·stride + dx` away. A mask is simply the choice of taps, so masked-out weights are
//! never stored or multiplied.
//!
//! Backward: `dx[g, r] = Σ_k dy[g, r − o_k] · w[k]ᵀ` (the same sum with negated offsets and
//! transposed weights) and `dw[k] = Σ_r x[g, r + o_k]ᵀ dy[g, r]`, each as whole-matrix
//! products by [`Products`] (f32/f64 exactly, or bf16 on the AMX tile unit).

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};

use super::matmul::{Bf16, Exact, Mat, Products, Scalar, amx};
use super::{contiguous_slice, in_place, like};
use crate::Result;
use crate::core::train::Precision;

/// `y (G, R, C_out)` with `y[g, r] = Σ_k x[g, r + offsets[k]] · w[k]`: `x (G, R, C_in)`, `w (K,
/// C_in, C_out)`, rows outside the sequence zero. `precision` chooses the products of f32
/// tensors (bf16 falls back to f32 on a CPU without AMX); f64 is always exact.
pub fn shifted_matmul(x: &Tensor, w: &Tensor, offsets: &[isize], precision: Precision) -> Result<Tensor> {
    let (_g, _r, c_in) = x.dims3()?;
    let (k, w_in, _n) = w.dims3()?;
    if k != offsets.len() || w_in != c_in {
        return Err(crate::Error::Config(format!(
            "shifted_matmul: {k} weight taps of {w_in} inputs for {} offsets of {c_in} channels",
            offsets.len()
        )));
    }
    let bf16 = precision == Precision::Bf16 && amx::available();
    let op = ShiftedMatmul { offsets: offsets.to_vec(), bf16 };
    Ok(x.contiguous()?.apply_op2(&w.contiguous()?, op)?)
}

/// The same sum in candle's operations (pad, narrow, matmul), for the tests.
pub fn shifted_matmul_reference(x: &Tensor, w: &Tensor, offsets: &[isize]) -> Result<Tensor> {
    let (g, r, c_in) = x.dims3()?;
    let n = w.dim(2)?;
    let mut y = Tensor::zeros((g * r, n), x.dtype(), x.device())?;
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
    Ok(y.reshape((g, r, n))?)
}

/// The sizes of one product: G sequences of R rows, C inputs, N outputs, K taps.
#[derive(Debug, Clone, Copy)]
struct Dims {
    g: usize,
    r: usize,
    c: usize,
    n: usize,
}

/// The AMX unit sums at most this many taps in one pass.
const TAPS_PER_PASS: usize = 16;

/// `y[g] += Σ_k x[g, · + o_k] · w_k` for every sequence, `w_k` the views `taps`; `x` and `y`
/// have `x_cols` and `y_cols` columns.
fn conv<T: Scalar, P: Products<T>>(y: &mut [T], x: &[T], d: Dims, (x_cols, y_cols): (usize, usize), taps: &[(isize, Mat<T>)]) {
    for g in 0..d.g {
        let xs = Mat::new(x, g * d.r * x_cols, d.r, x_cols);
        for pass in taps.chunks(TAPS_PER_PASS) {
            P::conv_acc(y, g * d.r * y_cols, xs, pass);
        }
    }
}

fn forward<T: Scalar + Default, P: Products<T>>(x: &[T], w: &[T], d: Dims, offsets: &[isize]) -> Vec<T> {
    let mut y = vec![T::default(); d.g * d.r * d.n];
    let taps: Vec<_> = offsets.iter().enumerate().map(|(k, &o)| (o, Mat::new(w, k * d.c * d.n, d.c, d.n))).collect();
    conv::<T, P>(&mut y, x, d, (d.c, d.n), &taps);
    y
}

/// `(dx, dw)` from `dy`.
fn backward<T: Scalar + Default, P: Products<T>>(
    x: &[T],
    w: &[T],
    dy: &[T],
    d: Dims,
    offsets: &[isize],
) -> (Vec<T>, Vec<T>) {
    let mut dx = vec![T::default(); x.len()];
    let back: Vec<_> = offsets.iter().enumerate().map(|(k, &o)| (-o, Mat::new(w, k * d.c * d.n, d.c, d.n).t())).collect();
    conv::<T, P>(&mut dx, dy, d, (d.n, d.c), &back);
    let mut dw = vec![T::default(); w.len()];
    for (k, &o) in offsets.iter().enumerate() {
        let reach = o.unsigned_abs();
        if reach >= d.r {
            continue;
        }
        let rows = d.r - reach;
        // Output rows r with r + o inside the sequence.
        let (x_start, y_start) = if o >= 0 { (reach, 0) } else { (0, reach) };
        for g in 0..d.g {
            let xs = Mat::new(x, g * d.r * d.c, d.r, d.c).row_range(x_start, rows).t();
            let ys = Mat::new(dy, g * d.r * d.n, d.r, d.n).row_range(y_start, rows);
            P::acc(&mut dw, k * d.c * d.n, xs, ys);
        }
    }
    (dx, dw)
}

struct ShiftedMatmul {
    offsets: Vec<isize>,
    bf16: bool,
}

impl ShiftedMatmul {
    fn dims(&self, x: &Shape, w: &Shape) -> candle_core::Result<Dims> {
        let (g, r, c) = x.dims3()?;
        let (_k, _c, n) = w.dims3()?;
        Ok(Dims { g, r, c, n })
    }
}

impl CustomOp2 for ShiftedMatmul {
    fn name(&self) -> &'static str {
        "shifted-matmul"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = self.dims(xl.shape(), wl.shape())?;
        let (op, o) = ("shifted-matmul", &self.offsets);
        let y = match (xs, ws) {
            (CpuStorage::F32(x), CpuStorage::F32(w)) => {
                let (x, w) = (contiguous_slice(x, xl, op)?, contiguous_slice(w, wl, op)?);
                CpuStorage::F32(if self.bf16 { forward::<f32, Bf16>(x, w, d, o) } else { forward::<f32, Exact>(x, w, d, o) })
            }
            (CpuStorage::F64(x), CpuStorage::F64(w)) => {
                CpuStorage::F64(forward::<f64, Exact>(contiguous_slice(x, xl, op)?, contiguous_slice(w, wl, op)?, d, o))
            }
            _ => candle_core::bail!("{op}: f32 or f64 operands of one type only"),
        };
        Ok((y, Shape::from((d.g, d.r, d.n))))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _y: &Tensor, dy: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let d = self.dims(x.shape(), w.shape())?;
        let (op, o) = ("shifted-matmul", &self.offsets);
        let dy = dy.contiguous()?;
        macro_rules! grads {
            ($t:ty, $p:ty) => {
                in_place(x, op, |xv: &[$t]| {
                    in_place(w, op, |wv: &[$t]| {
                        in_place(&dy, op, |g: &[$t]| {
                            let (dx, dw) = backward::<$t, $p>(xv, wv, g, d, o);
                            Ok((like(dx, x)?, like(dw, w)?))
                        })
                    })
                })?
            };
        }
        let (dx, dw) = match x.dtype() {
            candle_core::DType::F32 if self.bf16 => grads!(f32, Bf16),
            candle_core::DType::F32 => grads!(f32, Exact),
            candle_core::DType::F64 => grads!(f64, Exact),
            other => candle_core::bail!("{op}: unsupported dtype {other:?}"),
        };
        Ok((Some(dx), Some(dw)))
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

    /// Values and both gradients equal candle's pad/narrow/matmul, for offsets of both signs,
    /// one past the sequence, and more taps than one AMX pass sums.
    #[test]
    fn matches_shifted_candle_products_and_their_gradients() {
        let mut rng = Rng::new(3);
        let offsets: Vec<isize> = vec![-9, -8, -3, -1, 0, 1, 2, 7, 40, -3, 5, 0, -2, -4, -5, -6, -7, 3, 4];
        let x = Var::from_tensor(&random((3, 11, 5), &mut rng)).unwrap();
        let w = Var::from_tensor(&random((offsets.len(), 5, 4), &mut rng)).unwrap();
        let probe = random((3, 11, 4), &mut rng);
        let ours = shifted_matmul(&x, &w, &offsets, Precision::F32).unwrap();
        let theirs = shifted_matmul_reference(&x, &w, &offsets).unwrap();
        assert!(max_diff(&ours, &theirs) < 1e-12);
        let g_ours = (ours * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let g_theirs = (theirs * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        for v in [&x, &w] {
            let (a, b) = (g_ours.get(v).unwrap(), g_theirs.get(v).unwrap());
            assert!(max_diff(a, b) < 1e-12, "gradients differ by {}", max_diff(a, b));
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
        let exact = shifted_matmul(&x, &w, &offsets, Precision::F32).unwrap();
        let bf16 = shifted_matmul(&x, &w, &offsets, Precision::Bf16).unwrap();
        let scale = exact.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        let err = (&exact - &bf16).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(err < 0.02 * scale, "bf16 differs by {err} at scale {scale}");
    }
}
