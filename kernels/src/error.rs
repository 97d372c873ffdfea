//! The error type of every kernel call.

use crate::DType;

/// What went wrong in a kernel call. Variants hold facts (op, shapes, dtypes), not formatted text.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Two operands (or an operand and a parameter) disagree about a dimension.
    #[error("{op}: shape mismatch: {detail}")]
    Shape { op: &'static str, detail: String },

    /// A buffer's length does not match the number of elements its shape implies.
    #[error("tensor of shape {shape:?} needs {expected} elements, got {got}")]
    ElementCount { shape: Vec<usize>, expected: usize, got: usize },

    /// An op was asked for a dtype it does not support.
    #[error("{op}: dtype {dtype} is not supported here")]
    DType { op: &'static str, dtype: DType },

    /// An index (token id, row) points outside its table.
    #[error("{op}: index {index} is out of range for {len} rows")]
    Index { op: &'static str, index: usize, len: usize },

    /// A CUDA device was requested from a build or machine that cannot provide one.
    #[error("CUDA device {ordinal} requested, but {reason}")]
    CudaUnavailable { ordinal: usize, reason: &'static str },

    /// A device string such as `cuda:0` could not be parsed.
    #[error("unknown device '{0}' (expected 'cpu' or 'cuda:N')")]
    BadDevice(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
