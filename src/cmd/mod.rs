//! One module per subcommand.

pub mod accuracy;
pub mod bench;
pub mod compile;
pub mod explain;
pub mod generate;
pub mod options;
pub mod report;
pub mod run;
pub mod runner;
pub mod serve;

use fusec::exec::Error as ExecError;

use crate::Failure;

/// An executor (or weights) error as a failure: the user's when it is about the input.
pub fn exec_failure(e: impl Into<ExecError>) -> Failure {
    let e = e.into();
    if e.is_input_error() {
        Failure::Input(e.into())
    } else {
        Failure::Internal(e.into())
    }
}
