//! WaveNet's whole network (embedding, residual stack, head) as one operation with its own
//! forward and backward pass, for training. candle runs the same network as about fifteen
//! tensor operations per layer, each allocating its output and recording its own backward;
//! here every dilated convolution over the whole batch is `k` matrix products on shifted views
//! of the layer input (tap j of sequence b is rows `b·T .. b·T + T − s` of the input, s =
//! (k−1−j)·d, written into rows from `s`: no copies), and the gate and residual are passes over
//! the products' outputs. The skip sum is one product for all layers: their gate outputs side
//! by side (B·T × L·G) by their skip weights stacked (L·G × S), so the wide (B·T × S) sum is
//! written once, not read and written by every layer. The activations the backward pass needs
//! (each layer's input and pre-activation, the gate outputs, the skip sum, the head's hidden
//! layer) are kept from the forward pass in the op itself.
//!
//! The products go through [`Products`](super::matmul::Products): exactly in f32 by the `gemm`
//! crate (which candle itself uses on the CPU: it handles strided, transposed operands without
//! copies and picks AVX-512/AVX2/NEON kernels at run time; the engine's own kernels are tuned
//! for a handful of rows, not thousands), or with `--precision bf16` on the AMX tile unit.
//! Single threaded: the trainer runs one shard of the batch per thread.
//!
//! The weights enter as one flat tensor (candle's custom ops take at most three inputs; the
//! concatenation's backward hands each weight its part of the gradient), in [`ParamLayout`]'s
//! order. Checked against candle's autograd of the reference formulation and against finite
//! differences in the core's property tests.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};

use super::matmul::{Bf16, Exact, Mat, Products, Scalar};
use crate::Result;
use crate::core::train::Precision;
use crate::models::wavenet::Config;

/// Where each weight lives in the flat parameter vector, in the order the model packs them.
#[derive(Debug, Clone)]
pub struct ParamLayout {
    /// Hyper-parameters.
    pub cfg: Config,
    embed: usize,
    layers: Vec<LayerOffsets>,
    head0_w: usize,
    head0_b: usize,
    head1_w: usize,
    head1_b: usize,
    /// Total length.
    pub len: usize,
}

#[derive(Debug, Clone, Copy)]
struct LayerOffsets {
    dilation: usize,
    dilated_w: usize,
    dilated_b: usize,
    label: Option<usize>,
    residual_w: usize,
    residual_b: usize,
    skip_w: usize,
    skip_b: usize,
}

impl ParamLayout {
    /// The layout of a WaveNet of `cfg`: embed, then per layer dilated weight and bias, label
    /// table (if any), residual weight and bias, skip weight and bias; then the head.
    pub fn new(cfg: &Config) -> Self {
        let (k, c, g, s, h, v) = (
            cfg.kernel_width,
            cfg.residual_channels,
            cfg.gate_channels,
            cfg.skip_channels,
            cfg.head_channels,
            cfg.classes,
        );
        let mut at = 0;
        let mut take = |n: usize| {
            let start = at;
            at += n;
            start
        };
        let embed = take(v * c);
        let layers = (0..cfg.layers())
            .map(|i| LayerOffsets {
                dilation: cfg.dilation(i),
                dilated_w: take(k * c * 2 * g),
                dilated_b: take(2 * g),
                label: (cfg.num_labels > 0).then(|| take(cfg.num_labels * 2 * g)),
                residual_w: take(g * c),
                residual_b: take(c),
                skip_w: take(g * s),
                skip_b: take(s),
            })
            .collect();
        let head0_w = take(s * h);
        let head0_b = take(h);
        let head1_w = take(h * v);
        let head1_b = take(v);
        ParamLayout { cfg: cfg.clone(), embed, layers, head0_w, head0_b, head1_w, head1_b, len: at }
    }
}

macro_rules! gate_forward_body {
    ($t:ty, $pre:ident, $z:ident, $g:ident) => {{
        // Each loop maps one slice (the form that vectorises): tanh(f) = 2σ(2f) − 1, σ(g), then
        // their product.
        let one = <$t as $crate::layers::matmul::Scalar>::ONE;
        for (pr, zr) in $pre.chunks_exact_mut(2 * $g).zip($z.chunks_exact_mut($g)) {
            let (f, gt) = pr.split_at_mut($g);
            for x in f.iter_mut() {
                let s = <$t as Float>::sigmoid(*x + *x);
                *x = s + s - one;
            }
            for x in gt.iter_mut() {
                *x = <$t as Float>::sigmoid(*x);
            }
            for ((zi, &fi), &gi) in zr.iter_mut().zip(f.iter()).zip(gt.iter()) {
                *zi = fi * gi;
            }
        }
    }};
}

macro_rules! gate_backward_body {
    ($t:ty, $kept:ident, $dz:ident, $dpre:ident, $g:ident) => {
        for ((dr, kr), dzr) in $dpre.chunks_exact_mut(2 * $g).zip($kept.chunks_exact(2 * $g)).zip($dz.chunks_exact($g))
        {
            let (th, sg) = kr.split_at($g);
            let (df, dg) = dr.split_at_mut($g);
            for ((((dfi, dgi), &t), &s), &d) in df.iter_mut().zip(dg.iter_mut()).zip(th).zip(sg).zip(dzr) {
                let one = <$t as $crate::layers::matmul::Scalar>::ONE;
                *dfi = d * s * (one - t * t);
                *dgi = d * t * s * (one - s);
            }
        }
    };
}

/// The gated unit's passes compiled for AVX-512 (the crate's baseline is SSE2, where these
/// loops of exponentials stay scalar), chosen at run time where the CPU has it; the same
/// source as the portable passes.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{Float, Products};

    fn present() -> bool {
        std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512vl")
    }

    #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
    unsafe fn gate_forward_avx512(pre: &mut [f32], z: &mut [f32], g: usize) {
        gate_forward_body!(f32, pre, z, g)
    }

    #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
    unsafe fn gate_backward_avx512(kept: &[f32], dz: &[f32], dpre: &mut [f32], g: usize) {
        gate_backward_body!(f32, kept, dz, dpre, g)
    }

    /// The whole forward pass (and the NLL) compiled for AVX-512, if the CPU has it: the
    /// elementwise passes around the products (bias rows, ReLUs, softmax) then vectorise too.
    pub fn forward<P: Products<f32>>(
        l: &super::ParamLayout,
        p: &[f32],
        input: &[u32],
        cond: &[f32],
        size: super::Size,
        nll: bool,
    ) -> Option<(Vec<f32>, Vec<f32>, super::Activations<f32>)> {
        #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
        unsafe fn run<P: Products<f32>>(
            l: &super::ParamLayout,
            p: &[f32],
            input: &[u32],
            cond: &[f32],
            size: super::Size,
            nll: bool,
        ) -> (Vec<f32>, Vec<f32>, super::Activations<f32>) {
            super::forward_and_nll::<f32, P>(l, p, input, cond, size, nll)
        }
        // SAFETY: the features the function is compiled for were detected.
        present().then(|| unsafe { run::<P>(l, p, input, cond, size, nll) })
    }

    /// The whole backward pass compiled for AVX-512, if the CPU has it.
    pub fn backward<P: Products<f32>>(
        l: &super::ParamLayout,
        p: &[f32],
        input: &[u32],
        size: super::Size,
        acts: &super::Activations<f32>,
        dl: &[f32],
    ) -> Option<(Vec<f32>, Vec<f32>)> {
        #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
        unsafe fn run<P: Products<f32>>(
            l: &super::ParamLayout,
            p: &[f32],
            input: &[u32],
            size: super::Size,
            acts: &super::Activations<f32>,
            dl: &[f32],
        ) -> (Vec<f32>, Vec<f32>) {
            super::backward::<f32, P>(l, p, input, size, acts, dl)
        }
        // SAFETY: the features the function is compiled for were detected.
        present().then(|| unsafe { run::<P>(l, p, input, size, acts, dl) })
    }

    /// Runs the AVX-512 pass if the CPU has it; `false` if not.
    pub fn gate_forward(pre: &mut [f32], z: &mut [f32], g: usize) -> bool {
        // SAFETY: the features the function is compiled for were detected.
        present() && {
            unsafe { gate_forward_avx512(pre, z, g) };
            true
        }
    }

    /// Runs the AVX-512 pass if the CPU has it; `false` if not.
    pub fn gate_backward(kept: &[f32], dz: &[f32], dpre: &mut [f32], g: usize) -> bool {
        // SAFETY: the features the function is compiled for were detected.
        present() && {
            unsafe { gate_backward_avx512(kept, dz, dpre, g) };
            true
        }
    }
}

/// The float types the op runs in: f32 for training, f64 for the finite-difference checks.
trait Float:
    Scalar
    + Default
    + PartialOrd
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + std::ops::AddAssign
{
    const ZERO: Self;
    fn sigmoid(self) -> Self;
    fn exp(self) -> Self;
    fn ln(self) -> Self;
    /// The gated unit over rows [f | g] of `pre` (n × 2G): overwrites them with [tanh f | σ g]
    /// (what the backward pass needs) and writes z = tanh f · σ g.
    fn gate_forward(pre: &mut [Self], z: &mut [Self], g: usize) {
        gate_forward_body!(Self, pre, z, g)
    }
    /// d pre from d z and the kept [tanh f | σ g]: ∂z/∂f = σ(g)(1 − tanh²f),
    /// ∂z/∂g = tanh(f) σ(g)(1 − σ(g)).
    fn gate_backward(kept: &[Self], dz: &[Self], dpre: &mut [Self], g: usize) {
        gate_backward_body!(Self, kept, dz, dpre, g)
    }
    /// [`forward_and_nll`], compiled for the best instruction set the CPU has, its products
    /// in `precision` (f64 is always exact).
    fn forward_pass(
        l: &ParamLayout,
        p: &[Self],
        input: &[u32],
        cond: &[Self],
        size: Size,
        nll: bool,
        _precision: Precision,
    ) -> (Vec<Self>, Vec<Self>, Activations<Self>) {
        forward_and_nll::<Self, Exact>(l, p, input, cond, size, nll)
    }
    /// [`backward`], compiled for the best instruction set the CPU has, its products in
    /// `precision`.
    fn backward_pass(
        l: &ParamLayout,
        p: &[Self],
        input: &[u32],
        size: Size,
        acts: &Activations<Self>,
        dl: &[Self],
        _precision: Precision,
    ) -> (Vec<Self>, Vec<Self>) {
        backward::<Self, Exact>(l, p, input, size, acts, dl)
    }
    /// The op's output as candle storage, and what its backward pass keeps.
    fn storage(v: Vec<Self>) -> CpuStorage;
    fn keep(acts: Activations<Self>, probs: Vec<Self>) -> Kept;
}

impl Float for f32 {
    const ZERO: f32 = 0.0;
    #[inline(always)]
    fn sigmoid(self) -> f32 {
        1.0 / (1.0 + crate::fastmath::fast_exp(-self))
    }
    fn exp(self) -> f32 {
        crate::fastmath::fast_exp(self)
    }
    fn ln(self) -> f32 {
        f32::ln(self)
    }
    fn gate_forward(pre: &mut [f32], z: &mut [f32], g: usize) {
        #[cfg(target_arch = "x86_64")]
        if avx512::gate_forward(pre, z, g) {
            return;
        }
        gate_forward_body!(f32, pre, z, g)
    }
    fn gate_backward(kept: &[f32], dz: &[f32], dpre: &mut [f32], g: usize) {
        #[cfg(target_arch = "x86_64")]
        if avx512::gate_backward(kept, dz, dpre, g) {
            return;
        }
        gate_backward_body!(f32, kept, dz, dpre, g)
    }
    fn forward_pass(
        l: &ParamLayout,
        p: &[f32],
        input: &[u32],
        cond: &[f32],
        size: Size,
        nll: bool,
        precision: Precision,
    ) -> (Vec<f32>, Vec<f32>, Activations<f32>) {
        fn with<P: Products<f32>>(
            l: &ParamLayout,
            p: &[f32],
            input: &[u32],
            cond: &[f32],
            size: Size,
            nll: bool,
        ) -> (Vec<f32>, Vec<f32>, Activations<f32>) {
            #[cfg(target_arch = "x86_64")]
            if let Some(out) = avx512::forward::<P>(l, p, input, cond, size, nll) {
                return out;
            }
            forward_and_nll::<f32, P>(l, p, input, cond, size, nll)
        }
        match precision {
            Precision::F32 => with::<Exact>(l, p, input, cond, size, nll),
            Precision::Bf16 => with::<Bf16>(l, p, input, cond, size, nll),
        }
    }
    fn backward_pass(
        l: &ParamLayout,
        p: &[f32],
        input: &[u32],
        size: Size,
        acts: &Activations<f32>,
        dl: &[f32],
        precision: Precision,
    ) -> (Vec<f32>, Vec<f32>) {
        fn with<P: Products<f32>>(
            l: &ParamLayout,
            p: &[f32],
            input: &[u32],
            size: Size,
            acts: &Activations<f32>,
            dl: &[f32],
        ) -> (Vec<f32>, Vec<f32>) {
            #[cfg(target_arch = "x86_64")]
            if let Some(out) = avx512::backward::<P>(l, p, input, size, acts, dl) {
                return out;
            }
            backward::<f32, P>(l, p, input, size, acts, dl)
        }
        match precision {
            Precision::F32 => with::<Exact>(l, p, input, size, acts, dl),
            Precision::Bf16 => with::<Bf16>(l, p, input, size, acts, dl),
        }
    }
    fn storage(v: Vec<f32>) -> CpuStorage {
        CpuStorage::F32(v)
    }
    fn keep(acts: Activations<f32>, probs: Vec<f32>) -> Kept {
        Kept::F32(acts, probs)
    }
}

impl Float for f64 {
    const ZERO: f64 = 0.0;
    fn sigmoid(self) -> f64 {
        1.0 / (1.0 + (-self).exp())
    }
    fn exp(self) -> f64 {
        f64::exp(self)
    }
    fn ln(self) -> f64 {
        f64::ln(self)
    }
    fn storage(v: Vec<f64>) -> CpuStorage {
        CpuStorage::F64(v)
    }
    fn keep(acts: Activations<f64>, probs: Vec<f64>) -> Kept {
        Kept::F64(acts, probs)
    }
}

/// Adds `bias` to every row of `rows` (row length `bias.len()`).
#[inline(always)]
fn add_rows<T: Float>(rows: &mut [T], bias: &[T]) {
    for r in rows.chunks_exact_mut(bias.len()) {
        r.iter_mut().zip(bias).for_each(|(x, &b)| *x += b);
    }
}

/// `rows` copies of `row`, one after the other (a product's destination, starting at its bias).
#[inline(always)]
fn repeat_rows<T: Float>(row: &[T], rows: usize) -> Vec<T> {
    let mut out = Vec::with_capacity(rows * row.len());
    for _ in 0..rows {
        out.extend_from_slice(row);
    }
    out
}

/// `acc += Σ_rows rows` (row length `acc.len()`).
#[inline(always)]
fn sum_rows<T: Float>(acc: &mut [T], rows: &[T]) {
    for r in rows.chunks_exact(acc.len()) {
        acc.iter_mut().zip(r).for_each(|(a, &x)| *a += x);
    }
}

/// What the forward pass keeps for the backward pass.
struct Activations<T> {
    /// Per layer: its input `(B·T, C)`, [tanh(f), σ(g)] of its pre-activation `(B·T, 2G)`.
    inputs: Vec<Vec<T>>,
    pres: Vec<Vec<T>>,
    /// Every layer's gate output side by side, `(B·T, L·G)`: layer l's is columns l·G ..
    /// (l+1)·G. The skip sum is then one product with all the skip weights stacked
    /// (`L·G × S`), instead of L products each reading and writing the whole `(B·T, S)` sum.
    gates: Vec<T>,
    /// The skip sum before the head's first ReLU `(B·T, S)`, the head's hidden layer after its
    /// ReLU `(B·T, H)`.
    skip: Vec<T>,
    hidden: Vec<T>,
}

/// Every layer's skip weights stacked, `(L·G, S)`: rows l·G .. (l+1)·G are layer l's.
fn stacked_skip_weights<T: Float>(l: &ParamLayout, p: &[T]) -> Vec<T> {
    let (g, s) = (l.cfg.gate_channels, l.cfg.skip_channels);
    l.layers.iter().flat_map(|layer| p[layer.skip_w..layer.skip_w + g * s].iter().copied()).collect()
}

/// The taps of `layer`'s dilated convolution: for each j, how far back it reads,
/// (k−1−j)·d, and its weight W[j] (C × 2G).
fn dilated_taps<'a, T>(
    l: &ParamLayout,
    layer: &LayerOffsets,
    p: &'a [T],
) -> impl DoubleEndedIterator<Item = (usize, Mat<T>)> + ExactSizeIterator + 'a {
    let (k, c, g, d, at) =
        (l.cfg.kernel_width, l.cfg.residual_channels, l.cfg.gate_channels, layer.dilation, layer.dilated_w);
    (0..k).map(move |j| ((k - 1 - j) * d, Mat::new(p, at + j * c * 2 * g, c, 2 * g)))
}

/// Batch size and sequence length; with local conditioning, the frames per sequence and the
/// samples per frame (position t of a sequence reads its frame ⌊t / hop⌋).
#[derive(Debug, Clone, Copy)]
struct Size {
    batch: usize,
    len: usize,
    frames: usize,
    hop: usize,
}

impl Size {
    /// The row of the conditioning `(B·F, L·2G)` that position `t` of sequence `b` reads.
    #[inline(always)]
    fn frame_row(&self, b: usize, t: usize) -> usize {
        b * self.frames + t / self.hop
    }
}

/// Column 0 of each row of `input` is the label, the rest the tokens.
fn split_input(input: &[u32], size: Size) -> (Vec<u32>, &[u32]) {
    let labels = (0..size.batch).map(|b| input[b * (size.len + 1)]).collect();
    (labels, input)
}

fn token(input: &[u32], size: Size, b: usize, t: usize) -> usize {
    input[b * (size.len + 1) + 1 + t] as usize
}

#[inline(always)]
fn forward<T: Float, P: Products<T>>(
    l: &ParamLayout,
    p: &[T],
    input: &[u32],
    cond: &[T],
    size: Size,
) -> (Vec<T>, Activations<T>) {
    let cfg = &l.cfg;
    let (c, g, s, h, v) = (cfg.residual_channels, cfg.gate_channels, cfg.skip_channels, cfg.head_channels, cfg.classes);
    let (bsz, len) = (size.batch, size.len);
    let n = bsz * len;
    let (labels, _) = split_input(input, size);
    // The input is shifted by one: position t holds the embedding of token t − 1, 0 at t = 0.
    let mut x = vec![T::ZERO; n * c];
    for b in 0..bsz {
        for t in 1..len {
            let code = token(input, size, b, t - 1);
            x[(b * len + t) * c..(b * len + t + 1) * c]
                .copy_from_slice(&p[l.embed + code * c..l.embed + (code + 1) * c]);
        }
    }
    let lg = l.layers.len() * g;
    let mut acts =
        Activations { inputs: vec![], pres: vec![], gates: vec![T::ZERO; n * lg], skip: vec![], hidden: vec![] };
    let mut z = vec![T::ZERO; n * g];
    for layer in &l.layers {
        // pre = bias (+ label row) + Σ_j x[t − (k−1−j)·d] · W[j]   (B·T, 2G)
        let mut pre = repeat_rows(&p[layer.dilated_b..layer.dilated_b + 2 * g], n);
        if let Some(table) = layer.label {
            for (b, &lab) in labels.iter().enumerate() {
                let row = &p[table + lab as usize * 2 * g..table + (lab as usize + 1) * 2 * g];
                add_rows(&mut pre[b * len * 2 * g..(b + 1) * len * 2 * g], row);
            }
        }
        // Local conditioning: each position adds its frame's projection for this layer.
        if size.frames > 0 {
            let (li, width) = (acts.pres.len(), lg * 2);
            for (r, row) in pre.chunks_exact_mut(2 * g).enumerate() {
                let at = size.frame_row(r / len, r % len) * width + li * 2 * g;
                row.iter_mut().zip(&cond[at..at + 2 * g]).for_each(|(x, &c)| *x += c);
            }
        }
        // Per sequence: pre[t] += Σ_j x[t − (k−1−j)·d] W[j].
        let taps: Vec<(isize, Mat<T>)> = dilated_taps(l, layer, p).map(|(s, w)| (-(s as isize), w)).collect();
        for b in 0..bsz {
            P::conv_acc(&mut pre, b * len * 2 * g, Mat::new(&x, b * len * c, len, c), &taps);
        }
        // z = tanh(f) ⊙ σ(g), with tanh(f) = 2σ(2f) − 1. The pre-activation is overwritten by
        // [tanh(f), σ(g)], which is all the backward pass needs of it.
        T::gate_forward(&mut pre, &mut z, g);
        // x_next = x + z·W_res + b_res
        let mut next = x.clone();
        add_rows(&mut next, &p[layer.residual_b..layer.residual_b + c]);
        P::acc(&mut next, 0, Mat::new(&z, 0, n, g), Mat::new(p, layer.residual_w, g, c));
        let li = acts.pres.len();
        for (dst, src) in acts.gates.chunks_exact_mut(lg).zip(z.chunks_exact(g)) {
            dst[li * g..(li + 1) * g].copy_from_slice(src);
        }
        acts.inputs.push(std::mem::replace(&mut x, next));
        acts.pres.push(pre);
    }
    // skip = Σ_l (z_l·W_skip,l + b_skip,l), as one product.
    let skip_bias = l.layers.iter().fold(vec![T::ZERO; s], |mut acc, layer| {
        acc.iter_mut().zip(&p[layer.skip_b..layer.skip_b + s]).for_each(|(a, &b)| *a += b);
        acc
    });
    let stacked = stacked_skip_weights(l, p);
    acts.skip = repeat_rows(&skip_bias, n);
    P::acc(&mut acts.skip, 0, Mat::new(&acts.gates, 0, n, lg), Mat::new(&stacked, 0, lg, s));
    // Head: ReLU → 1×1 → ReLU → 1×1.
    let relu_skip: Vec<T> = acts.skip.iter().map(|&x| if x > T::ZERO { x } else { T::ZERO }).collect();
    let mut hidden = repeat_rows(&p[l.head0_b..l.head0_b + h], n);
    P::acc(&mut hidden, 0, Mat::new(&relu_skip, 0, n, s), Mat::new(p, l.head0_w, s, h));
    hidden.iter_mut().for_each(|x| {
        if *x < T::ZERO {
            *x = T::ZERO
        }
    });
    let mut logits = repeat_rows(&p[l.head1_b..l.head1_b + v], n);
    P::acc(&mut logits, 0, Mat::new(&hidden, 0, n, h), Mat::new(p, l.head1_w, h, v));
    acts.hidden = hidden;
    (logits, acts)
}

#[inline(always)]
fn backward<T: Float, P: Products<T>>(
    l: &ParamLayout,
    p: &[T],
    input: &[u32],
    size: Size,
    a: &Activations<T>,
    dlogits: &[T],
) -> (Vec<T>, Vec<T>) {
    let cfg = &l.cfg;
    let (k, c, g, s, h, v) =
        (cfg.kernel_width, cfg.residual_channels, cfg.gate_channels, cfg.skip_channels, cfg.head_channels, cfg.classes);
    let (bsz, len) = (size.batch, size.len);
    let n = bsz * len;
    let (labels, _) = split_input(input, size);
    let mut dp = vec![T::ZERO; p.len()];
    let mut dcond = vec![T::ZERO; bsz * size.frames * l.layers.len() * 2 * g];

    // Head, backwards.
    P::acc(&mut dp, l.head1_w, Mat::new(&a.hidden, 0, n, h).t(), Mat::new(dlogits, 0, n, v));
    sum_rows(&mut dp[l.head1_b..l.head1_b + v], dlogits);
    let mut dhidden = vec![T::ZERO; n * h];
    P::acc(&mut dhidden, 0, Mat::new(dlogits, 0, n, v), Mat::new(p, l.head1_w, h, v).t());
    dhidden.iter_mut().zip(&a.hidden).for_each(|(d, &x)| {
        if x <= T::ZERO {
            *d = T::ZERO
        }
    });
    let relu_skip: Vec<T> = a.skip.iter().map(|&x| if x > T::ZERO { x } else { T::ZERO }).collect();
    P::acc(&mut dp, l.head0_w, Mat::new(&relu_skip, 0, n, s).t(), Mat::new(&dhidden, 0, n, h));
    sum_rows(&mut dp[l.head0_b..l.head0_b + h], &dhidden);
    let mut dskip = vec![T::ZERO; n * s];
    P::acc(&mut dskip, 0, Mat::new(&dhidden, 0, n, h), Mat::new(p, l.head0_w, s, h).t());
    dskip.iter_mut().zip(&a.skip).for_each(|(d, &x)| {
        if x <= T::ZERO {
            *d = T::ZERO
        }
    });

    // The skip sum's product, backwards: every layer's skip weights and d z at once.
    let lg = l.layers.len() * g;
    let stacked = stacked_skip_weights(l, p);
    let mut dstacked = vec![T::ZERO; lg * s];
    P::acc(&mut dstacked, 0, Mat::new(&a.gates, 0, n, lg).t(), Mat::new(&dskip, 0, n, s));
    let mut dskip_bias = vec![T::ZERO; s];
    sum_rows(&mut dskip_bias, &dskip);
    for (li, layer) in l.layers.iter().enumerate() {
        let rows = &dstacked[li * g * s..(li + 1) * g * s];
        dp[layer.skip_w..layer.skip_w + g * s].iter_mut().zip(rows).for_each(|(d, &x)| *d += x);
        dp[layer.skip_b..layer.skip_b + s].iter_mut().zip(&dskip_bias).for_each(|(d, &x)| *d += x);
    }
    let mut dgates = vec![T::ZERO; n * lg];
    P::acc(&mut dgates, 0, Mat::new(&dskip, 0, n, s), Mat::new(&stacked, 0, lg, s).t());

    // The residual stack, last layer first; `dx` is the gradient of the current layer's output.
    let mut dx = vec![T::ZERO; n * c];
    let mut dz = vec![T::ZERO; n * g];
    let mut dpre = vec![T::ZERO; n * 2 * g];
    for (li, layer) in l.layers.iter().enumerate().rev() {
        let (x, pre, z) = (&a.inputs[li], &a.pres[li], Mat::strided(&a.gates, li * g, n, g, lg));
        // The residual 1×1; d z from the skip product and from the residual.
        P::acc(&mut dp, layer.residual_w, z.t(), Mat::new(&dx, 0, n, c));
        sum_rows(&mut dp[layer.residual_b..layer.residual_b + c], &dx);
        for (dst, src) in dz.chunks_exact_mut(g).zip(dgates.chunks_exact(lg)) {
            dst.copy_from_slice(&src[li * g..(li + 1) * g]);
        }
        P::acc(&mut dz, 0, Mat::new(&dx, 0, n, c), Mat::new(p, layer.residual_w, g, c).t());
        // The gate: ∂z/∂f = σ(g)(1 − tanh²f), ∂z/∂g = tanh(f) σ(g)(1 − σ(g)).
        T::gate_backward(pre, &dz, &mut dpre, g);
        sum_rows(&mut dp[layer.dilated_b..layer.dilated_b + 2 * g], &dpre);
        if let Some(table) = layer.label {
            for (b, &lab) in labels.iter().enumerate() {
                let at = table + lab as usize * 2 * g;
                sum_rows(&mut dp[at..at + 2 * g], &dpre[b * len * 2 * g..(b + 1) * len * 2 * g]);
            }
        }
        if size.frames > 0 {
            for (r, row) in dpre.chunks_exact(2 * g).enumerate() {
                let at = size.frame_row(r / len, r % len) * lg * 2 + li * 2 * g;
                dcond[at..at + 2 * g].iter_mut().zip(row).for_each(|(d, &x)| *d += x);
            }
        }
        // The dilated convolution: dW[j] += x_shiftedᵀ dpre; dx_in[t − s] += dpre[t] W[j]ᵀ.
        // The residual connection passes dx through unchanged.
        // The weight gradients first, per sequence from the unshifted tap (whose xᵀ the other
        // taps' products reuse), then the input gradient.
        for b in 0..bsz {
            let taps = dilated_taps(l, layer, p).enumerate().rev().filter(|&(_, (shift, _))| shift < len);
            for (j, (shift, _)) in taps {
                let (rows, w_at) = (len - shift, layer.dilated_w + j * c * 2 * g);
                let (xs, dps) =
                    (Mat::new(x, b * len * c, rows, c), Mat::new(&dpre, (b * len + shift) * 2 * g, rows, 2 * g));
                if j == k - 1 { P::acc(&mut dp, w_at, xs.t(), dps) } else { P::acc_again(&mut dp, w_at, xs.t(), dps) }
            }
        }
        // dx[t] += Σ_j dpre[t + (k−1−j)·d] W[j]ᵀ.
        let back_taps: Vec<(isize, Mat<T>)> = dilated_taps(l, layer, p).map(|(s, w)| (s as isize, w.t())).collect();
        for b in 0..bsz {
            P::conv_acc(&mut dx, b * len * c, Mat::new(&dpre, b * len * 2 * g, len, 2 * g), &back_taps);
        }
    }
    // The embedding: position t + 1 holds token t.
    for b in 0..bsz {
        for t in 1..len {
            let code = token(input, size, b, t - 1);
            let row = &dx[(b * len + t) * c..(b * len + t + 1) * c];
            dp[l.embed + code * c..l.embed + (code + 1) * c].iter_mut().zip(row).for_each(|(a, &x)| *a += x);
        }
    }
    (dp, dcond)
}

/// The op: from `input (B, T + 1)` (label, then tokens) and the flat parameters, the logits
/// `(B, T, V)`, or (`nll`) the NLL of each token `(B, T)`; keeps its activations (and, for the
/// NLL, the softmax) for its backward pass.
struct StackOp {
    layout: ParamLayout,
    size: Size,
    nll: bool,
    precision: Precision,
    kept: Mutex<Option<Kept>>,
}

enum Kept {
    F32(Activations<f32>, Vec<f32>),
    F64(Activations<f64>, Vec<f64>),
}

/// Turns `logits` (n × V) into their softmax in place and returns each row's NLL of its token
/// (the token at the same position: the logits of position t predict token t).
#[inline(always)]
fn softmax_nll<T: Float>(logits: &mut [T], input: &[u32], size: Size, v: usize) -> Vec<T> {
    let mut nll = Vec::with_capacity(size.batch * size.len);
    for (r, row) in logits.chunks_exact_mut(v).enumerate() {
        let (b, t) = (r / size.len, r % size.len);
        let target = row[token(input, size, b, t)];
        // Eight running maxima and sums (lanes), so that the reductions vectorise.
        let mut lanes = [row[0]; 8];
        for chunk in row.chunks(8) {
            for (m, &x) in lanes.iter_mut().zip(chunk) {
                if x > *m {
                    *m = x;
                }
            }
        }
        let max = lanes.iter().fold(lanes[0], |m, &x| if x > m { x } else { m });
        for x in row.iter_mut() {
            *x = (*x - max).exp();
        }
        let mut sums = [T::ZERO; 8];
        for chunk in row.chunks(8) {
            for (s, &x) in sums.iter_mut().zip(chunk) {
                *s += x;
            }
        }
        let sum = sums.iter().fold(T::ZERO, |a, &x| a + x);
        let inv = T::ONE / sum;
        row.iter_mut().for_each(|x| *x = *x * inv);
        nll.push(max + sum.ln() - target);
    }
    nll
}

/// The gradient of the logits from that of each row's NLL: g · (softmax − one-hot).
#[inline(always)]
fn nll_backward<T: Float>(mut probs: Vec<T>, grad: &[T], input: &[u32], size: Size, v: usize) -> Vec<T> {
    for (r, row) in probs.chunks_exact_mut(v).enumerate() {
        let (b, t) = (r / size.len, r % size.len);
        row[token(input, size, b, t)] = row[token(input, size, b, t)] - T::ONE;
        let g = grad[r];
        row.iter_mut().for_each(|x| *x = *x * g);
    }
    probs
}

/// The forward pass, then (`nll`) the NLL of each token: (output, softmax kept for the backward
/// pass or empty, activations).
#[inline(always)]
fn forward_and_nll<T: Float, P: Products<T>>(
    l: &ParamLayout,
    p: &[T],
    input: &[u32],
    cond: &[T],
    size: Size,
    nll: bool,
) -> (Vec<T>, Vec<T>, Activations<T>) {
    let (mut logits, acts) = forward::<T, P>(l, p, input, cond, size);
    if nll {
        let out = softmax_nll(&mut logits, input, size, l.cfg.classes);
        (out, logits, acts)
    } else {
        (logits, vec![], acts)
    }
}

impl StackOp {
    /// The op's output (logits or NLL) and what its backward pass keeps.
    fn forward_typed<T: Float>(&self, p: &[T], input: &[u32], cond: &[T]) -> (CpuStorage, Kept) {
        let (out, probs, acts) = T::forward_pass(&self.layout, p, input, cond, self.size, self.nll, self.precision);
        (T::storage(out), T::keep(acts, probs))
    }

    /// The gradients of the weights and of the conditioning.
    fn backward_typed<T: Float + candle_core::WithDType>(
        &self,
        params: &Tensor,
        cond: &Tensor,
        grad: &Tensor,
        tokens: &[u32],
        acts: &Activations<T>,
        probs: Vec<T>,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let (size, v) = (self.size, self.layout.cfg.classes);
        let p = params.to_vec1::<T>()?;
        let mut dl = grad.flatten_all()?.to_vec1::<T>()?;
        if self.nll {
            dl = nll_backward(probs, &dl, tokens, size, v);
        }
        let (dp, dcond) = T::backward_pass(&self.layout, &p, tokens, size, acts, &dl, self.precision);
        Ok((Tensor::from_vec(dp, p.len(), params.device())?, Tensor::from_vec(dcond, cond.shape(), cond.device())?))
    }
}

impl CustomOp3 for StackOp {
    fn name(&self) -> &'static str {
        "wavenet-stack"
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
        let CpuStorage::U32(input) = s1 else { candle_core::bail!("wavenet stack: tokens must be u32") };
        let input = super::contiguous_slice(input, l1, "wavenet stack")?;
        let (size, v) = (self.size, self.layout.cfg.classes);
        let shape = if self.nll { Shape::from((size.batch, size.len)) } else { Shape::from((size.batch, size.len, v)) };
        let mut kept = self.kept.lock().expect("invariant: not poisoned");
        use super::contiguous_slice as slice;
        const OP: &str = "wavenet stack";
        let (out, k) = match (s2, s3) {
            (CpuStorage::F32(p), CpuStorage::F32(c)) => self.forward_typed(slice(p, l2, OP)?, input, slice(c, l3, OP)?),
            (CpuStorage::F64(p), CpuStorage::F64(c)) => self.forward_typed(slice(p, l2, OP)?, input, slice(c, l3, OP)?),
            _ => candle_core::bail!("wavenet stack: weights and conditioning must be both f32 or both f64"),
        };
        *kept = Some(k);
        Ok((out, shape))
    }

    fn bwd(
        &self,
        input: &Tensor,
        params: &Tensor,
        cond: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let tokens = input.flatten_all()?.to_vec1::<u32>()?;
        let kept = self.kept.lock().expect("invariant: not poisoned").take();
        let (dp, dcond) = match kept {
            Some(Kept::F32(acts, probs)) => self.backward_typed::<f32>(params, cond, grad, &tokens, &acts, probs)?,
            Some(Kept::F64(acts, probs)) => self.backward_typed::<f64>(params, cond, grad, &tokens, &acts, probs)?,
            None => candle_core::bail!("wavenet stack: backward called twice, or before forward"),
        };
        Ok((None, Some(dp), (self.size.frames > 0).then_some(dcond)))
    }
}

/// Local conditioning for the op: each layer's projection of every frame, `(B, F, L·2G)` (layer
/// l's columns l·2G .. (l+1)·2G), and the samples per frame; position t reads frame ⌊t / hop⌋.
/// (For a vocoder with sub-frames, a "frame" here is a sub-frame: a row of the frame network.)
#[derive(Debug, Clone, Copy)]
pub struct FrameConditioning<'a> {
    /// The projections, `(B, F, L·2G)`.
    pub projections: &'a Tensor,
    /// Samples per frame.
    pub hop: usize,
}

/// The logits `(B, T, V)` of WaveNet `layout.cfg` for `tokens (B, T)` (and `labels (B,)`, and
/// the frames' projections), with the weights packed in `params` as [`ParamLayout`] says.
pub fn wavenet_logits(
    layout: &ParamLayout,
    params: &Tensor,
    tokens: &Tensor,
    labels: Option<&Tensor>,
    frames: Option<FrameConditioning>,
    precision: Precision,
) -> Result<Tensor> {
    apply(layout, params, tokens, labels, frames, false, precision)
}

/// The NLL in nats of every token, `(B, T)`: the loss without the logits ever becoming a candle
/// tensor (the softmax and its gradient are computed in the op).
pub fn wavenet_nll(
    layout: &ParamLayout,
    params: &Tensor,
    tokens: &Tensor,
    labels: Option<&Tensor>,
    frames: Option<FrameConditioning>,
    precision: Precision,
) -> Result<Tensor> {
    apply(layout, params, tokens, labels, frames, true, precision)
}

fn apply(
    layout: &ParamLayout,
    params: &Tensor,
    tokens: &Tensor,
    labels: Option<&Tensor>,
    frames: Option<FrameConditioning>,
    nll: bool,
    precision: Precision,
) -> Result<Tensor> {
    if precision == Precision::Bf16 && !super::matmul::amx::available() {
        return Err(crate::Error::Config(
            "--precision bf16 needs a CPU with AMX-BF16 (Intel Xeon 4th generation or later); use --precision f32"
                .into(),
        ));
    }
    let (batch, len) = tokens.dims2()?;
    let labels = match labels {
        Some(l) => l.to_dtype(DType::U32)?.reshape((batch, 1))?,
        None => Tensor::zeros((batch, 1), DType::U32, tokens.device())?,
    };
    if let Some(max) = labels.max_all()?.to_scalar::<u32>().ok().filter(|&m| m as usize >= layout.cfg.num_labels.max(1))
    {
        return Err(crate::Error::Config(format!("label index {max} out of range")));
    }
    let max_token = tokens.max_all()?.to_scalar::<u32>()?;
    if max_token as usize >= layout.cfg.classes {
        return Err(crate::Error::Config(format!("token {max_token} out of range")));
    }
    let (cond, hop, frame_count) = match frames {
        Some(FrameConditioning { projections, hop }) => {
            let (b, f, width) = projections.dims3()?;
            let needed = if len == 0 { 0 } else { (len - 1) / hop.max(1) + 1 };
            if b != batch || width != layout.layers.len() * 2 * layout.cfg.gate_channels || hop == 0 || f < needed {
                return Err(crate::Error::Config(format!(
                    "conditioning of shape ({b}, {f}, {width}) with a hop of {hop} for {batch} sequences of {len} samples: \
                     it needs at least {needed} frames of {} columns per sequence",
                    layout.layers.len() * 2 * layout.cfg.gate_channels
                )));
            }
            (projections.contiguous()?, hop, f)
        }
        None => (Tensor::zeros(0, params.dtype(), params.device())?, 1, 0),
    };
    let input = Tensor::cat(&[labels, tokens.to_dtype(DType::U32)?], 1)?.contiguous()?; // (B, T + 1)
    let size = Size { batch, len, frames: frame_count, hop };
    let op = StackOp { layout: layout.clone(), size, nll, precision, kept: Mutex::new(None) };
    Ok(input.apply_op3(&params.contiguous()?, &cond, op)?)
}
