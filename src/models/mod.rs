//! The models of the core, one file each. [`ModelConfig`] names a model and its settings in a
//! checkpoint's `config.json`.

use serde::{Deserialize, Serialize};

pub mod wavenet;

/// Which model a checkpoint holds, with its hyper-parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum ModelConfig {
    /// WaveNet over μ-law codes.
    Wavenet(wavenet::Config),
}
