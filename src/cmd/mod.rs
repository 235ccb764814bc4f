//! One module per subcommand.

pub mod compile;
pub mod explain;
pub mod report;
pub mod run;
