//! The library's error type. Every variant names the input it is about (a file, a tensor, a
//! setting) and, where one exists, what to do about it; the CLI prints the message as is.

use std::path::PathBuf;

/// Errors from the wavegen library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },

    /// A WAV file could not be decoded.
    #[error("{path}: not a readable WAV file ({reason}); re-export it as PCM or float WAV, or remove it")]
    BadWav {
        /// The file.
        path: PathBuf,
        /// What was wrong with it.
        reason: String,
    },

    /// A folder held no usable audio.
    #[error("{path}: {reason}")]
    NoAudio {
        /// The folder.
        path: PathBuf,
        /// Why nothing could be used.
        reason: String,
    },

    /// A checkpoint is missing, incomplete or does not fit the model it describes.
    #[error("checkpoint {path}: {reason}")]
    Checkpoint {
        /// The checkpoint directory or file.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },

    /// A dataset file is malformed (bad magic number, wrong length, ...).
    #[error("dataset {path}: {reason}")]
    Dataset {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },

    /// A setting is out of range or inconsistent with another.
    #[error("invalid setting: {0}")]
    Config(String),

    /// An audio output device could not be found or opened.
    #[error("audio output: {0}")]
    Audio(String),

    /// A tensor operation failed (a shape bug, or an unsupported operation).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    /// JSON could not be written or parsed.
    #[error("{path}: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        source: serde_json::Error,
    },
}

/// The library's result type.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }

    /// A checkpoint error on `path`.
    pub fn checkpoint(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::Checkpoint { path: path.into(), reason: reason.into() }
    }
}
