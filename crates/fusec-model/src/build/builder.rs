//! A thin front-to-back graph builder that names weights once, records their roles
//! and tags layers.

use std::collections::HashMap;

use fusec_ir::op::TypeError;
use fusec_ir::{
    BinaryOp, DType, Graph, InputKind, NodeId, Op, OutputKind, ReduceOp, Shape, TensorType,
    UnaryOp, WeightRole, F64,
};

/// A graph could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BuildError {
    /// A builder produced an ill-typed node: a bug in the builder, not in the user's
    /// input.
    #[error("internal error building `{graph}`: {source}")]
    Type {
        graph: String,
        #[source]
        source: TypeError,
    },
    /// The architecture does not build the step asked for (a prefill step from an
    /// architecture that only builds the decode step).
    #[error("{0}")]
    Unsupported(String),
}

/// Appends nodes in order; every node gets the current layer tag, every weight the role
/// it was declared with.
#[derive(Debug)]
pub struct Builder {
    graph: Graph,
    weights: HashMap<String, NodeId>,
    layer: Option<u32>,
}

type R = Result<NodeId, BuildError>;

impl Builder {
    pub fn new(name: &str) -> Self {
        Self {
            graph: Graph::new(name),
            weights: HashMap::new(),
            layer: None,
        }
    }

    /// The graph built so far.
    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    pub fn graph_mut(&mut self) -> &mut Graph {
        &mut self.graph
    }

    pub fn finish(self) -> Graph {
        self.graph
    }

    /// Records the number of decoder layers (the graph's `layers` attribute, read by
    /// [`Graph::layers`]).
    pub fn set_layer_count(&mut self, layers: u64) {
        self.graph.attrs.insert("layers".into(), layers.to_string());
    }

    /// Nodes added from now on belong to `layer`.
    pub fn set_layer(&mut self, layer: Option<u32>) {
        self.layer = layer;
    }

    fn wrap(&self, r: Result<NodeId, TypeError>) -> R {
        r.map_err(|source| BuildError::Type {
            graph: self.graph.name.clone(),
            source,
        })
    }

    fn tag(&mut self, id: NodeId) -> NodeId {
        self.graph.node_mut(id).layer = self.layer;
        id
    }

    /// Adds `op(operands)`.
    pub fn op(&mut self, op: Op, operands: &[NodeId]) -> R {
        let r = self.graph.add(op, operands);
        let id = self.wrap(r)?;
        Ok(self.tag(id))
    }

    pub fn input(&mut self, name: &str, kind: InputKind, ty: TensorType) -> R {
        let r = self.graph.add_leaf(
            Op::Input {
                name: name.to_string(),
                kind,
            },
            ty,
        );
        let id = self.wrap(r)?;
        Ok(self.tag(id))
    }

    /// The data input `name` that several layers read, created on first use and
    /// outside any layer (like the step's inputs declared before the first layer), so
    /// that every layer that reads it reads the same node.
    pub fn shared_input(&mut self, name: &str, ty: TensorType) -> R {
        let existing = self
            .graph
            .inputs()
            .into_iter()
            .find(|(_, n, _)| *n == name)
            .map(|(id, _, _)| id);
        if let Some(id) = existing {
            return Ok(id);
        }
        let layer = self.layer.take();
        let id = self.input(name, InputKind::Data, ty);
        self.layer = layer;
        id
    }

    /// The weight `name`, created on first use, with what it is in the model (later
    /// stages read the role instead of guessing from the graph's shape).
    pub fn weight(&mut self, name: &str, role: WeightRole, dtype: DType, shape: Shape) -> R {
        if let Some(&id) = self.weights.get(name) {
            return Ok(id);
        }
        self.graph.set_weight_role(name, role);
        let r = self.graph.add_leaf(
            Op::Weight {
                name: name.to_string(),
            },
            TensorType::new(dtype, shape),
        );
        let id = self.wrap(r)?;
        let id = self.tag(id);
        self.weights.insert(name.to_string(), id);
        self.graph.set_weight_role(name, role);
        Ok(id)
    }

    pub fn output(&mut self, name: &str, kind: OutputKind, value: NodeId) {
        self.graph.add_output(name, kind, value);
    }

    pub fn scalar(&mut self, value: f64) -> R {
        self.op(Op::Scalar { value: F64(value) }, &[])
    }

    pub fn unary(&mut self, u: UnaryOp, x: NodeId) -> R {
        self.op(Op::Unary(u), &[x])
    }

    pub fn binary(&mut self, b: BinaryOp, x: NodeId, y: NodeId) -> R {
        self.op(Op::Binary(b), &[x, y])
    }

    /// `x <op> scalar`.
    pub fn binary_scalar(&mut self, b: BinaryOp, x: NodeId, value: f64) -> R {
        let s = self.scalar(value)?;
        self.binary(b, x, s)
    }

    pub fn reduce(&mut self, kind: ReduceOp, x: NodeId, axis: i64, keepdim: bool) -> R {
        self.op(
            Op::Reduce {
                kind,
                axis,
                keepdim,
            },
            &[x],
        )
    }

    /// `x.to(dtype)`: a cast kernel, or nothing when `x` already has that dtype.
    pub fn to_dtype(&mut self, x: NodeId, dtype: DType) -> R {
        match self.graph.ty(x).tensor() {
            Some(t) if t.dtype == dtype => Ok(x),
            _ => self.op(Op::Cast { to: dtype }, &[x]),
        }
    }

    pub fn reshape(&mut self, x: NodeId, shape: Shape) -> R {
        self.op(Op::Reshape { shape }, &[x])
    }

    pub fn transpose(&mut self, x: NodeId, a: usize, b: usize) -> R {
        self.op(Op::Transpose { a, b }, &[x])
    }

    pub fn linear(&mut self, x: NodeId, w: NodeId) -> R {
        self.op(Op::Linear, &[x, w])
    }

    /// The tensor type of `x` (every value a builder makes is a tensor).
    pub fn ty(&self, x: NodeId) -> TensorType {
        self.graph
            .ty(x)
            .tensor()
            .cloned()
            .expect("builders only create tensor values")
    }
}
