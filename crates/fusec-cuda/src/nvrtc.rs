//! NVRTC, loaded at run time, so that fusec builds and runs where CUDA is absent.
//!
//! [`Nvrtc::load`] looks for `libnvrtc` in this order, taking the first that loads:
//! 1. `$FUSEC_NVRTC`: the library file, or a directory holding it;
//! 2. every directory of `$LD_LIBRARY_PATH`;
//! 3. `$CUDA_HOME/lib64`, `$CUDA_PATH/lib64`, `/usr/local/cuda/lib64`;
//! 4. the system's library search (`libnvrtc.so.12`, `libnvrtc.so`).
//!
//! The CUDA headers (`cuda_fp16.h`, `cuda_bf16.h`, `cuda_fp8.h`) come from
//! `$FUSEC_CUDA_INCLUDE`, or next to the library: the pip wheels' `nvidia/cuda_runtime/
//! include` beside `nvidia/cuda_nvrtc/lib`, or a toolkit's `include` beside `lib64`.
//!
//! A missing library is an [`NvrtcError::NotFound`] naming every place searched, never
//! a panic.

// Calling a C library through function pointers is unsafe by nature; every call
// below passes pointers that live for the duration of the call, with the sizes NVRTC
// asked for, and the program handle is destroyed exactly once.
#![allow(unsafe_code)]

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::path::{Path, PathBuf};

use fusec_codegen::Arch;

type Program = *mut c_void;
type NvrtcResult = c_int;

/// What went wrong with NVRTC.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NvrtcError {
    #[error("NVRTC not found (set FUSEC_NVRTC to libnvrtc.so.12, or add its directory to LD_LIBRARY_PATH); searched: {}", tried.join(", "))]
    NotFound { tried: Vec<String> },
    #[error("{library}: missing symbol `{symbol}`")]
    Symbol { library: String, symbol: String },
    #[error("{call} failed: {message} ({code})")]
    Call {
        call: &'static str,
        code: i32,
        message: String,
    },
    #[error("NVRTC could not compile the kernels for {target}:\n{log}")]
    Compile { target: String, log: String },
    #[error("the source holds a NUL byte")]
    Nul,
}

/// What to compile to.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// PTX for the virtual architecture (`compute_80`).
    Ptx(Arch),
    /// A CUBIN for the real architecture (`sm_80`): also runs the assembler, so
    /// register and shared memory limits are checked.
    Cubin(Arch),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Ptx(a) => write!(f, "{} (PTX)", a.compute()),
            Target::Cubin(a) => write!(f, "{} (CUBIN)", a.sm()),
        }
    }
}

/// A compiled image and NVRTC's log (warnings).
#[derive(Clone, Debug)]
pub struct Compiled {
    pub image: Vec<u8>,
    pub log: String,
}

/// A loaded NVRTC library.
#[derive(Debug)]
pub struct Nvrtc {
    lib: libloading::Library,
    path: String,
    include: Option<PathBuf>,
}

const NAMES: [&str; 3] = ["libnvrtc.so", "libnvrtc.so.12", "libnvrtc.so.13"];

fn env_path(var: &str) -> Option<PathBuf> {
    std::env::var_os(var)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// Candidate library paths, in search order.
fn candidates() -> Vec<String> {
    let mut out = Vec::new();
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Some(p) = env_path("FUSEC_NVRTC") {
        if p.is_dir() {
            dirs.push(p);
        } else {
            out.push(p.display().to_string());
        }
    }
    if let Some(paths) = std::env::var_os("LD_LIBRARY_PATH") {
        dirs.extend(std::env::split_paths(&paths).filter(|p| !p.as_os_str().is_empty()));
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(p) = env_path(var) {
            dirs.push(p.join("lib64"));
        }
    }
    dirs.push(PathBuf::from("/usr/local/cuda/lib64"));
    for d in dirs {
        for n in NAMES {
            let f = d.join(n);
            if f.is_file() {
                out.push(f.display().to_string());
            }
        }
    }
    out.extend(["libnvrtc.so.12", "libnvrtc.so"].map(String::from));
    out
}

/// The directory holding `cuda_fp16.h` for the library at `lib`.
fn find_include(lib: &str) -> Option<PathBuf> {
    let has = |d: &Path| d.join("cuda_fp16.h").is_file();
    if let Some(p) = env_path("FUSEC_CUDA_INCLUDE") {
        return Some(p);
    }
    let mut tries = Vec::new();
    if let Some(dir) = Path::new(lib).parent() {
        tries.push(dir.join("../../cuda_runtime/include"));
        tries.push(dir.join("../include"));
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(p) = env_path(var) {
            tries.push(p.join("include"));
        }
    }
    tries.push(PathBuf::from("/usr/local/cuda/include"));
    tries
        .into_iter()
        .find(|d| has(d))
        .map(|d| d.canonicalize().unwrap_or(d))
}

impl Nvrtc {
    /// Loads NVRTC; see the module documentation for where it looks.
    pub fn load() -> Result<Nvrtc, NvrtcError> {
        let tried = candidates();
        for c in &tried {
            // SAFETY: loading a shared library runs its initialisers; libnvrtc's are
            // those of any CUDA library and have no preconditions.
            if let Ok(lib) = unsafe { libloading::Library::new(c) } {
                let n = Nvrtc {
                    lib,
                    path: c.clone(),
                    include: find_include(c),
                };
                // A library that loads but lacks NVRTC's entry points is not NVRTC.
                if n.version().is_ok() {
                    return Ok(n);
                }
            }
        }
        Err(NvrtcError::NotFound { tried })
    }

    /// Where the library was loaded from.
    pub fn library(&self) -> &str {
        &self.path
    }

    /// The CUDA include directory passed to the compiler, if one was found.
    pub fn include_dir(&self) -> Option<&Path> {
        self.include.as_deref()
    }

    fn sym<T>(&self, name: &'static str) -> Result<libloading::Symbol<'_, T>, NvrtcError> {
        // SAFETY: `T` is the C signature of `name` as documented by NVRTC; the symbol
        // borrows the library, so it cannot outlive it.
        unsafe { self.lib.get::<T>(name.as_bytes()) }.map_err(|_| NvrtcError::Symbol {
            library: self.path.clone(),
            symbol: name.to_string(),
        })
    }

    fn check(&self, call: &'static str, r: NvrtcResult) -> Result<(), NvrtcError> {
        if r == 0 {
            return Ok(());
        }
        let message = match self
            .sym::<unsafe extern "C" fn(NvrtcResult) -> *const c_char>("nvrtcGetErrorString")
        {
            // SAFETY: NVRTC returns a static, NUL-terminated string for any code.
            Ok(f) => unsafe {
                let p = f(r);
                if p.is_null() {
                    String::new()
                } else {
                    CStr::from_ptr(p).to_string_lossy().into_owned()
                }
            },
            Err(_) => String::new(),
        };
        Err(NvrtcError::Call {
            call,
            code: r,
            message,
        })
    }

    /// NVRTC's version, `(major, minor)`.
    pub fn version(&self) -> Result<(i32, i32), NvrtcError> {
        let f = self
            .sym::<unsafe extern "C" fn(*mut c_int, *mut c_int) -> NvrtcResult>("nvrtcVersion")?;
        let (mut major, mut minor) = (0, 0);
        // SAFETY: two valid out-pointers.
        let r = unsafe { f(&mut major, &mut minor) };
        self.check("nvrtcVersion", r)?;
        Ok((major, minor))
    }

    /// Compiles one translation unit for `target`.
    pub fn compile(&self, source: &str, target: Target) -> Result<Compiled, NvrtcError> {
        let src = CString::new(source).map_err(|_| NvrtcError::Nul)?;
        let name = CString::new("kernels.cu").map_err(|_| NvrtcError::Nul)?;
        let mut options = vec!["--std=c++17".to_string()];
        options.push(match target {
            Target::Ptx(a) => format!("--gpu-architecture={}", a.compute()),
            Target::Cubin(a) => format!("--gpu-architecture={}", a.sm()),
        });
        if let Some(inc) = &self.include {
            options.push(format!("--include-path={}", inc.display()));
        }
        let options: Vec<CString> = options
            .into_iter()
            .map(CString::new)
            .collect::<Result<_, _>>()
            .map_err(|_| NvrtcError::Nul)?;
        let option_ptrs: Vec<*const c_char> = options.iter().map(|o| o.as_ptr()).collect();

        type Create = unsafe extern "C" fn(
            *mut Program,
            *const c_char,
            *const c_char,
            c_int,
            *const *const c_char,
            *const *const c_char,
        ) -> NvrtcResult;
        type Compile = unsafe extern "C" fn(Program, c_int, *const *const c_char) -> NvrtcResult;
        type Size = unsafe extern "C" fn(Program, *mut usize) -> NvrtcResult;
        type Get = unsafe extern "C" fn(Program, *mut c_char) -> NvrtcResult;
        type Destroy = unsafe extern "C" fn(*mut Program) -> NvrtcResult;
        let create = self.sym::<Create>("nvrtcCreateProgram")?;
        let compile = self.sym::<Compile>("nvrtcCompileProgram")?;
        let log_size = self.sym::<Size>("nvrtcGetProgramLogSize")?;
        let get_log = self.sym::<Get>("nvrtcGetProgramLog")?;
        let (size_name, get_name) = match target {
            Target::Ptx(_) => ("nvrtcGetPTXSize", "nvrtcGetPTX"),
            Target::Cubin(_) => ("nvrtcGetCUBINSize", "nvrtcGetCUBIN"),
        };
        let image_size = self.sym::<Size>(size_name)?;
        let get_image = self.sym::<Get>(get_name)?;
        let destroy = self.sym::<Destroy>("nvrtcDestroyProgram")?;

        let mut prog: Program = std::ptr::null_mut();
        // SAFETY: `src` and `name` are NUL-terminated and outlive the call; no headers.
        let r = unsafe {
            create(
                &mut prog,
                src.as_ptr(),
                name.as_ptr(),
                0,
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        self.check("nvrtcCreateProgram", r)?;
        let result = (|| {
            let n = c_int::try_from(option_ptrs.len()).unwrap_or(c_int::MAX);
            // SAFETY: `prog` is a live program; `option_ptrs` holds `n` valid strings.
            let compiled = unsafe { compile(prog, n, option_ptrs.as_ptr()) };
            let mut size = 0usize;
            // SAFETY: a live program and a valid out-pointer.
            self.check("nvrtcGetProgramLogSize", unsafe {
                log_size(prog, &mut size)
            })?;
            let mut log = vec![0u8; size.max(1)];
            // SAFETY: `log` holds the `size` bytes NVRTC asked for.
            self.check("nvrtcGetProgramLog", unsafe {
                get_log(prog, log.as_mut_ptr().cast())
            })?;
            let log = String::from_utf8_lossy(&log)
                .trim_end_matches('\0')
                .trim()
                .to_string();
            if compiled != 0 {
                return Err(NvrtcError::Compile {
                    target: target.to_string(),
                    log,
                });
            }
            // SAFETY: as above.
            self.check(size_name, unsafe { image_size(prog, &mut size) })?;
            let mut image = vec![0u8; size];
            // SAFETY: `image` holds the `size` bytes NVRTC asked for.
            self.check(get_name, unsafe {
                get_image(prog, image.as_mut_ptr().cast())
            })?;
            if matches!(target, Target::Ptx(_)) {
                // PTX is text with a terminating NUL.
                while image.last() == Some(&0) {
                    image.pop();
                }
            }
            Ok(Compiled { image, log })
        })();
        // SAFETY: `prog` was created above and is destroyed once.
        let _ = unsafe { destroy(&mut prog) };
        result
    }
}
