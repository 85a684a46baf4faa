//! Gated PixelCNN's whole network (its gated layers and its head) as a [`Network`] of
//! `layers::conv_stack`: one operation with its own backward pass, for training.
//!
//! A layer, on the padded layout of `layers::shifted` (every sum below is zero at padding rows):
//!
//! - `v_pre = b_v + conv_v(v)`, `h_pre = b_h + conv_h(h) + b_link + link(v_pre)` (the link
//!   reads the vertical stack one image row up);
//! - `v' = gate(v_pre)`, `h' = b_r + gate(h_pre) · W_r`, plus `h` after the first layer.
//!
//! The head is ReLU, 1×1, ReLU, 1×1 of the last `h'`. With dropout, `gate(h_pre)` is dropped
//! before `W_r` reads it (the residual block's inner units, as PixelCNN++ places it).

use super::conv_stack::{ConvAt, ConvShape, Head, HeadActs, Network, Placer, Rows, Value, biased};
use super::dropout::Dropout;
use super::matmul::Products;

/// The network: per layer the vertical, horizontal, link and residual convolutions, then the
/// head's two, in that order in the flat vector (weight, then bias, for each).
#[derive(Debug, Clone)]
pub struct GatedStack {
    layers: Vec<[ConvAt; 4]>,
    head: Head,
    padding: (usize, usize),
    len: usize,
    dropout: Option<Dropout>,
}

impl GatedStack {
    /// The network of `layers` ([vertical, horizontal, link, residual] each) and `head`
    /// ([hidden, out]), on rows whose padding is `(period, valid)`.
    pub fn new(layers: &[[ConvShape; 4]], head: &[ConvShape; 2], padding: (usize, usize)) -> Self {
        let mut placer = Placer::default();
        let layers = layers.iter().map(|convs| convs.each_ref().map(|c| placer.place(c))).collect();
        let head = Head::place(&mut placer, head);
        GatedStack { layers, head, padding, len: placer.len, dropout: None }
    }

    /// The same network, training with `dropout`.
    pub fn with_dropout(&self, dropout: Dropout) -> Self {
        GatedStack { dropout: Some(dropout), ..self.clone() }
    }

    fn channels_c(&self) -> usize {
        self.layers[0][3].c_out
    }
}

/// What one layer keeps for the backward pass, each `(G·R × width)`.
pub struct LayerActs<T> {
    v_pre: Vec<T>,
    h_pre: Vec<T>,
    v_out: Vec<T>,
    gated_h: Vec<T>,
    h_out: Vec<T>,
}

/// Everything the backward pass reads besides the input and the weights.
pub struct Activations<T> {
    layers: Vec<LayerActs<T>>,
    head: HeadActs<T>,
}

impl Network for GatedStack {
    type Kept<T: Value> = Activations<T>;

    fn weights(&self) -> usize {
        self.len
    }

    fn channels(&self) -> (usize, usize) {
        (self.layers[0][0].c_in, self.head.classes())
    }

    fn padding(&self) -> (usize, usize) {
        self.padding
    }

    fn forward<T: Value, P: Products<T>>(&self, p: &[T], x: &[T], rows: Rows) -> (Vec<T>, Activations<T>) {
        let c = self.channels_c();
        let mut layers: Vec<LayerActs<T>> = Vec::with_capacity(self.layers.len());
        for (i, [vertical, horizontal, link, residual]) in self.layers.iter().enumerate() {
            let (v_in, h_in) = match layers.last() {
                Some(prev) => (&prev.v_out[..], &prev.h_out[..]),
                None => (x, x),
            };
            let v_pre = vertical.forward::<T, P>(p, v_in, rows);
            // Both biases at once: the sum of two zero-padded sums is the padded sum.
            let both: Vec<T> = horizontal.bias(p).iter().zip(link.bias(p)).map(|(&a, &b)| a + b).collect();
            let mut h_pre = biased(rows.count(), &both);
            horizontal.accumulate::<T, P>(&mut h_pre, p, h_in, rows);
            link.accumulate::<T, P>(&mut h_pre, p, &v_pre, rows);
            rows.pad(&mut h_pre, link.c_out);
            let mut v_out = vec![T::default(); rows.count() * c];
            T::gate(&v_pre, &mut v_out, c);
            let mut gated_h = vec![T::default(); rows.count() * c];
            T::gate(&h_pre, &mut gated_h, c);
            if let Some(d) = &self.dropout {
                d.apply(&mut gated_h, i, rows.shape().1 * c);
            }
            let mut h_out = residual.forward::<T, P>(p, &gated_h, rows);
            if i > 0 {
                T::accumulate(&mut h_out, h_in);
            }
            layers.push(LayerActs { v_pre, h_pre, v_out, gated_h, h_out });
        }
        let last = &layers.last().expect("invariant: at least one layer").h_out;
        let (logits, head) = self.head.forward::<T, P>(p, last, rows);
        (logits, Activations { layers, head })
    }

    fn backward<T: Value, P: Products<T>>(
        &self,
        p: &[T],
        x: &[T],
        acts: &Activations<T>,
        dlogits: &[T],
        rows: Rows,
    ) -> Vec<T> {
        let (n, c) = (rows.count(), self.channels_c());
        let mut dp = vec![T::default(); p.len()];
        let mut dh = self.head.backward::<T, P>(&mut dp, p, &acts.head, dlogits, rows);
        // The last layer's vertical output feeds nothing. The other buffers are reused from
        // layer to layer, each written over, never cleared.
        let mut dv = vec![T::default(); n * c];
        let (mut d_gated, mut dh_pre, mut dv_pre) = (vec![T::default(); n * c], Vec::new(), Vec::new());
        for (i, [vertical, horizontal, link, residual]) in self.layers.iter().enumerate().rev() {
            let a = &acts.layers[i];
            let (v_in, h_in) =
                if i > 0 { (&acts.layers[i - 1].v_out[..], &acts.layers[i - 1].h_out[..]) } else { (x, x) };
            let two_c = vertical.c_out;
            // h' = residual(gated_h) + h: the residual's gradients; dh itself flows on to h.
            residual.grads::<T, P>(&mut dp, &a.gated_h, &mut dh, rows);
            residual.set_input_grads::<T, P>(&mut d_gated, &dh, p, rows);
            if let Some(d) = &self.dropout {
                d.apply(&mut d_gated, i, rows.shape().1 * c);
            }
            dh_pre.resize(n * two_c, T::default());
            T::gate_grad(&a.h_pre, &d_gated, &mut dh_pre, c);
            // h_pre = horizontal(h) + link(v_pre).
            horizontal.grads::<T, P>(&mut dp, h_in, &mut dh_pre, rows);
            link.grads::<T, P>(&mut dp, &a.v_pre, &mut dh_pre, rows);
            dv_pre.resize(n * two_c, T::default());
            T::gate_grad(&a.v_pre, &dv, &mut dv_pre, c);
            link.input_grads::<T, P>(&mut dv_pre, &dh_pre, p, rows);
            vertical.grads::<T, P>(&mut dp, v_in, &mut dv_pre, rows);
            if i == 0 {
                break; // the image's gradient is not needed
            }
            // Into the previous layer's outputs: dh keeps the residual path's share.
            horizontal.input_grads::<T, P>(&mut dh, &dh_pre, p, rows);
            vertical.set_input_grads::<T, P>(&mut dv, &dv_pre, p, rows);
        }
        dp
    }
}
