//! [`Server`]: the model thread, the routes and a tokio runtime, started together.

use std::net::SocketAddr;
use std::sync::Arc;

use fusec_text::{ChatTemplate, Tokenizer};
use tokio::runtime::Runtime;
use tokio::sync::oneshot;

use crate::engine::Engine;
use crate::error::ServeError;
use crate::http::{router, AppState};
use crate::scheduler::SchedulerConfig;
use crate::worker::{Metrics, Worker};

/// What a server serves and how it schedules.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// The name clients give as `model`.
    pub model: String,
    pub scheduler: SchedulerConfig,
    /// Threads of the async runtime (the HTTP side; the model has its own thread).
    pub http_threads: usize,
}

impl ServerConfig {
    pub fn new(model: impl Into<String>) -> ServerConfig {
        ServerConfig {
            model: model.into(),
            scheduler: SchedulerConfig::default(),
            http_threads: 2,
        }
    }
}

/// A running server. Dropping it stops it: the HTTP side at once, then the model
/// thread once its requests are cancelled.
#[derive(Debug)]
pub struct Server {
    addr: SocketAddr,
    state: Arc<AppState>,
    shutdown: Option<oneshot::Sender<()>>,
    runtime: Option<Runtime>,
}

impl Server {
    /// Binds `addr` (port 0: a free port, see [`Server::local_addr`]) and serves
    /// `engine` with `tokenizer` (without one, prompts must be token ids and responses
    /// carry ids and no text).
    pub fn start<E>(
        addr: SocketAddr,
        engine: E,
        tokenizer: Option<Tokenizer>,
        config: ServerConfig,
    ) -> Result<Server, ServeError>
    where
        E: Engine + Send + 'static,
    {
        config.scheduler.validate()?;
        let max_context = engine.max_context();
        let chat = tokenizer.as_ref().and_then(|t| ChatTemplate::of(t).ok());
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(config.http_threads.max(1))
            .thread_name("fusec-http")
            .enable_all()
            .build()
            .map_err(ServeError::Runtime)?;
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind(addr))
            .map_err(|source| ServeError::Bind { addr, source })?;
        let local = listener
            .local_addr()
            .map_err(|source| ServeError::Bind { addr, source })?;
        let worker = Worker::spawn(engine, config.scheduler)?;
        let state = Arc::new(AppState {
            worker,
            model: config.model,
            tokenizer: tokenizer.map(Arc::new),
            chat,
            max_context,
            next_seed: Default::default(),
        });
        let app = router(Arc::clone(&state));
        let (tx, rx) = oneshot::channel::<()>();
        runtime.spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = rx.await;
                })
                .await;
        });
        Ok(Server {
            addr: local,
            state,
            shutdown: Some(tx),
            runtime: Some(runtime),
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn metrics(&self) -> Metrics {
        self.state.worker.metrics()
    }

    /// Serves until the process gets SIGINT (Ctrl-C) or SIGTERM.
    pub fn run_until_signal(self) -> std::io::Result<()> {
        let Some(runtime) = self.runtime.as_ref() else {
            return Ok(());
        };
        runtime.block_on(async {
            #[cfg(unix)]
            {
                use tokio::signal::unix::{signal, SignalKind};
                let mut term = signal(SignalKind::terminate())?;
                tokio::select! {
                    r = tokio::signal::ctrl_c() => r,
                    _ = term.recv() => Ok(()),
                }
            }
            #[cfg(not(unix))]
            {
                tokio::signal::ctrl_c().await
            }
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        // Open streams end with the runtime; their receivers go, and the model thread
        // cancels their requests and ends when the last handle on it is dropped.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_timeout(std::time::Duration::from_secs(1));
        }
    }
}
