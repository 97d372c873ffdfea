//! Writing a checkpoint directory atomically: sharded safetensors, index, config and tokenizer files.
//!
//! Two pieces, which [`write_checkpoint`] puts together and the coordinator uses on their own to
//! assemble a job's output while the job runs:
//! - [`OutputFolder`]: a temporary folder beside the target (`.OUT.tmp-TAG`), renamed into place
//!   only when complete ([`OutputFolder::commit`]), so an interrupted run never leaves something
//!   that looks like a finished checkpoint. [`write_checkpoint`] tags it with the process id; the
//!   coordinator with the job id, so that a restarted coordinator finds and replaces it.
//! - [`WeightsWriter`]: the safetensors files, laid out before any tensor arrives. From the tensors'
//!   names, dtypes and shapes alone it computes the whole layout: tensors sorted by name, sharded
//!   greedily up to `max_shard_bytes` (Hugging Face's naming: `model.safetensors` when one file
//!   suffices, otherwise `model-0000K-of-0000N.safetensors` plus `model.safetensors.index.json`),
//!   each file's header and each tensor's offset. It creates the files at full length with their
//!   headers, then takes tensors in any order and from any thread, one positioned write each, and
//!   starts their disk writeback at once (`sync_file_range`), so the fsync in
//!   [`WeightsWriter::finish`] mostly waits for data already on its way. `finish` refuses while a
//!   tensor is missing, then syncs and writes the index and config.json.
//!
//! The same tensors always give the same bytes, whatever order they arrive in: each shard is what
//! [`crate::safetensors::serialize`] makes of its tensors (tested).
//!
//! Durable as well as atomic: every file is synced before the rename that publishes it, and the
//! folders whose entries a commit creates or renames are synced too ([`sync_dir`]), so that after a
//! power loss the output is either wholly there or not at all.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};

use rayon::prelude::*;
use serde_json::{json, Map, Value};

use crate::checkpoint::{INDEX_FILE, SINGLE_FILE};
use crate::safetensors::{check_len, header_bytes, RawTensor, TensorSpec};
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
    write_atomically(out_dir, overwrite, |folder| {
        write_weights_and_config(&config, tensors, folder.path(), max_shard_bytes)?;
        folder.copy_source_files(&copy_from)?;
        write_files(folder, &extra_files)
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
    write_atomically(out_dir, overwrite, |folder| {
        write_weights_and_config(config, tensors, folder.path(), max_shard_bytes)?;
        write_files(folder, files)
    })
}

/// Runs `fill` on a fresh [`OutputFolder`] tagged with this process's id and commits it when it
/// succeeds (removing the folder when anything fails).
fn write_atomically(out_dir: &Path, overwrite: Overwrite, fill: impl FnOnce(&OutputFolder) -> Result<()>) -> Result<()> {
    if out_dir.exists() && overwrite == Overwrite::Refuse {
        return Err(output_exists(out_dir));
    }
    let folder = OutputFolder::create(out_dir, &std::process::id().to_string())?;
    if let Err(e) = fill(&folder).and_then(|()| folder.commit(overwrite)) {
        let _ = folder.remove();
        return Err(e);
    }
    Ok(())
}

/// The safetensors file(s), the index when sharded, and config.json: a [`WeightsWriter`] fed all
/// at once.
fn write_weights_and_config(config: &Map<String, Value>, tensors: Vec<RawTensor>, dir: &Path, max_shard_bytes: u64) -> Result<()> {
    let writer = WeightsWriter::create(dir, tensors.iter().map(RawTensor::spec).collect(), max_shard_bytes)?;
    // Written in parallel: gigabytes for a large model.
    tensors.par_iter().try_for_each(|t| writer.write_tensor(&t.name, &t.data))?;
    writer.finish(config)
}

fn write_files(folder: &OutputFolder, files: &[(String, Vec<u8>)]) -> Result<()> {
    for (name, bytes) in files {
        folder.write_file(name, bytes)?;
    }
    Ok(())
}

/// Writes `bytes` to `path` and syncs it.
fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).map_err(Error::io(path))?;
    File::open(path).and_then(|f| f.sync_all()).map_err(Error::io(path))
}

/// Syncs the folder `dir` itself: the names created, renamed or removed in it reach the disk (a
/// synced file whose folder entry was not can vanish after a power loss, and so can a rename).
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(Error::io(dir))
}

/// The folder that holds `path` (`.` for a bare name).
fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Renames `from` to `to` (in one folder) and syncs that folder. Errors name `error_path`.
pub fn rename_durably(from: &Path, to: &Path, error_path: &Path) -> Result<()> {
    std::fs::rename(from, to).map_err(Error::io(error_path))?;
    sync_dir(parent_of(to))
}

fn output_exists(out_dir: &Path) -> Error {
    Error::Io {
        path: out_dir.into(),
        cause: std::io::Error::new(std::io::ErrorKind::AlreadyExists, "output directory exists (pass --overwrite to replace it)"),
    }
}

/// A checkpoint folder being written: `.{name}.tmp-{tag}` beside the output `{parent}/{name}`,
/// renamed to the output by [`OutputFolder::commit`]. See the module docs.
#[derive(Debug)]
pub struct OutputFolder {
    out_dir: PathBuf,
    tmp: PathBuf,
    /// Where a replaced output waits while the new one is renamed in: `.{name}.old-{tag}`.
    old: PathBuf,
}

impl OutputFolder {
    /// The temporary folder [`OutputFolder::create`] makes for `out_dir` and `tag`.
    pub fn temp_path(out_dir: &Path, tag: &str) -> Result<PathBuf> {
        Ok(Self::beside(out_dir, "tmp", tag)?.1)
    }

    /// `(parent, {parent}/.{name}.{what}-{tag})`.
    fn beside(out_dir: &Path, what: &str, tag: &str) -> Result<(PathBuf, PathBuf)> {
        let name = out_dir.file_name().ok_or_else(|| Error::Io {
            path: out_dir.into(),
            cause: std::io::Error::new(std::io::ErrorKind::InvalidInput, "output path has no directory name"),
        })?;
        let parent = match out_dir.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let path = parent.join(format!(".{}.{what}-{tag}", name.to_string_lossy()));
        Ok((parent, path))
    }

    /// Creates an empty temporary folder for `out_dir` (and the output's parent folders), replacing
    /// one of the same tag left by an earlier run, and first finishing a commit of that tag that
    /// was interrupted ([`OutputFolder::recover`]).
    pub fn create(out_dir: &Path, tag: &str) -> Result<OutputFolder> {
        let (parent, tmp) = Self::beside(out_dir, "tmp", tag)?;
        let (_, old) = Self::beside(out_dir, "old", tag)?;
        std::fs::create_dir_all(&parent).map_err(Error::io(&parent))?;
        Self::recover(out_dir, tag)?;
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(Error::io(&tmp))?;
        }
        std::fs::create_dir(&tmp).map_err(Error::io(&tmp))?;
        Ok(OutputFolder { out_dir: out_dir.to_path_buf(), tmp, old })
    }

    /// Undoes what a replacing [`OutputFolder::commit`] of `tag` left when its process died
    /// between its steps: with the replaced output still aside (`.{name}.old-{tag}`) and nothing
    /// at `out_dir`, the replaced output goes back (as a failed rename would have put it); with
    /// the new output already in place, the replaced one is removed. Nothing to do otherwise.
    pub fn recover(out_dir: &Path, tag: &str) -> Result<()> {
        let (_, old) = Self::beside(out_dir, "old", tag)?;
        if !old.exists() {
            return Ok(());
        }
        match out_dir.exists() {
            true => std::fs::remove_dir_all(&old).map_err(Error::io(&old)),
            false => std::fs::rename(&old, out_dir).map_err(Error::io(&old)),
        }
    }

    /// The identity of the temporary folder, which the output keeps once renamed into place: how
    /// a process that restarts after a commit tells its own output from another one
    /// ([`FolderId::of`]).
    pub fn id(&self) -> Result<FolderId> {
        FolderId::of(&self.tmp)?.ok_or_else(|| Error::Io {
            path: self.tmp.clone(),
            cause: std::io::Error::new(std::io::ErrorKind::NotFound, "the temporary output folder is gone"),
        })
    }

    /// The temporary folder, where files go until the commit.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// Writes the file `name` into the folder and syncs it.
    pub fn write_file(&self, name: &str, bytes: &[u8]) -> Result<()> {
        write_file(&self.tmp.join(name), bytes)
    }

    /// Copies those of [`COPIED_FILES`] that `source` holds (the tokenizer files of the model the
    /// checkpoint was made from).
    pub fn copy_source_files(&self, source: &Path) -> Result<()> {
        for name in COPIED_FILES {
            let src = source.join(name);
            if src.exists() {
                std::fs::copy(&src, self.tmp.join(name)).map_err(Error::io(&src))?;
            }
        }
        Ok(())
    }

    /// Renames the folder to the output. An existing output is refused or replaced as `overwrite`
    /// says; a replaced one is moved aside first and removed once the new one is in place (and put
    /// back when the rename fails). The folder must not be used afterwards.
    pub fn commit(&self, overwrite: Overwrite) -> Result<()> {
        let out_dir = &self.out_dir;
        // The files' own entries first, then each rename with the folder it happens in.
        sync_dir(&self.tmp)?;
        if !out_dir.exists() {
            return rename_durably(&self.tmp, out_dir, out_dir);
        }
        if overwrite == Overwrite::Refuse {
            return Err(output_exists(out_dir));
        }
        std::fs::rename(out_dir, &self.old).map_err(Error::io(out_dir))?;
        if let Err(cause) = std::fs::rename(&self.tmp, out_dir) {
            let _ = std::fs::rename(&self.old, out_dir);
            return Err(Error::Io { path: out_dir.clone(), cause });
        }
        sync_dir(parent_of(out_dir))?;
        std::fs::remove_dir_all(&self.old).map_err(Error::io(&self.old))
    }

    /// Removes the folder and everything in it (an output that will not be completed).
    pub fn remove(&self) -> Result<()> {
        std::fs::remove_dir_all(&self.tmp).map_err(Error::io(&self.tmp))
    }
}

/// A folder's identity on its file system (device and inode), which a rename keeps. Written as
/// `DEV:INO`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FolderId {
    pub dev: u64,
    pub ino: u64,
}

impl FolderId {
    /// The identity of the folder at `path`; `None` when nothing is there (a file is not a folder:
    /// an error).
    pub fn of(path: &Path) -> Result<Option<FolderId>> {
        use std::os::unix::fs::MetadataExt;
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.is_dir() => Ok(Some(FolderId { dev: m.dev(), ino: m.ino() })),
            Ok(_) => Err(Error::Io {
                path: path.into(),
                cause: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a directory"),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(cause) => Err(Error::Io { path: path.into(), cause }),
        }
    }

    /// Reads `DEV:INO` back; `None` for anything else.
    pub fn parse(text: &str) -> Option<FolderId> {
        let (dev, ino) = text.split_once(':')?;
        Some(FolderId { dev: dev.parse().ok()?, ino: ino.parse().ok()? })
    }
}

impl std::fmt::Display for FolderId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.dev, self.ino)
    }
}

/// Tensors sorted by name and cut greedily into shards of at most `max_shard_bytes` of data (a
/// larger tensor gets a shard of its own).
fn shard_tensors(mut tensors: Vec<TensorSpec>, max_shard_bytes: u64) -> Vec<Vec<TensorSpec>> {
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    let mut shards: Vec<Vec<TensorSpec>> = vec![Vec::new()];
    let mut current = 0u64;
    for t in tensors {
        let size = t.len_bytes();
        if current > 0 && current + size > max_shard_bytes {
            shards.push(Vec::new());
            current = 0;
        }
        current += size;
        shards.last_mut().expect("at least one shard").push(t);
    }
    shards
}

/// Where a tensor's bytes go; `state` is one of [`EMPTY`], [`WRITING`], [`WRITTEN`].
#[derive(Debug)]
struct Slot {
    spec: TensorSpec,
    shard: usize,
    /// Of its first byte, from the start of the shard file.
    offset: u64,
    state: AtomicU8,
}

const EMPTY: u8 = 0;
const WRITING: u8 = 1;
const WRITTEN: u8 = 2;

#[derive(Debug)]
struct Shard {
    file_name: String,
    path: PathBuf,
    file: File,
}

/// The safetensors files, index and config.json of a checkpoint, laid out before any tensor
/// arrives and filled in any order; see the module docs. Every method takes `&self`: tensors may
/// be written from many threads at once (each goes to its own byte range).
#[derive(Debug)]
pub struct WeightsWriter {
    dir: PathBuf,
    shards: Vec<Shard>,
    /// Sorted by name.
    slots: Vec<Slot>,
}

impl WeightsWriter {
    /// Lays out `tensors` (any order; names must be unique) in shards of at most `max_shard_bytes`
    /// of data and creates the files in `dir`, at their full length, headers written.
    pub fn create(dir: &Path, tensors: Vec<TensorSpec>, max_shard_bytes: u64) -> Result<WeightsWriter> {
        let groups = shard_tensors(tensors, max_shard_bytes);
        let n = groups.len();
        let metadata = BTreeMap::from([("format".to_string(), "pt".to_string())]);
        let (mut shards, mut slots) = (Vec::with_capacity(n), Vec::<Slot>::new());
        for (k, group) in groups.into_iter().enumerate() {
            let file_name = if n == 1 { SINGLE_FILE.to_string() } else { format!("model-{:05}-of-{n:05}.safetensors", k + 1) };
            let path = dir.join(&file_name);
            let header = header_bytes(&group, &metadata);
            let mut offset = header.len() as u64;
            for spec in group {
                if slots.last().is_some_and(|s| s.spec.name == spec.name) {
                    let detail = "listed twice in the checkpoint's layout".to_string();
                    return Err(Error::BadTensor { path, tensor: spec.name, detail });
                }
                let len = spec.len_bytes();
                slots.push(Slot { spec, shard: k, offset, state: AtomicU8::new(EMPTY) });
                offset += len;
            }
            let file = File::create(&path).map_err(Error::io(&path))?;
            file.write_all_at(&header, 0).map_err(Error::io(&path))?;
            file.set_len(offset).map_err(Error::io(&path))?;
            shards.push(Shard { file_name, path, file });
        }
        Ok(WeightsWriter { dir: dir.to_path_buf(), shards, slots })
    }

    fn slot(&self, name: &str) -> Option<&Slot> {
        self.slots.binary_search_by(|s| s.spec.name.as_str().cmp(name)).ok().map(|i| &self.slots[i])
    }

    /// The tensors of the layout, sorted by name.
    pub fn tensors(&self) -> impl Iterator<Item = &TensorSpec> {
        self.slots.iter().map(|s| &s.spec)
    }

    /// Writes tensor `name`'s little-endian bytes into its place and starts their writeback.
    /// Refused, naming the tensor: a name not in the layout, a byte count other than dtype x
    /// shape, and a tensor written before (or being written by another thread). A write that
    /// fails leaves the tensor unwritten, to be written again.
    pub fn write_tensor(&self, name: &str, bytes: &[u8]) -> Result<()> {
        let slot = self.slot(name).ok_or_else(|| Error::UnknownTensor { path: self.dir.clone(), tensor: name.into() })?;
        let shard = &self.shards[slot.shard];
        check_len(&shard.path, &slot.spec, bytes.len())?;
        if slot.state.compare_exchange(EMPTY, WRITING, Ordering::AcqRel, Ordering::Acquire).is_err() {
            return Err(Error::TensorWrittenTwice { path: shard.path.clone(), tensor: name.into() });
        }
        if let Err(cause) = shard.file.write_all_at(bytes, slot.offset) {
            slot.state.store(EMPTY, Ordering::Release);
            return Err(Error::Io { path: shard.path.clone(), cause });
        }
        start_writeback(&shard.file, slot.offset, bytes.len());
        slot.state.store(WRITTEN, Ordering::Release);
        Ok(())
    }

    /// Whether tensor `name` has been written (`false` for a name not in the layout).
    pub fn is_written(&self, name: &str) -> bool {
        self.slot(name).is_some_and(|s| s.state.load(Ordering::Acquire) == WRITTEN)
    }

    /// The tensors not written yet, in name order.
    pub fn missing(&self) -> impl Iterator<Item = &str> {
        self.slots.iter().filter(|s| s.state.load(Ordering::Acquire) != WRITTEN).map(|s| s.spec.name.as_str())
    }

    /// Waits until every shard is on disk (fsync, the shards in parallel).
    pub fn sync(&self) -> Result<()> {
        self.shards.par_iter().try_for_each(|s| s.file.sync_all().map_err(Error::io(&s.path)))
    }

    /// Completes the weights: refuses while a tensor is missing (naming it), syncs the shards, then
    /// writes the index (when sharded) and `config`, both synced.
    pub fn finish(&self, config: &Map<String, Value>) -> Result<()> {
        if let Some(slot) = self.slots.iter().find(|s| s.state.load(Ordering::Acquire) != WRITTEN) {
            return Err(Error::MissingTensor {
                path: self.shards[slot.shard].path.clone(),
                tensor: slot.spec.name.clone(),
                hint: " (it was never written)".into(),
            });
        }
        self.sync()?;
        if self.shards.len() > 1 {
            let weight_map: BTreeMap<&str, &str> =
                self.slots.iter().map(|s| (s.spec.name.as_str(), self.shards[s.shard].file_name.as_str())).collect();
            let total_size: u64 = self.slots.iter().map(|s| s.spec.len_bytes()).sum();
            let index = json!({"metadata": {"total_size": total_size}, "weight_map": weight_map});
            write_file(&self.dir.join(INDEX_FILE), &serde_json::to_vec_pretty(&index).expect("JSON serialises"))?;
        }
        write_file(&self.dir.join("config.json"), &serde_json::to_vec_pretty(config).expect("JSON serialises"))
    }
}

/// Asks the kernel to start writing `len` bytes at `offset` of `file` to disk now, without waiting
/// for them (Linux: `sync_file_range(SYNC_FILE_RANGE_WRITE)`), so the final fsync finds most data
/// on its way. A hint: its result is deliberately ignored, because the fsync in
/// [`WeightsWriter::finish`] reports any failure to write. Elsewhere than Linux it does nothing.
#[cfg(target_os = "linux")]
fn start_writeback(file: &File, offset: u64, len: usize) {
    use std::os::fd::AsRawFd;
    // SAFETY: a system call on a descriptor that `file` keeps open for the call; no memory is
    // passed to the kernel.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), offset as i64 as _, len as i64 as _, libc::SYNC_FILE_RANGE_WRITE);
    }
}

#[cfg(not(target_os = "linux"))]
fn start_writeback(_file: &File, _offset: u64, _len: usize) {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::safetensors::{self, StDtype};
    use awq_kernels::rng::SplitMix64;

    #[test]
    fn a_durable_rename_moves_the_file_and_names_what_is_missing() {
        let dir = tempfile::tempdir().unwrap();
        let (from, to) = (dir.path().join("a.partial"), dir.path().join("a"));
        std::fs::write(&from, b"staged").unwrap();
        rename_durably(&from, &to, &to).unwrap();
        assert_eq!(std::fs::read(&to).unwrap(), b"staged");
        assert!(!from.exists());
        let err = rename_durably(&from, &to, &to).unwrap_err().to_string();
        assert!(err.contains(&*to.to_string_lossy()), "{err}");
        let gone = dir.path().join("gone");
        assert!(sync_dir(&gone).unwrap_err().to_string().contains("gone"));
    }

    /// Tensors of several dtypes and sizes with random bytes, in no particular name order.
    fn sample_tensors() -> Vec<RawTensor> {
        let mut rng = SplitMix64::new(5);
        let shapes: [(&str, StDtype, &[usize]); 9] = [
            ("model.layers.1.mlp.up_proj.qweight", StDtype::I32, &[64, 8]),
            ("model.embed_tokens.weight", StDtype::F16, &[100, 64]),
            ("model.layers.0.input_layernorm.weight", StDtype::F16, &[64]),
            ("model.layers.10.mlp.up_proj.scales", StDtype::F16, &[2, 64]),
            ("lm_head.weight", StDtype::F16, &[100, 64]),
            ("model.layers.0.self_attn.q_proj.qzeros", StDtype::I32, &[2, 8]),
            ("model.norm.weight", StDtype::F32, &[64]),
            ("model.layers.2.odd", StDtype::I8, &[3]),
            ("model.layers.2.self_attn.q_proj.bias", StDtype::BF16, &[5]),
        ];
        shapes
            .iter()
            .map(|&(name, dtype, shape)| {
                let n = shape.iter().product::<usize>() * dtype.size_bytes();
                let data = (0..n).map(|_| (rng.next_u64() >> 56) as u8).collect();
                RawTensor { name: name.into(), dtype, shape: shape.to_vec(), data }
            })
            .collect()
    }

    /// The files a checkpoint of `tensors` must hold, computed the old way: sorted, cut greedily,
    /// each shard through `safetensors::serialize`, plus the index when sharded.
    fn expected_files(tensors: &[RawTensor], max_shard_bytes: u64) -> BTreeMap<String, Vec<u8>> {
        let mut sorted = tensors.to_vec();
        sorted.sort_by(|a, b| a.name.cmp(&b.name));
        let mut shards: Vec<Vec<RawTensor>> = vec![Vec::new()];
        let mut current = 0;
        for t in sorted {
            if current > 0 && current + t.data.len() as u64 > max_shard_bytes {
                shards.push(Vec::new());
                current = 0;
            }
            current += t.data.len() as u64;
            shards.last_mut().unwrap().push(t);
        }
        let metadata = BTreeMap::from([("format".to_string(), "pt".to_string())]);
        let n = shards.len();
        let name = |k: usize| if n == 1 { SINGLE_FILE.to_string() } else { format!("model-{:05}-of-{n:05}.safetensors", k + 1) };
        let mut files: BTreeMap<String, Vec<u8>> =
            shards.iter().enumerate().map(|(k, s)| (name(k), safetensors::serialize(Path::new("x"), s, &metadata).unwrap())).collect();
        if n > 1 {
            let weight_map: BTreeMap<&str, String> =
                shards.iter().enumerate().flat_map(|(k, s)| s.iter().map(move |t| (t.name.as_str(), name(k)))).collect();
            let total: usize = tensors.iter().map(|t| t.data.len()).sum();
            let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
            files.insert(INDEX_FILE.into(), serde_json::to_vec_pretty(&index).unwrap());
        }
        files
    }

    fn files_in(dir: &Path) -> BTreeMap<String, Vec<u8>> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap())
            .map(|e| (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).unwrap()))
            .collect()
    }

    fn config() -> Map<String, Value> {
        json!({"model_type": "llama", "hidden_size": 64}).as_object().unwrap().clone()
    }

    #[test]
    fn tensors_in_any_order_give_the_bytes_serialize_gives() {
        let tensors = sample_tensors();
        // One file; several shards; one tensor per shard.
        for (max_shard_bytes, n_shards) in [(u64::MAX, 1), (13_000, 3), (1, tensors.len())] {
            let mut want = expected_files(&tensors, max_shard_bytes);
            assert_eq!(want.keys().filter(|k| k.ends_with(".safetensors")).count(), n_shards);
            want.insert("config.json".into(), serde_json::to_vec_pretty(&config()).unwrap());

            // All at once (what write_checkpoint does).
            let all_at_once = tempfile::tempdir().unwrap();
            write_weights_and_config(&config(), tensors.clone(), all_at_once.path(), max_shard_bytes).unwrap();
            assert_eq!(files_in(all_at_once.path()), want, "all at once, {n_shards} shards");

            // Laid out from the specs, then fed in reverse from several threads.
            let streamed = tempfile::tempdir().unwrap();
            let specs = tensors.iter().rev().map(RawTensor::spec).collect();
            let writer = WeightsWriter::create(streamed.path(), specs, max_shard_bytes).unwrap();
            assert_eq!(writer.missing().count(), tensors.len());
            tensors.par_iter().rev().for_each(|t| writer.write_tensor(&t.name, &t.data).unwrap());
            assert!(writer.is_written("lm_head.weight"));
            writer.finish(&config()).unwrap();
            assert_eq!(files_in(streamed.path()), want, "streamed, {n_shards} shards");
        }
    }

    #[test]
    fn unknown_wrong_length_twice_and_missing_tensors_are_refused_by_name() {
        let tensors = sample_tensors();
        let dir = tempfile::tempdir().unwrap();
        let writer = WeightsWriter::create(dir.path(), tensors.iter().map(RawTensor::spec).collect(), 13_000).unwrap();
        let norm = tensors.iter().find(|t| t.name == "model.norm.weight").unwrap();

        let err = writer.write_tensor("model.nope", &[0; 4]).unwrap_err();
        assert!(matches!(&err, Error::UnknownTensor { tensor, .. } if tensor == "model.nope"), "{err}");
        let err = writer.write_tensor(&norm.name, &norm.data[1..]).unwrap_err();
        assert!(matches!(&err, Error::BadTensor { tensor, .. } if *tensor == norm.name), "{err}");
        assert!(err.to_string().contains("255 bytes given for F32 [64] (256 bytes)"), "{err}");
        assert!(!writer.is_written(&norm.name), "a refused write writes nothing");

        writer.write_tensor(&norm.name, &norm.data).unwrap();
        let err = writer.write_tensor(&norm.name, &norm.data).unwrap_err();
        assert!(matches!(&err, Error::TensorWrittenTwice { tensor, .. } if *tensor == norm.name), "{err}");

        // The first missing tensor in name order is named.
        let err = writer.finish(&config()).unwrap_err();
        assert!(matches!(&err, Error::MissingTensor { tensor, .. } if tensor == "lm_head.weight"), "{err}");
        assert!(!dir.path().join("config.json").exists());

        let twice = vec![norm.spec(), norm.spec()];
        let err = WeightsWriter::create(dir.path(), twice, 1 << 20).unwrap_err();
        assert!(matches!(&err, Error::BadTensor { tensor, .. } if *tensor == norm.name), "{err}");
    }

    #[test]
    fn output_folder_refuses_or_replaces_and_is_removed_on_failure() {
        let parent = tempfile::tempdir().unwrap();
        let out = parent.path().join("out");
        let entries = || {
            let mut names: Vec<String> =
                std::fs::read_dir(parent.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
            names.sort();
            names
        };
        let write = |marker: &str, overwrite| {
            write_atomically(&out, overwrite, |folder| folder.write_file("marker", marker.as_bytes()))
        };
        write("first", Overwrite::Refuse).unwrap();
        let err = write("second", Overwrite::Refuse).unwrap_err();
        assert!(err.to_string().contains("output directory exists"), "{err}");
        write("second", Overwrite::Replace).unwrap();
        assert_eq!(std::fs::read_to_string(out.join("marker")).unwrap(), "second");
        assert_eq!(entries(), ["out"]);

        // A failing fill leaves the output as it was and no temporary folder.
        let failed = write_atomically(&out, Overwrite::Replace, |folder| {
            folder.write_file("marker", b"third")?;
            Err(Error::Io { path: folder.path().into(), cause: std::io::Error::other("fill failed") })
        });
        assert!(failed.is_err());
        assert_eq!(std::fs::read_to_string(out.join("marker")).unwrap(), "second");
        assert_eq!(entries(), ["out"]);

        // A folder of the same tag left behind is replaced; commit refuses an output created since.
        let stale = OutputFolder::create(&out.with_file_name("new"), "job1").unwrap();
        stale.write_file("leftover", b"x").unwrap();
        let folder = OutputFolder::create(&out.with_file_name("new"), "job1").unwrap();
        assert_eq!(folder.path(), OutputFolder::temp_path(&out.with_file_name("new"), "job1").unwrap());
        assert_eq!(folder.path().file_name().unwrap(), ".new.tmp-job1");
        assert!(!folder.path().join("leftover").exists());
        std::fs::create_dir(out.with_file_name("new")).unwrap();
        let err = folder.commit(Overwrite::Refuse).unwrap_err();
        assert!(err.to_string().contains("output directory exists"), "{err}");
        folder.remove().unwrap();
        assert_eq!(entries(), ["new", "out"]);
    }

    /// A replacing commit whose process died between its two renames (the old output aside,
    /// nothing in place) or after them (the old output not yet removed): the next folder of the
    /// same tag puts the old output back, or removes it; the output keeps its folder's identity.
    #[test]
    fn regress_a_replacing_commit_interrupted_between_its_renames() {
        let parent = tempfile::tempdir().unwrap();
        let out = parent.path().join("out");
        let old = parent.path().join(".out.old-job1");
        let entries = || {
            let names = std::fs::read_dir(parent.path()).unwrap();
            let mut names: Vec<String> = names.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
            names.sort();
            names
        };
        // Died after moving the old output aside: it goes back before anything else happens.
        std::fs::create_dir(&old).unwrap();
        std::fs::write(old.join("marker"), "old").unwrap();
        let folder = OutputFolder::create(&out, "job1").unwrap();
        assert_eq!(std::fs::read_to_string(out.join("marker")).unwrap(), "old");
        assert_eq!(entries(), [".out.tmp-job1", "out"]);

        let id = folder.id().unwrap();
        folder.write_file("marker", b"new").unwrap();
        folder.commit(Overwrite::Replace).unwrap();
        assert_eq!(FolderId::of(&out).unwrap(), Some(id), "a rename keeps the folder's identity");
        assert_eq!(FolderId::parse(&id.to_string()), Some(id));
        assert_eq!(FolderId::of(&parent.path().join("missing")).unwrap(), None);

        // Died after the new output was in place, before removing the old one: it goes.
        std::fs::create_dir(&old).unwrap();
        OutputFolder::recover(&out, "job1").unwrap();
        assert_eq!(std::fs::read_to_string(out.join("marker")).unwrap(), "new");
        assert_eq!(entries(), ["out"]);
    }
}
