//! A disk cache of compiled kernels, so that a process does not wait for NVRTC at every start.
//!
//! Compiling the engine's `.cu` files takes seconds (7-8 s on the GPU machines, all files in
//! parallel), and every `awq quantize` or `awq worker` process starts without the modules. A
//! compiled CUBIN depends only on its inputs, so it is kept on disk under a key made of all of them:
//! the source text, the headers it includes (`common.cuh` and its own), the file's name, the
//! architecture, NVRTC's version, the CUDA header folder and the `-D` options (`kernel-probes`
//! builds only). A changed kernel, toolkit or GPU generation gets a new
//! key; nothing is ever invalidated by hand.
//!
//! Where: `KernelSettings::kernel_cache` (`AWQ_KERNEL_CACHE` in `awq`; `off` turns the cache off),
//! by default `$XDG_CACHE_HOME/awq/kernels`, else `$HOME/.cache/awq/kernels` (`KernelCache::dir`).
//! `KernelSettings::nvrtc_verbose` bypasses it (the point is ptxas's report). An
//! entry is written to a temporary name and renamed, and carries its length and checksum: a torn or
//! corrupted entry is compiled again and replaced. The cache never fails a compile: a folder that
//! cannot be created or written only means compiling every time.

use std::path::{Path, PathBuf};

use super::nvrtc::{compile, defines, include_dirs, nvrtc_version, CudaHeader, COMMON_HEADER};
use crate::settings::settings;
use crate::Result;

/// What the cache did for one compile.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheOutcome {
    /// Read from the cache; NVRTC was not called.
    Hit,
    /// Compiled (and stored, where the folder is writable).
    Miss,
    /// Compiled; the cache is off (`KernelCache::Off`, `nvrtc_verbose`, or no folder).
    Off,
}

/// The cache folder of the process's settings; `None` when the cache is off or no folder can be
/// named.
pub(crate) fn cache_dir() -> Option<PathBuf> {
    let settings = settings();
    if settings.nvrtc_verbose {
        return None;
    }
    settings.kernel_cache.dir()
}

/// [`compile`] through the cache in [`cache_dir`].
pub(crate) fn compile_cached(file: &str, text: &str, headers: &[&CudaHeader], arch: &str) -> Result<(Vec<u8>, CacheOutcome)> {
    compile_cached_in(cache_dir().as_deref(), file, text, headers, arch)
}

/// [`compile`] through the cache in `dir` (`None`: no cache).
pub fn compile_cached_in(
    dir: Option<&Path>,
    file: &str,
    text: &str,
    headers: &[&CudaHeader],
    arch: &str,
) -> Result<(Vec<u8>, CacheOutcome)> {
    let Some(dir) = dir else {
        return Ok((compile(file, text, headers, arch)?, CacheOutcome::Off));
    };
    let path = dir.join(entry_name(file, text, headers, arch));
    if let Some(cubin) = std::fs::read(&path).ok().and_then(|bytes| decode(&bytes)) {
        return Ok((cubin, CacheOutcome::Hit));
    }
    let cubin = compile(file, text, headers, arch)?;
    // Best effort: a cache that cannot be written is a cache that misses.
    let _ = store(dir, &path, &cubin);
    Ok((cubin, CacheOutcome::Miss))
}

/// `{file with / as _}-{arch}-{key}.cubin`.
fn entry_name(file: &str, text: &str, headers: &[&CudaHeader], arch: &str) -> String {
    let version = format!("{:?}", nvrtc_version());
    let include = format!("{:?}", include_dirs());
    let defines = defines().join(" ");
    let mut key = Fnv64::new();
    let ours = [&COMMON_HEADER].into_iter().chain(headers.iter().copied()).flat_map(|h| [h.file, h.code]);
    for part in ["awq-kernel-cache-v2", file, text, arch, &version, &include, &defines].into_iter().chain(ours) {
        key.write(part.as_bytes());
        // A separator, so that moving bytes from one part to the next changes the key.
        key.write(&[0xff]);
    }
    format!("{}-{arch}-{:016x}.cubin", file.replace(['/', '\\'], "_"), key.finish())
}

fn store(dir: &Path, path: &Path, cubin: &[u8]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    // Unique per process and thread: two processes filling the cache at once each rename a whole
    // entry into place.
    let tmp = path.with_extension(format!("tmp-{}-{:?}", std::process::id(), std::thread::current().id()).replace(['(', ')'], ""));
    std::fs::write(&tmp, encode(cubin))?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

const MAGIC: &[u8; 8] = b"AWQCUBIN";

/// `MAGIC`, the CUBIN's length and checksum (u64 little-endian each), the CUBIN.
fn encode(cubin: &[u8]) -> Vec<u8> {
    let mut sum = Fnv64::new();
    sum.write(cubin);
    let mut out = Vec::with_capacity(24 + cubin.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(cubin.len() as u64).to_le_bytes());
    out.extend_from_slice(&sum.finish().to_le_bytes());
    out.extend_from_slice(cubin);
    out
}

/// The CUBIN of an entry, or `None` when anything about it is off.
fn decode(entry: &[u8]) -> Option<Vec<u8>> {
    let (magic, rest) = entry.split_at_checked(8)?;
    let (len, rest) = rest.split_at_checked(8)?;
    let (sum, cubin) = rest.split_at_checked(8)?;
    let len = u64::from_le_bytes(len.try_into().ok()?);
    if magic != MAGIC || cubin.len() as u64 != len || cubin.is_empty() {
        return None;
    }
    let mut check = Fnv64::new();
    check.write(cubin);
    (check.finish() == u64::from_le_bytes(sum.try_into().ok()?)).then(|| cubin.to_vec())
}

/// 64-bit FNV-1a: a stable hash (the standard library's may change between releases) for keys and
/// checksums; not for adversarial input, which a private cache folder does not get.
struct Fnv64(u64);

impl Fnv64 {
    fn new() -> Fnv64 {
        Fnv64(0xcbf2_9ce4_8422_2325)
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_and_damage_is_detected() {
        let cubin: Vec<u8> = (0..1000u32).map(|i| (i * 7 % 251) as u8).collect();
        let entry = encode(&cubin);
        assert_eq!(decode(&entry).as_deref(), Some(cubin.as_slice()));
        for at in [0, 9, 17, 24, entry.len() - 1] {
            let mut bad = entry.clone();
            bad[at] ^= 0x40;
            assert_eq!(decode(&bad), None, "byte {at} flipped");
        }
        assert_eq!(decode(&entry[..entry.len() - 1]), None, "torn");
        assert_eq!(decode(&entry[..10]), None, "short");
        assert_eq!(decode(&encode(&[])), None, "empty");
    }

    #[test]
    fn the_key_changes_with_every_input() {
        let base = entry_name("ops/a.cu", "text", &[], "sm_90");
        assert_eq!(base, entry_name("ops/a.cu", "text", &[], "sm_90"), "stable");
        assert!(base.starts_with("ops_a.cu-sm_90-") && base.ends_with(".cubin"), "{base}");
        let header = CudaHeader { file: "ops/a.cuh", code: "header" };
        let header2 = CudaHeader { file: "ops/a.cuh", code: "header!" };
        for other in [
            entry_name("ops/b.cu", "text", &[], "sm_90"),
            entry_name("ops/a.cu", "text!", &[], "sm_90"),
            entry_name("ops/a.cu", "text", &[], "sm_80"),
            entry_name("ops/a.cu", "text", &[&header], "sm_90"),
        ] {
            assert_ne!(base, other);
        }
        assert_ne!(entry_name("ops/a.cu", "text", &[&header], "sm_90"), entry_name("ops/a.cu", "text", &[&header2], "sm_90"));
        // The FNV-1a test vector, so the key is the documented hash.
        let mut h = Fnv64::new();
        h.write(b"a");
        assert_eq!(h.finish(), 0xaf63_dc4c_8601_ec8c);
    }
}
