//! Writing a checkpoint directory atomically: sharded safetensors, index, config and tokenizer files.
//!
//! Everything is written into a temporary folder beside the target (`.OUT.tmp-PID`) and renamed
//! into place only when complete, so an interrupted run never leaves something that looks like a
//! finished checkpoint. Tensors are sorted by name and sharded greedily up to `max_shard_bytes`
//! (Hugging Face's naming: `model.safetensors` when one file suffices, otherwise
//! `model-0000K-of-0000N.safetensors` plus `model.safetensors.index.json`); the same tensors always
//! give the same bytes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde_json::{json, Map, Value};

use crate::checkpoint::{INDEX_FILE, SINGLE_FILE};
use crate::safetensors::{self, RawTensor};
use crate::{Error, Result};

/// Files copied unchanged from the source checkpoint when present.
pub const COPIED_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
];

/// What to do when the output directory exists already.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Overwrite {
    Refuse,
    /// Replace it, once the new one is complete.
    Replace,
}

/// A checkpoint to be written.
pub struct CheckpointOutput {
    pub config: Map<String, Value>,
    pub tensors: Vec<RawTensor>,
    /// Source directory for [`COPIED_FILES`].
    pub copy_from: PathBuf,
    /// Extra files (name, bytes), e.g. a quantization report.
    pub extra_files: Vec<(String, Vec<u8>)>,
}

/// Writes `output` to `out_dir`; see the module docs.
pub fn write_checkpoint(output: CheckpointOutput, out_dir: &Path, max_shard_bytes: u64, overwrite: Overwrite) -> Result<()> {
    let CheckpointOutput { config, tensors, copy_from, extra_files } = output;
    write_atomically(out_dir, overwrite, |dir| {
        write_weights_and_config(&config, tensors, dir, max_shard_bytes)?;
        for name in COPIED_FILES {
            let src = copy_from.join(name);
            if src.exists() {
                std::fs::copy(&src, dir.join(name)).map_err(Error::io(&src))?;
            }
        }
        write_files(dir, &extra_files)
    })
}

/// Writes a checkpoint that has no source directory to copy from (an imported GGUF file): tensors
/// and config.json as [`write_checkpoint`] writes them, and `files` (name, bytes), which carry the
/// tokenizer files; nothing else. Same atomic rename.
pub fn write_generated_checkpoint(
    config: &Map<String, Value>,
    tensors: Vec<RawTensor>,
    files: &[(String, Vec<u8>)],
    out_dir: &Path,
    max_shard_bytes: u64,
    overwrite: Overwrite,
) -> Result<()> {
    write_atomically(out_dir, overwrite, |dir| {
        write_weights_and_config(config, tensors, dir, max_shard_bytes)?;
        write_files(dir, files)
    })
}

/// Runs `fill` on a fresh temporary folder beside `out_dir` and renames it to `out_dir` when it
/// succeeds (removing the folder when it fails).
fn write_atomically(out_dir: &Path, overwrite: Overwrite, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    if out_dir.exists() && overwrite == Overwrite::Refuse {
        return Err(Error::Io {
            path: out_dir.into(),
            cause: std::io::Error::new(std::io::ErrorKind::AlreadyExists, "output directory exists (pass --overwrite to replace it)"),
        });
    }
    let name = out_dir.file_name().ok_or_else(|| Error::Io {
        path: out_dir.into(),
        cause: std::io::Error::new(std::io::ErrorKind::InvalidInput, "output path has no directory name"),
    })?;
    let parent = match out_dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(Error::io(&parent))?;
    let tmp = parent.join(format!(".{}.tmp-{}", name.to_string_lossy(), std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(Error::io(&tmp))?;
    }
    std::fs::create_dir(&tmp).map_err(Error::io(&tmp))?;
    if let Err(e) = fill(&tmp) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if out_dir.exists() {
        let old = parent.join(format!(".{}.old-{}", name.to_string_lossy(), std::process::id()));
        std::fs::rename(out_dir, &old).map_err(Error::io(out_dir))?;
        std::fs::rename(&tmp, out_dir).map_err(Error::io(out_dir))?;
        std::fs::remove_dir_all(&old).map_err(Error::io(&old))?;
    } else {
        std::fs::rename(&tmp, out_dir).map_err(Error::io(out_dir))?;
    }
    Ok(())
}

/// The safetensors file(s), the index when sharded, and config.json.
fn write_weights_and_config(config: &Map<String, Value>, mut tensors: Vec<RawTensor>, dir: &Path, max_shard_bytes: u64) -> Result<()> {
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    let mut shards: Vec<Vec<RawTensor>> = vec![Vec::new()];
    let mut current = 0u64;
    for t in tensors {
        let size = t.data.len() as u64;
        if current > 0 && current + size > max_shard_bytes {
            shards.push(Vec::new());
            current = 0;
        }
        current += size;
        shards.last_mut().expect("at least one shard").push(t);
    }
    let metadata = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    if shards.len() == 1 {
        safetensors::write(&dir.join(SINGLE_FILE), &shards[0], &metadata)?;
    } else {
        let n = shards.len();
        let mut weight_map = BTreeMap::new();
        let mut total_size = 0usize;
        let file_name = |k: usize| format!("model-{:05}-of-{n:05}.safetensors", k + 1);
        for (k, shard) in shards.iter().enumerate() {
            for t in shard {
                weight_map.insert(t.name.clone(), file_name(k));
                total_size += t.data.len();
            }
        }
        // The shards are written (and synced) in parallel: gigabytes each for a large model.
        shards.par_iter().enumerate().try_for_each(|(k, shard)| safetensors::write(&dir.join(file_name(k)), shard, &metadata))?;
        let index = json!({"metadata": {"total_size": total_size}, "weight_map": weight_map});
        write_file(&dir.join(INDEX_FILE), &serde_json::to_vec_pretty(&index).expect("JSON serialises"))?;
    }
    write_file(&dir.join("config.json"), &serde_json::to_vec_pretty(config).expect("JSON serialises"))
}

fn write_files(dir: &Path, files: &[(String, Vec<u8>)]) -> Result<()> {
    for (name, bytes) in files {
        write_file(&dir.join(name), bytes)?;
    }
    Ok(())
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).map_err(Error::io(path))?;
    std::fs::File::open(path).and_then(|f| f.sync_all()).map_err(Error::io(path))
}
