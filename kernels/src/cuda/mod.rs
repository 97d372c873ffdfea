//! The CUDA side of awq-kernels (feature `cuda`): devices, device storage and kernel modules.
//!
//! - [`CudaDevice`]: one per ordinal, created at first use and kept for the life of the process. It
//!   holds the device's primary context, its one stream (every copy and launch of the crate goes
//!   there, so they run in the order they were issued; [`graph`] records it), the modules NVRTC compiled for it (one per
//!   `.cu` file, compiled at the first launch of one of its kernels, see [`nvrtc`]) and a cuBLAS
//!   handle.
//! - `CudaStorage`: a tensor's data on a device. Clones share the buffer; the one in-place op
//!   (`add_assign`) copies it first when it is shared, so tensors keep value semantics.
//!
//! Everything CUDA is loaded at run time (cudarc's dynamic loading): a binary built with the feature
//! builds and starts on machines without CUDA, and the first use of a CUDA device answers
//! [`Error::CudaLibraryNotFound`]. cudarc panics when it is asked to call into a library that is not
//! there, so every way in checks for the library first (the driver in [`CudaDevice::get`], NVRTC in
//! [`nvrtc::compile`], cuBLAS in `CudaDevice::with_blas`).
//!
//! - [`nccl`]: NCCL point-to-point transfers between GPUs ([`NcclId`], [`NcclComm`]), what carries
//!   activations from one pipeline stage to the next.
//!
//! What this module does not do: decide where ops run or hold any op's kernels. Each op module
//! dispatches on the device of its operands and launches its own kernels from its own `.cu` file.

pub mod graph;
pub mod kernel_cache;
pub mod nccl;
pub mod nvrtc;
mod pinned;
pub mod timing;

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use cudarc::cublas::CudaBlas;
use cudarc::driver::{
    sys, CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, DeviceRepr, DriverError, LaunchArgs,
    LaunchConfig, PushKernelArg, SyncOnDrop,
};
use cudarc::nvrtc::Ptx;
use half::{bf16, f16};

pub(crate) use pinned::PinnedStaging;
pub use nccl::{nccl_available, AbortSignal, NcclComm, NcclId, NCCL_ID_BYTES};
pub use nvrtc::{compile, cubin_defines, include_dirs, nvrtc_available, nvrtc_version, CudaHeader, CudaSource, COMMON_HEADER};

use crate::{DType, Device, Error, Result};

/// Locks a mutex whose data stays consistent even if a holder panicked (caches only).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Whether libcuda can be loaded. Checked once per process.
pub fn driver_available() -> bool {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    // SAFETY: only tries to dlopen the library names cudarc knows; no symbol is called.
    *PRESENT.get_or_init(|| unsafe { cudarc::driver::sys::is_culib_present() })
}

fn cublas_available() -> bool {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    // SAFETY: as above.
    *PRESENT.get_or_init(|| unsafe { cudarc::cublas::sys::is_culib_present() })
}

/// How many CUDA devices this machine has (0 when the driver is missing or finds none).
pub fn device_count() -> usize {
    if !driver_available() || cudarc::driver::result::init().is_err() {
        return 0;
    }
    CudaContext::device_count().map_or(0, |n| n.max(0) as usize)
}

/// One CUDA device as the crate uses it. See the module docs.
pub struct CudaDevice {
    ordinal: usize,
    name: String,
    /// `sm_XY` from the device's compute capability: what NVRTC compiles for.
    arch: String,
    compute_major: u32,
    multiprocessors: usize,
    stream: Arc<CudaStream>,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    blas: Mutex<Option<CudaBlas>>,
    /// The split-K kernels' arrival counters, and the smaller buffers they replaced: kept, because a
    /// recorded [`graph`] may still name them.
    arrivals: Mutex<(Option<Arc<CudaSlice<u32>>>, Vec<Arc<CudaSlice<u32>>>)>,
    /// The device's default memory pool (what stream-ordered allocations come from), as an address:
    /// the handle is a raw pointer, and the pool lives as long as the device. `None` where the
    /// device has no pools (allocations are synchronous there).
    pool: Option<usize>,
}

impl fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cuda:{} ({}, {})", self.ordinal, self.name, self.arch)
    }
}

impl CudaDevice {
    /// The device `cuda:ordinal`, created on first use (driver loaded and initialised, ordinal
    /// checked, primary context retained) and cached for the process.
    ///
    /// Devices open in parallel: each ordinal has a slot of its own, and only that slot is locked
    /// while its context is created (a few hundred milliseconds each).
    pub fn get(ordinal: usize) -> Result<Arc<CudaDevice>> {
        type Slot = Arc<Mutex<Option<Arc<CudaDevice>>>>;
        static DEVICES: OnceLock<Mutex<HashMap<usize, Slot>>> = OnceLock::new();
        let slot = lock(DEVICES.get_or_init(Default::default)).entry(ordinal).or_default().clone();
        let mut slot = lock(&slot);
        if let Some(dev) = slot.as_ref() {
            return Ok(dev.clone());
        }
        let dev = Arc::new(CudaDevice::open(ordinal)?);
        *slot = Some(dev.clone());
        Ok(dev)
    }

    fn open(ordinal: usize) -> Result<CudaDevice> {
        if !driver_available() {
            return Err(Error::CudaLibraryNotFound { what: "CUDA driver", library: "libcuda.so" });
        }
        let device = Device::Cuda(ordinal);
        let driver = |call: &'static str| move |source: DriverError| Error::CudaDriver { device, call, source };
        cudarc::driver::result::init().map_err(driver("cuInit"))?;
        let count = CudaContext::device_count().map_err(driver("cuDeviceGetCount"))?.max(0) as usize;
        if ordinal >= count {
            return Err(Error::NoSuchCudaDevice { ordinal, count });
        }
        let ctx = CudaContext::new(ordinal).map_err(driver("cuDevicePrimaryCtxRetain"))?;
        let (major, minor) = ctx.compute_capability().map_err(driver("cuDeviceGetAttribute"))?;
        let name = ctx.name().map_err(driver("cuDeviceGetName"))?;
        let multiprocessors = ctx
            .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(driver("cuDeviceGetAttribute"))?
            .max(1) as usize;
        // One stream per device, created (not the legacy default stream, which CUDA graphs cannot
        // capture: see [`graph`]) and without cudarc's per-buffer events, which only order work
        // between streams: every copy, launch and free of the crate goes to this one stream in
        // the order it was issued, and the events would cost two driver calls per allocation.
        // SAFETY: no buffer is created before this, and none is ever used on another stream.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(driver("cuStreamCreate"))?;
        let pool = if ctx.has_async_alloc() { Some(keep_freed_memory(ctx.cu_device()).map_err(driver("cuMemPoolSetAttribute"))?) } else { None };
        Ok(CudaDevice {
            pool,
            ordinal,
            name,
            // sm_90 compiles as sm_90a: the H100's architecture-specific instructions (wgmma, for
            // the W4A16 prefill kernel) are there, and the code runs on no other GPU anyway.
            arch: if (major, minor) == (9, 0) { "sm_90a".to_string() } else { format!("sm_{major}{minor}") },
            compute_major: major.max(0) as u32,
            multiprocessors,
            stream,
            modules: Mutex::new(HashMap::new()),
            blas: Mutex::new(None),
            arrivals: Mutex::new((None, Vec::new())),
        })
    }

    pub(crate) fn device(&self) -> Device {
        Device::Cuda(self.ordinal)
    }

    /// The device's name as the driver reports it (`NVIDIA H100 80GB HBM3`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The major compute capability (9 on Hopper): what decides which kernels a GPU can run.
    pub(crate) fn compute_major(&self) -> u32 {
        self.compute_major
    }

    /// Streaming multiprocessors (132 on an H100 SXM): what grids are sized against.
    pub(crate) fn multiprocessors(&self) -> usize {
        self.multiprocessors
    }

    /// The architecture NVRTC compiles for (`sm_90a` on an H100, `sm_XY` elsewhere).
    pub(crate) fn arch(&self) -> &str {
        &self.arch
    }

    pub(crate) fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Bytes of device memory free now: what the driver has free (`cuMemGetInfo`) plus what the
    /// memory pool keeps for reuse.
    pub(crate) fn free_memory(&self) -> Result<u64> {
        let (free, _total) = self.stream.context().mem_get_info().map_err(self.driver_error("cuMemGetInfo"))?;
        let pooled = match self.pool {
            Some(pool) => {
                let attr = |a| pool_attribute(pool, a).map_err(self.driver_error("cuMemPoolGetAttribute"));
                let reserved = attr(cudarc::driver::sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT)?;
                let used = attr(cudarc::driver::sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT)?;
                reserved.saturating_sub(used)
            }
            None => 0,
        };
        Ok(free as u64 + pooled)
    }

    /// Bytes of device memory in all (`cuMemGetInfo`).
    pub(crate) fn total_memory(&self) -> Result<u64> {
        let (_free, total) = self.stream.context().mem_get_info().map_err(self.driver_error("cuMemGetInfo"))?;
        Ok(total as u64)
    }

    /// Waits until everything issued to this device so far has finished.
    pub(crate) fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(self.driver_error("cuStreamSynchronize"))
    }

    pub(crate) fn driver_error(&self, call: &'static str) -> impl Fn(DriverError) -> Error {
        let device = self.device();
        move |source| Error::CudaDriver { device, call, source }
    }

    pub(crate) fn kernel_error(&self, src: &'static CudaSource, kernel: &str) -> impl Fn(DriverError) -> Error {
        let (device, kernel) = (self.device(), kernel.to_string());
        move |source| Error::CudaKernel { device, file: src.file, kernel: kernel.clone(), source }
    }

    /// The kernel `kernel` of `src`, compiling and loading `src` for this device on first use.
    pub(crate) fn function(&self, src: &'static CudaSource, kernel: &str) -> Result<CudaFunction> {
        let loaded = lock(&self.modules).get(src.file).cloned();
        let module = match loaded {
            Some(m) => m,
            None => self.load(src, &compile_shared(src, &self.arch)?)?,
        };
        module.load_function(kernel).map_err(self.kernel_error(src, kernel))
    }

    /// Launches kernel `name` of `src` with `params` pointing at its arguments in order, each a
    /// value of the kernel's parameter type (device addresses as `CUdeviceptr`). With `overlap`
    /// (programmatic dependent launch, sm_90; ignored on older GPUs) its blocks may start as the
    /// previous kernel's blocks finish, before that whole grid has: the kernel must then execute
    /// `griddepcontrol.wait` before it reads anything the earlier kernel wrote or writes anything
    /// it reads (the split-K kernels of ops/w4a16/ do).
    ///
    /// # Safety
    /// As for any launch: `params` must match the kernel's parameters in number, order and type,
    /// every address must stay valid until the kernel has run, and every buffer must hold what the
    /// kernel indexes.
    pub(crate) unsafe fn launch_with(
        &self,
        src: &'static CudaSource,
        name: &str,
        cfg: LaunchConfig,
        overlap: bool,
        params: &mut [*mut std::ffi::c_void],
    ) -> Result<()> {
        let function = self.function(src, name)?;
        self.stream.context().bind_to_thread().map_err(self.kernel_error(src, name))?;
        // SAFETY: a plain-data union; the attribute below sets the field it reads.
        let mut attribute: sys::CUlaunchAttribute = std::mem::zeroed();
        attribute.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        attribute.value.programmaticStreamSerializationAllowed = 1;
        let config = sys::CUlaunchConfig {
            gridDimX: cfg.grid_dim.0,
            gridDimY: cfg.grid_dim.1,
            gridDimZ: cfg.grid_dim.2,
            blockDimX: cfg.block_dim.0,
            blockDimY: cfg.block_dim.1,
            blockDimZ: cfg.block_dim.2,
            sharedMemBytes: cfg.shared_mem_bytes,
            hStream: self.stream.cu_stream(),
            attrs: &mut attribute,
            numAttrs: (overlap && self.compute_major >= 9) as u32,
        };
        // SAFETY: the caller vouches for `params`; config and attribute outlive the call.
        sys::cuLaunchKernelEx(&config, function.cu_function(), params.as_mut_ptr(), std::ptr::null_mut())
            .result()
            .map_err(self.kernel_error(src, name))
    }

    /// Loads `src`'s compiled `cubin` into this device's context, unless it is loaded already.
    fn load(&self, src: &'static CudaSource, cubin: &[u8]) -> Result<Arc<CudaModule>> {
        let mut modules = lock(&self.modules);
        if let Some(m) = modules.get(src.file) {
            return Ok(m.clone());
        }
        let module =
            self.stream.context().load_module(Ptx::from_binary(cubin.to_vec())).map_err(self.kernel_error(src, "(module load)"))?;
        modules.insert(src.file, module.clone());
        Ok(module)
    }

    /// Compiles every one of `sources` not loaded yet, all at once (one thread per source), loading
    /// each as soon as it is compiled: a long job calls this at its start (through
    /// `Device::prepare`, with every source of the crate) so that the first use of each op does not
    /// wait for NVRTC (seconds in all, for the sources the AWQ engine uses). An op used meanwhile
    /// waits only for its own source.
    pub(crate) fn precompile(&self, sources: &[&'static CudaSource]) -> Result<()> {
        let missing: Vec<&'static CudaSource> =
            sources.iter().copied().filter(|src| !lock(&self.modules).contains_key(src.file)).collect();
        std::thread::scope(|scope| {
            let running: Vec<_> =
                missing.iter().map(|&src| scope.spawn(move || self.load(src, &compile_shared(src, &self.arch)?).map(|_| ()))).collect();
            running.into_iter().try_for_each(|h| h.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)))
        })
    }

    /// Lets kernel `kernel` of `src` use `bytes` of dynamic shared memory. Above 48 KiB a kernel
    /// must opt in (a function attribute); sm_80 and later allow 99 KiB or more, and where a GPU
    /// allows less the driver's error names the kernel.
    pub(crate) fn allow_dynamic_shared(&self, src: &'static CudaSource, kernel: &str, bytes: usize) -> Result<()> {
        if bytes <= 48 * 1024 {
            return Ok(());
        }
        use cudarc::driver::sys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
        self.function(src, kernel)?
            .set_attribute(CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, bytes as i32)
            .map_err(self.kernel_error(src, kernel))
    }

    /// Runs `f` with this device's cuBLAS handle (created on first use; bound to the device's stream).
    pub(crate) fn with_blas<R>(&self, f: impl FnOnce(&CudaBlas) -> Result<R>) -> Result<R> {
        if !cublas_available() {
            return Err(Error::CudaLibraryNotFound { what: "cuBLAS", library: "libcublas.so.13" });
        }
        let mut blas = lock(&self.blas);
        if blas.is_none() {
            let handle = CudaBlas::new(self.stream.clone())
                .map_err(|source| Error::Cublas { device: self.device(), call: "cublasCreate", source })?;
            *blas = Some(handle);
        }
        f(blas.as_ref().expect("set just above"))
    }

    /// At least `len` counters, all zero, for split-K kernels: the blocks of one output tile count
    /// their arrivals there, and the last one resets the counter to 0 before it ends, so the buffer
    /// is all zero again between launches. One buffer serves every such launch on the device: the
    /// device's one stream runs them one after another.
    pub(crate) fn arrival_counters(&self, len: usize) -> Result<Arc<CudaSlice<u32>>> {
        let mut slot = lock(&self.arrivals);
        let (current, retired) = &mut *slot;
        if let Some(buf) = current.as_ref().filter(|b| b.len() >= len) {
            return Ok(buf.clone());
        }
        let mut buf = self.alloc::<u32>(len.max(4096))?;
        self.stream.memset_zeros(&mut buf).map_err(self.driver_error("cuMemsetD8"))?;
        let buf = Arc::new(buf);
        retired.extend(current.replace(buf.clone()));
        Ok(buf)
    }

    /// A buffer of `len` elements whose contents are unspecified: every caller writes all of it.
    pub(crate) fn alloc<T: DeviceRepr>(&self, len: usize) -> Result<CudaSlice<T>> {
        if len == 0 {
            return self.stream.null().map_err(self.driver_error("cuMemAlloc"));
        }
        // SAFETY: the memory is uninitialised; callers launch a kernel that writes every element
        // before anything reads it.
        unsafe { self.stream.alloc(len) }.map_err(self.driver_error("cuMemAlloc"))
    }

    pub(crate) fn alloc_buf(&self, dtype: DType, len: usize) -> Result<CudaBuf> {
        Ok(match dtype {
            DType::F32 => CudaBuf::F32(self.alloc(len)?),
            DType::F16 => CudaBuf::F16(self.alloc(len)?),
            DType::BF16 => CudaBuf::BF16(self.alloc(len)?),
        })
    }

    /// A zero-filled buffer of `len` values of `dtype` (a memset on the device, no upload).
    pub(crate) fn zeros_buf(&self, dtype: DType, len: usize) -> Result<CudaBuf> {
        let map = self.driver_error("cuMemsetD8");
        Ok(match dtype {
            DType::F32 => CudaBuf::F32(self.stream.alloc_zeros(len).map_err(map)?),
            DType::F16 => CudaBuf::F16(self.stream.alloc_zeros(len).map_err(map)?),
            DType::BF16 => CudaBuf::BF16(self.stream.alloc_zeros(len).map_err(map)?),
        })
    }

    /// `len` zeros in a new device buffer (a memset, no upload).
    pub(crate) fn zeros_u32(&self, len: usize) -> Result<CudaSlice<u32>> {
        if len == 0 {
            return self.alloc(0);
        }
        self.stream.alloc_zeros(len).map_err(self.driver_error("cuMemsetD8"))
    }

    /// Copies host values into an existing device buffer of as many (queued on the stream).
    pub(crate) fn write_u32(&self, host: &[u32], buf: &mut CudaSlice<u32>) -> Result<()> {
        if host.is_empty() {
            return Ok(());
        }
        self.stream.memcpy_htod(host, buf).map_err(self.driver_error("cuMemcpyHtoD"))
    }

    /// Copies host values into a new device buffer.
    pub(crate) fn upload<T: DeviceRepr>(&self, host: &[T]) -> Result<CudaSlice<T>> {
        if host.is_empty() {
            return self.alloc(0);
        }
        self.stream.clone_htod(host).map_err(self.driver_error("cuMemcpyHtoD"))
    }

    /// Copies a device buffer to the host (waits for the work that writes it).
    pub(crate) fn download<T: DeviceRepr>(&self, buf: &CudaSlice<T>) -> Result<Vec<T>> {
        if buf.is_empty() {
            return Ok(Vec::new());
        }
        let values = self.stream.clone_dtoh(buf).map_err(self.driver_error("cuMemcpyDtoH"))?;
        self.synchronize()?;
        Ok(values)
    }

    /// A copy of `buf` on this device (which may be another device than `buf`'s).
    pub(crate) fn copy_buf(&self, buf: &CudaBuf) -> Result<CudaBuf> {
        fn copy<T: DeviceRepr>(dev: &CudaDevice, s: &CudaSlice<T>) -> Result<CudaSlice<T>> {
            if s.is_empty() {
                return dev.alloc(0);
            }
            dev.stream.clone_dtod(s).map_err(dev.driver_error("cuMemcpyDtoD"))
        }
        Ok(match buf {
            CudaBuf::F32(s) => CudaBuf::F32(copy(self, s)?),
            CudaBuf::F16(s) => CudaBuf::F16(copy(self, s)?),
            CudaBuf::BF16(s) => CudaBuf::BF16(copy(self, s)?),
        })
    }
}

/// Kernel `name` of `src`, loaded on one device and ready to take its arguments. A launcher pushes
/// them, in the kernel's parameter order, onto [`Kernel::args`] and launches with
/// [`Kernel::launch`] in an `unsafe` block whose `// SAFETY:` comment says why those arguments are
/// right for that kernel (one per launch site, as candle does):
///
/// ```text
/// let kernel = dev.kernel(&CUDA_SOURCE, "add_f32_f32")?;
/// let mut args = kernel.args();
/// a.arg(&mut args);
/// // ... every parameter, scalars bound to variables first (the builder keeps references)
/// // SAFETY: add_f32_f32(const float* a, ...): ...
/// unsafe { kernel.launch(args, grid_for(n, 256)) }?;
/// ```
pub(crate) struct Kernel<'d> {
    dev: &'d CudaDevice,
    src: &'static CudaSource,
    name: String,
    function: CudaFunction,
}

impl CudaDevice {
    /// Kernel `name` of `src` on this device (compiling and loading `src` on first use).
    pub(crate) fn kernel(&self, src: &'static CudaSource, name: &str) -> Result<Kernel<'_>> {
        Ok(Kernel { dev: self, src, name: name.to_string(), function: self.function(src, name)? })
    }
}

impl Kernel<'_> {
    /// An empty argument list for this kernel, on the device's stream.
    pub(crate) fn args(&self) -> LaunchArgs<'_> {
        self.dev.stream.launch_builder(&self.function)
    }

    /// Queues the kernel with `args` on the device's stream; a driver error names the kernel.
    ///
    /// # Safety
    /// `args` must match the kernel's parameters in number, order and type, and every buffer in
    /// them must hold every element the kernel indexes under `cfg` (buffers are freed in stream
    /// order, so they may be dropped after this returns).
    pub(crate) unsafe fn launch(&self, mut args: LaunchArgs<'_>, cfg: LaunchConfig) -> Result<()> {
        // SAFETY: the caller's contract is the builder's.
        unsafe { args.launch(cfg) }.map(|_| ()).map_err(self.dev.kernel_error(self.src, &self.name))
    }
}

/// `src` compiled for `arch` (through the disk cache, [`kernel_cache`]), once per process: devices
/// of one architecture share the cubin (four GPUs starting a job at once would otherwise compile
/// every source four times). A caller that
/// finds the compile under way waits for it; a failed compile is not kept (the next caller tries
/// again and gets the error itself).
fn compile_shared(src: &'static CudaSource, arch: &str) -> Result<Arc<Vec<u8>>> {
    type Slot = Arc<Mutex<Option<Arc<Vec<u8>>>>>;
    static CUBINS: OnceLock<Mutex<HashMap<(&'static str, String), Slot>>> = OnceLock::new();
    let slot = lock(CUBINS.get_or_init(Default::default)).entry((src.file, arch.to_string())).or_default().clone();
    let mut slot = lock(&slot);
    if let Some(cubin) = slot.as_ref() {
        return Ok(cubin.clone());
    }
    let (cubin, _) = kernel_cache::compile_cached(src.file, src.code, src.headers, arch)?;
    let cubin = Arc::new(cubin);
    *slot = Some(cubin.clone());
    Ok(cubin)
}

/// Tells `device`'s default memory pool to keep the memory freed into it instead of handing it back
/// to the driver at every synchronization (its default threshold is 0 bytes); returns the pool.
///
/// Why: the engine frees and allocates gigabytes of temporaries per block (activations of 40,960
/// tokens), with a host synchronization between grid points; with the default, each allocation
/// after a synchronization maps fresh physical memory, which costs time on every device and
/// contends between devices driven from one process (4 GPUs searched 45% slower per block than 1).
fn keep_freed_memory(device: sys::CUdevice) -> std::result::Result<usize, DriverError> {
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    // SAFETY: out-pointer to a local; the device handle comes from a live context.
    unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, device) }.result()?;
    let mut threshold = u64::MAX;
    // SAFETY: the attribute takes a cuuint64_t, which `threshold` is.
    unsafe {
        sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut threshold as *mut u64).cast(),
        )
    }
    .result()?;
    Ok(pool as usize)
}

/// A byte count attribute of the memory pool at address `pool`.
fn pool_attribute(pool: usize, attribute: cudarc::driver::sys::CUmemPool_attribute) -> std::result::Result<u64, DriverError> {
    let mut value = 0u64;
    // SAFETY: `pool` is a device's default pool (see `keep_freed_memory`); the byte-count
    // attributes are cuuint64_t.
    unsafe { cudarc::driver::sys::cuMemPoolGetAttribute(pool as cudarc::driver::sys::CUmemoryPool, attribute, (&mut value as *mut u64).cast()) }
        .result()?;
    Ok(value)
}

/// A launch configuration of `block` threads per block, covering `n` items with a grid-stride loop.
pub(crate) fn grid_for(n: usize, block: u32) -> LaunchConfig {
    let blocks = n.div_ceil(block as usize).clamp(1, 1 << 20) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (block, 1, 1), shared_mem_bytes: 0 }
}

/// `value` (a row count, a width) as a kernel's 32-bit parameter; the kernels index with it, and
/// grids are at most 2^31 - 1 blocks wide.
pub(crate) fn kernel_dim(op: &'static str, value: usize) -> Result<u32> {
    match i32::try_from(value) {
        Ok(v) => Ok(v as u32),
        Err(_) => Err(Error::Shape { op, detail: format!("dimension {value} exceeds the CUDA kernels' limit of 2^31 - 1") }),
    }
}

/// A device buffer of one of the storage dtypes.
#[derive(Debug)]
pub(crate) enum CudaBuf {
    F32(CudaSlice<f32>),
    F16(CudaSlice<f16>),
    BF16(CudaSlice<bf16>),
}

impl CudaBuf {
    pub(crate) fn dtype(&self) -> DType {
        match self {
            CudaBuf::F32(_) => DType::F32,
            CudaBuf::F16(_) => DType::F16,
            CudaBuf::BF16(_) => DType::BF16,
        }
    }

    pub(crate) fn len(&self) -> usize {
        match self {
            CudaBuf::F32(s) => s.len(),
            CudaBuf::F16(s) => s.len(),
            CudaBuf::BF16(s) => s.len(),
        }
    }

    /// Pushes the buffer as a kernel argument that the kernel reads.
    pub(crate) fn arg<'a, 'b: 'a>(&'b self, args: &mut LaunchArgs<'a>) {
        match self {
            CudaBuf::F32(s) => args.arg(s),
            CudaBuf::F16(s) => args.arg(s),
            CudaBuf::BF16(s) => args.arg(s),
        };
    }

    /// The buffer's device address, for a launch that does not go through cudarc's builder
    /// ([`CudaDevice::launch_with`]); valid while the guard lives.
    pub(crate) fn device_ptr<'a>(&'a self, stream: &'a CudaStream) -> (sys::CUdeviceptr, SyncOnDrop<'a>) {
        match self {
            CudaBuf::F32(s) => s.device_ptr(stream),
            CudaBuf::F16(s) => s.device_ptr(stream),
            CudaBuf::BF16(s) => s.device_ptr(stream),
        }
    }

    /// Pushes the buffer as a kernel argument that the kernel writes.
    pub(crate) fn arg_mut<'a, 'b: 'a>(&'b mut self, args: &mut LaunchArgs<'a>) {
        match self {
            CudaBuf::F32(s) => args.arg(s),
            CudaBuf::F16(s) => args.arg(s),
            CudaBuf::BF16(s) => args.arg(s),
        };
    }
}

/// A tensor's data on a CUDA device. Clones share the buffer (see [`CudaStorage::buf_mut`]).
#[derive(Clone)]
pub(crate) struct CudaStorage {
    dev: Arc<CudaDevice>,
    buf: Arc<CudaBuf>,
}

impl fmt::Debug for CudaStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CudaStorage({}, {} x {})", self.dev.device(), self.buf.len(), self.buf.dtype())
    }
}

impl CudaStorage {
    pub(crate) fn new(dev: Arc<CudaDevice>, buf: CudaBuf) -> CudaStorage {
        CudaStorage { dev, buf: Arc::new(buf) }
    }

    pub(crate) fn dev(&self) -> &Arc<CudaDevice> {
        &self.dev
    }

    pub(crate) fn buf(&self) -> &CudaBuf {
        &self.buf
    }

    pub(crate) fn dtype(&self) -> DType {
        self.buf.dtype()
    }

    /// Elements in the buffer (the tensor's element count).
    pub(crate) fn len(&self) -> usize {
        self.buf.len()
    }

    /// The buffer for writing in place; copied first when another tensor shares it.
    pub(crate) fn buf_mut(&mut self) -> Result<&mut CudaBuf> {
        if Arc::get_mut(&mut self.buf).is_none() {
            self.buf = Arc::new(self.dev.copy_buf(&self.buf)?);
        }
        Ok(Arc::get_mut(&mut self.buf).expect("the buffer was just made unique"))
    }

    /// Whether two storages are the same buffer (not merely equal values).
    pub(crate) fn same_buffer(&self, other: &CudaStorage) -> bool {
        Arc::ptr_eq(&self.buf, &other.buf)
    }
}
