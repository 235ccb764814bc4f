//! A [`Device`] that runs the generated kernels on the CPU: the translation unit is
//! compiled by the host C++ compiler against `emu.h`, a small emulation of the CUDA
//! features the kernels use, and loaded as a shared library.
//!
//! It checks the kernels' logic (indexing, reductions, online softmax, GQA, in-place
//! appends, FP8 scaling) where no GPU is at hand; it says nothing about performance.

// Loading the compiled kernels and calling them through C function pointers cannot be
// done without `unsafe`; every pointer passed is a live allocation made by the
// library itself, with the sizes the plan gives.
#![allow(unsafe_code)]

use std::collections::HashMap;
use std::fmt::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use fusec_codegen::Output;
use fusec_cuda::runtime::{Device, RunError};

type Launch = unsafe extern "C" fn(*const u64, i32, u32, u32, u32, u32, u32);

/// The C++ compiler, if there is one.
pub fn compiler() -> Option<String> {
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "g++".into());
    let ok = Command::new(&cxx)
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    ok.then_some(cxx)
}

/// The C++ compiler, or `None` after saying loudly (past the test harness's capture, so
/// that it shows in every log) that `what` was not run. With `FUSEC_REQUIRE_TOOLS` set,
/// as `.ci/run` sets it, a missing compiler fails the test instead.
pub fn compiler_or_report(what: &str) -> Option<String> {
    let c = compiler();
    if c.is_none() {
        let line = format!("NO C++ COMPILER: {what} were NOT run in emulation");
        if std::env::var_os("FUSEC_REQUIRE_TOOLS").is_some() {
            panic!("{line} (FUSEC_REQUIRE_TOOLS is set)");
        }
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), "\n{line}\n");
    }
    c
}

pub struct Emulator {
    dir: PathBuf,
    lib: Option<libloading::Library>,
    launchers: HashMap<String, Launch>,
    cxx: String,
}

impl Emulator {
    pub fn new(cxx: String, dir: &Path) -> Emulator {
        Emulator {
            dir: dir.to_path_buf(),
            lib: None,
            launchers: HashMap::new(),
            cxx,
        }
    }

    fn lib(&self) -> Result<&libloading::Library, RunError> {
        self.lib
            .as_ref()
            .ok_or_else(|| RunError::Device("kernels not loaded".into()))
    }

    fn sym<T: Copy>(&self, name: &str) -> Result<T, RunError> {
        // SAFETY: the symbol is one of the functions emu.h or the glue below defines,
        // with the signature `T`.
        unsafe { self.lib()?.get::<T>(name.as_bytes()).map(|s| *s) }
            .map_err(|e| RunError::Device(format!("{name}: {e}")))
    }
}

/// The glue that launches one kernel: its pointer parameters' types come from its
/// signature.
fn glue(name: &str, function: &str) -> Result<String, String> {
    let open = format!("{name}(");
    let start = function.find(&open).ok_or("no signature")? + open.len();
    let end = function[start..].find(") {").ok_or("no signature end")? + start;
    let params: Vec<&str> = function[start..end].split(", ").collect();
    let mut args = Vec::new();
    for (i, p) in params.iter().enumerate() {
        if *p == "const int S" {
            args.push("S".to_string());
        } else {
            let ty = p.split(" __restrict__").next().ok_or("parameter")?;
            args.push(format!("({ty})a[{i}]"));
        }
    }
    Ok(format!(
        "extern \"C\" void emu_launch_{name}(const unsigned long long* a, int S, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned shared) {{\n  emu::launch(dim3{{gx, gy, gz}}, bx, shared, [=] {{ {name}({}); }});\n}}\n",
        args.join(", ")
    ))
}

impl Device for Emulator {
    fn alloc(&mut self, bytes: u64) -> Result<u64, RunError> {
        let f: unsafe extern "C" fn(u64) -> u64 = self.sym("emu_alloc")?;
        // SAFETY: emu_alloc allocates and zeroes; 0 means out of memory.
        let p = unsafe { f(bytes) };
        if p == 0 {
            return Err(RunError::Device(format!("cannot allocate {bytes} bytes")));
        }
        Ok(p)
    }

    fn write(&mut self, addr: u64, data: &[u8]) -> Result<(), RunError> {
        let f: unsafe extern "C" fn(u64, *const u8, u64) = self.sym("emu_write")?;
        // SAFETY: `addr` is inside an allocation of at least `data.len()` bytes.
        unsafe { f(addr, data.as_ptr(), data.len() as u64) };
        Ok(())
    }

    fn read(&mut self, addr: u64, len: usize) -> Result<Vec<u8>, RunError> {
        let f: unsafe extern "C" fn(*mut u8, u64, u64) = self.sym("emu_read")?;
        let mut out = vec![0u8; len];
        // SAFETY: as for write.
        unsafe { f(out.as_mut_ptr(), addr, len as u64) };
        Ok(out)
    }

    fn load(&mut self, output: &Output) -> Result<(), RunError> {
        std::fs::create_dir_all(&self.dir).map_err(|e| RunError::Device(e.to_string()))?;
        let here = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/emulate");
        // Dynamic shared memory is the block's buffer in the emulation.
        let mut src = output.source().replace(
            "extern __shared__ __align__(16) unsigned char fu_dyn[];",
            "unsigned char* fu_dyn = emu::block->dyn;",
        );
        for k in &output.kernels {
            let g = glue(&k.name, &k.function).map_err(RunError::Device)?;
            let _ = writeln!(src, "{g}");
        }
        let cpp = self.dir.join("kernels.cpp");
        let so = self.dir.join("libkernels.so");
        std::fs::write(&cpp, src).map_err(|e| RunError::Device(e.to_string()))?;
        let out = Command::new(&self.cxx)
            .args([
                "-std=c++20",
                "-O1",
                "-U_FORTIFY_SOURCE",
                "-fno-gnu-unique",
                "-shared",
                "-fPIC",
                "-pthread",
                "-w",
                "-include",
            ])
            .arg(here.join("emu.h"))
            .arg("-I")
            .arg(here.join("include"))
            .arg(&cpp)
            .arg("-o")
            .arg(&so)
            .output()
            .map_err(|e| RunError::Device(e.to_string()))?;
        if !out.status.success() {
            return Err(RunError::Device(format!(
                "{} failed:\n{}",
                self.cxx,
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        // SAFETY: the library was just built from the kernels and emu.h; its
        // initialisers only set up statics.
        let lib = unsafe { libloading::Library::new(&so) }
            .map_err(|e| RunError::Device(e.to_string()))?;
        self.lib = Some(lib);
        for k in &output.kernels {
            let f: Launch = self.sym(&format!("emu_launch_{}", k.name))?;
            self.launchers.insert(k.name.clone(), f);
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
        let f = *self
            .launchers
            .get(kernel)
            .ok_or_else(|| RunError::Device(format!("no kernel {kernel}")))?;
        // SAFETY: `args` holds one live device address per pointer parameter.
        unsafe {
            f(
                args.as_ptr(),
                past,
                grid[0],
                grid[1],
                grid[2],
                block[0],
                shared,
            )
        };
        Ok(())
    }

    fn sync(&mut self) -> Result<(), RunError> {
        Ok(())
    }
}
