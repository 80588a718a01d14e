//! Batch: per tenant, ready graphs are collected into one Composite Graph request (up to the
//! graph and node limits, or what arrived during a short linger) and two versions of one
//! booking in a batch collapse to the newest. A lone booking on an idle queue goes at once:
//! the batcher only waits for more when `linger` says so.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::salesforce::model::{Graph, GraphRequest, GraphResult, Subrequest};
use crate::salesforce::{SalesforceClient, SalesforceError};

/// How a batch is formed.
#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    /// Graphs per request.
    pub max_graphs: usize,
    /// Nodes per request.
    pub max_nodes: usize,
    /// While another request is in flight, wait this long for more graphs to fill a batch.
    pub linger: Duration,
    /// Requests in flight per tenant.
    pub max_in_flight: usize,
}

/// What happened to one submitted graph.
#[derive(Debug)]
pub enum GraphOutcome {
    /// Salesforce answered for this graph (successful or not).
    Answered(GraphResult),
    /// A newer version of the same booking was in the same batch.
    Collapsed,
    /// The whole request failed.
    RequestFailed(Arc<SalesforceError>),
}

/// One booking's graph waiting for a batch.
struct Submission {
    booking_id: String,
    version: u64,
    nodes: Vec<Subrequest>,
    reply: oneshot::Sender<GraphOutcome>,
}

/// The batcher was stopped before it answered.
#[derive(Debug, thiserror::Error)]
#[error("the batcher of tenant {0} stopped")]
pub struct BatcherStopped(pub String);

/// Handle to a tenant's batcher task.
#[derive(Clone)]
pub struct Batcher {
    tenant: String,
    tx: mpsc::Sender<Submission>,
}

impl Batcher {
    /// Starts a batcher for `client`'s tenant on `tracker`; it ends when `cancel` fires and its
    /// queue is drained.
    pub fn spawn(
        client: Arc<SalesforceClient>,
        limits: BatchLimits,
        tracker: &TaskTracker,
        cancel: CancellationToken,
    ) -> Self {
        let tenant = client.tenant().to_owned();
        // Enough room for a few full batches; beyond that, submitters wait (backpressure).
        let (tx, rx) = mpsc::channel(limits.max_graphs * (limits.max_in_flight + 1));
        tracker.spawn(run(client, limits, rx, tracker.clone(), cancel));
        Self { tenant, tx }
    }

    /// Submits a booking's graph and waits for its outcome.
    pub async fn submit(
        &self,
        booking_id: &str,
        version: u64,
        nodes: Vec<Subrequest>,
    ) -> Result<GraphOutcome, BatcherStopped> {
        let (reply, answer) = oneshot::channel();
        let submission = Submission {
            booking_id: booking_id.to_owned(),
            version,
            nodes,
            reply,
        };
        self.tx
            .send(submission)
            .await
            .map_err(|_| BatcherStopped(self.tenant.clone()))?;
        answer
            .await
            .map_err(|_| BatcherStopped(self.tenant.clone()))
    }
}

async fn run(
    client: Arc<SalesforceClient>,
    limits: BatchLimits,
    mut rx: mpsc::Receiver<Submission>,
    tracker: TaskTracker,
    cancel: CancellationToken,
) {
    let in_flight = Arc::new(Semaphore::new(limits.max_in_flight));
    let mut carry: Option<Submission> = None;
    loop {
        let first = match carry.take() {
            Some(s) => s,
            None => tokio::select! {
                next = rx.recv() => match next {
                    Some(s) => s,
                    None => return,
                },
                () = cancel.cancelled() => {
                    // Submitters have stopped; answer whatever is still queued.
                    rx.close();
                    match rx.recv().await {
                        Some(s) => s,
                        None => return,
                    }
                }
            },
        };
        // Linger only while another request is in flight: a lone booking on an idle queue goes
        // at once, while under load the batch waits briefly to fill.
        let busy = in_flight.available_permits() < limits.max_in_flight;
        // Wait for a request slot: while all are busy, more graphs pile up and the next batch is
        // fuller, which is what keeps API calls per booking low when Salesforce is the limit.
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            return;
        };
        let linger = if busy { limits.linger } else { Duration::ZERO };
        let mut nodes = first.nodes.len();
        let mut batch = vec![first];
        let deadline = tokio::time::Instant::now() + linger;
        while batch.len() < limits.max_graphs {
            let next = match rx.try_recv() {
                Ok(s) => Some(s),
                Err(mpsc::error::TryRecvError::Empty) if !linger.is_zero() => {
                    tokio::time::timeout_at(deadline, rx.recv())
                        .await
                        .ok()
                        .flatten()
                }
                Err(_) => None,
            };
            let Some(next) = next else { break };
            if nodes + next.nodes.len() > limits.max_nodes {
                carry = Some(next);
                break;
            }
            nodes += next.nodes.len();
            batch.push(next);
        }
        let client = client.clone();
        tracker.spawn(async move {
            send(&client, collapse(batch)).await;
            drop(permit);
        });
    }
}

/// Keeps the newest version of each booking; older ones are answered `Collapsed` at once.
fn collapse(batch: Vec<Submission>) -> Vec<Submission> {
    let mut newest: HashMap<String, u64> = HashMap::new();
    for s in &batch {
        let v = newest.entry(s.booking_id.clone()).or_insert(s.version);
        *v = (*v).max(s.version);
    }
    let mut kept = Vec::with_capacity(batch.len());
    for s in batch {
        if newest.get(&s.booking_id) == Some(&s.version) {
            newest.remove(&s.booking_id);
            kept.push(s);
        } else {
            let _ = s.reply.send(GraphOutcome::Collapsed);
        }
    }
    kept
}

async fn send(client: &SalesforceClient, batch: Vec<Submission>) {
    let mut replies = Vec::with_capacity(batch.len());
    let mut graphs = Vec::with_capacity(batch.len());
    for (i, s) in batch.into_iter().enumerate() {
        graphs.push(Graph {
            graph_id: format!("g{i}"),
            composite_request: s.nodes,
        });
        replies.push(s.reply);
    }
    match client.composite_graph(&GraphRequest { graphs }).await {
        Ok(response) => {
            let mut by_id: HashMap<String, GraphResult> = response
                .graphs
                .into_iter()
                .map(|g| (g.graph_id.clone(), g))
                .collect();
            for (i, reply) in replies.into_iter().enumerate() {
                let outcome = match by_id.remove(&format!("g{i}")) {
                    Some(result) => GraphOutcome::Answered(result),
                    None => GraphOutcome::RequestFailed(Arc::new(SalesforceError::Decode {
                        kind: "graph",
                        message: format!("no result for graph g{i}"),
                    })),
                };
                let _ = reply.send(outcome);
            }
        }
        Err(error) => {
            let error = Arc::new(error);
            for reply in replies {
                let _ = reply.send(GraphOutcome::RequestFailed(error.clone()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collapse_keeps_the_newest_version_once() {
        let mut answers = Vec::new();
        let mut batch = Vec::new();
        for (booking, version) in [("a", 1), ("a", 3), ("b", 1), ("a", 2), ("a", 3)] {
            let (reply, answer) = oneshot::channel();
            answers.push(answer);
            batch.push(Submission {
                booking_id: booking.into(),
                version,
                nodes: vec![],
                reply,
            });
        }
        let kept = collapse(batch);
        let kept: Vec<(String, u64)> = kept
            .iter()
            .map(|s| (s.booking_id.clone(), s.version))
            .collect();
        assert_eq!(kept, [("a".to_owned(), 3), ("b".to_owned(), 1)]);
        let collapsed = answers
            .into_iter()
            .filter_map(|mut a| a.try_recv().ok())
            .filter(|o| matches!(o, GraphOutcome::Collapsed))
            .count();
        assert_eq!(collapsed, 3);
    }
}
