//! Progress bars (indicatif, on stderr) for the library's [`Reporter`].

use indicatif::{ProgressBar, ProgressStyle};
use wavegen::core::train::Event;
use wavegen::tasks::Reporter;

/// Draws one bar per phase and a training bar with loss and throughput.
pub struct Bars {
    bar: Option<(String, ProgressBar)>,
    train_bar: Option<ProgressBar>,
    quiet: bool,
    /// When stderr is not a terminal (a run in the background, its output in a log), bars are
    /// hidden: a plain progress line is written instead, at most this often.
    plain_every: Option<std::time::Duration>,
    plain_last: Option<std::time::Instant>,
}

impl Bars {
    /// A reporter; `quiet` hides notes and bars (for `--json`).
    pub fn new(quiet: bool) -> Self {
        use std::io::IsTerminal;
        let plain_every = (!std::io::stderr().is_terminal()).then(|| std::time::Duration::from_secs(60));
        Bars { bar: None, train_bar: None, quiet, plain_every, plain_last: None }
    }

    /// A plain progress line for a log, if one is due: `{what} {done}/{total}`.
    fn plain_progress(&mut self, what: &str, done: u64, total: u64) {
        let Some(every) = self.plain_every else { return };
        let now = std::time::Instant::now();
        let last = *self.plain_last.get_or_insert(now);
        if now.duration_since(last) >= every {
            self.plain_last = Some(now);
            eprintln!("{what} {done}/{total}");
        }
    }

    fn println(&self, line: &str) {
        match (&self.train_bar, &self.bar) {
            (Some(b), _) | (None, Some((_, b))) if !b.is_hidden() => b.println(line),
            _ => eprintln!("{line}"),
        }
    }

    /// Removes any bar.
    pub fn finish(&mut self) {
        if let Some((_, b)) = self.bar.take() {
            b.finish_and_clear();
        }
        if let Some(b) = self.train_bar.take() {
            b.finish();
        }
    }
}

impl Reporter for Bars {
    fn note(&mut self, message: &str) {
        if !self.quiet {
            self.println(message);
        }
    }

    fn progress(&mut self, phase: &str, done: u64, total: u64) {
        if self.quiet {
            return;
        }
        self.plain_progress(phase, done, total);
        if self.bar.as_ref().is_none_or(|(p, _)| p != phase) {
            if let Some((_, b)) = self.bar.take() {
                b.finish_and_clear();
            }
            let b = ProgressBar::new(total).with_prefix(phase.to_string());
            b.set_style(
                ProgressStyle::with_template(if phase.starts_with("downloading") {
                    "{prefix:>10} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}"
                } else {
                    "{prefix:>10} [{bar:30}] {pos}/{len} {per_sec} eta {eta}"
                })
                .expect("invariant: valid template")
                .progress_chars("=> "),
            );
            self.bar = Some((phase.to_string(), b));
        }
        let (_, b) = self.bar.as_ref().expect("invariant: just set");
        b.set_position(done);
        if done >= total {
            b.finish_and_clear();
            self.bar = None;
        }
    }

    fn live(&mut self, line: &str) {
        use std::io::{IsTerminal, Write};
        if !self.quiet && std::io::stderr().is_terminal() {
            eprint!("\r{line}  ");
            let _ = std::io::stderr().flush();
        }
    }

    fn train_event(&mut self, event: &Event) {
        if self.quiet {
            return;
        }
        let bar = self.train_bar.get_or_insert_with(|| {
            let b = ProgressBar::new(0).with_prefix("training");
            b.set_style(
                ProgressStyle::with_template("{prefix:>10} [{bar:30}] {pos}/{len} {msg} eta {eta}")
                    .expect("invariant: valid template")
                    .progress_chars("=> "),
            );
            b
        });
        match event {
            Event::Step { step, max_steps, loss, lr, tokens_per_second, .. } => {
                bar.set_length(*max_steps);
                bar.set_position(*step);
                let message = format!(
                    "loss {:.3} bits  lr {lr:.1e}  {:.0} samples/s",
                    loss / std::f64::consts::LN_2,
                    tokens_per_second
                );
                bar.set_message(message.clone());
                self.plain_progress(&format!("training {message}  step"), *step, *max_steps);
            }
            Event::Eval(e) => {
                let line = format!(
                    "step {:>6}  train {:.4} bits/sample  val {:.4} bits/sample  ({:.0} s)",
                    e.step,
                    e.train_nats / std::f64::consts::LN_2,
                    e.val_nats / std::f64::consts::LN_2,
                    e.seconds
                );
                if bar.is_hidden() { eprintln!("{line}") } else { bar.println(line) }
            }
            Event::Saved { .. } => {}
        }
    }
}
