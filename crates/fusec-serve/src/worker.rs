//! The model thread: it owns the [`Scheduler`] and its engine, steps it while there is
//! work, and talks to the async side over tokio channels. The executor is CPU-bound and
//! drives its own thread team, so it never runs on the async runtime's threads.
//!
//! A request is submitted with the sender of its events; the thread checks it at once
//! (the caller gets the refusal before it answers its client). Between steps the
//! thread takes new commands and cancels every request whose event receiver is gone (a
//! client that disconnected, or a handler that has seen a stop string), which frees its
//! sequence before the next step.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use crate::engine::Engine;
use crate::error::{ServeError, SubmitError};
use crate::scheduler::{Event, Request, RequestId, Scheduler, SchedulerConfig, SchedulerStats};

/// What the server reports at its metrics endpoint.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Metrics {
    pub scheduler: SchedulerStats,
    pub requests_submitted: u64,
    pub requests_refused: u64,
    /// Tokens fed per second (prompt and generated) over the last few seconds of steps.
    pub tokens_per_s: f64,
    /// Tokens generated per second over the same window.
    pub generated_per_s: f64,
}

/// The window of recent steps the rates are measured over.
const RATE_WINDOW: Duration = Duration::from_secs(10);

enum Command {
    Submit {
        request: Request,
        events: mpsc::UnboundedSender<Event>,
        reply: oneshot::Sender<Result<RequestId, SubmitError>>,
    },
}

/// The handle of the model thread. Dropping it lets the thread finish the requests it
/// holds and end.
#[derive(Debug)]
pub struct Worker {
    commands: Option<mpsc::UnboundedSender<Command>>,
    metrics: Arc<Mutex<Metrics>>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Command")
    }
}

impl Worker {
    /// Starts the model thread over `engine`.
    pub fn spawn<E>(engine: E, config: SchedulerConfig) -> Result<Worker, ServeError>
    where
        E: Engine + Send + 'static,
    {
        let scheduler = Scheduler::new(engine, config)?;
        let (tx, rx) = mpsc::unbounded_channel();
        let metrics = Arc::new(Mutex::new(Metrics {
            scheduler: scheduler.stats(),
            ..Metrics::default()
        }));
        let shared = Arc::clone(&metrics);
        let thread = std::thread::Builder::new()
            .name("fusec-model".into())
            .spawn(move || Loop::new(scheduler, rx, shared).run())
            .map_err(ServeError::Thread)?;
        Ok(Worker {
            commands: Some(tx),
            metrics,
            thread: Some(thread),
        })
    }

    /// Submits a request: its events arrive on the returned receiver; dropping the
    /// receiver cancels it.
    pub async fn submit(
        &self,
        request: Request,
    ) -> Result<(RequestId, mpsc::UnboundedReceiver<Event>), SubmitError> {
        let (events, receiver) = mpsc::unbounded_channel();
        let (reply, answer) = oneshot::channel();
        let commands = self.commands.as_ref().ok_or(SubmitError::ShuttingDown)?;
        commands
            .send(Command::Submit {
                request,
                events,
                reply,
            })
            .map_err(|_| SubmitError::ShuttingDown)?;
        let id = answer.await.map_err(|_| SubmitError::ShuttingDown)??;
        Ok((id, receiver))
    }

    /// The metrics as of the last step.
    pub fn metrics(&self) -> Metrics {
        self.metrics
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.commands = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The model thread's state.
struct Loop<E> {
    scheduler: Scheduler<E>,
    commands: mpsc::UnboundedReceiver<Command>,
    open: bool,
    senders: HashMap<RequestId, mpsc::UnboundedSender<Event>>,
    metrics: Arc<Mutex<Metrics>>,
    submitted: u64,
    refused: u64,
    /// (when, tokens fed, tokens generated) per recent step.
    recent: std::collections::VecDeque<(Instant, u64, u64)>,
}

impl<E: Engine> Loop<E> {
    fn new(
        scheduler: Scheduler<E>,
        commands: mpsc::UnboundedReceiver<Command>,
        metrics: Arc<Mutex<Metrics>>,
    ) -> Loop<E> {
        Loop {
            scheduler,
            commands,
            open: true,
            senders: HashMap::new(),
            metrics,
            submitted: 0,
            refused: 0,
            recent: std::collections::VecDeque::new(),
        }
    }

    fn run(mut self) {
        loop {
            if self.scheduler.is_idle() {
                if !self.open {
                    return;
                }
                match self.commands.blocking_recv() {
                    Some(c) => self.handle(c),
                    None => return,
                }
            }
            loop {
                match self.commands.try_recv() {
                    Ok(c) => self.handle(c),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => {
                        self.open = false;
                        break;
                    }
                }
            }
            self.cancel_abandoned();
            let before = self.scheduler.stats();
            let events = self.scheduler.step();
            // Published before the events go out, so that a client that has seen a
            // token sees metrics as of that step or later; and again after, when a
            // receiver found gone cancelled a request.
            let after = self.scheduler.stats();
            self.record(&before, &after);
            self.publish(after);
            let cancelled = self.scheduler.stats().cancelled;
            for event in events {
                self.deliver(event);
            }
            let now = self.scheduler.stats();
            if now.cancelled != cancelled {
                self.publish(now);
            }
        }
    }

    fn handle(&mut self, command: Command) {
        match command {
            Command::Submit {
                request,
                events,
                reply,
            } => {
                let result = self.scheduler.submit(request);
                match &result {
                    Ok(id) => {
                        self.submitted += 1;
                        self.senders.insert(*id, events);
                    }
                    Err(_) => self.refused += 1,
                }
                // A caller that has gone already leaves an abandoned request, which the
                // next check cancels.
                let _ = reply.send(result);
            }
        }
    }

    /// Cancels the requests nobody listens to any more.
    fn cancel_abandoned(&mut self) {
        let gone: Vec<RequestId> = self
            .senders
            .iter()
            .filter(|(_, s)| s.is_closed())
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            self.senders.remove(&id);
            self.scheduler.cancel(id);
        }
    }

    fn deliver(&mut self, event: Event) {
        let id = event.request();
        let last = !matches!(event, Event::Token { .. });
        let sent = self.senders.get(&id).is_some_and(|s| s.send(event).is_ok());
        if last {
            self.senders.remove(&id);
        } else if !sent {
            self.senders.remove(&id);
            self.scheduler.cancel(id);
        }
    }

    /// Adds a step's tokens to the window the rates are measured over.
    fn record(&mut self, before: &SchedulerStats, after: &SchedulerStats) {
        let now = Instant::now();
        if after.steps > before.steps {
            self.recent.push_back((
                now,
                after.tokens_fed - before.tokens_fed,
                after.tokens_generated - before.tokens_generated,
            ));
        }
        while self
            .recent
            .front()
            .is_some_and(|(t, _, _)| now.duration_since(*t) > RATE_WINDOW)
        {
            self.recent.pop_front();
        }
    }

    /// Publishes the metrics: the scheduler's `stats` and the rates.
    fn publish(&mut self, stats: SchedulerStats) {
        let now = Instant::now();
        let (tokens_per_s, generated_per_s) = match self.recent.front() {
            Some((first, _, _)) if self.recent.len() > 1 => {
                let secs = now.duration_since(*first).as_secs_f64();
                // The first step's tokens were fed before the window began.
                let fed: u64 = self.recent.iter().skip(1).map(|r| r.1).sum();
                let generated: u64 = self.recent.iter().skip(1).map(|r| r.2).sum();
                if secs > 0.0 {
                    (fed as f64 / secs, generated as f64 / secs)
                } else {
                    (0.0, 0.0)
                }
            }
            _ => (0.0, 0.0),
        };
        let mut m = self.metrics.lock().unwrap_or_else(PoisonError::into_inner);
        *m = Metrics {
            scheduler: stats,
            requests_submitted: self.submitted,
            requests_refused: self.refused,
            tokens_per_s,
            generated_per_s,
        };
    }
}
