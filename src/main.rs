//! The `fusec` command line.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod cmd;

/// fusec compiles one decode step of an LLM: it captures the step as an eager
/// framework runs it, fuses it, and reports what that saves.
#[derive(Parser, Debug)]
#[command(name = "fusec", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    Accuracy(cmd::accuracy::Args),
    Bench(cmd::bench::Args),
    Compile(cmd::compile::Args),
    Explain(cmd::explain::Args),
    Report(cmd::report::Args),
    Run(cmd::run::Args),
    Serve(cmd::serve::Args),
}

/// How a command failed: bad input (exit 2) or an internal error (exit 1).
#[derive(Debug)]
pub enum Failure {
    Input(anyhow::Error),
    Internal(anyhow::Error),
}

impl From<fusec::pipeline::PipelineError> for Failure {
    fn from(e: fusec::pipeline::PipelineError) -> Self {
        if e.is_input_error() {
            Failure::Input(e.into())
        } else {
            Failure::Internal(e.into())
        }
    }
}

impl From<fusec::output::OutputError> for Failure {
    fn from(e: fusec::output::OutputError) -> Self {
        Failure::Input(e.into())
    }
}

/// Writes to standard output, flushed at once so that a failure is seen here. A
/// closed pipe (`fusec ... | head`) ends the program quietly with exit code 0, as
/// ripgrep and other Rust tools do, where `print!` would panic; any other failure
/// (`> /dev/full`) is an error of the environment: exit 2 with a message. Files the
/// command wrote are complete by then (see `fusec::output`).
pub fn say(text: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        complain(&format!("error: cannot write to standard output: {e}\n"));
        std::process::exit(2);
    }
}

/// Writes to standard error. Unlike `eprintln!`, which panics when the write fails
/// (`2> /dev/full`), a failure here is ignored: there is nowhere left to report it, and
/// the exit code still says what happened.
pub fn complain(text: &str) {
    use std::io::Write;
    let _ = std::io::stderr().lock().write_all(text.as_bytes());
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Accuracy(args) => cmd::accuracy::run(args),
        Command::Bench(args) => cmd::bench::run(args),
        Command::Compile(args) => cmd::compile::run(args),
        Command::Explain(args) => cmd::explain::run(args),
        Command::Report(args) => cmd::report::run(args),
        Command::Run(args) => cmd::run::run(args),
        Command::Serve(args) => cmd::serve::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Input(e)) => {
            complain(&format!("error: {e:#}\n"));
            ExitCode::from(2)
        }
        Err(Failure::Internal(e)) => {
            complain(&format!("internal error: {e:#}\n"));
            ExitCode::from(1)
        }
    }
}
