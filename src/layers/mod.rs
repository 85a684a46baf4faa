//! Building blocks candle-nn lacks or computes wrongly on this CPU. Activations are
//! channels-last and contiguous, `(B, T, C)`, and every product is a plain 2-D matmul of a
//! contiguous `(B·T, C_in)` matrix by a `(C_in, C_out)` weight: candle 0.11's conv1d backward
//! and its batched matmul on transposed views give wrong gradients (see
//! `shared/notes/candle-cpu.md`), and this formulation is checked by finite differences in
//! `core::check`.

use candle_core::{Module, Tensor};
use candle_nn::{Init, VarBuilder};

use crate::Result;

pub mod attention;
pub mod conv_stack;
pub mod dropout;
pub mod gated;
pub mod gated_stack;
pub mod masked_stack;
pub mod matmul;
pub mod nade;
pub mod norm;
pub mod recurrent;
pub mod shifted;
pub mod transformer_stack;
pub mod wavenet_stack;
pub use gated::gated_unit;

/// The widest vector unit of this CPU the hand-written loops are compiled for: 2 for AVX-512, 1
/// for AVX2 (both with FMA), 0 for neither.
#[cfg(target_arch = "x86_64")]
pub(crate) fn vector_level() -> u8 {
    use std::arch::is_x86_feature_detected as has;
    static LEVEL: std::sync::OnceLock<u8> = std::sync::OnceLock::new();
    *LEVEL.get_or_init(|| {
        if has!("avx512f") && has!("avx2") && has!("fma") {
            2
        } else if has!("avx2") && has!("fma") {
            1
        } else {
            0
        }
    })
}

/// `pub fn NAME(args) -> R` running `INNER(args)` compiled for the CPU's vector unit (found at
/// run time), so that one binary runs on any x86-64 and still uses AVX-512 or AVX2 where
/// present. `INNER` should be `#[inline(always)]`, so that its loops are compiled inside.
macro_rules! per_cpu {
    ($(pub fn $name:ident($($arg:ident: $ty:ty),*) -> $ret:ty = $inner:path;)*) => {$(
        pub fn $name($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                unsafe fn avx512($($arg: $ty),*) -> $ret {
                    $inner($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) -> $ret {
                    $inner($($arg),*)
                }
                match $crate::layers::vector_level() {
                    // SAFETY: the features were detected on this CPU.
                    2 => return unsafe { avx512($($arg),*) },
                    1 => return unsafe { avx2($($arg),*) },
                    _ => {}
                }
            }
            $inner($($arg),*)
        }
    )*};
}
pub(crate) use per_cpu;

/// The slice of a custom op's input that `layout` describes, which must be contiguous.
pub(crate) fn contiguous_slice<'a, T>(
    data: &'a [T],
    layout: &candle_core::Layout,
    op: &str,
) -> candle_core::Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("{op}: inputs must be contiguous"),
    }
}

/// `f` of the contiguous data of `t`, read where it lies (no copy).
pub(crate) fn in_place<T: candle_core::WithDType, R>(
    t: &Tensor,
    op: &str,
    f: impl FnOnce(&[T]) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        candle_core::Storage::Cpu(cpu) => f(contiguous_slice(cpu.as_slice::<T>()?, layout, op)?),
        _ => candle_core::bail!("{op}: CPU tensors only"),
    }
}

/// `values` as a tensor of the shape and device of `like`.
pub(crate) fn like<T: candle_core::WithDType>(values: Vec<T>, like: &Tensor) -> candle_core::Result<Tensor> {
    Tensor::from_vec(values, like.shape(), like.device())
}

/// An affine map over the last dimension, weight stored `(in, out)` (the transpose of
/// PyTorch's `nn.Linear.weight`).
#[derive(Debug, Clone)]
pub struct ChannelLinear {
    /// `(in, out)`.
    pub weight: Tensor,
    /// `(out,)`.
    pub bias: Tensor,
}

impl ChannelLinear {
    /// Loads or creates `weight` and `bias` under `vb`; fresh weights are N(0, gain²/in).
    pub fn new(in_dim: usize, out_dim: usize, gain: f64, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints(
            (in_dim, out_dim),
            "weight",
            Init::Randn { mean: 0.0, stdev: gain / (in_dim as f64).sqrt() },
        )?;
        let bias = vb.get_with_hints(out_dim, "bias", Init::Const(0.0))?;
        Ok(ChannelLinear { weight, bias })
    }
}

impl ChannelLinear {
    /// The map of `xs` run as `options` say (precision of the products, a ReLU of the input).
    pub fn forward_with(&self, xs: &Tensor, options: shifted::Options) -> Result<Tensor> {
        linear(xs, &self.weight, &self.bias, options)
    }
}

impl Module for ChannelLinear {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        linear(xs, &self.weight, &self.bias, shifted::Options::plain())
            .map_err(|e| candle_core::Error::Msg(e.to_string()))
    }
}

/// `x · w + b` over the last axis of `x (…, in)`, `w (in, out)`, `b (out,)`: one operation with
/// its own backward pass (a 1×1 [`shifted::shifted_conv`], run as `options` say), where
/// candle's matmul and broadcast bias would be two each way, and the bias's gradient a
/// reduction of its own.
pub fn linear(x: &Tensor, w: &Tensor, b: &Tensor, options: shifted::Options) -> Result<Tensor> {
    let dims = x.dims();
    let in_dim = *dims.last().ok_or_else(|| crate::Error::Config("linear: a scalar input".into()))?;
    let rows = x.elem_count() / in_dim.max(1);
    let ys = shifted::shifted_conv(&x.reshape((1, rows, in_dim))?, &w.unsqueeze(0)?, b, &[0], options)?;
    let mut out_dims = dims.to_vec();
    *out_dims.last_mut().expect("invariant: at least one dimension") = w.dim(1)?;
    Ok(ys.reshape(out_dims)?)
}

/// The `k` taps of a causal dilated convolution, stacked on the channel axis:
/// `(B, T, C)` → `(B, T, k·C)` whose block `j` is `x[t − (k−1−j)·d]` (zeros before the start).
/// Multiplying by a `(k·C, C_out)` weight then is the convolution.
pub fn causal_taps(xs: &Tensor, kernel: usize, dilation: usize) -> Result<Tensor> {
    let (_b, t, _c) = xs.dims3()?;
    if kernel == 1 {
        return Ok(xs.clone());
    }
    let span = (kernel - 1) * dilation;
    let padded = xs.pad_with_zeros(1, span, 0)?; // (B, T + span, C)
    let taps = (0..kernel).map(|j| padded.narrow(1, j * dilation, t)).collect::<candle_core::Result<Vec<_>>>()?;
    Ok(Tensor::cat(&taps, 2)?) // (B, T, k·C)
}
