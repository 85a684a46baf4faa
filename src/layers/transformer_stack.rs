//! The transformer's whole training pass (embeddings, every block, the final norm and the
//! logits) as a [`Network`] of `layers::conv_stack`: one operation with its own backward pass.
//! As separate operations (`models::transformer`'s stepper still runs them) each block was
//! about ten candle operations, and candle's autograd adds every gradient into a freshly zeroed
//! tensor: those additions and fills were a fifth of a training step (perf). Here the residual
//! stream is summed in place and every weight's gradient goes straight into one flat vector.
//!
//! The input is each position's token as a number (V for the start token); per block, on the
//! residual stream `h`: `h += out(attention(qkv(norm1(h))))`, then `h += mlp1(relu(mlp0(norm2
//! (h))))`; the logits are `output(norm(h))`. The linear maps are 1×1 convolutions
//! ([`ConvAt`]), so their weights are laid out `(in, out)` as `layers::ChannelLinear`'s.

use super::attention::{self, Sizes};
use super::conv_stack::{ConvAt, Network, Placer, Rows, Value, add_bias, into_relu, relu_grad};
use super::matmul::Products;
use super::norm;

/// Where a layer norm's weight and bias start in the flat vector, and their width.
#[derive(Debug, Clone, Copy)]
struct NormAt {
    w: usize,
    b: usize,
    d: usize,
}

impl NormAt {
    fn place(placer: &mut Placer, d: usize) -> Self {
        NormAt { w: placer.vector(d), b: placer.vector(d), d }
    }

    fn forward<T: Value>(&self, p: &[T], x: &[T]) -> Vec<T> {
        norm::forward(x, &p[self.w..][..self.d], &p[self.b..][..self.d])
    }

    /// `dp +=` the weight's and bias's gradients; `dx +=` the input's.
    fn backward<T: Value>(&self, dp: &mut [T], dx: &mut [T], p: &[T], x: &[T], dy: &[T]) {
        let (dxn, dw, db) = norm::backward(x, &p[self.w..][..self.d], dy);
        T::accumulate(dx, &dxn);
        T::accumulate(&mut dp[self.w..][..self.d], &dw);
        T::accumulate(&mut dp[self.b..][..self.d], &db);
    }
}

#[derive(Debug, Clone)]
struct Block {
    norm1: NormAt,
    qkv: ConvAt,
    out: ConvAt,
    norm2: NormAt,
    mlp_in: ConvAt,
    mlp_out: ConvAt,
}

/// The network. Its flat vector holds, in order: the token embeddings `(V + 1, D)`, the
/// position embeddings `(L, D)`, per block norm1's weight and bias, qkv `(D, 3D)` and bias,
/// out `(D, D)` and bias, norm2's weight and bias, mlp0 `(D, M)` and bias, mlp1 `(M, D)` and
/// bias; then the final norm's weight and bias, and output `(D, V)` and bias.
#[derive(Debug, Clone)]
pub struct TransformerStack {
    tokens: usize,
    dim: usize,
    heads: usize,
    context: usize,
    embed: usize,
    position: usize,
    blocks: Vec<Block>,
    norm: NormAt,
    output: ConvAt,
    len: usize,
}

impl TransformerStack {
    /// A network over `classes` tokens (plus the start token) of width `dim`, `heads` heads,
    /// `layers` blocks with MLPs of `mlp` units, and positions up to `context`.
    pub fn new(classes: usize, dim: usize, heads: usize, layers: usize, mlp: usize, context: usize) -> Self {
        let mut placer = Placer::default();
        let embed = placer.vector((classes + 1) * dim);
        let position = placer.vector(context * dim);
        let linear = |placer: &mut Placer, i: usize, o: usize| placer.place(&(vec![0], i, o));
        let blocks = (0..layers)
            .map(|_| Block {
                norm1: NormAt::place(&mut placer, dim),
                qkv: linear(&mut placer, dim, 3 * dim),
                out: linear(&mut placer, dim, dim),
                norm2: NormAt::place(&mut placer, dim),
                mlp_in: linear(&mut placer, dim, mlp),
                mlp_out: linear(&mut placer, mlp, dim),
            })
            .collect();
        let norm = NormAt::place(&mut placer, dim);
        let output = linear(&mut placer, dim, classes);
        TransformerStack {
            tokens: classes + 1,
            dim,
            heads,
            context,
            embed,
            position,
            blocks,
            norm,
            output,
            len: placer.len,
        }
    }

    /// Row `r`'s token and position (`r` counts through `t` positions per sequence).
    fn token_and_position<T: Value>(&self, x: &[T], r: usize, t: usize) -> (usize, usize) {
        let token = x[r].to_f64() as usize;
        (token.min(self.tokens - 1), r % t)
    }
}

/// What one block keeps: its input, the inputs of its maps, the attention's output and
/// log-sum-exps, and the stream between its two halves.
pub struct BlockActs<T> {
    h: Vec<T>,
    normed1: Vec<T>,
    qkv: Vec<T>,
    att: Vec<T>,
    lse: Vec<f64>,
    h_mid: Vec<T>,
    normed2: Vec<T>,
    hidden: Vec<T>,
}

/// Everything the backward pass reads besides the input and the weights.
pub struct Activations<T> {
    blocks: Vec<BlockActs<T>>,
    h: Vec<T>,
    normed: Vec<T>,
}

impl Network for TransformerStack {
    type Kept<T: Value> = Activations<T>;

    fn weights(&self) -> usize {
        self.len
    }

    fn channels(&self) -> (usize, usize) {
        (1, self.output.c_out)
    }

    /// No padding rows (a row is padding when `r % 1 ≥ 1`: never).
    fn padding(&self) -> (usize, usize) {
        (1, 1)
    }

    fn forward<T: Value, P: Products<T>>(&self, p: &[T], x: &[T], rows: Rows) -> (Vec<T>, Activations<T>) {
        let (b, t) = rows.shape();
        let d = self.dim;
        assert!(t <= self.context, "invariant: the model checked the length against its context");
        let mut h = vec![T::default(); rows.count() * d];
        for (r, row) in h.chunks_exact_mut(d).enumerate() {
            let (token, position) = self.token_and_position(x, r, t);
            let (e, q) = (&p[self.embed + token * d..][..d], &p[self.position + position * d..][..d]);
            row.iter_mut().zip(e).zip(q).for_each(|((v, &e), &q)| *v = e + q);
        }
        let sizes = Sizes::new(b, t, self.heads, d / self.heads);
        let mut blocks = Vec::with_capacity(self.blocks.len());
        for block in &self.blocks {
            let normed1 = block.norm1.forward(p, &h);
            let qkv = block.qkv.forward::<T, P>(p, &normed1, rows);
            let (att, lse) = attention::forward::<T, P>(&qkv, sizes);
            let h_in = h.clone();
            block.out.accumulate::<T, P>(&mut h, p, &att, rows);
            add_bias(&mut h, block.out.bias(p));
            let normed2 = block.norm2.forward(p, &h);
            let hidden = into_relu(block.mlp_in.forward::<T, P>(p, &normed2, rows));
            let h_mid = h.clone();
            block.mlp_out.accumulate::<T, P>(&mut h, p, &hidden, rows);
            add_bias(&mut h, block.mlp_out.bias(p));
            blocks.push(BlockActs { h: h_in, normed1, qkv, att, lse, h_mid, normed2, hidden });
        }
        let normed = self.norm.forward(p, &h);
        let logits = self.output.forward::<T, P>(p, &normed, rows);
        (logits, Activations { blocks, h, normed })
    }

    fn backward<T: Value, P: Products<T>>(
        &self,
        p: &[T],
        x: &[T],
        acts: &Activations<T>,
        dlogits: &[T],
        rows: Rows,
    ) -> Vec<T> {
        let (b, t) = rows.shape();
        let (n, d) = (rows.count(), self.dim);
        let sizes = Sizes::new(b, t, self.heads, d / self.heads);
        let mut dp = vec![T::default(); p.len()];
        let mut dy = dlogits.to_vec();
        self.output.grads::<T, P>(&mut dp, &acts.normed, &mut dy, rows);
        let mut d_normed = vec![T::default(); n * d];
        self.output.input_grads::<T, P>(&mut d_normed, &dy, p, rows);
        let mut dh = vec![T::default(); n * d];
        self.norm.backward(&mut dp, &mut dh, p, &acts.h, &d_normed);
        // Gradients are written over these (`set_input_grads`) block after block, not added
        // to freshly cleared ones. `d_in` holds, in turn, the gradients of norm2's output, of
        // the attention's and of norm1's output.
        let mut d_hidden = Vec::new();
        let mut d_in = vec![T::default(); n * d];
        for (block, a) in self.blocks.iter().zip(&acts.blocks).rev() {
            // h = h_mid + mlp1(relu(mlp0(norm2(h_mid)))): dh flows on, and into the MLP.
            block.mlp_out.grads::<T, P>(&mut dp, &a.hidden, &mut dh, rows);
            d_hidden.resize(n * block.mlp_out.c_in, T::default());
            block.mlp_out.set_input_grads::<T, P>(&mut d_hidden, &dh, p, rows);
            relu_grad(&mut d_hidden, &a.hidden);
            block.mlp_in.grads::<T, P>(&mut dp, &a.normed2, &mut d_hidden, rows);
            block.mlp_in.set_input_grads::<T, P>(&mut d_in, &d_hidden, p, rows);
            block.norm2.backward(&mut dp, &mut dh, p, &a.h_mid, &d_in);
            // h_mid = h + out(attention(qkv(norm1(h)))).
            block.out.grads::<T, P>(&mut dp, &a.att, &mut dh, rows);
            block.out.set_input_grads::<T, P>(&mut d_in, &dh, p, rows);
            let mut d_qkv = attention::backward::<T, P>(&a.qkv, &a.att, &d_in, &a.lse, sizes);
            block.qkv.grads::<T, P>(&mut dp, &a.normed1, &mut d_qkv, rows);
            block.qkv.set_input_grads::<T, P>(&mut d_in, &d_qkv, p, rows);
            block.norm1.backward(&mut dp, &mut dh, p, &a.h, &d_in);
        }
        for (r, g) in dh.chunks_exact(d).enumerate() {
            let (token, position) = self.token_and_position(x, r, t);
            T::accumulate(&mut dp[self.embed + token * d..][..d], g);
            T::accumulate(&mut dp[self.position + position * d..][..d], g);
        }
        dp
    }
}
