//! Models on disk: config.json, architecture descriptors, checkpoints and tokenizers.
//!
//! - [`ModelConfig`]: config.json parsed and checked, errors naming the field.
//! - [`arch`]: one [`arch::ArchDescriptor`] per architecture (tensor names, block layout, AWQ scaling
//!   groups, tensor-parallel splits), looked up by `model_type`.
//! - [`safetensors`]: the file format, memory-mapped and checked before any tensor is read.
//! - [`manifest`]: every tensor a checkpoint holds, from the architecture and config alone;
//!   [`manifest::AwqManifest`] is the exact content of an AWQ output checkpoint.
//! - [`Checkpoint`]: a checkpoint directory (single or sharded), checked against its config and
//!   read one block at a time.
//! - [`Tokenizer`]: tokenizer.json through the `tokenizers` crate.
//! - [`synthetic`]: small random checkpoints that tests write for themselves.
//! - [`gguf`]: llama.cpp's GGUF files, read, dequantized and imported as checkpoints.
//!
//! This is the only crate that spells Hugging Face tensor names or config.json fields. It does no
//! arithmetic beyond dtype conversion, and knows nothing of jobs, workers or the network.

pub mod arch;
pub mod awq_format;
mod checkpoint;
mod config;
mod error;
pub mod gguf;
pub mod manifest;
pub mod safetensors;
pub mod synthetic;
pub mod writer;
mod tokenizer;

pub use checkpoint::{BlockWeights, Checkpoint, LinearWeights, INDEX_FILE, SINGLE_FILE};
pub use config::{GenerationConfig, LayerType, LayerTypes, ModelConfig, MoeConfig, RopeParams, RopeScaling, SparseRule};
pub use error::{Error, Result};
pub use tokenizer::{Tokenizer, TokenizerConfig, MAX_ADDED_TOKEN_BYTES};
