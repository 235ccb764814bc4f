//! The e-graph's language: an IR [`Op`] with child e-class ids. There is no second op
//! vocabulary; the e-graph and the IR share `fusec_ir::Op`.

use std::fmt;

use egg::{Id, Language};
use fusec_ir::Op;

/// An e-node: an op and its operand e-classes.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ENode {
    pub op: Op,
    pub children: Vec<Id>,
}

impl Language for ENode {
    /// Nodes are grouped by op name, attributes aside.
    type Discriminant = &'static str;

    fn discriminant(&self) -> Self::Discriminant {
        self.op.name()
    }

    fn matches(&self, other: &Self) -> bool {
        self.op == other.op && self.children.len() == other.children.len()
    }

    fn children(&self) -> &[Id] {
        &self.children
    }

    fn children_mut(&mut self) -> &mut [Id] {
        &mut self.children
    }
}

impl fmt::Display for ENode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.op)
    }
}
