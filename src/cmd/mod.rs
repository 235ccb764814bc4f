//! One module per subcommand.

pub mod bench;
pub mod compile;
pub mod explain;
pub mod options;
pub mod report;
pub mod run;
