//! Measured launches, bytes and time: per node for one step, per op kind over many.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::time::Duration;

use fusec_ir::NodeId;

/// What one kernel launch did.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct NodeStats {
    pub node: NodeId,
    /// The op's name (`linear`, `binary.mul`...), the profile's grouping key.
    pub kind: &'static str,
    pub layer: Option<u32>,
    pub bytes_read: u64,
    pub bytes_written: u64,
    /// Time in the kernel.
    pub time: Duration,
}

/// What one step did: totals over its launches, and each launch.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StepStats {
    pub launches: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    /// Wall time of the whole step, interpreter overhead included.
    pub time: Duration,
    pub nodes: Vec<NodeStats>,
}

impl StepStats {
    pub fn bytes(&self) -> u64 {
        self.bytes_read + self.bytes_written
    }
}

/// Totals for one op kind, or for everything.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct KindStats {
    pub launches: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub time: Duration,
}

impl KindStats {
    pub fn bytes(&self) -> u64 {
        self.bytes_read + self.bytes_written
    }

    /// Bytes moved per second of kernel time, in GB/s (0 when no time was measured).
    pub fn gb_per_s(&self) -> f64 {
        let secs = self.time.as_secs_f64();
        if secs > 0.0 {
            self.bytes() as f64 / secs / 1e9
        } else {
            0.0
        }
    }

    fn add(&mut self, launches: u64, bytes_read: u64, bytes_written: u64, time: Duration) {
        self.launches += launches;
        self.bytes_read += bytes_read;
        self.bytes_written += bytes_written;
        self.time += time;
    }
}

/// Per-op-kind totals over any number of steps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Profile {
    kinds: BTreeMap<&'static str, KindStats>,
    steps: u64,
    /// Summed step wall time (kernel time plus interpreter overhead).
    wall: Duration,
}

impl Profile {
    pub fn new() -> Profile {
        Profile::default()
    }

    /// Adds one step's launches.
    pub fn add(&mut self, step: &StepStats) {
        self.steps += 1;
        self.wall += step.time;
        for n in &step.nodes {
            self.kinds
                .entry(n.kind)
                .or_default()
                .add(1, n.bytes_read, n.bytes_written, n.time);
        }
    }

    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Summed wall time of the steps.
    pub fn wall_time(&self) -> Duration {
        self.wall
    }

    /// Totals per op kind, by name.
    pub fn kinds(&self) -> &BTreeMap<&'static str, KindStats> {
        &self.kinds
    }

    /// Totals over every kind.
    pub fn total(&self) -> KindStats {
        let mut t = KindStats::default();
        for k in self.kinds.values() {
            t.add(k.launches, k.bytes_read, k.bytes_written, k.time);
        }
        t
    }

    /// The table `fusec run --profile` prints: one line per op kind, slowest first,
    /// then the total.
    pub fn render(&self) -> String {
        let mut rows: Vec<(&str, KindStats)> = self.kinds.iter().map(|(k, v)| (*k, *v)).collect();
        rows.sort_by(|a, b| b.1.time.cmp(&a.1.time).then(a.0.cmp(b.0)));
        let mut out = String::new();
        // The first column fits the longest op name, `fused.decode_attention`.
        let _ = writeln!(
            out,
            "{:<24} {:>10} {:>12} {:>12} {:>11} {:>8}",
            "op", "launches", "read MB", "written MB", "time ms", "GB/s"
        );
        let line = |out: &mut String, name: &str, k: &KindStats| {
            let _ = writeln!(
                out,
                "{:<24} {:>10} {:>12.3} {:>12.3} {:>11.3} {:>8.2}",
                name,
                k.launches,
                k.bytes_read as f64 / 1e6,
                k.bytes_written as f64 / 1e6,
                k.time.as_secs_f64() * 1e3,
                k.gb_per_s()
            );
        };
        for (name, k) in &rows {
            line(&mut out, name, k);
        }
        line(
            &mut out,
            &format!("total/{} steps", self.steps),
            &self.total(),
        );
        out
    }
}
