//! Consumer acknowledgements of one channel, sent as `basic.ack` with `multiple = true` whenever
//! the order in which messages settle allows: one frame for a run of settled deliveries instead
//! of one per message.
//!
//! Why: acking each delivery on its own is most of what a consumer costs the client and the
//! broker. Measured on the bench machine, a lapin consumer on a quorum queue spent 43 µs of CPU
//! per message acking each one and 10 µs acking every 50th with `multiple`, and the broker
//! delivered 3.5 times as many messages per second. RabbitMQ's own benchmarks name the
//! multi-ack interval as the biggest single gain for a quorum queue consumer
//! (`rabbitmq-notes.md` §2).
//!
//! # Rules (AMQP 0-9-1 `basic.ack`, RabbitMQ "Consumer Acknowledgements")
//! Delivery tags are per channel and rise by one with every delivery on it; `multiple = true`
//! acknowledges every unacknowledged delivery up to and including the tag. So a multiple ack is
//! sent only for a run of tags *every one of which* this process settled: the run starting right
//! after the highest tag already covered ([`Window`]'s floor). A tag this process never saw (a
//! delivery still in lapin's buffer, or a `basic.get` it did not report) keeps the run from
//! passing it, so nothing is acknowledged that was not settled. A delivery settled another way
//! (`basic.nack`, `basic.reject`) is reported after its frame was sent, so a later multiple ack,
//! which only touches unacknowledged deliveries, cannot overtake it. Acking a tag twice closes the
//! channel (`PRECONDITION_FAILED - unknown delivery tag`): every individual ack of a round is
//! handed to lapin, and sent, before the next round begins, so no later multiple ack can precede
//! it.
//!
//! # Holding
//! A delivery settled behind one still in progress cannot join a run. It is held for at most
//! [`HOLD`], in case the gap closes, and then acknowledged on its own: a slow message never holds
//! the acks of faster ones for longer than that, so the prefetch window keeps moving.
//! [`Acks::flush`] sends every held ack at once (before the shutdown's settle barrier). Gaps are
//! the rule, not the exception: a Composite answer settles up to 75 bookings at once, a tenant has
//! several requests in flight, and they are answered in any order, so a booking settles behind
//! one whose request is answered later. On the bench (zero-latency org, requests of ~150 ms),
//! a hold of 5 ms sent 40 % of the acks alone, 50 ms 20 %, 150 ms none.
//!
//! Each [`Acks::ack`] answers only once the frame covering its delivery was handed to lapin, with
//! lapin's answer for that frame, so the caller counts a message settled exactly as before.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use futures_util::future::join_all;
use lapin::Acker;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions, BasicRejectOptions};
use prometheus::{IntCounter, IntCounterVec};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

/// How long a settled delivery waits behind an unsettled one before it is acked on its own:
/// about one Composite request's time (module documentation). The cost is a prefetch slot held
/// that long.
pub const HOLD: Duration = Duration::from_millis(150);

/// lapin's answer for the frame that acknowledged a delivery: `Ok(true)` sent, `Ok(false)` the
/// channel had closed (the broker will redeliver), `Err` the channel failed.
pub type AckAnswer = Result<bool, lapin::Error>;

enum Command {
    /// A delivery to acknowledge.
    Ack {
        tag: u64,
        acker: Acker,
        answer: oneshot::Sender<AckAnswer>,
    },
    /// A delivery settled by a frame already sent (nack, reject).
    Settled { tag: u64 },
    /// Ack every held delivery now; answered when done.
    Flush { done: oneshot::Sender<()> },
}

/// The acknowledgements of one channel (see the module documentation). Cheap to clone; the task
/// that sends the frames ends when the last clone is dropped.
#[derive(Clone)]
pub struct Acks {
    commands: mpsc::UnboundedSender<Command>,
}

impl Acks {
    /// Starts the task acknowledging one channel's deliveries (on `tracker`), holding
    /// out-of-order ones for at most `hold`, counting them in `counted` by label `sent`:
    /// `in_run` or `alone` (`portals_crm_amqp_acks_total`).
    pub fn start(tracker: &TaskTracker, hold: Duration, counted: IntCounterVec) -> Self {
        let (commands, receiver) = mpsc::unbounded_channel();
        tracker.spawn(run(receiver, hold, Counted::new(&counted)));
        Self { commands }
    }

    /// Acknowledges `delivery` (of this channel), alone or in a run; answers once the frame
    /// covering it was handed to lapin.
    pub async fn ack(&self, delivery: &Delivery) -> AckAnswer {
        self.request(delivery).answer().await
    }

    /// Asks for `delivery`'s acknowledgement now; [`AckRequest::answer`] waits for the frame that
    /// covers it (up to [`HOLD`] for a delivery settled behind a gap), so a caller can give back
    /// what it holds for the message first.
    pub fn request(&self, delivery: &Delivery) -> AckRequest {
        let (answer, answered) = oneshot::channel();
        let command = Command::Ack {
            tag: delivery.delivery_tag,
            acker: delivery.acker.clone(),
            answer,
        };
        match self.commands.send(command) {
            Ok(()) => AckRequest::Queued(answered),
            // The task is gone (only while the connection closes): ack directly.
            Err(_) => AckRequest::Direct(delivery.acker.clone()),
        }
    }

    /// `basic.nack` for `delivery`, sent now; once sent, the delivery no longer stops a run.
    pub async fn nack(&self, delivery: &Delivery, options: BasicNackOptions) -> AckAnswer {
        let sent = delivery.acker.nack(options).await;
        self.settled_if_sent(delivery.delivery_tag, &sent);
        sent
    }

    /// `basic.reject` for `delivery`, sent now; once sent, the delivery no longer stops a run.
    pub async fn reject(&self, delivery: &Delivery, options: BasicRejectOptions) -> AckAnswer {
        let sent = delivery.acker.reject(options).await;
        self.settled_if_sent(delivery.delivery_tag, &sent);
        sent
    }

    /// Sends every held ack now; returns when they were handed to lapin.
    pub async fn flush(&self) {
        let (done, flushed) = oneshot::channel();
        if self.commands.send(Command::Flush { done }).is_ok() {
            let _ = flushed.await;
        }
    }

    /// A guard for `delivery` while it is processed: dropped before [`Unsettled::disarm`] (the
    /// processing panicked and is unwinding), it hands the delivery back with `basic.nack`,
    /// `requeue = true`. Without it the delivery would stay unacknowledged until the channel
    /// closes, and every ack behind it on the channel would go alone. The broker redelivers it,
    /// and a work queue's delivery limit dead-letters it after its last attempt (`x-death`
    /// reason `delivery_limit`, `rabbitmq-notes.md` §1), so a message that crashes the code
    /// every time ends in the dead-letter queue, not in a loop.
    pub fn guard(&self, delivery: &Delivery) -> Unsettled {
        Unsettled {
            handed_back: Some((self.clone(), delivery.delivery_tag, delivery.acker.clone())),
        }
    }

    /// A frame not sent leaves the delivery unacknowledged: no run may pass it.
    fn settled_if_sent(&self, tag: u64, sent: &AckAnswer) {
        if matches!(sent, Ok(true)) {
            // Without the task there is no run to extend.
            let _ = self.commands.send(Command::Settled { tag });
        }
    }
}

/// A delivery being processed ([`Acks::guard`]); nacked with requeue if dropped armed.
#[must_use = "dropped at once, it hands the delivery back"]
pub struct Unsettled {
    handed_back: Option<(Acks, u64, Acker)>,
}

impl Unsettled {
    /// The delivery's outcome is being settled the ordinary way: nothing to hand back.
    pub fn disarm(mut self) {
        self.handed_back = None;
    }
}

impl Drop for Unsettled {
    fn drop(&mut self) {
        let Some((acks, tag, acker)) = self.handed_back.take() else {
            return;
        };
        tracing::error!(
            delivery_tag = tag,
            "processing ended without settling the message (a panic); handing it back"
        );
        // Drop cannot wait for the frame. Only a task unwinding gets here, inside the runtime.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let sent = acker
                    .nack(BasicNackOptions {
                        requeue: true,
                        multiple: false,
                    })
                    .await;
                acks.settled_if_sent(tag, &sent);
            });
        }
    }
}

/// An acknowledgement asked for ([`Acks::request`]).
#[must_use = "the delivery counts as settled only once its answer is known"]
pub enum AckRequest {
    /// Waiting for its run, or its hold to end.
    Queued(oneshot::Receiver<AckAnswer>),
    /// The channel's task is gone: acked on its own when awaited.
    Direct(Acker),
}

impl AckRequest {
    /// lapin's answer for the frame that acknowledged the delivery.
    pub async fn answer(self) -> AckAnswer {
        match self {
            Self::Queued(answered) => match answered.await {
                Ok(answer) => answer,
                // The task ended without answering: the connection is closing and the broker
                // redelivers what was not acknowledged.
                Err(_) => Ok(false),
            },
            Self::Direct(acker) => acker.ack(BasicAckOptions::default()).await,
        }
    }
}

/// The counters of how deliveries were acknowledged.
struct Counted {
    in_run: IntCounter,
    alone: IntCounter,
}

impl Counted {
    fn new(counted: &IntCounterVec) -> Self {
        Self {
            in_run: counted.with_label_values(&["in_run"]),
            alone: counted.with_label_values(&["alone"]),
        }
    }
}

/// The task: takes every command waiting, then sends one round of frames (see [`Window::take`]),
/// and waits no longer than the oldest held delivery may wait.
async fn run(mut commands: mpsc::UnboundedReceiver<Command>, hold: Duration, counted: Counted) {
    let mut window = Window::default();
    let mut flushes = Vec::new();
    loop {
        let first = match window.deadline(hold) {
            Some(deadline) => match tokio::time::timeout_at(deadline, commands.recv()).await {
                Ok(command) => command,
                Err(_) => {
                    send(window.take(Instant::now(), hold, false), &counted).await;
                    continue;
                }
            },
            None => commands.recv().await,
        };
        let Some(first) = first else {
            // Every sender is gone: what is held goes out on its own.
            send(window.take(Instant::now(), hold, true), &counted).await;
            return;
        };
        let now = Instant::now();
        window.apply(first, now, &mut flushes);
        // Settling tasks that were woken together (the bookings of one Composite answer) run
        // before this one looks again: their acks join this round.
        tokio::task::yield_now().await;
        while let Ok(command) = commands.try_recv() {
            window.apply(command, now, &mut flushes);
        }
        send(
            window.take(Instant::now(), hold, !flushes.is_empty()),
            &counted,
        )
        .await;
        for done in flushes.drain(..) {
            let _ = done.send(());
        }
    }
}

impl Window<Acker, oneshot::Sender<AckAnswer>> {
    fn apply(&mut self, command: Command, now: Instant, flushes: &mut Vec<oneshot::Sender<()>>) {
        match command {
            Command::Ack { tag, acker, answer } => self.settle(tag, Some((acker, answer)), now),
            Command::Settled { tag } => self.settle(tag, None, now),
            Command::Flush { done } => flushes.push(done),
        }
    }
}

/// Sends a round's frames together (lapin queues them in this order) and answers each waiter.
async fn send(round: Round<Acker, oneshot::Sender<AckAnswer>>, counted: &Counted) {
    let Round { run, alone } = round;
    if let Some((_, waiters)) = &run {
        counted.in_run.inc_by(waiters.len() as u64);
    }
    counted.alone.inc_by(alone.len() as u64);
    let multiple = run.map(|(acker, answers)| async move {
        let answer = acker.ack(BasicAckOptions { multiple: true }).await;
        for waiter in answers {
            let _ = waiter.send(answer.clone());
        }
    });
    let singles = join_all(alone.into_iter().map(|(acker, waiter)| async move {
        let _ = waiter.send(acker.ack(BasicAckOptions::default()).await);
    }));
    match multiple {
        Some(multiple) => {
            futures_util::join!(multiple, singles);
        }
        None => {
            singles.await;
        }
    }
}

/// What one round sends: one multiple ack (the acker of the run's highest acked tag, and every
/// waiter the run answers), and the held deliveries acked alone.
#[derive(Debug)]
struct Round<A, W> {
    run: Option<(A, Vec<W>)>,
    alone: Vec<(A, W)>,
}

/// The settled deliveries above the floor (every tag at or below it is acknowledged or settled
/// another way), generic over the acker and the waiter so the rules can be tested without a
/// broker.
///
/// Bounded when a gap never closes (a delivery that stays unsettled on an open channel): the
/// deliveries acked alone behind it are kept as ranges of tags, which coalesce as they arrive in
/// order, and the held ones in arrival order, so a round costs what it takes, not what is held.
#[derive(Debug)]
struct Window<A, W> {
    floor: u64,
    /// Settled, waiting for their ack, by tag.
    waiting: BTreeMap<u64, (A, W)>,
    /// The waiting ones in the order they settled (so, of their hold's end), with that instant;
    /// an entry whose tag a run took since is skipped when reached.
    order: VecDeque<(Instant, u64)>,
    /// Settled by a frame already sent (nacked, rejected, or acked alone), above the floor:
    /// ranges of tags, first → last (inclusive), never adjacent or overlapping.
    done: BTreeMap<u64, u64>,
}

impl<A, W> Default for Window<A, W> {
    fn default() -> Self {
        Self {
            floor: 0,
            waiting: BTreeMap::new(),
            order: VecDeque::new(),
            done: BTreeMap::new(),
        }
    }
}

impl<A, W> Window<A, W> {
    /// Records tag `tag` as settled: to be acked (`Some`) or already settled by another frame.
    fn settle(&mut self, tag: u64, ack: Option<(A, W)>, now: Instant) {
        if tag <= self.floor || self.is_done(tag) || self.waiting.contains_key(&tag) {
            // Cannot happen on one channel (each tag is settled once); acking it again would
            // close the channel. The waiter is answered by dropping it (as a closing channel).
            return;
        }
        match ack {
            Some(entry) => {
                self.waiting.insert(tag, entry);
                self.order.push_back((now, tag));
            }
            None => self.mark_done(tag),
        }
    }

    fn is_done(&self, tag: u64) -> bool {
        self.done
            .range(..=tag)
            .next_back()
            .is_some_and(|(_, &last)| tag <= last)
    }

    /// Adds `tag` (not yet done) to the ranges, joining its neighbours.
    fn mark_done(&mut self, tag: u64) {
        let mut first = tag;
        let mut last = tag;
        if let Some((&start, &end)) = self.done.range(..tag).next_back()
            && end + 1 == tag
        {
            first = start;
        }
        if let Some(end) = self.done.remove(&(tag + 1)) {
            last = end;
        }
        self.done.insert(first, last);
    }

    /// When the oldest held delivery must be acked on its own.
    fn deadline(&mut self, hold: Duration) -> Option<Instant> {
        while let Some(&(since, tag)) = self.order.front() {
            if self.waiting.contains_key(&tag) {
                return Some(since + hold);
            }
            self.order.pop_front();
        }
        None
    }

    /// Takes the run that starts right above the floor (one multiple ack for all of it), and,
    /// beyond it, the deliveries held since `hold` ago or longer (all of them when `flush`), to be
    /// acked alone; those are recorded as done so a later run can pass them.
    fn take(&mut self, now: Instant, hold: Duration, flush: bool) -> Round<A, W> {
        let mut acker = None;
        let mut waiters = Vec::new();
        loop {
            let next = self.floor + 1;
            if let Some((a, waiter)) = self.waiting.remove(&next) {
                self.floor = next;
                acker = Some(a);
                waiters.push(waiter);
            } else if let Some(last) = self.done.remove(&next) {
                self.floor = last;
            } else {
                break;
            }
        }
        let mut alone = Vec::new();
        while let Some(&(since, tag)) = self.order.front() {
            if !flush && now.duration_since(since) < hold {
                break;
            }
            self.order.pop_front();
            if let Some(entry) = self.waiting.remove(&tag) {
                alone.push(entry);
                self.mark_done(tag);
            }
        }
        Round {
            run: acker.map(|a| (a, waiters)),
            alone,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The acker is its tag; the waiter is its tag too.
    fn window(settled: &[u64], now: Instant) -> Window<u64, u64> {
        let mut window = Window::default();
        for &tag in settled {
            window.settle(tag, Some((tag, tag)), now);
        }
        window
    }

    #[test]
    fn a_run_from_the_floor_is_one_multiple_ack_at_its_highest_tag() {
        let now = Instant::now();
        let mut w = window(&[3, 1, 2, 5], now);
        let round = w.take(now, HOLD, false);
        let (acker, waiters) = round.run.expect("1..=3 is a run");
        assert_eq!(acker, 3);
        assert_eq!(waiters, vec![1, 2, 3]);
        assert!(round.alone.is_empty(), "5 waits for 4: {:?}", round.alone);
        assert_eq!(w.floor, 3);
        // 4 arrives: 4 and 5 are the next run.
        w.settle(4, Some((4, 4)), now);
        let round = w.take(now, HOLD, false);
        assert_eq!(round.run, Some((5, vec![4, 5])));
        assert_eq!(w.floor, 5);
        assert!(w.waiting.is_empty() && w.done.is_empty());
    }

    #[test]
    fn a_gap_is_never_covered_and_what_waits_behind_it_goes_alone_after_the_hold() {
        let now = Instant::now();
        let mut w = window(&[2, 3], now);
        let round = w.take(now, HOLD, false);
        assert!(round.run.is_none(), "tag 1 is not settled: no multiple ack");
        assert!(round.alone.is_empty(), "not held long enough yet");
        assert_eq!(w.deadline(HOLD), Some(now + HOLD));
        let later = now + HOLD;
        let round = w.take(later, HOLD, false);
        assert!(round.run.is_none());
        assert_eq!(round.alone, vec![(2, 2), (3, 3)]);
        assert_eq!(w.deadline(HOLD), None, "nothing waits any more");
        // When 1 settles, the run passes the two acked alone without acking them again.
        w.settle(1, Some((1, 1)), later);
        let round = w.take(later, HOLD, false);
        assert_eq!(round.run, Some((1, vec![1])));
        assert!(round.alone.is_empty());
        assert_eq!(w.floor, 3);
    }

    #[test]
    fn a_delivery_settled_by_another_frame_lets_the_run_pass_but_is_not_acked() {
        let now = Instant::now();
        let mut w: Window<u64, u64> = window(&[1, 3], now);
        w.settle(2, None, now); // nacked
        w.settle(4, None, now); // rejected
        let round = w.take(now, HOLD, false);
        // The multiple ack is sent at the highest *acked* tag of the run (3), and the run ends
        // at 4.
        assert_eq!(round.run, Some((3, vec![1, 3])));
        assert_eq!(w.floor, 4);
        // A run of only nacked deliveries sends nothing.
        w.settle(5, None, now);
        let round = w.take(now, HOLD, false);
        assert!(round.run.is_none() && round.alone.is_empty());
        assert_eq!(w.floor, 5);
    }

    #[test]
    fn a_flush_sends_everything_held_at_once() {
        let now = Instant::now();
        let mut w = window(&[1, 4, 6], now);
        let round = w.take(now, HOLD, true);
        assert_eq!(round.run, Some((1, vec![1])));
        assert_eq!(round.alone, vec![(4, 4), (6, 6)]);
    }

    #[test]
    fn behind_a_gap_that_never_closes_what_is_kept_stays_small() {
        let start = Instant::now();
        let mut w: Window<u64, u64> = Window::default();
        // Tag 1 never settles; 10,000 more do, in order, each acked alone after its hold.
        for tag in 2..=10_001 {
            let now = start + Duration::from_millis(tag);
            w.settle(tag, Some((tag, tag)), now);
            let round = w.take(now, HOLD, false);
            assert!(round.run.is_none());
        }
        let round = w.take(start + Duration::from_secs(60), HOLD, false);
        assert!(round.run.is_none());
        assert_eq!(w.floor, 0, "nothing passes the unsettled tag 1");
        assert!(w.waiting.is_empty() && w.order.is_empty());
        assert_eq!(
            w.done.iter().collect::<Vec<_>>(),
            vec![(&2, &10_001)],
            "one range, not ten thousand entries"
        );
        // Once 1 settles, one run passes them all.
        w.settle(1, Some((1, 1)), start);
        assert_eq!(w.take(start, HOLD, false).run, Some((1, vec![1])));
        assert_eq!(w.floor, 10_001);
        assert!(w.done.is_empty());
    }

    #[test]
    fn a_tag_at_or_below_the_floor_is_not_acked_twice() {
        let now = Instant::now();
        let mut w = window(&[1, 2], now);
        let _ = w.take(now, HOLD, false);
        w.settle(2, Some((2, 2)), now);
        let round = w.take(now, HOLD, true);
        assert!(round.run.is_none() && round.alone.is_empty());
    }
}
