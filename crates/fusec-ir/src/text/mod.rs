//! The canonical, round-trippable text form of the IR.

pub mod parse;
mod position;
pub mod print;
pub mod token;

pub use parse::{parse, ParseError};
pub use position::line_col;
pub use print::print;
