//! The one training loop, for every model (nanoGPT's shape): set the learning rate → forward
//! and backward → clip and step → evaluate and checkpoint → log → stop. Resuming from a
//! checkpoint continues bit for bit: weights, optimizer moments, step, and the generator
//! that draws the data are all restored.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::optim::{AdamW, AdamWConfig};
use candle_core::backprop::GradStore;

use super::{Autoregressive, masked_nll_sum};
use crate::data::{Batch, BatchSource};
use crate::layers::dropout::Dropout;
use crate::rng::Rng;
use crate::{Error, Result};

/// How the products of training run: exactly in f32, or on bfloat16-rounded operands with f32
/// sums (models that have such a path: WaveNet). Weights, gradients and the optimizer's state
/// stay f32 either way.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Exact f32 products.
    #[default]
    F32,
    /// bfloat16 operands, f32 sums (AMX).
    Bf16,
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        })
    }
}

impl Precision {
    /// How the products run here, for the logs: bf16 needs AMX, and falls back to exact f32
    /// on a CPU without it.
    pub fn products_here(self) -> String {
        match self {
            Precision::Bf16 if !crate::layers::matmul::amx::available() => {
                "f32 products (the run is set to bf16, which needs AMX; this CPU has none)".to_string()
            }
            p => format!("{p} products"),
        }
    }
}

/// The final learning rate as a fraction of the peak, for the commands' schedules.
pub const FINAL_LR_FRACTION: f64 = 1.0 / 20.0;

/// Settings of a training run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Stop after this many optimizer steps in total (counting those before a resume).
    pub max_steps: u64,
    /// Stop after this many minutes of this run, whatever the step.
    pub max_minutes: Option<f64>,
    /// Peak learning rate, reached after the warm-up.
    pub lr: f64,
    /// Final learning rate, reached at `decay_steps` (cosine decay from `lr`).
    pub min_lr: f64,
    /// Linear warm-up from 0 over this many steps.
    pub warmup_steps: u64,
    /// Length of the cosine decay; the rate stays at `min_lr` after it.
    pub decay_steps: u64,
    /// The optimizer.
    pub adamw: AdamWConfig,
    /// Evaluate on the validation batches every this many steps.
    pub eval_every: u64,
    /// Write a checkpoint every this many steps (and always at the end).
    pub checkpoint_every: u64,
    /// Precision of the products in the forward and backward passes.
    #[serde(default)]
    pub precision: Precision,
    /// Probability of dropping a unit while training, for models that have dropout (0: none).
    #[serde(default)]
    pub dropout: f64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            max_steps: 10_000,
            max_minutes: None,
            lr: 2e-3,
            min_lr: 1e-4,
            warmup_steps: 100,
            decay_steps: 10_000,
            adamw: AdamWConfig::default(),
            eval_every: 250,
            checkpoint_every: 250,
            precision: Precision::F32,
            dropout: 0.0,
        }
    }
}

impl TrainConfig {
    /// The learning rate at `step`: linear warm-up, then cosine decay to `min_lr`, then flat.
    pub fn lr_at(&self, step: u64) -> f64 {
        // 1) warm-up
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        // 2) after the decay: the floor
        if step >= self.decay_steps {
            return self.min_lr;
        }
        // 3) in between: cosine from lr down to min_lr
        let span = (self.decay_steps - self.warmup_steps).max(1) as f64;
        let progress = (step - self.warmup_steps) as f64 / span;
        self.min_lr + 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()) * (self.lr - self.min_lr)
    }

    /// Checks the ranges.
    pub fn validate(&self) -> Result<()> {
        if !(self.lr > 0.0 && self.lr.is_finite() && self.min_lr >= 0.0 && self.min_lr <= self.lr) {
            return Err(Error::Config(format!(
                "need 0 ≤ min-lr ≤ lr and lr > 0 (lr {}, min-lr {})",
                self.lr, self.min_lr
            )));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::Config(format!("--dropout must be in [0, 1), got {}", self.dropout)));
        }
        let d = self.adamw.average_decay;
        if !(0.0..1.0).contains(&d) {
            return Err(Error::Config(format!("--average must be in [0, 1) (0: no averaging), got {d}")));
        }
        if self.eval_every == 0 || self.checkpoint_every == 0 {
            return Err(Error::Config("--eval-every and --checkpoint-every must be at least 1".into()));
        }
        if let Some(m) = self.max_minutes
            && !(m >= 0.0 && m.is_finite())
        {
            return Err(Error::Config(format!("--minutes must be a finite number ≥ 0, got {m}")));
        }
        Ok(())
    }
}

/// One line of the training log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogEntry {
    /// Optimizer steps done.
    pub step: u64,
    /// Mean training loss (nats per token) since the previous entry.
    pub train_nats: f64,
    /// Validation NLL in nats per token.
    pub val_nats: f64,
    /// Learning rate of the last step.
    pub lr: f64,
    /// Training seconds so far, over all runs.
    pub seconds: f64,
}

/// Everything about a run that changes as it trains (saved in every checkpoint).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimizer steps done.
    pub step: u64,
    /// Tokens that counted in the loss so far.
    pub tokens_seen: u64,
    /// The generator that draws training batches: saving it saves the data position.
    pub rng: Rng,
    /// Best validation NLL so far (nats per token).
    pub best_val_nats: Option<f64>,
    /// Training seconds so far, over all runs.
    pub seconds: f64,
    /// The log: one entry per evaluation.
    pub history: Vec<LogEntry>,
}

impl TrainState {
    /// The state before the first step.
    pub fn new(seed: u64) -> Self {
        TrainState {
            step: 0,
            tokens_seen: 0,
            rng: Rng::derived(seed, "data"),
            best_val_nats: None,
            seconds: 0.0,
            history: vec![],
        }
    }
}

/// What the loop reports as it goes.
#[derive(Debug, Clone)]
pub enum Event {
    /// A step finished.
    Step {
        /// Steps done.
        step: u64,
        /// Steps the run trains for in all.
        max_steps: u64,
        /// Its loss, nats per token.
        loss: f64,
        /// Its learning rate.
        lr: f64,
        /// Gradient norm before clipping.
        grad_norm: f64,
        /// Counted tokens per second over this run.
        tokens_per_second: f64,
    },
    /// A validation pass finished.
    Eval(LogEntry),
    /// A checkpoint was written.
    Saved {
        /// At this step.
        step: u64,
    },
}

/// Why training stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Stop {
    /// `max_steps` reached.
    Steps,
    /// `max_minutes` reached.
    Time,
    /// Interrupted (Ctrl-C).
    Interrupted,
}

/// The mean NLL of `batch` (the training loss) and its gradients, data-parallel: the rows are
/// split into up to `threads` shards of consecutive rows, each shard's forward and backward
/// runs on its own thread, and the gradients are added in shard order. The result depends
/// only on the number of shards, so a run is deterministic for a given `--threads`.
pub fn loss_and_grads<M: Autoregressive + Sync>(model: &M, batch: &Batch, threads: usize) -> Result<(f64, GradStore)> {
    crate::keep_freed_memory();
    let rows = batch.tokens.dim(0)?;
    let shards = threads.clamp(1, rows.max(1));
    let count = batch.mask.sum_all()?.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?.max(1.0);
    // Each shard's share of the mean: its summed NLL over the whole batch's count.
    let shard = |start: usize, len: usize| -> Result<(f64, GradStore)> {
        let (sum, _) = masked_nll_sum(model, &batch.rows(start, len)?)?;
        let loss = (sum / count)?;
        let grads = loss.backward()?;
        Ok((loss.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?, grads))
    };
    if shards == 1 {
        return shard(0, rows);
    }
    let bounds = shard_bounds(rows, shards);
    let results: Vec<Result<(f64, GradStore)>> = std::thread::scope(|scope| {
        let handles: Vec<_> = bounds.iter().map(|&(s, n)| scope.spawn(move || shard(s, n))).collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(Error::Config("a training thread panicked".into()))))
            .collect()
    });
    let mut results = results.into_iter();
    let (mut loss, mut grads) = results.next().expect("invariant: at least one shard")?;
    for r in results {
        let (l, g) = r?;
        loss += l;
        for id in g.get_ids() {
            let add = g.get_id(*id).expect("invariant: listed id");
            let sum = match grads.get_id(*id) {
                Some(acc) => (acc + add)?,
                None => add.clone(),
            };
            grads.insert_id(*id, sum);
        }
    }
    Ok((loss, grads))
}

/// The summed NLL (nats) of `model` over `batches`, and the number of counted positions.
pub fn nll_sum<M: Autoregressive + Sync>(model: &M, batches: &[Batch]) -> Result<(f64, f64)> {
    let per_batch = in_parallel(batches, rayon::current_num_threads(), |b| -> Result<(f64, f64)> {
        let (s, c) = masked_nll_sum(model, b)?;
        Ok((s.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?, c))
    });
    let (mut sum, mut count) = (0.0, 0.0);
    for r in per_batch {
        let (s, c) = r?;
        sum += s;
        count += c;
    }
    Ok((sum, count))
}

/// `(start, len)` of `shards` runs of consecutive rows covering `rows`, as even as they can be.
pub fn shard_bounds(rows: usize, shards: usize) -> Vec<(usize, usize)> {
    (0..shards).map(|i| (i * rows / shards, (i + 1) * rows / shards - i * rows / shards)).collect()
}

/// `f` of every item, on up to `threads` threads (item i on thread i mod threads), the results
/// in the items' order: for evaluation, whose fused operations run on one thread each, as the
/// trainer's shards do.
pub fn in_parallel<T: Sync, R: Send>(items: &[T], threads: usize, f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let threads = threads.clamp(1, items.len().max(1));
    if threads == 1 {
        return items.iter().map(&f).collect();
    }
    let f = &f;
    let mut results: Vec<(usize, R)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                scope.spawn(move || {
                    items.iter().enumerate().skip(t).step_by(threads).map(|(i, item)| (i, f(item))).collect::<Vec<_>>()
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e))).collect()
    });
    results.sort_by_key(|&(i, _)| i);
    results.into_iter().map(|(_, r)| r).collect()
}

/// The mean NLL (nats per token) of `model` over `batches`.
pub fn evaluate<M: Autoregressive + Sync>(model: &M, batches: &[Batch]) -> Result<f64> {
    let (sum, count) = nll_sum(model, batches)?;
    Ok(sum / count.max(1.0))
}

/// Trains `model` (whose parameters `opt` updates) until a stop condition holds. `save` writes
/// a checkpoint of the current state; `stop` is raised from outside (Ctrl-C). When the
/// optimizer averages the weights, validation and `save` see the average in the parameters
/// (the weights a checkpoint keeps), and the raw weights are in the optimizer's state.
#[allow(clippy::too_many_arguments)] // each is a different collaborator; a struct would only rename them
pub fn train<M: Autoregressive + Sync>(
    model: &mut M,
    opt: &mut AdamW,
    data: &mut dyn BatchSource,
    cfg: &TrainConfig,
    state: &mut TrainState,
    save: &mut dyn FnMut(&TrainState, &AdamW) -> Result<()>,
    observe: &mut dyn FnMut(Event),
    stop: &AtomicBool,
) -> Result<Stop> {
    cfg.validate()?;
    if cfg.dropout > 0.0 && !model.has_dropout() {
        return Err(Error::Config("this model has no dropout: leave out --dropout".into()));
    }
    let val = data.val_batches()?;
    let started = Instant::now();
    let seconds_before = state.seconds;
    let tokens_before = state.tokens_seen;
    let (mut loss_sum, mut loss_steps, mut lr) = (0.0, 0u64, cfg.lr_at(state.step));
    let mut evaluated_at = None;
    let why = loop {
        // stop?
        if state.step >= cfg.max_steps {
            break Stop::Steps;
        }
        if stop.load(Ordering::SeqCst) {
            break Stop::Interrupted;
        }
        if cfg.max_minutes.is_some_and(|m| started.elapsed().as_secs_f64() >= m * 60.0) {
            break Stop::Time;
        }
        // learning rate
        lr = cfg.lr_at(state.step);
        // forward, backward (models with several connectivities take them in turn)
        model.select_connectivity((state.step % model.connectivities() as u64) as usize);
        let mut batch = data.train_batch(&mut state.rng)?;
        if cfg.dropout > 0.0 {
            // Each step's masks from its number: a resumed run draws the same ones.
            let seed = crate::rng::hash64(state.step ^ 0x6472_6f70_6f75_7400);
            batch.dropout = Some(Dropout { rate: cfg.dropout, seed, first: 0 });
        }
        let (loss, grads) = loss_and_grads(&*model, &batch, rayon::current_num_threads())?;
        if !loss.is_finite() {
            return Err(Error::Config(format!("the loss became {loss} at step {}: lower --lr", state.step + 1)));
        }
        // clip, step
        let grad_norm = opt.step(&grads, lr)?;
        state.step += 1;
        state.tokens_seen += batch.counted_positions()? as u64;
        state.seconds = seconds_before + started.elapsed().as_secs_f64();
        loss_sum += loss;
        loss_steps += 1;
        let tokens_per_second = (state.tokens_seen - tokens_before) as f64 / started.elapsed().as_secs_f64().max(1e-9);
        observe(Event::Step { step: state.step, max_steps: cfg.max_steps, loss, lr, grad_norm, tokens_per_second });
        // evaluate, checkpoint
        // (with the average of the weights in place, when the optimizer keeps one)
        if state.step.is_multiple_of(cfg.eval_every) {
            opt.averaged(|| log_eval(model, &val, state, lr, &mut loss_sum, &mut loss_steps, observe))?;
            evaluated_at = Some(state.step);
        }
        if state.step.is_multiple_of(cfg.checkpoint_every) {
            opt.averaged(|| save(state, opt))?;
            observe(Event::Saved { step: state.step });
        }
    };
    // A final evaluation and checkpoint, unless this very step already had them.
    if evaluated_at != Some(state.step) && loss_steps > 0 {
        opt.averaged(|| log_eval(model, &val, state, lr, &mut loss_sum, &mut loss_steps, observe))?;
    }
    opt.averaged(|| save(state, opt))?;
    observe(Event::Saved { step: state.step });
    Ok(why)
}

fn log_eval<M: Autoregressive + Sync>(
    model: &mut M,
    val: &[Batch],
    state: &mut TrainState,
    lr: f64,
    loss_sum: &mut f64,
    loss_steps: &mut u64,
    observe: &mut dyn FnMut(Event),
) -> Result<()> {
    model.select_connectivity(0);
    let val_nats = evaluate(&*model, val)?;
    let entry = LogEntry {
        step: state.step,
        train_nats: *loss_sum / (*loss_steps).max(1) as f64,
        val_nats,
        lr,
        seconds: state.seconds,
    };
    (*loss_sum, *loss_steps) = (0.0, 0);
    state.best_val_nats = Some(state.best_val_nats.map_or(val_nats, |b| b.min(val_nats)));
    state.history.push(entry.clone());
    observe(Event::Eval(entry));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn learning_rate_warms_up_decays_and_floors() {
        let cfg = TrainConfig { lr: 1.0, min_lr: 0.1, warmup_steps: 10, decay_steps: 110, ..Default::default() };
        assert!((cfg.lr_at(0) - 0.1).abs() < 1e-12);
        assert!((cfg.lr_at(9) - 1.0).abs() < 1e-12);
        assert!((cfg.lr_at(10) - 1.0).abs() < 1e-12);
        assert!((cfg.lr_at(60) - 0.55).abs() < 1e-12, "halfway down the cosine");
        assert!((cfg.lr_at(110) - 0.1).abs() < 1e-12);
        assert!((cfg.lr_at(1_000) - 0.1).abs() < 1e-12);
        for s in 10..110 {
            assert!(cfg.lr_at(s + 1) <= cfg.lr_at(s));
        }
    }
}
