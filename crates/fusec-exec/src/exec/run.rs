//! Running a step: the slot table, the caches moved into their kernels, the checks
//! of each result against its IR type, and the statistics of each launch.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use fusec_ir::shape::Bindings;
use fusec_ir::Op;

use super::check::{check_finite, check_result};
use super::dispatch::{dispatch, Operands};
use super::executor::Executor;
use super::traffic::read_bytes;
use super::value::{recycle, RunOutput, StepInputs, Value};
use crate::error::Error;
use crate::profile::{NodeStats, StepStats};
use crate::team;
use crate::tensor::Tensor;

impl Executor {
    /// Runs one step. `inputs` gives every `input` and `state` leaf by name, with the
    /// dtype and shape its type has under `bindings`. A KV cache given here is appended
    /// to in place when it has room and nothing else shares its buffer.
    pub fn run(
        &mut self,
        bindings: &Bindings,
        mut inputs: HashMap<String, Tensor>,
    ) -> Result<RunOutput, Error> {
        self.run_restoring(bindings, &mut inputs)
    }

    /// Runs one step like [`Executor::run`], taking the inputs out of `inputs`. If the
    /// step fails, every input is put back into `inputs` with the values it had (an
    /// in-place append writes only past the end of the cache it was given), so the
    /// caller can go on from where it was.
    pub fn run_restoring(
        &mut self,
        bindings: &Bindings,
        inputs: &mut HashMap<String, Tensor>,
    ) -> Result<RunOutput, Error> {
        let mut out = RunOutput::new();
        self.run_into(bindings, inputs, &mut out)?;
        Ok(out)
    }

    /// Runs one step like [`Executor::run_restoring`], taking the inputs out of
    /// `inputs` (by name or by position, see [`StepInputs`]) and writing the outputs
    /// and measurements into `out`, whose earlier contents it replaces. With `out`
    /// kept from step to step, a steady-state step allocates nothing (see the module
    /// documentation). If the step fails, every input is put back into `inputs` and
    /// `out` is left empty.
    pub fn run_into(
        &mut self,
        bindings: &Bindings,
        inputs: &mut dyn StepInputs,
        out: &mut RunOutput,
    ) -> Result<(), Error> {
        out.clear();
        if let Some(extra) = inputs.unknown_input(&self.input_names) {
            return Err(Error::BadInput {
                name: extra,
                message: "not an input of the graph".into(),
            });
        }
        let step_start = Instant::now();
        // Room for every launch and output; a no-op after the first step.
        out.stats.nodes.reserve(self.plan.len());
        out.outputs.reserve(self.outputs.len());
        let mut slots = std::mem::take(&mut self.slots);
        let mut spare = Spare {
            args: std::mem::take(&mut self.spare_args),
            owned: std::mem::take(&mut self.spare_owned),
        };
        // The step is one team region: its kernels' parallel loops go to workers that
        // spin for the whole step instead of sleeping between kernels (see `team`).
        let result = team::region(|| {
            self.run_plan(bindings, inputs, &mut slots, &mut spare, &mut out.stats)
        });
        self.spare_args = spare.args;
        self.spare_owned = spare.owned;
        match &result {
            Ok(()) => {
                // Each output's value moves out of its slot (a clone would keep its
                // buffer from going back to the pool), except when a later output
                // names the same value.
                for (i, (name, kind, s)) in self.outputs.iter().enumerate() {
                    let again = self.outputs[i + 1..].iter().any(|o| o.2 == *s);
                    let value = if again {
                        slots[*s].clone()
                    } else {
                        slots[*s].take()
                    };
                    if let Some(v) = value {
                        out.outputs.push((Arc::clone(name), *kind, v));
                    }
                }
                out.stats.time = step_start.elapsed();
            }
            Err(_) => {
                for node in self.plan.iter().filter(|n| n.is_input) {
                    if let (Op::Input { name, .. }, Some(index), Some(Value::Tensor(t))) =
                        (&node.op, node.input, slots[node.number].take())
                    {
                        inputs.restore_input(index, name, t);
                    }
                }
                out.clear();
            }
        }
        // Everything but the bound leaves' values goes back to the pool; those stay
        // for the next step.
        for (slot, node) in slots.iter_mut().zip(&self.plan) {
            if node.bound.is_none() {
                if let Some(v) = slot.take() {
                    recycle(v);
                }
            }
        }
        self.slots = slots;
        result
    }

    /// Runs every node of the plan, recording each launch in `stats` (emptied by the
    /// caller).
    fn run_plan(
        &self,
        b: &Bindings,
        inputs: &mut dyn StepInputs,
        slots: &mut [Option<Value>],
        spare: &mut Spare,
        stats: &mut StepStats,
    ) -> Result<(), Error> {
        for (pos, node) in self.plan.iter().enumerate() {
            // A bound leaf (a weight, RoPE frequencies) still holds the value an earlier
            // step gave it: there is nothing to do, not even a reference count to bump.
            if node.bound.is_some() && slots[pos].is_some() {
                continue;
            }
            // Caches appended to in place are moved out of their slots first, so the
            // kernel owns them (see the module documentation).
            let owned = &mut spare.owned;
            owned.clear();
            owned.resize(node.operands.len(), None);
            for &i in &node.owned {
                let s = node.operands[i];
                if let Some(Value::Tensor(_)) = slots[s] {
                    if let Some(Value::Tensor(t)) = slots[s].take() {
                        owned[i] = Some(t);
                    }
                }
            }
            let mut args = reuse_refs(std::mem::take(&mut spare.args));
            for (i, &o) in node.operands.iter().enumerate() {
                let v = slots[o].as_ref();
                if v.is_none() && owned[i].is_none() {
                    return Err(Error::InvalidGraph(format!(
                        "operand %{o} freed before its last use"
                    )));
                }
                args.push(v);
            }
            let mut operands = Operands { args: &args, owned };
            let start = Instant::now();
            let outcome = dispatch(node, &mut operands, inputs, b).map(|o| {
                let traffic = match (o.launched, o.traffic) {
                    (true, Some(t)) => t,
                    (true, None) => (read_bytes(&node.op, &args), o.value.bytes()),
                    (false, _) => (0, 0),
                };
                (o.value, o.launched, traffic)
            });
            let time = start.elapsed();
            spare.args = reuse_refs(args);
            // The moved caches go back to their slots (an input lives until the end of
            // the step) or are dropped, whatever the outcome.
            for (i, t) in spare.owned.iter_mut().enumerate() {
                if let Some(t) = t.take() {
                    let s = node.operands[i];
                    if self.plan[s].is_input {
                        slots[s] = Some(Value::Tensor(t));
                    } else {
                        crate::recycle::recycle(t);
                    }
                }
            }
            let (value, launched, (bytes_read, bytes_written)) = outcome?;
            check_result(node, &value, b)?;
            if self.check_finite {
                check_finite(node, &value)?;
            }
            if launched {
                stats.launches += 1;
                stats.bytes_read += bytes_read;
                stats.bytes_written += bytes_written;
                stats.nodes.push(NodeStats {
                    node: node.id,
                    kind: node.op.name(),
                    layer: node.layer,
                    bytes_read,
                    bytes_written,
                    time,
                });
            }
            slots[pos] = Some(value);
            for &s in &node.free {
                if let Some(v) = slots[s].take() {
                    recycle(v);
                }
            }
        }
        Ok(())
    }
}

/// The per-node operand lists of [`Executor::run_plan`], lent by the executor for one
/// step so that their allocations outlive it.
struct Spare {
    args: Vec<Option<&'static Value>>,
    owned: Vec<Option<Tensor>>,
}

/// `refs`, emptied and retyped for borrows of any lifetime, keeping its allocation:
/// the standard library collects a mapped `Vec` iterator into the same allocation
/// when the element layouts match, so the per-node operand list reuses one buffer
/// across nodes and steps (the step allocation test checks it).
fn reuse_refs<'b>(mut refs: Vec<Option<&Value>>) -> Vec<Option<&'b Value>> {
    refs.clear();
    refs.into_iter().map(|_| None).collect()
}
