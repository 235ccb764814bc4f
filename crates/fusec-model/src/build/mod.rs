//! The [`Builder`] that blocks and architectures append nodes to, front to back.

mod builder;

pub use builder::{BuildError, Builder};
