//! Runtime values, a step's outputs, and where a step's inputs come from.

use std::collections::HashMap;
use std::sync::Arc;

use fusec_ir::OutputKind;

use crate::kernels::gemv::QuantWeight;
use crate::profile::StepStats;
use crate::tensor::Tensor;

/// A runtime value: a tensor, a scalar kernel argument, the results of a
/// multi-result (fused) op, read with `get`, or a quantized GEMV weight (a `dequant`
/// node, which launches nothing: its consumer reads the FP8 values and the scales).
#[derive(Clone, Debug)]
pub enum Value {
    Tensor(Tensor),
    Scalar(f32),
    Tuple(Vec<Tensor>),
    Quant(QuantWeight),
}

impl Value {
    /// The tensor, if this is one.
    pub fn tensor(&self) -> Option<&Tensor> {
        match self {
            Value::Tensor(t) => Some(t),
            Value::Scalar(_) | Value::Tuple(_) | Value::Quant(_) => None,
        }
    }

    pub fn into_tensor(self) -> Option<Tensor> {
        match self {
            Value::Tensor(t) => Some(t),
            Value::Scalar(_) | Value::Tuple(_) | Value::Quant(_) => None,
        }
    }

    /// Drops the value, giving its buffers that no other value shares back to this
    /// thread's buffer pool, where the executor's next step finds them. A caller that
    /// takes outputs out of a [`RunOutput`] and drops them frees their buffers
    /// instead, and the next step has to allocate new ones.
    pub fn recycle(self) {
        recycle(self);
    }
}

/// The graph's outputs after one step, with the step's measurements.
///
/// Kept from step to step and handed to [`Executor::run_into`](crate::Executor::run_into), it keeps the capacity
/// of its lists, so that a steady-state step allocates none. A caller may drain
/// `outputs` to keep values, and give those it is done with back through
/// [`Value::recycle`]; whatever it leaves there goes back to the buffer pool at the
/// start of the next step.
#[derive(Debug, Default)]
pub struct RunOutput {
    /// Each output's name (shared with the executor, so that a step copies no string),
    /// kind and value, in the graph's order.
    pub outputs: Vec<(Arc<str>, OutputKind, Value)>,
    pub stats: StepStats,
}

impl RunOutput {
    pub fn new() -> RunOutput {
        RunOutput::default()
    }

    /// The output called `name`.
    pub fn get(&self, name: &str) -> Option<&Value> {
        self.outputs
            .iter()
            .find(|(n, _, _)| &**n == name)
            .map(|(_, _, v)| v)
    }

    /// Empties the output list and the statistics, keeping their capacity; the values
    /// left in the list go back to the buffer pool.
    pub(super) fn clear(&mut self) {
        self.outputs.drain(..).for_each(|(_, _, v)| recycle(v));
        let mut nodes = std::mem::take(&mut self.stats.nodes);
        nodes.clear();
        self.stats = StepStats {
            nodes,
            ..StepStats::default()
        };
    }
}

/// Where a step's `input` and `state` leaves come from: the executor takes each one
/// out by its position among the graph's inputs (the order of `Graph::inputs`, see
/// [`Executor::input_index`](crate::Executor::input_index)) or by name, and puts them back if the step fails.
///
/// A map by name (`HashMap<String, Tensor>`) is the simple form; a vector indexed by
/// position (`Vec<Option<Tensor>>`) is what a decode loop keeps from step to step.
/// Neither allocates when a tensor is taken: the map only drops the key.
pub trait StepInputs {
    /// Takes input `index`, called `name`, out; `None` when it was not given.
    fn take_input(&mut self, index: usize, name: &str) -> Option<Tensor>;

    /// Puts input `index`, called `name`, back after a failed step.
    fn restore_input(&mut self, index: usize, name: &str, tensor: Tensor);

    /// An entry that is not among the graph's inputs `names` (in the order of
    /// `Graph::inputs`), by name, if there is one.
    fn unknown_input(&self, names: &[Arc<str>]) -> Option<String>;
}

impl StepInputs for HashMap<String, Tensor> {
    fn take_input(&mut self, _: usize, name: &str) -> Option<Tensor> {
        self.remove(name)
    }

    fn restore_input(&mut self, _: usize, name: &str, tensor: Tensor) {
        self.insert(name.to_string(), tensor);
    }

    fn unknown_input(&self, names: &[Arc<str>]) -> Option<String> {
        self.keys()
            .find(|key| !names.iter().any(|name| **name == ***key))
            .cloned()
    }
}

impl StepInputs for Vec<Option<Tensor>> {
    fn take_input(&mut self, index: usize, _: &str) -> Option<Tensor> {
        self.get_mut(index).and_then(Option::take)
    }

    fn restore_input(&mut self, index: usize, _: &str, tensor: Tensor) {
        if self.len() <= index {
            self.resize_with(index + 1, || None);
        }
        self[index] = Some(tensor);
    }

    fn unknown_input(&self, names: &[Arc<str>]) -> Option<String> {
        let n = names.len();
        self.iter()
            .enumerate()
            .skip(n)
            .find(|(_, t)| t.is_some())
            .map(|(i, _)| format!("#{i} (the graph has {n} inputs)"))
    }
}

/// Returns the buffers of a dropped value to the pool (those no other value shares).
pub(crate) fn recycle(v: Value) {
    match v {
        Value::Tensor(t) => crate::recycle::recycle(t),
        Value::Tuple(ts) => crate::recycle::give_tensors(ts),
        Value::Scalar(_) | Value::Quant(_) => {}
    }
}
