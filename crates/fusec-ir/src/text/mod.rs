//! The canonical, round-trippable text form of the IR.

pub mod parse;
pub mod print;
pub mod token;

pub use parse::{parse, ParseError};
pub use print::print;
