//! NCCL point-to-point transfers between GPUs (feature `cuda`): what carries a pipeline stage's
//! activations to the next stage when both run on GPUs, in one process or in several, on one
//! machine or several.
//!
//! - [`NcclId`]: a communicator's unique id (`ncclGetUniqueId`: 128 opaque bytes that name the
//!   creator's bootstrap socket). One rank creates it; every other rank must get the same bytes by
//!   some other channel (awq-cluster relays them through the coordinator): [`NcclId::to_bytes`],
//!   [`NcclId::from_bytes`].
//! - [`NcclComm`]: this thread's rank of a communicator, bound to one CUDA device.
//!   [`NcclComm::start`] joins without waiting and [`NcclComm::init`] waits until every rank has
//!   joined; [`NcclComm::send`] and [`NcclComm::recv`] move a tensor (f32, f16, bf16) to or from
//!   another rank, [`NcclComm::send_u64s`] and [`NcclComm::recv_u64s`] a few integers (a header);
//!   [`NcclComm::close`] ends it.
//!
//! How it waits. Communicators are non-blocking (`ncclConfig_t::blocking = 0`): each NCCL call
//! returns at once, and this module polls the communicator's state (`ncclCommGetAsyncError`) and,
//! for a transfer, a CUDA event recorded behind it, until the call is done. Between polls it asks
//! the communicator's [`AbortSignal`]; when that says stop, it aborts the communicator
//! (`ncclCommAbort`, which also stops its kernels on the GPU) and the call returns
//! [`Error::NcclAborted`]. Blocking NCCL calls cannot be interrupted: a rank waiting for a peer
//! that died, or never joins, would hold its thread forever. That is also why cudarc's safe
//! `nccl::Comm` is not used (its calls block, and its drop panics when an abort fails): this module
//! calls `cudarc::nccl::sys` directly.
//!
//! Ordering. Transfers run on the device's one stream (see [`super`]), after the kernels that wrote
//! the data, and return once they completed: a received tensor is ready, a sent one may be freed or
//! written. The calls of one communicator must not overlap (NCCL's rule): `NcclComm` is `Send` but
//! not `Sync`.
//!
//! Ending. [`NcclComm::close`] flushes the communicator's work (`ncclCommFinalize`) and frees it
//! (`ncclCommDestroy`); both are local, they wait for no other rank, so a rank may leave as soon as
//! its own transfers are done while the others go on. Dropping a communicator that was not closed
//! aborts it. libnccl is loaded at run time like the rest of CUDA: without it, the first call
//! answers [`Error::CudaLibraryNotFound`].
//!
//! What this module does not do: decide which ranks talk to each other, or carry the id between
//! processes.

use std::cell::Cell;
use std::ffi::{c_char, c_int, c_void, CStr};
use std::fmt;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};
use cudarc::nccl::sys::{self, ncclResult_t};
use cudarc::nccl::NcclType;

use super::{CudaBuf, CudaDevice, CudaStorage};
use crate::{DType, Device, Error, Result, Tensor};

/// Bytes of an NCCL unique id (`NCCL_UNIQUE_ID_BYTES`).
pub const NCCL_ID_BYTES: usize = 128;

/// The first and the longest pause between two looks at a waiting call. Polling starts fast (a
/// header of a few bytes arrives in microseconds) and backs off to a pause that is short next to
/// any transfer worth NCCL (an activation is megabytes) and leaves the CPU to the other threads.
const FIRST_POLL: Duration = Duration::from_micros(20);
const MAX_POLL: Duration = Duration::from_millis(1);

/// Whether libnccl can be loaded. Checked once per process.
pub fn nccl_available() -> bool {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    // SAFETY: only tries to dlopen the library names cudarc knows; no symbol is called.
    *PRESENT.get_or_init(|| unsafe { sys::is_culib_present() })
}

fn check_library() -> Result<()> {
    if nccl_available() {
        Ok(())
    } else {
        Err(Error::CudaLibraryNotFound { what: "NCCL", library: "libnccl.so" })
    }
}

/// A C string NCCL returned, copied (empty for null).
///
/// # Safety
/// `p` is null or points to a NUL-terminated string that stays valid during the call.
unsafe fn c_string(p: *const c_char) -> String {
    if p.is_null() {
        return String::new();
    }
    // SAFETY: the caller's promise.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

/// The name of an NCCL result (`ncclRemoteError`) and what NCCL says about it: its error string
/// and the last error NCCL recorded (which names the peer, the socket, the CUDA call, ...).
fn describe(result: ncclResult_t) -> (String, String) {
    // SAFETY: ncclGetErrorString returns a static string for every code; ncclGetLastError a string
    // NCCL keeps (its argument is unused). Both are copied at once.
    let (text, last) = unsafe {
        (c_string(sys::ncclGetErrorString(result)), c_string(sys::ncclGetLastError(std::ptr::null_mut())))
    };
    let message = if last.trim().is_empty() { text } else { format!("{text}; {}", last.trim()) };
    (format!("{result:?}"), message)
}

/// The unique id of an NCCL communicator: every rank joins with the same bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct NcclId([u8; NCCL_ID_BYTES]);

impl fmt::Debug for NcclId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The bytes are a socket address and a magic number: nothing to read in a log.
        f.write_str("NcclId(..)")
    }
}

impl NcclId {
    /// A fresh id (`ncclGetUniqueId`). The process that creates it runs the communicator's
    /// bootstrap root until every rank has joined, so it must live that long: it is the process
    /// of one of the ranks (rank 0, here).
    ///
    /// Errors: [`Error::CudaLibraryNotFound`] without libnccl, [`Error::NcclUniqueId`].
    pub fn new() -> Result<NcclId> {
        check_library()?;
        let id = cudarc::nccl::result::get_uniqueid().map_err(|e| {
            let (code, message) = describe(e.0);
            Error::NcclUniqueId { code, message }
        })?;
        Ok(NcclId(id.internal.map(|c| c as u8)))
    }

    /// The id's 128 bytes, to send to the other ranks.
    pub fn to_bytes(&self) -> [u8; NCCL_ID_BYTES] {
        self.0
    }

    /// The id another rank created, from its bytes. Errors: [`Error::NcclIdLength`] when `bytes`
    /// is not 128 bytes long.
    pub fn from_bytes(bytes: &[u8]) -> Result<NcclId> {
        let id: [u8; NCCL_ID_BYTES] =
            bytes.try_into().map_err(|_| Error::NcclIdLength { expected: NCCL_ID_BYTES, got: bytes.len() })?;
        Ok(NcclId(id))
    }

    fn raw(&self) -> sys::ncclUniqueId {
        sys::ncclUniqueId { internal: self.0.map(|b| b as c_char) }
    }
}

/// Asked between polls while an NCCL call waits: `true` aborts the communicator and fails the
/// call with [`Error::NcclAborted`]. Called often (up to a thousand times a second): keep it cheap.
pub type AbortSignal = Box<dyn Fn() -> bool + Send>;

/// `ncclConfig_t` for a non-blocking communicator, every other field left to NCCL.
///
/// `version` says the struct follows NCCL 2.14's layout (the first with `blocking`): NCCL then
/// resets every later field to its default, whatever its own version, and copies no more than
/// `size` bytes (the smaller of cudarc's struct and its own), so the struct suits any NCCL since
/// 2.14, older or newer than cudarc's headers.
fn nonblocking_config() -> sys::ncclConfig_t {
    const UNDEF: c_int = c_int::MIN; // NCCL_CONFIG_UNDEF_INT
    sys::ncclConfig_t {
        size: std::mem::size_of::<sys::ncclConfig_t>(),
        magic: 0xcafe_beef,      // NCCL_API_MAGIC
        version: 2 * 10000 + 14 * 100, // NCCL_VERSION(2, 14, 0)
        blocking: 0,
        cgaClusterSize: UNDEF,
        minCTAs: UNDEF,
        maxCTAs: UNDEF,
        netName: std::ptr::null(),
        splitShare: UNDEF,
        trafficClass: UNDEF,
        commName: std::ptr::null(),
        collnetEnable: UNDEF,
        CTAPolicy: UNDEF,
        shrinkShare: UNDEF,
        nvlsCTAs: UNDEF,
        nChannelsPerNetPeer: UNDEF,
        nvlinkCentricSched: UNDEF,
        graphUsageMode: UNDEF,
        numRmaCtx: UNDEF,
        maxP2pPeers: UNDEF,
    }
}

/// One rank of an NCCL communicator, on one CUDA device. See the module docs.
pub struct NcclComm {
    /// Null once the communicator was closed or aborted.
    comm: Cell<sys::ncclComm_t>,
    dev: Arc<CudaDevice>,
    rank: usize,
    n_ranks: usize,
    /// Whether joining finished (every rank has joined).
    ready: Cell<bool>,
    abort: AbortSignal,
}

// SAFETY: an NCCL communicator may be used from any thread as long as its calls do not overlap.
// `NcclComm` is not `Sync` (its `Cell`s), so one never reaches two threads at once.
unsafe impl Send for NcclComm {}

impl fmt::Debug for NcclComm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NcclComm(rank {} of {} on {})", self.rank, self.n_ranks, self.device())
    }
}

impl NcclComm {
    /// Joins the communicator `id` as `rank` of `n_ranks` on `device` and waits until every rank
    /// has joined (forever, if one never does: [`NcclComm::start`] takes an [`AbortSignal`]).
    pub fn init(device: Device, id: &NcclId, rank: usize, n_ranks: usize) -> Result<NcclComm> {
        let comm = NcclComm::start(device, id, rank, n_ranks, Box::new(|| false))?;
        comm.wait_ready()?;
        Ok(comm)
    }

    /// Starts joining the communicator `id` as `rank` of `n_ranks` on `device`, and returns without
    /// waiting for the other ranks: NCCL goes on in the background, and the first transfer (or
    /// [`NcclComm::wait_ready`]) waits until every rank has joined, or until `abort` says stop.
    ///
    /// Errors: [`Error::NcclUsage`] (rank outside the communicator, a device that is not a GPU),
    /// whatever opening the device reports, [`Error::CudaLibraryNotFound`] without libnccl,
    /// [`Error::Nccl`].
    pub fn start(device: Device, id: &NcclId, rank: usize, n_ranks: usize, abort: AbortSignal) -> Result<NcclComm> {
        let usage = |problem: &str| Error::NcclUsage { device, rank, n_ranks, problem: problem.to_string() };
        let Device::Cuda(ordinal) = device else {
            return Err(usage("NCCL communicators live on CUDA devices"));
        };
        if rank >= n_ranks {
            return Err(usage("the rank is outside the communicator"));
        }
        let (Ok(n), Ok(r)) = (c_int::try_from(n_ranks), c_int::try_from(rank)) else {
            return Err(usage("more ranks than NCCL counts"));
        };
        let dev = CudaDevice::get(ordinal)?;
        check_library()?;
        let this = NcclComm { comm: Cell::new(std::ptr::null_mut()), dev, rank, n_ranks, ready: Cell::new(false), abort };
        this.bind()?;
        let mut config = nonblocking_config();
        let mut comm: sys::ncclComm_t = std::ptr::null_mut();
        // SAFETY: `comm` and `config` are valid for the call; NCCL copies the id and the config.
        let result = unsafe { sys::ncclCommInitRankConfig(&mut comm, n, id.raw(), r, &mut config) };
        // Even a failed init may leave a communicator to abort (drop does).
        this.comm.set(comm);
        this.check("ncclCommInitRankConfig", result)?;
        Ok(this)
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn n_ranks(&self) -> usize {
        self.n_ranks
    }

    pub fn device(&self) -> Device {
        self.dev.device()
    }

    /// Waits until every rank has joined (a no-op once they have).
    pub fn wait_ready(&self) -> Result<()> {
        if self.ready.get() {
            return Ok(());
        }
        self.wait("ncclCommInitRankConfig")?;
        self.ready.set(true);
        Ok(())
    }

    /// Sends `x` (on this communicator's device) to rank `peer`, which receives it with
    /// [`NcclComm::recv`] of the same shape and dtype. Returns once `x` was sent.
    pub fn send(&self, x: &Tensor, peer: usize) -> Result<()> {
        let peer = self.check_peer(peer)?;
        let storage = match x.cuda_storage() {
            Some(s) if s.dev().device() == self.device() => s,
            _ => return Err(Error::DeviceMismatch { op: "NcclComm::send", first: self.device(), other: x.device() }),
        };
        // Nothing to move; the receiver skips its side the same way.
        if x.elem_count() == 0 {
            return Ok(());
        }
        match storage.buf() {
            CudaBuf::F32(s) => self.send_slice(s, peer),
            CudaBuf::F16(s) => self.send_slice(s, peer),
            CudaBuf::BF16(s) => self.send_slice(s, peer),
        }
    }

    /// Receives a tensor of `shape` and `dtype` from rank `peer` (its [`NcclComm::send`]), on this
    /// communicator's device. Returns once it arrived.
    pub fn recv(&self, shape: &[usize], dtype: DType, peer: usize) -> Result<Tensor> {
        let peer = self.check_peer(peer)?;
        let len = shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d)).ok_or_else(|| Error::Shape {
            op: "NcclComm::recv",
            detail: format!("shape {shape:?} has more elements than memory can index"),
        })?;
        let mut buf = self.dev.alloc_buf(dtype, len)?;
        if len > 0 {
            match &mut buf {
                CudaBuf::F32(s) => self.recv_slice(s, peer)?,
                CudaBuf::F16(s) => self.recv_slice(s, peer)?,
                CudaBuf::BF16(s) => self.recv_slice(s, peer)?,
            }
        }
        Ok(Tensor::from_cuda(shape, CudaStorage::new(self.dev.clone(), buf)))
    }

    /// Sends a few integers (a header) to rank `peer`, which receives them with
    /// [`NcclComm::recv_u64s`] of the same length.
    pub fn send_u64s(&self, values: &[u64], peer: usize) -> Result<()> {
        let peer = self.check_peer(peer)?;
        if values.is_empty() {
            return Ok(());
        }
        let buf = self.dev.upload(values)?;
        self.send_slice(&buf, peer)
    }

    /// Receives `len` integers from rank `peer` (its [`NcclComm::send_u64s`]).
    pub fn recv_u64s(&self, len: usize, peer: usize) -> Result<Vec<u64>> {
        let peer = self.check_peer(peer)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        let mut buf = self.dev.alloc::<u64>(len)?;
        self.recv_slice(&mut buf, peer)?;
        self.dev.download(&buf)
    }

    /// The sum of `x` (f32, `[..]`, on this communicator's device) over every rank, as a new tensor
    /// of its shape; every rank calls it with the same shape, in the same order, and gets the same
    /// bits. Unlike the transfers above it returns once NCCL has queued the reduction on the
    /// device's stream, without waiting for it to run (what follows on the stream waits for it), so
    /// a CUDA graph can record it: the tensor-parallel ranks of one process, which fail together.
    pub fn all_reduce_sum(&self, x: &Tensor) -> Result<Tensor> {
        const CALL: &str = "ncclAllReduce";
        let storage = match x.cuda_storage() {
            Some(s) if s.dev().device() == self.device() => s,
            _ => return Err(Error::DeviceMismatch { op: "NcclComm::all_reduce_sum", first: self.device(), other: x.device() }),
        };
        let CudaBuf::F32(src) = storage.buf() else {
            return Err(Error::DType { op: "NcclComm::all_reduce_sum", dtype: x.dtype() });
        };
        let len = x.elem_count();
        let mut out = self.dev.alloc::<f32>(len)?;
        if len > 0 {
            self.wait_ready()?;
            self.bind()?;
            let comm = self.live(CALL)?;
            let stream = self.dev.stream().cu_stream() as sys::cudaStream_t;
            let (from, _read) = src.device_ptr(self.dev.stream());
            let (to, _written) = out.device_ptr_mut(self.dev.stream());
            // SAFETY: `from` and `to` hold `len` f32 on this communicator's device; the stream orders
            // every later use and the freeing of either buffer after the reduction.
            let queued = unsafe {
                sys::ncclAllReduce(
                    from as *const c_void,
                    to as *mut c_void,
                    len,
                    f32::as_nccl_type(),
                    sys::ncclRedOp_t::ncclSum,
                    comm,
                    stream,
                )
            };
            let result = self.check(CALL, queued).and_then(|()| self.wait(CALL));
            if result.is_err() {
                self.abort_now();
            }
            result?;
        }
        Ok(Tensor::from_cuda(x.shape(), CudaStorage::new(self.dev.clone(), CudaBuf::F32(out))))
    }

    /// Ends this rank's part of the communicator: flushes its work and frees it, without waiting
    /// for the other ranks. A communicator that never finished joining is aborted instead, and one
    /// that was aborted has nothing left to end.
    pub fn close(self) -> Result<()> {
        if self.comm.get().is_null() {
            return Ok(());
        }
        if !self.ready.get() {
            self.abort_now();
            return Ok(());
        }
        self.bind()?;
        let comm = self.live("ncclCommFinalize")?;
        // SAFETY: `comm` is a live communicator of this thread (not Sync: no other call overlaps).
        self.check("ncclCommFinalize", unsafe { sys::ncclCommFinalize(comm) })?;
        self.wait("ncclCommFinalize")?;
        let comm = self.comm.replace(std::ptr::null_mut());
        // SAFETY: finalized above; nothing uses `comm` after this (the field is null now).
        let result = unsafe { sys::ncclCommDestroy(comm) };
        if result != ncclResult_t::ncclSuccess {
            return Err(self.failed("ncclCommDestroy", result));
        }
        Ok(())
    }

    /// Makes the device's context current on this thread: NCCL works on the current device.
    fn bind(&self) -> Result<()> {
        self.dev.stream().context().bind_to_thread().map_err(self.dev.driver_error("cuCtxSetCurrent"))
    }

    fn live(&self, call: &'static str) -> Result<sys::ncclComm_t> {
        let comm = self.comm.get();
        if comm.is_null() {
            return Err(self.aborted(call));
        }
        Ok(comm)
    }

    fn aborted(&self, call: &'static str) -> Error {
        Error::NcclAborted { device: self.device(), call, rank: self.rank, n_ranks: self.n_ranks }
    }

    fn failed(&self, call: &'static str, result: ncclResult_t) -> Error {
        let (code, message) = describe(result);
        Error::Nccl { device: self.device(), call, rank: self.rank, n_ranks: self.n_ranks, code, message }
    }

    /// Ok for a call that succeeded or goes on in the background (non-blocking communicator).
    fn check(&self, call: &'static str, result: ncclResult_t) -> Result<()> {
        match result {
            ncclResult_t::ncclSuccess | ncclResult_t::ncclInProgress => Ok(()),
            other => Err(self.failed(call, other)),
        }
    }

    fn check_peer(&self, peer: usize) -> Result<c_int> {
        if peer == self.rank || peer >= self.n_ranks {
            return Err(Error::NcclUsage {
                device: self.device(),
                rank: self.rank,
                n_ranks: self.n_ranks,
                problem: format!("peer {peer} is not another rank of the communicator"),
            });
        }
        Ok(peer as c_int)
    }

    /// The communicator's state: in progress, success, or the error of an earlier call.
    fn state(&self, call: &'static str) -> Result<ncclResult_t> {
        let comm = self.live(call)?;
        let mut state = ncclResult_t::ncclSuccess;
        // SAFETY: `comm` is live and `state` valid for the call.
        let result = unsafe { sys::ncclCommGetAsyncError(comm, &mut state) };
        if result != ncclResult_t::ncclSuccess {
            return Err(self.failed("ncclCommGetAsyncError", result));
        }
        Ok(state)
    }

    /// Sleeps `pause` (then a longer one next time), unless the abort signal says stop: then the
    /// communicator is aborted and `call` fails.
    fn pause_or_abort(&self, call: &'static str, pause: &mut Duration) -> Result<()> {
        if (self.abort)() {
            self.abort_now();
            return Err(self.aborted(call));
        }
        std::thread::sleep(*pause);
        *pause = (*pause * 2).min(MAX_POLL);
        Ok(())
    }

    /// Polls until the communicator's call in progress (joining, an enqueue, finalizing) is done.
    fn wait(&self, call: &'static str) -> Result<()> {
        let mut pause = FIRST_POLL;
        loop {
            match self.state(call)? {
                ncclResult_t::ncclSuccess => return Ok(()),
                ncclResult_t::ncclInProgress => {}
                other => return Err(self.failed(call, other)),
            }
            self.pause_or_abort(call, &mut pause)?;
        }
    }

    /// Aborts the communicator (also what it still runs on the GPU); its calls fail from now on.
    fn abort_now(&self) {
        let comm = self.comm.replace(std::ptr::null_mut());
        if comm.is_null() {
            return;
        }
        let _ = self.bind();
        // SAFETY: `comm` was live and is used no more (the field is null). Abort frees what it
        // can and its result leaves nothing to act on.
        let _ = unsafe { sys::ncclCommAbort(comm) };
    }

    /// Enqueues a transfer with `enqueue` (given the communicator and the device's stream) and
    /// waits until it completed. After a failure or an abort the communicator is aborted, which
    /// stops the transfer on the GPU before its buffer can be freed.
    fn transfer(&self, call: &'static str, enqueue: impl FnOnce(sys::ncclComm_t, sys::cudaStream_t) -> ncclResult_t) -> Result<()> {
        self.wait_ready()?;
        self.bind()?;
        let comm = self.live(call)?;
        let stream = self.dev.stream().cu_stream() as sys::cudaStream_t;
        let result = self.check(call, enqueue(comm, stream)).and_then(|()| self.complete(call));
        if result.is_err() {
            self.abort_now();
        }
        result
    }

    /// Waits for the transfer just enqueued: first for NCCL to put it on the stream (a
    /// non-blocking communicator may still be connecting to the peer), then for the stream to
    /// reach an event recorded behind it, watching for errors NCCL reports meanwhile (a peer that
    /// went away).
    fn complete(&self, call: &'static str) -> Result<()> {
        self.wait(call)?;
        let done = self.dev.stream().record_event(None).map_err(self.dev.driver_error("cuEventRecord"))?;
        let mut pause = FIRST_POLL;
        loop {
            if done.try_is_complete().map_err(self.dev.driver_error("cuEventQuery"))? {
                return Ok(());
            }
            match self.state(call)? {
                ncclResult_t::ncclSuccess | ncclResult_t::ncclInProgress => {}
                other => return Err(self.failed(call, other)),
            }
            self.pause_or_abort(call, &mut pause)?;
        }
    }

    fn send_slice<T: NcclType>(&self, data: &CudaSlice<T>, peer: c_int) -> Result<()> {
        let (ptr, _record) = data.device_ptr(self.dev.stream());
        let len = data.len();
        self.transfer("ncclSend", |comm, stream| {
            // SAFETY: `ptr` holds `len` elements of T on this communicator's device, borrowed until
            // the transfer completed or the communicator was aborted (`transfer` returns after).
            unsafe { sys::ncclSend(ptr as *const c_void, len, T::as_nccl_type(), peer, comm, stream) }
        })
    }

    fn recv_slice<T: NcclType>(&self, data: &mut CudaSlice<T>, peer: c_int) -> Result<()> {
        let len = data.len();
        let (ptr, _record) = data.device_ptr_mut(self.dev.stream());
        self.transfer("ncclRecv", |comm, stream| {
            // SAFETY: as in `send_slice`, and the buffer is borrowed mutably.
            unsafe { sys::ncclRecv(ptr as *mut c_void, len, T::as_nccl_type(), peer, comm, stream) }
        })
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        self.abort_now();
    }
}
