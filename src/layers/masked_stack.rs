//! PixelCNN's whole network (the mask-A convolution, the residual blocks, the head) as a
//! [`Network`] of `layers::conv_stack`: one operation with its own backward pass, for training.
//!
//! On the padded layout of `layers::shifted` (every sum is zero at padding rows): `h = b +
//! conv_A(x)`, then per block `h += expand(relu(conv_B(relu(reduce(relu(h))))))` (1×1 from 2C
//! to C, the masked convolution, 1×1 back to 2C), then the head: ReLU, 1×1, ReLU, 1×1. With
//! dropout, the masked convolution's ReLU is dropped before `expand` reads it.
//!
//! The first convolution's output is relaid onto narrower rows for the blocks and the head: a
//! wide first kernel needs as many padding columns as its radius, the 3×3 blocks one, and
//! every padding row is computed like a pixel (a 15×15 first layer on 28-pixel rows would
//! make every later layer 35/29 as costly).

use super::conv_stack::{
    ConvAt, ConvShape, Head, HeadActs, Network, Placer, Rows, Value, add_bias, into_relu, relu, relu_grad,
};
use super::dropout::Dropout;
use super::matmul::Products;

/// The network: the first convolution, per block its reduce, masked and expand convolutions,
/// then the head's two, in that order in the flat vector (weight, then bias, for each).
#[derive(Debug, Clone)]
pub struct MaskedStack {
    input: ConvAt,
    blocks: Vec<[ConvAt; 3]>,
    head: Head,
    padding: (usize, usize),
    block_padding: (usize, usize),
    len: usize,
    dropout: Option<Dropout>,
}

impl MaskedStack {
    /// The network of `input`, `blocks` ([reduce, masked, expand] each) and `head` ([hidden,
    /// out]): the input on rows whose padding is `padding` (`(period, valid)`), the blocks, the
    /// head and the output on rows padded as `block_padding` says (the offsets of each
    /// convolution given for its rows).
    pub fn new(
        input: &ConvShape,
        blocks: &[[ConvShape; 3]],
        head: &[ConvShape; 2],
        padding: (usize, usize),
        block_padding: (usize, usize),
    ) -> Self {
        let mut placer = Placer::default();
        let input = placer.place(input);
        let blocks = blocks.iter().map(|convs| convs.each_ref().map(|c| placer.place(c))).collect();
        let head = Head::place(&mut placer, head);
        MaskedStack { input, blocks, head, padding, block_padding, len: placer.len, dropout: None }
    }

    /// The same network, training with `dropout`.
    pub fn with_dropout(&self, dropout: Dropout) -> Self {
        MaskedStack { dropout: Some(dropout), ..self.clone() }
    }
}

/// What one block keeps: the ReLUs of its three convolutions' inputs.
pub struct BlockActs<T> {
    h: Vec<T>,
    reduced: Vec<T>,
    masked: Vec<T>,
}

/// Everything the backward pass reads besides the input and the weights.
pub struct Activations<T> {
    blocks: Vec<BlockActs<T>>,
    head: HeadActs<T>,
}

impl Network for MaskedStack {
    type Kept<T: Value> = Activations<T>;

    fn weights(&self) -> usize {
        self.len
    }

    fn channels(&self) -> (usize, usize) {
        (self.input.c_in, self.head.classes())
    }

    fn padding(&self) -> (usize, usize) {
        self.padding
    }

    fn output_padding(&self) -> (usize, usize) {
        self.block_padding
    }

    fn forward<T: Value, P: Products<T>>(&self, p: &[T], x: &[T], input_rows: Rows) -> (Vec<T>, Activations<T>) {
        let rows = input_rows.with_padding(self.block_padding);
        let mut h = input_rows.relaid(self.input.forward::<T, P>(p, x, input_rows), rows, self.input.c_out);
        let mut blocks = Vec::with_capacity(self.blocks.len());
        for (i, [reduce, masked, expand]) in self.blocks.iter().enumerate() {
            let relu_h = relu(&h);
            let reduced = into_relu(reduce.forward::<T, P>(p, &relu_h, rows));
            let mut masked_out = into_relu(masked.forward::<T, P>(p, &reduced, rows));
            if let Some(d) = &self.dropout {
                d.apply(&mut masked_out, i, rows.shape().1 * masked.c_out);
            }
            // h += expand(·): the sum of zero-padded sums stays zero at the padding.
            expand.accumulate::<T, P>(&mut h, p, &masked_out, rows);
            add_bias(&mut h, expand.bias(p));
            rows.pad(&mut h, expand.c_out);
            blocks.push(BlockActs { h: relu_h, reduced, masked: masked_out });
        }
        let (logits, head) = self.head.forward::<T, P>(p, &h, rows);
        (logits, Activations { blocks, head })
    }

    fn backward<T: Value, P: Products<T>>(
        &self,
        p: &[T],
        x: &[T],
        acts: &Activations<T>,
        dlogits: &[T],
        input_rows: Rows,
    ) -> Vec<T> {
        let rows = input_rows.with_padding(self.block_padding);
        let n = rows.count();
        let mut dp = vec![T::default(); p.len()];
        let mut dh = self.head.backward::<T, P>(&mut dp, p, &acts.head, dlogits, rows);
        // Every block's gradients are written over these (`set_input_grads`), not added to
        // cleared buffers: clearing them block by block was 4% of a step.
        let (mut d_masked, mut d_reduced, mut d_h) = (Vec::new(), Vec::new(), Vec::new());
        for (i, ([reduce, masked, expand], a)) in self.blocks.iter().zip(&acts.blocks).enumerate().rev() {
            d_masked.resize(n * expand.c_in, T::default());
            d_reduced.resize(n * masked.c_in, T::default());
            d_h.resize(n * reduce.c_in, T::default());
            // h += expand(masked): dh flows on unchanged, and into the block.
            expand.grads::<T, P>(&mut dp, &a.masked, &mut dh, rows);
            expand.set_input_grads::<T, P>(&mut d_masked, &dh, p, rows);
            if let Some(d) = &self.dropout {
                d.apply(&mut d_masked, i, rows.shape().1 * masked.c_out);
            }
            // (A dropped unit is 0 in `a.masked`, so its gradient stays 0 here too.)
            relu_grad(&mut d_masked, &a.masked);
            masked.grads::<T, P>(&mut dp, &a.reduced, &mut d_masked, rows);
            masked.set_input_grads::<T, P>(&mut d_reduced, &d_masked, p, rows);
            relu_grad(&mut d_reduced, &a.reduced);
            reduce.grads::<T, P>(&mut dp, &a.h, &mut d_reduced, rows);
            reduce.set_input_grads::<T, P>(&mut d_h, &d_reduced, p, rows);
            T::accumulate_relu_grad(&mut dh, &d_h, &a.h);
        }
        let mut dh = rows.relaid(dh, input_rows, self.input.c_out);
        self.input.grads::<T, P>(&mut dp, x, &mut dh, input_rows);
        dp
    }
}
