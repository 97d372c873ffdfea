//! The error type of checkpoint, config, tokenizer and GGUF handling.
//!
//! Every variant names the file it is about and, where there is one, the tensor or config field, so
//! the message that reaches a user says what to look at.

use std::path::PathBuf;

/// What went wrong reading or writing a model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing a file failed. (The I/O error is part of this message rather than a
    /// separate `source`, so error chains print it once.)
    #[error("{path}: {cause}")]
    Io { path: PathBuf, cause: std::io::Error },

    /// A safetensors or GGUF file is shorter than its own header says it must be.
    #[error("{path}: truncated: {detail}")]
    Truncated { path: PathBuf, detail: String },

    /// A safetensors header (or index file) or a GGUF header is not what the format says.
    #[error("{path}: malformed header: {detail}")]
    BadHeader { path: PathBuf, detail: String },

    /// A tensor's entry in a header is inconsistent with itself or the file.
    #[error("{path}: tensor {tensor}: {detail}")]
    BadTensor { path: PathBuf, tensor: String, detail: String },

    /// A tensor the architecture needs is in no file of the checkpoint.
    #[error("{path}: tensor {tensor} is missing{hint}")]
    MissingTensor { path: PathBuf, tensor: String, hint: String },

    /// A tensor given to the checkpoint writer is not in the layout it was created with.
    #[error("{path}: tensor {tensor} is not part of this checkpoint's layout")]
    UnknownTensor { path: PathBuf, tensor: String },

    /// A tensor was given to the checkpoint writer a second time (or while its first write runs).
    #[error("{path}: tensor {tensor} was written twice")]
    TensorWrittenTwice { path: PathBuf, tensor: String },

    /// A tensor's shape disagrees with what config.json implies.
    #[error("{path}: tensor {tensor}: shape {got:?} does not match config.json, which implies {expected:?}")]
    ShapeMismatch { path: PathBuf, tensor: String, expected: Vec<usize>, got: Vec<usize> },

    /// A tensor's dtype disagrees with config.json's `torch_dtype`, or is not a float type.
    #[error("{path}: tensor {tensor}: dtype {got}, expected {expected}")]
    DTypeMismatch { path: PathBuf, tensor: String, expected: String, got: String },

    /// config.json lacks a field or has a bad value in it.
    #[error("{path}: field `{field}`: {detail}")]
    ConfigField { path: PathBuf, field: String, detail: String },

    /// config.json names an architecture we have no descriptor for.
    #[error("{path}: model_type `{model_type}` is not supported (supported: {supported})")]
    UnsupportedArchitecture { path: PathBuf, model_type: String, supported: String },

    /// A GGUF metadata key is missing, has the wrong type, or holds a value we cannot use.
    #[error("{path}: metadata key `{key}`: {detail}")]
    GgufKey { path: PathBuf, key: String, detail: String },

    /// A GGUF file's `general.architecture` has no importer.
    #[error("{path}: general.architecture `{architecture}` is not supported (supported: {supported})")]
    UnsupportedGgufArchitecture { path: PathBuf, architecture: String, supported: String },

    /// A linear's shape does not split into quantization groups (or into the 8 columns an int32
    /// packs).
    #[error("tensor {tensor}: weight {shape:?} cannot be quantized in groups of {group_size}: its input features must be a multiple of the group size and its output features of 8{hint}")]
    NotQuantizable { tensor: String, shape: [usize; 2], group_size: usize, hint: String },

    /// tokenizer.json could not be loaded or used.
    #[error("{path}: tokenizer: {detail}")]
    Tokenizer { path: PathBuf, detail: String },

    /// A tensor operation on loaded weights failed (for example, dtype conversion).
    #[error(transparent)]
    Kernel(#[from] awq_kernels::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |cause| Error::Io { path, cause }
    }

    /// Tensor `tensor` of `path` holds a NaN or an infinity (every weight read is checked).
    pub(crate) fn non_finite(path: impl Into<PathBuf>, tensor: &str) -> Error {
        Error::BadTensor { path: path.into(), tensor: tensor.into(), detail: "contains NaN or infinite values".into() }
    }
}

impl Error {
    /// Whether this is a fault of the machine that hit it rather than of the files it read: a
    /// device error, or an I/O error (the coordinator could open the checkpoint; a worker that
    /// cannot read it has a broken mount or disk). Everything else names a bad file or field.
    pub fn is_fault(&self) -> bool {
        match self {
            Error::Io { .. } => true,
            Error::Kernel(e) => e.is_fault(),
            _ => false,
        }
    }
}
