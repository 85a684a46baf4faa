//! The streaming WaveNet engine: the fast-WaveNet queues on plain `f32` buffers. Weights are
//! copied once from the candle model into contiguous `(in, out)` matrices; each layer keeps a
//! ring of its last (k−1)·d inputs for every stream; one step runs, per layer, one product over
//! the stacked taps, the fused gate, and the residual and skip products, with no allocation.
//! N streams advance together, so every weight read serves N rows (matrix × matrix).

use std::sync::Arc;

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

/// A vocoder's frame network, laid out for the kernels.
struct FrameWeights {
    /// `((2c+1)·M, K·R)`, frames f − c … f + c stacked, to K rows (sub-frames) of R (or to the
    /// hidden layer).
    conv: Vec<f32>,
    bias: Vec<f32>,
    /// The hidden layer to K rows of R, `(N, K·R)`, and its bias, when there is one.
    out: Option<(Vec<f32>, Vec<f32>)>,
    /// Frames read on either side (c).
    context: usize,
    mean: Vec<f32>,
    deviation: Vec<f32>,
    /// Every layer's projection side by side, `(R, L·2G)`.
    projections: Vec<f32>,
    hop: usize,
    subframes: usize,
}

/// What a vocoder adds to each layer's pre-activation, per frame of one input: computed once
/// per frame (K rows, one per sub-frame), read by every sample of the sub-frame. Each layer's
/// dilated-convolution bias is folded in, so a step starts each pre-activation from its row.
#[derive(Debug, Clone)]
pub struct Conditioning {
    /// Frames −c … F − 1 + c (those whose frame network reads any of the input; c its
    /// context), K rows of L·2G each (row (f + c)·K + k is sub-frame k of frame f), then the K
    /// rows of a frame surrounded by silence (the features' floor), for positions further
    /// before and after the input, as in training windows.
    rows: Vec<f32>,
    width: usize,
    subframes: usize,
    context: usize,
    /// Samples per row: the hop over K.
    samples_per_row: usize,
    /// Frames of the input.
    pub frames: usize,
}

impl Conditioning {
    /// Where in `rows` the row of sub-frame `index` starts, counting from the input's start
    /// (frames −c … F − 1 + c; any other: the silent frame's).
    fn row_start(&self, index: isize) -> usize {
        let (k, c) = (self.subframes as isize, self.context as isize);
        let inside = (self.frames + 2 * self.context) * self.subframes;
        let r = usize::try_from(index + c * k)
            .ok()
            .filter(|&r| r < inside)
            .unwrap_or_else(|| inside + index.rem_euclid(k) as usize);
        r * self.width
    }
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
    frames: Option<FrameWeights>,
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
    /// A vocoder's conditioning of each stream (empty otherwise), the steps taken, and how
    /// many of them came before the input's first sample (the lead-in).
    local: Vec<Arc<Conditioning>>,
    /// Where each stream's row of this step starts in its conditioning.
    row_starts: Vec<usize>,
    position: usize,
    lead: usize,
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
            frames: match &model.frames {
                None => None,
                Some(net) => {
                    let per_layer: Vec<Vec<f32>> = model
                        .layers
                        .iter()
                        .map(|l| flat(l.local.as_ref().expect("invariant: a vocoder's layers")))
                        .collect::<Result<_>>()?;
                    let (r, w) = (net.cfg.channels, per_layer.len() * 2 * model.cfg.gate_channels);
                    let mut projections = Vec::with_capacity(r * w);
                    for i in 0..r {
                        for p in &per_layer {
                            let cols = p.len() / r;
                            projections.extend_from_slice(&p[i * cols..(i + 1) * cols]);
                        }
                    }
                    Some(FrameWeights {
                        conv: flat(&net.conv.weight)?,
                        bias: flat(&net.conv.bias)?,
                        out: net
                            .out
                            .as_ref()
                            .map(|o| Ok::<_, Error>((flat(&o.weight)?, flat(&o.bias)?)))
                            .transpose()?,
                        context: net.cfg.context,
                        mean: net.cfg.mean.clone(),
                        deviation: net.cfg.deviation.clone(),
                        projections,
                        hop: net.cfg.mel.hop,
                        subframes: net.cfg.subframes,
                    })
                }
            },
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

    /// Whether the model is a vocoder (its streams need [`Engine::condition`]).
    pub fn is_vocoder(&self) -> bool {
        self.frames.is_some()
    }

    /// A vocoder's conditioning on `features` (`frames × M` log-mel values, row-major): the
    /// frame network and every layer's projection, once per frame. Frames outside the input
    /// read as silence (the features' floor), as in training.
    pub fn condition(&self, features: &[f32], frames: usize) -> Result<Conditioning> {
        let Some(fw) = &self.frames else {
            return Err(Error::Config("this model is not a vocoder: it takes no mel features".into()));
        };
        let m = fw.mean.len();
        if features.len() != frames * m || frames == 0 {
            return Err(Error::Config(format!(
                "{} feature values for {frames} frames: this vocoder reads {m} mel bands per frame",
                features.len()
            )));
        }
        let m_in = (2 * fw.context + 1) * m; // stacked inputs per frame
        let kr = fw.out.as_ref().map_or(fw.bias.len(), |(_, b)| b.len()); // K·R: outputs per frame
        let (r, width) = (kr / fw.subframes, fw.projections.len() * fw.subframes / kr);
        let floor = crate::audio::mel::FLOOR.ln();
        let c = fw.context as isize;
        // Standardised frames −2c … F − 1 + 2c: frames −c … F − 1 + c are computed (any other
        // reads only silence), each reading c frames either side.
        let padded: Vec<f32> = (-2 * c..frames as isize + 2 * c)
            .flat_map(|f| {
                (0..m).map(move |b| {
                    let x = if (0..frames as isize).contains(&f) { features[f as usize * m + b] } else { floor };
                    (x - fw.mean[b]) / fw.deviation[b]
                })
            })
            .collect();
        let mm = self.kernels.matmul_acc;
        let layer = |x: &[f32], w: &[f32], bias: &[f32], rows: usize, inp: usize| {
            let mut y: Vec<f32> = (0..rows).flat_map(|_| bias.iter().copied()).collect();
            mm(&mut y, x, w, rows, inp, bias.len());
            y.iter_mut().for_each(|v| *v = v.tanh());
            y
        };
        // `frames` stacked inputs to K rows each: (frames, K·R) is (frames·K, R).
        let project = |stacked: &[f32], frames: usize| {
            let mut y = layer(stacked, &fw.conv, &fw.bias, frames, m_in);
            if let Some((w, b)) = &fw.out {
                y = layer(&y, w, b, frames, fw.bias.len());
            }
            let rows = frames * fw.subframes;
            let mut out = vec![0f32; rows * width];
            mm(&mut out, &y, &fw.projections, rows, r, width);
            out
        };
        // Frame f (−c … F − 1 + c) reads padded rows f + c … f + 3c: 2c + 1 consecutive rows are
        // one stacked input.
        let computed = frames + 2 * fw.context;
        let stacked: Vec<f32> = (0..computed).flat_map(|i| padded[i * m..i * m + m_in].iter().copied()).collect();
        let silence_in: Vec<f32> = (0..m_in).map(|i| (floor - fw.mean[i % m]) / fw.deviation[i % m]).collect();
        let biases: Vec<f32> = self.layers.iter().flat_map(|l| l.dilated_bias.iter().copied()).collect();
        let with_biases = |mut rows: Vec<f32>| {
            rows.chunks_exact_mut(width).for_each(|row| row.iter_mut().zip(&biases).for_each(|(x, b)| *x += b));
            rows
        };
        let mut rows = project(&stacked, computed);
        rows.extend(project(&silence_in, 1));
        Ok(Conditioning {
            rows: with_biases(rows),
            width,
            subframes: fw.subframes,
            context: fw.context,
            samples_per_row: fw.hop / fw.subframes,
            frames,
        })
    }

    /// Fresh state for `labels.len()` streams (labels are ignored, and may be all 0, when the
    /// model is unconditioned).
    pub fn streams(&self, labels: &[u32]) -> Result<Streams> {
        if self.is_vocoder() {
            return Err(Error::Config(
                "this model is a vocoder: it generates from mel features (`wavegen vocode`)".into(),
            ));
        }
        self.streams_conditioned(labels, vec![], 0)
    }

    /// Fresh state for `labels.len()` streams of a vocoder, stream i conditioned on `local[i]`,
    /// its first `lead` steps (the priming) coming before the input's first sample.
    pub fn vocoder_streams(&self, labels: &[u32], local: Vec<Arc<Conditioning>>, lead: usize) -> Result<Streams> {
        if !self.is_vocoder() || local.len() != labels.len() {
            return Err(Error::Config(format!(
                "{} conditioning inputs for {} streams of a {}",
                local.len(),
                labels.len(),
                if self.is_vocoder() { "vocoder" } else { "model that takes no features" }
            )));
        }
        self.streams_conditioned(labels, local, lead)
    }

    fn streams_conditioned(&self, labels: &[u32], local: Vec<Arc<Conditioning>>, lead: usize) -> Result<Streams> {
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
            row_starts: vec![0; local.len()],
            local,
            position: 0,
            lead,
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
        // A vocoder's row, found once per step: the sample's position in its input (negative
        // in the lead-in) over the samples per row.
        let per_row = s.local.first().map_or(1, |l| l.samples_per_row) as isize;
        let row = (s.position as isize - s.lead as isize).div_euclid(per_row);
        for (start, local) in s.row_starts.iter_mut().zip(&s.local) {
            *start = local.row_start(row);
        }
        for (li, layer) in self.layers.iter().enumerate() {
            let d = layer.dilation;
            let slots = (k - 1) * d;
            let ring = &mut s.rings[li];
            let head = s.heads[li];
            // The bias; a vocoder's row holds it and this layer's projection of the frame.
            for (r, pre) in s.pre.chunks_exact_mut(2 * g).enumerate() {
                match s.local.get(r) {
                    Some(local) => pre.copy_from_slice(&local.rows[s.row_starts[r] + li * 2 * g..][..2 * g]),
                    None => pre.copy_from_slice(&layer.dilated_bias),
                }
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
        s.position += 1;
        &s.logits
    }
}
