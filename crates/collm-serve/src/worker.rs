//! The model worker: one thread owns the run and answers requests in batches. Handlers put
//! jobs on a bounded queue (`try_send`: a full queue is answered 503 at once, never waited
//! on); the worker takes the first job, then more for up to `max_wait` or until `max_batch`
//! rows, checks each job's ids, scores all their rows in one shared-prefix call (rows of one
//! user share their prefix across requests too) and answers each job on its own channel, typed
//! by its task (scores for a score job, a ranked list for a rank job). The worker knows nothing
//! of HTTP: its errors say what went wrong, and the API maps them to statuses.

use crate::metrics::Metrics;
use collm::recommend::{Ranked, Recommender, RequestError, User};
use collm_data::Interaction;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// Who a request is for.
#[derive(Debug, Clone)]
pub enum Who {
    User(u64),
    /// A cold user: liked items, oldest first.
    History(Vec<u64>),
}

/// Why the worker could not answer a job.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The request names an id the run does not know, or asks for nothing sensible.
    #[error(transparent)]
    Request(#[from] RequestError),
    /// The model failed (or panicked) on the batch the job was in.
    #[error("scoring failed: {0}")]
    Scoring(String),
}

/// Where a job's answer goes.
pub type Reply<T> = oneshot::Sender<Result<T, WorkerError>>;

/// What a job asks for, with the channel its answer (of that kind) goes to.
pub enum Task {
    Score {
        items: Vec<u64>,
        reply: Reply<Vec<f64>>,
    },
    Rank {
        k: usize,
        candidates: Option<Vec<u64>>,
        reply: Reply<Vec<Ranked>>,
    },
}

pub struct Job {
    pub who: Who,
    pub task: Task,
}

/// What the handlers hold: the queue's sending end and its depth.
#[derive(Clone)]
pub struct Queue {
    tx: SyncSender<Job>,
    depth: Arc<AtomicUsize>,
    metrics: Arc<Metrics>,
}

impl Queue {
    /// Queues a job; `Err(job)` when the queue is full (or the worker has stopped).
    pub fn offer(&self, job: Job) -> Result<(), Job> {
        self.depth.fetch_add(1, Ordering::SeqCst);
        match self.tx.try_send(job) {
            Ok(()) => {
                self.metrics
                    .queue_depth
                    .set(self.depth.load(Ordering::SeqCst) as i64);
                Ok(())
            }
            Err(TrySendError::Full(j)) | Err(TrySendError::Disconnected(j)) => {
                self.depth.fetch_sub(1, Ordering::SeqCst);
                Err(j)
            }
        }
    }
}

pub struct Limits {
    pub max_batch: usize,
    pub max_wait: Duration,
}

/// Starts the worker thread; `open` builds the recommender inside it (the model never moves
/// between threads). Returns the queue once the run is open, or the error that opening gave.
pub fn start(
    open: impl FnOnce() -> anyhow::Result<Recommender> + Send + 'static,
    capacity: usize,
    limits: Limits,
    metrics: Arc<Metrics>,
) -> anyhow::Result<(Queue, std::thread::JoinHandle<()>)> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<Job>(capacity.max(1));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<anyhow::Result<()>>();
    let depth = Arc::new(AtomicUsize::new(0));
    let (d, m) = (depth.clone(), metrics.clone());
    let handle = std::thread::Builder::new()
        .name("collm-model".into())
        .spawn(move || {
            let rec = match open() {
                Ok(r) => {
                    let _ = ready_tx.send(Ok(()));
                    r
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            serve_jobs(&rec, rx, &limits, &d, &m);
        })?;
    ready_rx
        .recv()
        .map_err(|_| anyhow::anyhow!("the model worker stopped while opening the run"))??;
    Ok((Queue { tx, depth, metrics }, handle))
}

fn serve_jobs(
    rec: &Recommender,
    rx: Receiver<Job>,
    limits: &Limits,
    depth: &AtomicUsize,
    metrics: &Metrics,
) {
    let taken = |n: usize| {
        let left = depth.fetch_sub(n, Ordering::SeqCst) - n;
        metrics.queue_depth.set(left as i64);
    };
    // Ends when every sender is gone (the server has shut down and drained).
    while let Ok(first) = rx.recv() {
        taken(1);
        let mut jobs = vec![first];
        let deadline = Instant::now() + limits.max_wait;
        let mut rows = jobs[0].task.rows_hint();
        while rows < limits.max_batch {
            let wait = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(wait) {
                Ok(j) => {
                    taken(1);
                    rows += j.task.rows_hint();
                    jobs.push(j);
                }
                Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        run_batch(rec, jobs, metrics);
    }
}

impl Task {
    fn rows_hint(&self) -> usize {
        match self {
            Task::Score { items, .. } => items.len(),
            Task::Rank {
                candidates: Some(c),
                ..
            } => c.len(),
            Task::Rank {
                candidates: None, ..
            } => usize::MAX / 4,
        }
    }

    /// Whether the client has gone (nobody waits for the answer).
    fn is_closed(&self) -> bool {
        match self {
            Task::Score { reply, .. } => reply.is_closed(),
            Task::Rank { reply, .. } => reply.is_closed(),
        }
    }

    fn fail(self, e: WorkerError) {
        match self {
            Task::Score { reply, .. } => drop(reply.send(Err(e))),
            Task::Rank { reply, .. } => drop(reply.send(Err(e))),
        }
    }
}

/// A job whose ids are checked: its user and the items to score.
struct Ready {
    user: User,
    items: Vec<u32>,
}

fn prepare(rec: &Recommender, job: &Job) -> Result<Ready, RequestError> {
    let user = match &job.who {
        Who::User(u) => rec.user(*u)?,
        Who::History(h) => rec.cold_user(h)?,
    };
    let items = match &job.task {
        Task::Score { items: ids, .. }
        | Task::Rank {
            candidates: Some(ids),
            ..
        } => ids
            .iter()
            .map(|&i| rec.item(i))
            .collect::<Result<Vec<_>, _>>()?,
        Task::Rank {
            candidates: None, ..
        } => rec.unseen(&user),
    };
    Ok(Ready { user, items })
}

fn run_batch(rec: &Recommender, jobs: Vec<Job>, metrics: &Metrics) {
    let mut ready = Vec::with_capacity(jobs.len());
    for job in jobs {
        if job.task.is_closed() {
            metrics.abandoned.inc();
            continue;
        }
        match prepare(rec, &job) {
            Ok(r) => ready.push((job, r)),
            Err(e) => job.task.fail(e.into()),
        }
    }
    if ready.is_empty() {
        return;
    }
    let rows: Vec<Interaction> = ready
        .iter()
        .flat_map(|(_, r)| r.items.iter().map(|&i| r.user.row(i)))
        .collect();
    metrics.batch_rows.observe(rows.len() as f64);
    metrics.batch_requests.observe(ready.len() as f64);
    // Each job's rows end at ends[j].
    let ends: Vec<usize> = ready
        .iter()
        .scan(0, |at, (_, r)| {
            *at += r.items.len();
            Some(*at)
        })
        .collect();
    // Job j's rows are starts[j]..ends[j].
    let starts: Vec<usize> = std::iter::once(0)
        .chain(ends.iter().copied())
        .take(ready.len())
        .collect();
    // Before each model call: does anyone still wait for a row not scored yet? Rows of one
    // user share one prefill whatever the number of model calls (see collm::score); the rest
    // is not scored once everyone still owed rows has gone (the jobs whose rows are all done
    // are answered below).
    let mut wanted = |done: &[Option<f64>]| {
        ready
            .iter()
            .zip(starts.iter().zip(&ends))
            .any(|((job, _), (&from, &to))| {
                !job.task.is_closed() && done[from..to].iter().any(Option::is_none)
            })
    };
    // A failure (or a panic) in the model answers this batch with 500; the worker goes on.
    let scored = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        rec.score_rows_until(&rows, &mut wanted)
    }));
    let scores = match scored {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::error!("scoring failed: {e:#}");
            for (job, _) in ready {
                job.task.fail(WorkerError::Scoring(format!("{e:#}")));
            }
            return;
        }
        Err(_) => {
            tracing::error!("scoring panicked");
            for (job, _) in ready {
                job.task
                    .fail(WorkerError::Scoring("the model panicked".into()));
            }
            return;
        }
    };
    for ((job, r), (&from, &to)) in ready.into_iter().zip(starts.iter().zip(&ends)) {
        let Some(s) = scores[from..to]
            .iter()
            .copied()
            .collect::<Option<Vec<f64>>>()
        else {
            // Its client has gone (see above): nobody to answer.
            metrics.abandoned.inc();
            continue;
        };
        match job.task {
            Task::Score { reply, .. } => drop(reply.send(Ok(s))),
            Task::Rank { k, reply, .. } => drop(reply.send(Ok(rec.top(&r.items, &s, k)))),
        }
    }
}
