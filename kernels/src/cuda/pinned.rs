//! Page-locked host memory in front of one device: the CUDA side of [`crate::HostStaging`].

use std::sync::Arc;

use cudarc::driver::{sys, CudaEvent, DevicePtrMut, PinnedHostSlice};

use super::{CudaBuf, CudaDevice, CudaStorage};
use crate::{DType, Result};

/// A page-locked buffer, grown on demand, and the event of the last copy out of it.
pub(crate) struct PinnedStaging {
    dev: Arc<CudaDevice>,
    buf: Option<PinnedHostSlice<u8>>,
    /// Bytes asked for by the last [`PinnedStaging::buffer`].
    asked: usize,
    /// Recorded after each upload; waited for before the buffer is handed out again. Blocking, so
    /// that a loader waiting behind a long queue of device work sleeps instead of spinning.
    copied: CudaEvent,
}

impl PinnedStaging {
    pub(crate) fn new(dev: Arc<CudaDevice>) -> Result<PinnedStaging> {
        let copied =
            dev.stream.context().new_event(Some(sys::CUevent_flags::CU_EVENT_BLOCKING_SYNC)).map_err(dev.driver_error("cuEventCreate"))?;
        Ok(PinnedStaging { dev, buf: None, asked: 0, copied })
    }

    /// Bytes asked for by the last [`PinnedStaging::buffer`].
    pub(crate) fn len(&self) -> usize {
        self.asked
    }

    pub(crate) fn buffer(&mut self, len: usize) -> Result<&mut [u8]> {
        // An event never recorded counts as complete.
        self.copied.synchronize().map_err(self.dev.driver_error("cuEventSynchronize"))?;
        if self.buf.as_ref().is_none_or(|b| b.len() < len) {
            self.buf = None;
            // Plain page-locked memory, not write-combined: the loader reads it back (finiteness).
            // SAFETY: cuMemHostAlloc of `len` bytes; the slice frees it when dropped.
            let buf = unsafe { self.dev.stream.context().alloc_pinned_with_flags::<u8>(len.max(1), 0) }
                .map_err(self.dev.driver_error("cuMemHostAlloc"))?;
            self.buf = Some(buf);
        }
        self.asked = len;
        let buf = self.buf.as_mut().expect("allocated above");
        let bytes = buf.as_mut_slice().map_err(self.dev.driver_error("cuEventSynchronize"))?;
        Ok(&mut bytes[..len])
    }

    /// A new device buffer of `elements` values of `dtype`, filled from the start of the staging
    /// buffer by an asynchronous copy on the device's stream.
    pub(crate) fn upload(&mut self, dtype: DType, elements: usize) -> Result<CudaStorage> {
        let len = elements * dtype.size_bytes();
        let dev = self.dev.clone();
        let host = self.buf.as_ref().map(|b| b.as_slice()).transpose().map_err(dev.driver_error("cuEventSynchronize"))?.unwrap_or(&[]);
        let host = &host[..len];
        let mut out = dev.alloc_buf(dtype, elements)?;
        if len > 0 {
            let stream = dev.stream.clone();
            // The guard records the write for cudarc's cross-stream tracking (off on one stream).
            let (dst, _write) = match &mut out {
                CudaBuf::F32(s) => s.device_ptr_mut(&stream),
                CudaBuf::F16(s) => s.device_ptr_mut(&stream),
                CudaBuf::BF16(s) => s.device_ptr_mut(&stream),
            };
            // SAFETY: `dst` is a fresh allocation of exactly `len` bytes on this stream; `host` is
            // page-locked and is not written again before `copied` (recorded below) completes.
            unsafe { cudarc::driver::result::memcpy_htod_async(dst, host, stream.cu_stream()) }
                .map_err(dev.driver_error("cuMemcpyHtoDAsync"))?;
            self.copied.record(&stream).map_err(dev.driver_error("cuEventRecord"))?;
        }
        Ok(CudaStorage::new(dev, out))
    }
}
