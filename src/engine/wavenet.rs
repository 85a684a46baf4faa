//! The streaming WaveNet engine: the fast-WaveNet queues on plain `f32` buffers. Weights are
//! copied once from the candle model into contiguous `(in, out)` matrices; each layer keeps a
//! ring of its last (k−1)·d inputs for every stream; one step runs, per layer, one product over
//! the stacked taps, the fused gate, and the residual and skip products, with no allocation.
//! N streams advance together, so every weight read serves N rows (matrix × matrix).

use super::kernels::Kernels;
use crate::models::wavenet::{Config, WaveNet};
use crate::{Error, Result};

fn flat(t: &candle_core::Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

struct Layer {
    dilation: usize,
    /// `(k·C, 2G)`: the dilated taps, oldest first, then the current input.
    dilated: Vec<f32>,
    dilated_bias: Vec<f32>,
    /// `(L, 2G)`, when conditioned.
    label: Option<Vec<f32>>,
    residual: Vec<f32>,
    residual_bias: Vec<f32>,
    skip: Vec<f32>,
    skip_bias: Vec<f32>,
}

/// The weights of a WaveNet, laid out for the kernels.
pub struct Engine {
    cfg: Config,
    embed: Vec<f32>,
    layers: Vec<Layer>,
    head0: Vec<f32>,
    head0_bias: Vec<f32>,
    head1: Vec<f32>,
    head1_bias: Vec<f32>,
    kernels: Kernels,
    /// Use libm's tanh and exp instead of the fast approximations.
    pub exact: bool,
}

/// The state of N streams: the layer rings and the scratch buffers of one step.
pub struct Streams {
    n: usize,
    /// Per layer, (k−1)·d slots of N×C inputs; `head` is the oldest slot.
    rings: Vec<Vec<f32>>,
    heads: Vec<usize>,
    /// Per layer, the label's contribution to the pre-activation (N × 2G), or empty.
    cond: Vec<Vec<f32>>,
    x: Vec<f32>,
    pre: Vec<f32>,
    z: Vec<f32>,
    skip: Vec<f32>,
    hidden: Vec<f32>,
    logits: Vec<f32>,
}

impl Streams {
    /// The logits of the last step, `N × classes`.
    pub fn logits(&self) -> &[f32] {
        &self.logits
    }
}

impl Engine {
    /// Copies the weights of `model` (once, at load).
    pub fn new(model: &WaveNet, kernels: Kernels, exact: bool) -> Result<Self> {
        let layers = model
            .layers
            .iter()
            .map(|l| {
                Ok(Layer {
                    dilation: l.dilation,
                    dilated: flat(&l.dilated.weight)?,
                    dilated_bias: flat(&l.dilated.bias)?,
                    label: l.label.as_ref().map(|e| flat(e.embeddings())).transpose()?,
                    residual: flat(&l.residual.weight)?,
                    residual_bias: flat(&l.residual.bias)?,
                    skip: flat(&l.skip.weight)?,
                    skip_bias: flat(&l.skip.bias)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Engine {
            cfg: model.cfg.clone(),
            embed: flat(model.embed.embeddings())?,
            layers,
            head0: flat(&model.head0.weight)?,
            head0_bias: flat(&model.head0.bias)?,
            head1: flat(&model.head1.weight)?,
            head1_bias: flat(&model.head1.bias)?,
            kernels,
            exact,
        })
    }

    /// The kernels in use.
    pub fn kernels(&self) -> Kernels {
        self.kernels
    }

    /// The model's config.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Fresh state for `labels.len()` streams (labels are ignored, and may be all 0, when the
    /// model is unconditioned).
    pub fn streams(&self, labels: &[u32]) -> Result<Streams> {
        let (n, c, g) = (labels.len(), self.cfg.residual_channels, self.cfg.gate_channels);
        if n == 0 {
            return Err(Error::Config("at least one stream".into()));
        }
        let cond = self
            .layers
            .iter()
            .map(|l| match &l.label {
                None => Ok(Vec::new()),
                Some(table) => labels
                    .iter()
                    .map(|&lab| {
                        let lab = lab as usize;
                        table
                            .get(lab * 2 * g..(lab + 1) * 2 * g)
                            .ok_or_else(|| Error::Config(format!("label index {lab} out of range")))
                    })
                    .collect::<Result<Vec<_>>>()
                    .map(|rows| rows.concat()),
            })
            .collect::<Result<Vec<_>>>()?;
        let k = self.cfg.kernel_width;
        Ok(Streams {
            n,
            rings: self.layers.iter().map(|l| vec![0.0; (k - 1) * l.dilation * n * c]).collect(),
            heads: vec![0; self.layers.len()],
            cond,
            x: vec![0.0; n * c],
            pre: vec![0.0; n * 2 * g],
            z: vec![0.0; n * g],
            skip: vec![0.0; n * self.cfg.skip_channels],
            hidden: vec![0.0; n * self.cfg.head_channels],
            logits: vec![0.0; n * self.cfg.classes],
        })
    }

    /// Advances every stream by its previous code (`None` at the very start) and returns the
    /// logits of the next code, `N × classes`.
    pub fn step<'s>(&self, s: &'s mut Streams, prev: Option<&[u32]>) -> &'s [f32] {
        let (n, c, g, k) = (s.n, self.cfg.residual_channels, self.cfg.gate_channels, self.cfg.kernel_width);
        let (sk, h, v) = (self.cfg.skip_channels, self.cfg.head_channels, self.cfg.classes);
        let mm = self.kernels.matmul_acc;
        match prev {
            Some(codes) => {
                for (r, &code) in codes.iter().enumerate().take(n) {
                    s.x[r * c..(r + 1) * c].copy_from_slice(&self.embed[code as usize * c..(code as usize + 1) * c]);
                }
            }
            None => s.x.fill(0.0),
        }
        s.skip.fill(0.0);
        for (li, layer) in self.layers.iter().enumerate() {
            let d = layer.dilation;
            let slots = (k - 1) * d;
            let ring = &mut s.rings[li];
            let head = s.heads[li];
            for r in 0..n {
                s.pre[r * 2 * g..(r + 1) * 2 * g].copy_from_slice(&layer.dilated_bias);
            }
            if !s.cond[li].is_empty() {
                s.pre.iter_mut().zip(&s.cond[li]).for_each(|(p, c)| *p += c);
            }
            // Tap j < k−1 reads x[t − (k−1−j)·d], ring slot head + j·d (all N rows of a slot are
            // contiguous, so each tap is one product); the last tap is the current input.
            let w_tap = c * 2 * g;
            for j in 0..k - 1 {
                let slot = (head + j * d) % slots;
                mm(
                    &mut s.pre,
                    &ring[slot * n * c..(slot + 1) * n * c],
                    &layer.dilated[j * w_tap..(j + 1) * w_tap],
                    n,
                    c,
                    2 * g,
                );
            }
            mm(&mut s.pre, &s.x, &layer.dilated[(k - 1) * w_tap..], n, c, 2 * g);
            // The current input becomes the newest slot, over the oldest.
            if slots > 0 {
                ring[head * n * c..(head + 1) * n * c].copy_from_slice(&s.x);
                s.heads[li] = (head + 1) % slots;
            }
            (self.kernels.gate)(&s.pre, &mut s.z, g, self.exact);
            for r in 0..n {
                s.x[r * c..(r + 1) * c].iter_mut().zip(&layer.residual_bias).for_each(|(x, b)| *x += b);
                s.skip[r * sk..(r + 1) * sk].iter_mut().zip(&layer.skip_bias).for_each(|(x, b)| *x += b);
            }
            mm(&mut s.x, &s.z, &layer.residual, n, g, c);
            mm(&mut s.skip, &s.z, &layer.skip, n, g, sk);
        }
        // Head: ReLU → 1×1 → ReLU → 1×1.
        s.skip.iter_mut().for_each(|x| *x = x.max(0.0));
        for r in 0..n {
            s.hidden[r * h..(r + 1) * h].copy_from_slice(&self.head0_bias);
            s.logits[r * v..(r + 1) * v].copy_from_slice(&self.head1_bias);
        }
        mm(&mut s.hidden, &s.skip, &self.head0, n, sk, h);
        s.hidden.iter_mut().for_each(|x| *x = x.max(0.0));
        mm(&mut s.logits, &s.hidden, &self.head1, n, h, v);
        &s.logits
    }
}
