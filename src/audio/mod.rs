//! Audio in and out: WAV files, resampling, μ-law coding, mel features (and `.npy` files)
//! and signal measurements.
//! No tensors here: everything is plain `f32` samples or `u8` codes.

pub mod analysis;
pub mod distortion;
pub mod griffin_lim;
pub mod mel;
pub mod mulaw;
pub mod npy;
pub mod output;
pub mod resample;
pub mod spectrogram;
pub mod wav;
