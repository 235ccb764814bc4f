//! The GPU executor (feature `cuda`): runs the kernels and launch plan of
//! `fusec-codegen` on an NVIDIA GPU through cudarc, with the CUDA driver and NVRTC
//! loaded at run time, so the crate builds and its tests run where CUDA is absent.
//!
//! - [`CudaDevice`] is `crate::runtime::Device` on a GPU: allocations by
//!   address, NVRTC to a CUBIN for the GPU's own architecture, launches on one stream;
//! - [`CheckpointWeights`] feeds a [`Weights`] set (a checkpoint, random weights, or
//!   the FP8 weights of `fusec_weights::quant`) to the runner in the dtypes the plan wants;
//! - [`Runner`] (re-exported) allocates the plan's buffers and runs decode steps.
//!
//! A missing driver, a missing NVRTC, or no GPU is a [`GpuError`], never a panic:
//! presence is checked before cudarc is first called, as cudarc panics on a missing
//! library.

// The CUDA driver API is C: allocation, copies and launches through raw device
// addresses cannot be expressed without `unsafe`. Every address passed below is one
// this module allocated (or an offset inside it that the launch plan sized), every
// copy stays within the allocation's byte count, and kernels are launched with the
// argument list their generated signature declares (pointers, then `int S`).
#![allow(unsafe_code)]

use std::collections::HashMap;
use std::sync::Arc;

use crate::nvrtc::{Nvrtc, NvrtcError, Target};
use crate::runtime::{Device, RunError};
use cudarc::driver::{
    result, sys, CudaContext, CudaFunction, CudaStream, LaunchConfig, PushKernelArg,
};
use fusec_codegen::{Arch, Output};

pub use crate::runtime::{Runner, Step};

/// Why the GPU cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error("the CUDA driver (libcuda.so) is not installed or cannot be loaded")]
    NoDriver,
    #[error(transparent)]
    Nvrtc(#[from] NvrtcError),
    #[error("CUDA: {0}")]
    Driver(String),
    #[error(transparent)]
    Run(#[from] RunError),
}

fn driver(e: impl std::fmt::Debug) -> RunError {
    RunError::Device(format!("{e:?}"))
}

/// Whether the CUDA driver library can be loaded.
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen the library by name.
    unsafe { sys::is_culib_present() }
}

/// One GPU, its default stream, and what has been allocated and loaded on it.
#[derive(Debug)]
pub struct CudaDevice {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    nvrtc: Nvrtc,
    arch: Arch,
    allocations: Vec<u64>,
    functions: HashMap<String, CudaFunction>,
    /// Dynamic shared memory each kernel has been allowed.
    shared_limit: HashMap<String, u32>,
}

impl CudaDevice {
    /// The GPU `ordinal` (0 for the first), with NVRTC found as
    /// `crate::nvrtc` documents.
    pub fn new(ordinal: usize) -> Result<CudaDevice, GpuError> {
        if !driver_present() {
            return Err(GpuError::NoDriver);
        }
        let nvrtc = Nvrtc::load()?;
        let ctx = CudaContext::new(ordinal).map_err(|e| GpuError::Driver(format!("{e:?}")))?;
        let (major, minor) = ctx
            .compute_capability()
            .map_err(|e| GpuError::Driver(format!("{e:?}")))?;
        let cc = u32::try_from(major * 10 + minor)
            .map_err(|_| GpuError::Driver("bad compute capability".into()))?;
        if cc < 80 {
            return Err(GpuError::Driver(format!(
                "compute capability {major}.{minor}: fusec's kernels need sm_80 or newer"
            )));
        }
        let stream = ctx.default_stream();
        Ok(CudaDevice {
            ctx,
            stream,
            nvrtc,
            arch: Arch(cc),
            allocations: Vec::new(),
            functions: HashMap::new(),
            shared_limit: HashMap::new(),
        })
    }

    /// The GPU's name, e.g. `NVIDIA H100 80GB HBM3`.
    pub fn name(&self) -> String {
        self.ctx.name().unwrap_or_else(|_| "unknown GPU".into())
    }

    pub fn arch(&self) -> Arch {
        self.arch
    }

    /// Measures device-to-device copy bandwidth on `bytes` bytes (read plus written
    /// bytes per second, as achieved-bandwidth figures count them), best of `reps`.
    pub fn copy_bandwidth(&mut self, bytes: u64, reps: u32) -> Result<f64, RunError> {
        let src = self.alloc(bytes)?;
        let dst = self.alloc(bytes)?;
        let n = usize::try_from(bytes).map_err(|_| RunError::Device("copy too large".into()))?;
        let mut best = f64::INFINITY;
        for _ in 0..reps.max(1) {
            self.sync()?;
            let t = std::time::Instant::now();
            // SAFETY: both addresses are allocations of `bytes` bytes made above.
            unsafe { result::memcpy_dtod_async(dst, src, n, self.stream.cu_stream()) }
                .map_err(driver)?;
            self.sync()?;
            best = best.min(t.elapsed().as_secs_f64());
        }
        Ok(2.0 * bytes as f64 / best)
    }
}

impl Drop for CudaDevice {
    fn drop(&mut self) {
        let _ = self.stream.synchronize();
        for &a in &self.allocations {
            // SAFETY: allocated by `alloc` and freed once.
            let _ = unsafe { result::free_sync(a) };
        }
    }
}

impl Device for CudaDevice {
    fn alloc(&mut self, bytes: u64) -> Result<u64, RunError> {
        let n = usize::try_from(bytes.max(1))
            .map_err(|_| RunError::Device(format!("{bytes} bytes")))?;
        self.ctx.bind_to_thread().map_err(driver)?;
        // SAFETY: a fresh allocation of `n` bytes, zeroed before use; cudaMalloc
        // aligns to at least 256 bytes.
        let a = unsafe { result::malloc_sync(n) }.map_err(driver)?;
        self.allocations.push(a);
        // SAFETY: `a` holds `n` bytes.
        unsafe { result::memset_d8_sync(a, 0, n) }.map_err(driver)?;
        Ok(a)
    }

    fn write(&mut self, addr: u64, data: &[u8]) -> Result<(), RunError> {
        self.ctx.bind_to_thread().map_err(driver)?;
        // SAFETY: the runner writes within the buffers it sized from the plan.
        unsafe { result::memcpy_htod_sync(addr, data) }.map_err(driver)
    }

    fn read(&mut self, addr: u64, len: usize) -> Result<Vec<u8>, RunError> {
        self.ctx.bind_to_thread().map_err(driver)?;
        self.sync()?;
        let mut out = vec![0u8; len];
        // SAFETY: as for `write`; the stream is idle, so the copy sees every launch.
        unsafe { result::memcpy_dtoh_sync(&mut out, addr) }.map_err(driver)?;
        Ok(out)
    }

    fn load(&mut self, output: &Output) -> Result<(), RunError> {
        let image = self
            .nvrtc
            .compile(&output.source(), Target::Cubin(self.arch))
            .map_err(|e| RunError::Device(e.to_string()))?;
        let module = self
            .ctx
            .load_module(cudarc::nvrtc::Ptx::from_binary(image.image))
            .map_err(driver)?;
        for k in &output.kernels {
            let f = module.load_function(&k.name).map_err(driver)?;
            self.functions.insert(k.name.clone(), f);
        }
        Ok(())
    }

    fn launch(
        &mut self,
        kernel: &str,
        grid: [u32; 3],
        block: [u32; 3],
        shared: u32,
        args: &[u64],
        past: i32,
    ) -> Result<(), RunError> {
        let f = self
            .functions
            .get(kernel)
            .ok_or_else(|| RunError::Device(format!("kernel `{kernel}` is not loaded")))?;
        // Above 48 KiB a kernel must be allowed its dynamic shared memory first.
        if shared > 48 * 1024 && self.shared_limit.get(kernel).copied().unwrap_or(0) < shared {
            let v = i32::try_from(shared).map_err(|_| RunError::Device("shared memory".into()))?;
            f.set_attribute(
                sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                v,
            )
            .map_err(driver)?;
            self.shared_limit.insert(kernel.to_string(), shared);
        }
        let mut b = self.stream.launch_builder(f);
        for a in args {
            b.arg(a);
        }
        b.arg(&past);
        let cfg = LaunchConfig {
            grid_dim: (grid[0], grid[1], grid[2]),
            block_dim: (block[0], block[1], block[2]),
            shared_mem_bytes: shared,
        };
        // SAFETY: the arguments are the kernel's parameters in order: one device
        // address per pointer parameter, each a live buffer the plan sized for what
        // the kernel indexes, then `int S`.
        unsafe { b.launch(cfg) }.map_err(driver)?;
        Ok(())
    }

    fn sync(&mut self) -> Result<(), RunError> {
        self.stream.synchronize().map_err(driver)
    }
}
