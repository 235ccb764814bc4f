//! What the backend is asked to produce: target architectures, block sizes, and the
//! decode shape the kernels are specialised for.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::Error;

/// A CUDA compute capability, `sm_80` for `Arch(80)`.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct Arch(pub u32);

impl Arch {
    /// Ampere (A100), the oldest target: BF16 arithmetic, no FP8 tensor cores.
    pub const SM80: Arch = Arch(80);
    /// Hopper (H100, H200).
    pub const SM90: Arch = Arch(90);

    /// The real architecture, for CUBIN: `sm_80`.
    pub fn sm(self) -> String {
        format!("sm_{}", self.0)
    }

    /// The virtual architecture, for PTX: `compute_80`.
    pub fn compute(self) -> String {
        format!("compute_{}", self.0)
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sm_{}", self.0)
    }
}

impl From<Arch> for String {
    fn from(a: Arch) -> String {
        a.sm()
    }
}

impl TryFrom<String> for Arch {
    type Error = String;

    fn try_from(s: String) -> Result<Arch, String> {
        s.parse()
    }
}

impl std::str::FromStr for Arch {
    type Err = String;

    /// Parses `sm_80` (or `80`). Compute capabilities below 8.0 are rejected: the
    /// kernels use BF16 conversions that need Ampere.
    fn from_str(s: &str) -> Result<Arch, String> {
        let digits = s.strip_prefix("sm_").unwrap_or(s);
        match digits.parse::<u32>() {
            Ok(v) if v >= 80 => Ok(Arch(v)),
            Ok(v) => Err(format!("sm_{v} is too old: fusec targets sm_80 and newer")),
            Err(_) => Err(format!("`{s}` is not an architecture like sm_80")),
        }
    }
}

/// The concrete decode shape the kernels are specialised for. The batch is baked into
/// every kernel; the number of cached positions `S` stays a kernel argument, and every
/// buffer with a dimension derived from `S` is allocated for `max_seq_len` positions,
/// so that its strides are compile-time constants and one plan serves every step.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecodeShape {
    /// Sequences per step (the symbol `B`).
    pub batch: u64,
    /// The most positions a KV cache holds after a step (`S + 1 <= max_seq_len`).
    pub max_seq_len: u64,
    /// The sizes of a paged KV cache's symbols (`P` blocks in each pool, `M` entries per
    /// block table row), for a paged step's graph; `None` for a dense step, and for a
    /// paged one [`crate::generate`] fills in [`PagedShape::covering`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paged: Option<PagedShape>,
}

/// The static sizes of a paged KV cache (Kwon et al. 2023, "Efficient Memory
/// Management for Large Language Model Serving with PagedAttention", section 4.2): the
/// pools `[P, KV, BS, hd]` are allocated once for `P` blocks, and each sequence's
/// block table row has `M` entries, so a sequence reaches at most `M * BS` positions.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PagedShape {
    /// Blocks in each layer's pool (the symbol `P`).
    pub pool_blocks: u64,
    /// Blocks per sequence in the block table (the symbol `M`).
    pub max_blocks: u64,
}

impl PagedShape {
    /// Tables wide enough for `max_seq_len` positions in blocks of `block_size`, and a
    /// pool with a block for every entry of every sequence's table: what a dense cache
    /// of the same batch and length would hold, so no step can run out of blocks.
    pub fn covering(batch: u64, max_seq_len: u64, block_size: u64) -> PagedShape {
        let max_blocks = max_seq_len.div_ceil(block_size.max(1)).max(1);
        PagedShape {
            pool_blocks: batch.saturating_mul(max_blocks).max(1),
            max_blocks,
        }
    }
}

impl DecodeShape {
    pub fn new(batch: u64, max_seq_len: u64) -> DecodeShape {
        DecodeShape {
            batch,
            max_seq_len,
            paged: None,
        }
    }

    /// This shape with a paged cache of the given sizes.
    pub fn with_paged(self, paged: PagedShape) -> DecodeShape {
        DecodeShape {
            paged: Some(paged),
            ..self
        }
    }

    /// The allocated extent of every dimension `S + k`: `max_seq_len`, so that a cache
    /// read as `[.., S, hd]` and appended in place to `[.., S + 1, hd]` (or, in a
    /// prefill step of `T` tokens, `[.., S + T, hd]`) is one buffer with one layout. A
    /// step caching `k` new positions runs only while `S + k <= max_seq_len` (the
    /// runner checks it), so every `S + k` of its graph fits.
    pub fn capacity(&self) -> u64 {
        self.max_seq_len
    }

    pub(crate) fn check(&self) -> Result<(), Error> {
        if self.batch == 0 || self.max_seq_len == 0 {
            return Err(Error::Options(format!(
                "batch ({}) and max_seq_len ({}) must be positive",
                self.batch, self.max_seq_len
            )));
        }
        if let Some(p) = self.paged {
            // The kernels index blocks and table entries with 32-bit ints.
            let limit = i32::MAX as u64;
            if p.pool_blocks == 0
                || p.max_blocks == 0
                || p.pool_blocks > limit
                || p.max_blocks > limit
            {
                return Err(Error::Options(format!(
                    "a paged cache of {} blocks and tables of {} must have 1..={limit} of each",
                    p.pool_blocks, p.max_blocks
                )));
            }
        }
        Ok(())
    }
}

/// Backend options, as naga's backends take them: the targets and the tuning knobs.
/// The defaults suit H100-class GPUs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Options {
    /// The architectures the source must compile for (NVRTC is run for each).
    pub archs: Vec<Arch>,
    /// Threads per block of elementwise, gather and copy kernels.
    pub block_size: u32,
    /// Warps per block of GEMV kernels; each warp computes whole output rows.
    pub gemv_warps: u32,
    /// Threads per block of attention kernels.
    pub attention_threads: u32,
    /// Blocks a kernel should launch at least to fill the GPU (about 4 per SM).
    pub target_blocks: u32,
    /// Decode attention splits the KV length over several blocks (flash-decoding)
    /// when a cache can hold at least this many positions.
    pub split_kv_min_len: u64,
    /// The fewest positions one split handles. The default, 64, gives 512 blocks at
    /// context 4096 for an 8-KV-head model (about 4 per SM of an H100 or H200): with
    /// 256, an H200 ran 128 blocks there, walking positions one dependent chain at a
    /// time at 4% of the DRAM bandwidth (BENCHMARKS.md, "GPU decode on an NVIDIA H200").
    pub split_kv_min_chunk: u64,
    /// The most shared memory a kernel may ask for. Above 48 KiB the runner must raise
    /// the kernel's dynamic shared memory limit (the plan records what each launch
    /// needs); larger activations are read from global memory instead.
    pub max_shared_bytes: u32,
    /// The most shared memory an FP8 GEMV stages its quantized activations in as f32
    /// (read with no conversion); beyond it they are staged as f16 (exact for every FP8
    /// code, one conversion per element). The default keeps four 256-thread GEMV blocks
    /// per SM on sm_80 and sm_90, as many as the grid has per SM.
    #[serde(default = "default_fp8_f32_stage_bytes")]
    pub fp8_f32_stage_bytes: u32,
    /// The largest grid of a grid-stride kernel.
    pub max_grid: u32,
}

fn default_fp8_f32_stage_bytes() -> u32 {
    32 * 1024
}

impl Default for Options {
    fn default() -> Options {
        Options {
            archs: vec![Arch::SM80, Arch::SM90],
            block_size: 256,
            gemv_warps: 8,
            attention_threads: 128,
            target_blocks: 528,
            split_kv_min_len: 1024,
            split_kv_min_chunk: 64,
            max_shared_bytes: 96 * 1024,
            fp8_f32_stage_bytes: default_fp8_f32_stage_bytes(),
            max_grid: 65_535,
        }
    }
}

impl Options {
    pub(crate) fn check(&self) -> Result<(), Error> {
        let bad = |m: String| Err(Error::Options(m));
        if self.archs.is_empty() {
            return bad("no target architecture".into());
        }
        for (name, v) in [
            ("block_size", self.block_size),
            ("attention_threads", self.attention_threads),
        ] {
            if !(32..=1024).contains(&v) || !v.is_multiple_of(32) {
                return bad(format!("{name} {v} must be a multiple of 32 in 32..=1024"));
            }
        }
        if self.gemv_warps == 0 || self.gemv_warps > 32 {
            return bad(format!("gemv_warps {} must be in 1..=32", self.gemv_warps));
        }
        if self.target_blocks == 0 || self.max_grid == 0 || self.split_kv_min_chunk == 0 {
            return bad("target_blocks, max_grid and split_kv_min_chunk must be positive".into());
        }
        if self.max_shared_bytes < 16 * 1024 {
            return bad(format!(
                "max_shared_bytes {} is below the 16 KiB the attention kernels need",
                self.max_shared_bytes
            ));
        }
        Ok(())
    }
}
