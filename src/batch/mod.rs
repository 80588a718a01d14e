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

use crate::enrich::Caches;
use crate::plan::duplicates::Related;
use crate::plan::relations::{Change, Existing, NODE_PREFIX, RelationSpec, Wanted, changes};
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

impl BatchLimits {
    /// How many messages of one tenant a worker processes at once: enough to keep its
    /// `max_in_flight` requests full and the next batch forming (`(max_in_flight + 1) ×
    /// max_graphs`, 1,125 with the defaults). More would only wait in the batcher while holding
    /// prefetch slots the other tenants need.
    pub fn tenant_in_flight(&self) -> usize {
        (self.max_in_flight + 1) * self.max_graphs
    }
}

/// What happened to one submitted graph.
#[derive(Debug)]
pub enum GraphOutcome {
    /// Salesforce answered for this graph (successful or not); with the Event's relations as
    /// a successful graph left them (for the ledger), when the tenant maps relations.
    Answered(GraphResult, Option<Vec<Existing>>),
    /// A newer version of the same booking was in the same batch.
    Collapsed,
    /// The whole request failed.
    RequestFailed(Arc<SalesforceError>),
}

/// One booking's graph waiting for a batch.
struct Submission {
    booking_id: String,
    version: u64,
    /// Shared with the submitter, which keeps them to read the answer against.
    nodes: Arc<Vec<Subrequest>>,
    /// The Event's relations as the ledger has them for the previous version, if it does.
    relations_before: Option<Vec<Existing>>,
    /// Records of the mapping written as existing records (left out of `nodes`), for the
    /// relations.
    related: Vec<Related>,
    reply: oneshot::Sender<GraphOutcome>,
}

/// How a tenant's graphs get their Event relations (see [`crate::enrich::relations`] for why
/// they stay exactly once).
#[derive(Clone)]
pub struct Relater {
    /// The tenant's relations mapping.
    pub spec: RelationSpec,
    /// The REST API version of the relation nodes.
    pub api_version: String,
    /// The caches: a graph that failed on its relations forgets the ledger's copy of them.
    pub caches: Caches,
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
    /// Starts a batcher; with a `relater`, each graph also gets the nodes that relate its Event
    /// to the mapped records, planned per request with at most one lookup query.
    pub fn spawn_relating(
        client: Arc<SalesforceClient>,
        limits: BatchLimits,
        tracker: &TaskTracker,
        cancel: CancellationToken,
        relater: Option<Relater>,
    ) -> Self {
        let tenant = client.tenant().to_owned();
        // Enough room for a few full batches; beyond that, submitters wait (backpressure).
        let (tx, rx) = mpsc::channel(limits.max_graphs * (limits.max_in_flight + 1));
        tracker.spawn(run(client, limits, rx, tracker.clone(), cancel, relater));
        Self { tenant, tx }
    }

    /// Submits a booking's graph and waits for its outcome. `related` are the records of the
    /// mapping written as existing ones (a duplicate rule's matches), which the Event is
    /// related to in their place. The nodes are shared, not copied: the submitter keeps them.
    /// `relations_before` is what the ledger entry of version `version - 1` says the Event's
    /// relations are (see [`crate::enrich::relations`] for why that is enough).
    pub async fn submit(
        &self,
        booking_id: &str,
        version: u64,
        nodes: Arc<Vec<Subrequest>>,
        related: Vec<Related>,
        relations_before: Option<Vec<Existing>>,
    ) -> Result<GraphOutcome, BatcherStopped> {
        let (reply, answer) = oneshot::channel();
        let submission = Submission {
            booking_id: booking_id.to_owned(),
            version,
            nodes,
            relations_before,
            related,
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
    relater: Option<Relater>,
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
        let relater = relater.clone();
        tracker.spawn(async move {
            send(&client, relater.as_ref(), collapse(batch)).await;
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

/// One graph of a request: the booking's nodes, and its relation changes when it has any.
struct Outgoing {
    submission: Submission,
    wanted: Option<Wanted>,
    changes: Vec<Change>,
}

impl Outgoing {
    /// The booking's nodes, then its relation nodes; borrowed, as they are only serialised.
    fn nodes(&self) -> Vec<&Subrequest> {
        self.submission
            .nodes
            .iter()
            .chain(self.changes.iter().filter_map(|c| c.node.as_ref()))
            .collect()
    }

    /// True when the graph failed on one of its relation nodes: the relations it was planned on
    /// were not the org's (another worker wrote the same version meanwhile).
    fn failed_on_relation(&self, result: &GraphResult) -> bool {
        !result.is_successful
            && result.graph_response.composite_response.iter().any(|node| {
                node.reference_id.starts_with(NODE_PREFIX)
                    && node.node_error().is_some_and(|e| !e.is_placeholder())
            })
    }

    /// The relations after the graph committed, with the ids Salesforce gave the new ones.
    fn committed(&self, result: &GraphResult) -> Option<Vec<Existing>> {
        self.wanted.as_ref()?;
        let relations = self
            .changes
            .iter()
            .filter_map(|change| {
                let mut after: Existing = change.after.clone()?;
                if after.id.is_empty() {
                    let reference = &change.node.as_ref()?.reference_id;
                    after.id = result
                        .graph_response
                        .composite_response
                        .iter()
                        .find(|n| &n.reference_id == reference)?
                        .record_id()?
                        .into_owned();
                }
                Some(after)
            })
            .collect();
        Some(relations)
    }
}

/// Plans the relation changes of `graphs` whose relations are unknown or must be re-read:
/// from the ledger's entry of the previous version when `fresh` is false and it has one, else
/// with one query for all of them.
async fn plan_relations(
    client: &SalesforceClient,
    relater: &Relater,
    graphs: &mut [Outgoing],
    fresh: bool,
) -> Result<(), SalesforceError> {
    let mut misses = Vec::new();
    for (i, g) in graphs.iter_mut().enumerate() {
        let Some(wanted) = &g.wanted else { continue };
        let cached = if fresh {
            None
        } else if g.submission.version == 1 {
            // Nothing to read: only a graph of version 1 creates the Event, so it has no
            // relations yet; a replay whose first send did commit fails on the duplicate
            // relation and comes back here `fresh` (see `crate::enrich::relations`).
            Some(Vec::new())
        } else {
            let known = g.submission.relations_before.take();
            relater.caches.count_relations_hit(known.is_some());
            known
        };
        match cached {
            Some(existing) => g.changes = changes(&relater.api_version, wanted, &existing),
            None => misses.push(i),
        }
    }
    if misses.is_empty() {
        return Ok(());
    }
    let wanted: Vec<&Wanted> = misses
        .iter()
        .filter_map(|&i| graphs[i].wanted.as_ref())
        .collect();
    let found = relater.caches.read_relations(client, &wanted).await?;
    for (&i, existing) in misses.iter().zip(found) {
        if let Some(wanted) = &graphs[i].wanted {
            graphs[i].changes = changes(&relater.api_version, wanted, &existing);
        }
    }
    Ok(())
}

/// Sends one request; answers each graph unless it failed on a relation node and `retry` is
/// set, in which case it is handed back to be re-planned from the org.
async fn send_once(
    client: &SalesforceClient,
    relater: Option<&Relater>,
    graphs: Vec<Outgoing>,
    retry: bool,
) -> Vec<Outgoing> {
    let request = GraphRequest {
        graphs: graphs
            .iter()
            .enumerate()
            .map(|(i, g)| Graph {
                graph_id: format!("g{i}"),
                composite_request: g.nodes(),
            })
            .collect(),
    };
    let response = match client.composite_graph(&request).await {
        Ok(response) => response,
        Err(error) => {
            let error = Arc::new(error);
            for g in graphs {
                let _ = g
                    .submission
                    .reply
                    .send(GraphOutcome::RequestFailed(error.clone()));
            }
            return Vec::new();
        }
    };
    let mut by_id: HashMap<String, GraphResult> = response
        .graphs
        .into_iter()
        .map(|g| (g.graph_id.clone(), g))
        .collect();
    let mut again = Vec::new();
    for (i, g) in graphs.into_iter().enumerate() {
        let Some(result) = by_id.remove(&format!("g{i}")) else {
            let _ = g
                .submission
                .reply
                .send(GraphOutcome::RequestFailed(Arc::new(
                    SalesforceError::Decode {
                        kind: "graph",
                        message: format!("no result for graph g{i}"),
                    },
                )));
            continue;
        };
        let mut relations = None;
        if let Some(relater) = relater {
            if result.is_successful {
                relations = g.committed(&result);
            } else if g.failed_on_relation(&result) {
                relater
                    .caches
                    .forget_relations(client.tenant(), &g.submission.booking_id);
                if retry {
                    again.push(g);
                    continue;
                }
            }
        }
        let _ = g
            .submission
            .reply
            .send(GraphOutcome::Answered(result, relations));
    }
    again
}

async fn send(client: &SalesforceClient, relater: Option<&Relater>, batch: Vec<Submission>) {
    let mut graphs: Vec<Outgoing> = batch
        .into_iter()
        .map(|submission| Outgoing {
            wanted: relater.and_then(|r| r.spec.wanted(&submission.nodes, &submission.related)),
            submission,
            changes: Vec::new(),
        })
        .collect();
    let Some(relater) = relater else {
        send_once(client, None, graphs, false).await;
        return;
    };
    let mut fresh = false;
    loop {
        if let Err(error) = plan_relations(client, relater, &mut graphs, fresh).await {
            let error = Arc::new(error);
            for g in graphs {
                let _ = g
                    .submission
                    .reply
                    .send(GraphOutcome::RequestFailed(error.clone()));
            }
            return;
        }
        // A graph that failed on a stale view of its relations is re-planned from the org and
        // sent once more; a second failure is answered as it is.
        graphs = send_once(client, Some(relater), graphs, !fresh).await;
        if graphs.is_empty() {
            return;
        }
        fresh = true;
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
                nodes: Arc::default(),
                relations_before: None,
                related: vec![],
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
