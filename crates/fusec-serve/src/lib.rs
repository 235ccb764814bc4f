//! fusec's serving side: continuous batching over a decode engine, behind an
//! OpenAI-compatible HTTP server.
//!
//! - [`engine`]: the [`Engine`] trait (add a sequence, step the running ones, remove
//!   one, KV capacity in blocks) and [`SessionEngine`], one batch-1 CPU session per
//!   sequence over one shared copy of the weights;
//! - [`paged`]: [`PagedEngine`], the sequences' caches in blocks of one pool per layer
//!   and every step one batched run over the listed sequences;
//! - [`scheduler`]: the [`Scheduler`]: requests join between steps and leave when they
//!   finish, a token budget per step shared by prompt chunks and decodes, preemption
//!   by evict-and-recompute when KV blocks run out;
//! - [`worker`]: the model thread that steps the scheduler, and its channels to the
//!   async side;
//! - [`text`]: streaming detokenization and stop strings; [`openai`]: the request and
//!   response bodies; [`http`]: the routes; [`server`]: all of it started on a port.

pub mod engine;
mod error;
pub mod http;
pub mod openai;
pub mod paged;
pub mod scheduler;
pub mod server;
pub mod synthetic;
pub mod text;
pub mod worker;

pub use engine::{
    Engine, Hooked, Pace, Paced, SeqId, SessionEngine, SessionEngineConfig, StepHook, Work,
};
pub use error::{ConfigError, EngineError, ServeError, SubmitError};
pub use paged::PagedEngine;
pub use scheduler::{
    Event, Finish, Request, RequestId, Scheduler, SchedulerConfig, SchedulerStats,
};
pub use server::{Server, ServerConfig};
pub use synthetic::SyntheticEngine;
pub use worker::{Metrics, Worker};
