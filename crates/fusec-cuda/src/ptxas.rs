//! `ptxas -v`: what each compiled kernel uses (registers, spilled bytes, static shared
//! memory, stack) and the occupancy that allows on one SM.
//!
//! The figures are ptxas's own, for one architecture and one ptxas version (both are
//! part of the output, so a table is reproducible); the occupancy follows the rules of
//! the CUDA Occupancy Calculator as the CUDA C++ Programming Guide states them
//! ("Compute Capabilities", technical specifications per compute capability, and
//! "Occupancy Calculator"): registers are allocated per warp in units of 256, shared
//! memory per block with 1 KiB reserved by the system, and an SM holds at most 64
//! warps (2048 threads) and 32 blocks on sm_80 and sm_90.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use fusec_codegen::Arch;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum PtxasError {
    #[error("ptxas not found (searched $FUSEC_PTXAS, $PATH, $CUDA_HOME/bin, /usr/local/cuda/bin)")]
    NotFound,
    #[error("could not run {path}: {source}")]
    Run {
        path: String,
        source: std::io::Error,
    },
    #[error("ptxas failed for {arch}: {stderr}")]
    Failed { arch: String, stderr: String },
    #[error("unexpected ptxas output: {0}")]
    Parse(String),
}

/// What ptxas reports for one kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resources {
    pub kernel: String,
    pub registers: u32,
    pub spill_stores: u32,
    pub spill_loads: u32,
    pub stack_bytes: u32,
    /// Static shared memory (`__shared__` arrays), without the dynamic part.
    pub shared_static: u32,
}

/// `ptxas`: `$FUSEC_PTXAS`, then `$PATH`, `$CUDA_HOME/bin`, `/usr/local/cuda/bin`.
pub fn find() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("FUSEC_PTXAS") {
        let p = PathBuf::from(p);
        return p.is_file().then_some(p);
    }
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(h) = std::env::var_os("CUDA_HOME") {
        dirs.push(PathBuf::from(h).join("bin"));
    }
    dirs.push(PathBuf::from("/usr/local/cuda/bin"));
    dirs.into_iter()
        .map(|d| d.join("ptxas"))
        .find(|p| p.is_file())
}

/// The last line of `ptxas --version` (e.g. `Build cuda_12.9.r12.9/compiler.36037853_0`).
pub fn version(ptxas: &Path) -> Result<String, PtxasError> {
    let out = Command::new(ptxas)
        .arg("--version")
        .output()
        .map_err(|source| PtxasError::Run {
            path: ptxas.display().to_string(),
            source,
        })?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .map(|l| l.trim().to_string())
        .ok_or_else(|| PtxasError::Parse("empty --version output".into()))
}

/// `ptxas -v -arch=sm_XX` on `ptx` (read from standard input, written nowhere), parsed.
pub fn resources(ptxas: &Path, ptx: &[u8], arch: Arch) -> Result<Vec<Resources>, PtxasError> {
    let run = |source| PtxasError::Run {
        path: ptxas.display().to_string(),
        source,
    };
    let mut child = Command::new(ptxas)
        .args(["-v", &format!("-arch={arch}"), "-o", "/dev/null", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(run)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(ptx).map_err(run)?;
    }
    let out = child.wait_with_output().map_err(run)?;
    // ptxas -v writes its info lines to stderr (stdout in some versions): read both.
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        return Err(PtxasError::Failed {
            arch: arch.to_string(),
            stderr: text,
        });
    }
    parse(&text)
}

fn number_before(line: &str, unit: &str) -> Option<u32> {
    let i = line.find(unit)?;
    line[..i].split_whitespace().last()?.parse().ok()
}

/// The kernels of a `ptxas -v` log, sorted by name (ptxas lists them in no useful
/// order).
pub fn parse(log: &str) -> Result<Vec<Resources>, PtxasError> {
    let mut out: Vec<Resources> = Vec::new();
    for line in log.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let name = rest
                .split('\'')
                .next()
                .ok_or_else(|| PtxasError::Parse(line.to_string()))?;
            out.push(Resources {
                kernel: name.to_string(),
                registers: 0,
                spill_stores: 0,
                spill_loads: 0,
                stack_bytes: 0,
                shared_static: 0,
            });
            continue;
        }
        let Some(cur) = out.last_mut() else { continue };
        if line.contains("bytes stack frame") {
            cur.stack_bytes = number_before(line, "bytes stack frame").unwrap_or(0);
            cur.spill_stores = number_before(line, "bytes spill stores").unwrap_or(0);
            cur.spill_loads = number_before(line, "bytes spill loads").unwrap_or(0);
        } else if line.contains("Used") && line.contains("registers") {
            cur.registers = number_before(line, "registers")
                .ok_or_else(|| PtxasError::Parse(line.to_string()))?;
            cur.shared_static = number_before(line, "bytes smem").unwrap_or(0);
        }
    }
    if out.is_empty() {
        return Err(PtxasError::Parse("no entry function in the log".into()));
    }
    out.sort_by(|a, b| a.kernel.cmp(&b.kernel));
    Ok(out)
}

/// An SM's limits for the occupancy rules (CUDA C++ Programming Guide, technical
/// specifications per compute capability).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SmLimits {
    pub registers: u32,
    pub max_warps: u32,
    pub max_blocks: u32,
    /// The most shared memory a block's SM can be configured with.
    pub shared_bytes: u32,
    /// Shared memory the system reserves per block.
    pub shared_reserved: u32,
}

impl SmLimits {
    /// sm_80 (A100): 164 KiB of shared memory per SM; sm_90 (H100/H200): 228 KiB. Both:
    /// 64 Ki registers, 64 warps, 32 blocks, 1 KiB reserved per block.
    pub fn of(arch: Arch) -> SmLimits {
        SmLimits {
            registers: 65_536,
            max_warps: 64,
            max_blocks: 32,
            shared_bytes: if arch.0 >= 90 { 228 * 1024 } else { 164 * 1024 },
            shared_reserved: 1024,
        }
    }
}

/// Resident blocks per SM and what limits them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Occupancy {
    pub blocks: u32,
    pub warps: u32,
    pub limiter: &'static str,
}

impl Occupancy {
    /// Resident warps over the SM's maximum.
    pub fn fraction(&self, limits: &SmLimits) -> f64 {
        f64::from(self.warps) / f64::from(limits.max_warps)
    }
}

/// How many blocks of `threads` threads, each thread using `registers` registers and
/// the block `shared` bytes of shared memory (static plus dynamic), fit on one SM.
pub fn occupancy(registers: u32, threads: u32, shared: u32, limits: &SmLimits) -> Occupancy {
    let warps = threads.div_ceil(32).max(1);
    // Registers: per warp, rounded up to the allocation unit of 256.
    let per_warp = (registers.max(1) * 32).div_ceil(256) * 256;
    let by_regs = (limits.registers / per_warp) / warps;
    let by_warps = limits.max_warps / warps;
    let by_shared = if shared == 0 {
        u32::MAX
    } else {
        limits.shared_bytes / (shared + limits.shared_reserved)
    };
    let candidates = [
        (by_warps, "warps"),
        (by_regs, "registers"),
        (by_shared, "shared memory"),
        (limits.max_blocks, "blocks"),
    ];
    let (blocks, limiter) = candidates
        .into_iter()
        .min_by_key(|(n, _)| *n)
        .unwrap_or((0, "warps"));
    Occupancy {
        blocks,
        warps: blocks * warps,
        limiter,
    }
}

/// A deterministic table of every kernel of `plan` compiled for `arch`: ptxas's
/// figures, the launch's threads and dynamic shared memory from the plan, and the
/// occupancy they allow. Kernels launched several times appear once (their launches
/// share threads and shared memory: the plan's kernel text fixes both).
pub fn table(
    res: &[Resources],
    plan: &fusec_codegen::LaunchPlan,
    arch: Arch,
    ptxas_version: &str,
) -> String {
    use std::fmt::Write as _;
    let limits = SmLimits::of(arch);
    let mut t = String::new();
    let _ = writeln!(
        t,
        "# ptxas -v, {arch} ({ptxas_version}); occupancy from the CUDA occupancy rules \
         ({} registers, {} warps, {} blocks, {} KiB shared memory per SM)",
        limits.registers,
        limits.max_warps,
        limits.max_blocks,
        limits.shared_bytes / 1024
    );
    let _ = writeln!(
        t,
        "{:<40} {:>7} {:>5} {:>12} {:>8} {:>8} {:>10} {:>9}  limiter",
        "kernel", "threads", "regs", "spill st/ld", "smem", "dynamic", "blocks/SM", "occupancy"
    );
    for r in res {
        let Some(l) = plan.launches.iter().find(|l| l.kernel == r.kernel) else {
            continue;
        };
        let threads = l.block.iter().product::<u32>();
        let o = occupancy(
            r.registers,
            threads,
            r.shared_static + l.shared_bytes,
            &limits,
        );
        let _ = writeln!(
            t,
            "{:<40} {:>7} {:>5} {:>12} {:>8} {:>8} {:>10} {:>8.0}%  {}",
            r.kernel,
            threads,
            r.registers,
            format!("{}/{}", r.spill_stores, r.spill_loads),
            r.shared_static,
            l.shared_bytes,
            o.blocks,
            o.fraction(&limits) * 100.0,
            o.limiter
        );
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = "ptxas info    : 35 bytes gmem
ptxas info    : Compiling entry function 'fusec_k13_argmax' for 'sm_90'
ptxas info    : Function properties for fusec_k13_argmax
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 15 registers, used 1 barriers, 256 bytes smem
ptxas info    : Compile time = 48.332 ms
ptxas info    : Compiling entry function 'fusec_k12_gemv' for 'sm_90'
ptxas info    : Function properties for fusec_k12_gemv
    32 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 34 registers, used 1 barriers, 144 bytes smem, 368 bytes cmem[0]
";

    #[test]
    fn parses_a_ptxas_log_sorted_by_kernel() {
        let r = parse(LOG).expect("parses");
        assert_eq!(
            r,
            vec![
                Resources {
                    kernel: "fusec_k12_gemv".into(),
                    registers: 34,
                    spill_stores: 8,
                    spill_loads: 4,
                    stack_bytes: 32,
                    shared_static: 144,
                },
                Resources {
                    kernel: "fusec_k13_argmax".into(),
                    registers: 15,
                    spill_stores: 0,
                    spill_loads: 0,
                    stack_bytes: 0,
                    shared_static: 256,
                },
            ]
        );
        assert!(parse("ptxas info    : 0 bytes gmem\n").is_err());
    }

    #[test]
    fn occupancy_by_hand() {
        let h = SmLimits::of(Arch::SM90);
        // 256 threads at 34 registers: 34 * 32 = 1088 -> 1280 per warp; 65536 / 1280 =
        // 51 warps, 6 blocks of 8 warps by registers; 8 by warps: 6 blocks, 48 warps.
        let o = occupancy(34, 256, 144, &h);
        assert_eq!((o.blocks, o.warps, o.limiter), (6, 48, "registers"));
        assert!((o.fraction(&h) - 0.75).abs() < 1e-12);
        // 32 registers: 1024 per warp, 64 warps: 8 blocks by registers and by warps.
        assert_eq!(occupancy(32, 256, 0, &h).blocks, 8);
        // 128 threads at 128 registers: 4096 per warp, 16 warps, 4 blocks of 4 warps.
        let o = occupancy(128, 128, 7248, &h);
        assert_eq!((o.blocks, o.warps, o.limiter), (4, 16, "registers"));
        // 57,344 bytes of dynamic shared memory plus 144 static: 58,512 with the
        // reserved KiB; 233,472 / 58,512 = 3 blocks on sm_90, 167,936 / 58,512 = 2 on
        // sm_80.
        let o = occupancy(32, 256, 57_344 + 144, &h);
        assert_eq!((o.blocks, o.limiter), (3, "shared memory"));
        let a = SmLimits::of(Arch::SM80);
        assert_eq!(occupancy(32, 256, 57_344 + 144, &a).blocks, 2);
        // 1024 threads: at most 2 blocks by warps.
        assert_eq!(occupancy(15, 1024, 256, &h).blocks, 2);
    }
}
