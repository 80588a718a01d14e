//! Acknowledgements in runs (`amqp::acks`) against the real broker: a run acks exactly what was
//! settled, never a delivery still in progress, never one handed back with a nack.

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicConsumeOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    BasicRejectOptions, ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use portals_crm::amqp::Acks;
use prometheus::{IntCounterVec, Opts};
use tokio_util::task::TaskTracker;

const URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

async fn quorum_queue(channel: &lapin::Channel, name: &str) {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    channel
        .queue_declare(
            name.into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            args,
        )
        .await
        .expect("declare the test queue");
}

/// What is left in `queue` once every connection that consumed it closed: the bodies, taken
/// with `basic.get` and acked.
async fn left_in(channel: &lapin::Channel, queue: &str) -> BTreeSet<String> {
    let mut left = BTreeSet::new();
    while let Some(message) = channel
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .expect("basic.get")
    {
        left.insert(String::from_utf8(message.delivery.data.clone()).unwrap());
    }
    left
}

/// A queue name no other test uses.
fn unique_queue() -> String {
    let unique = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("test.acks.{}.{unique}", std::process::id())
}

/// A connection and a publishing channel with confirms.
async fn admin() -> (Connection, lapin::Channel) {
    let admin = Connection::connect(URL, ConnectionProperties::default())
        .await
        .expect("broker on 127.0.0.1:5672");
    let channel = admin.create_channel().await.unwrap();
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    (admin, channel)
}

/// Publishes bodies `1` to `n`, confirmed.
async fn publish_numbers(channel: &lapin::Channel, queue: &str, n: usize) {
    for body in 1..=n {
        channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                body.to_string().as_bytes(),
                BasicProperties::default(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }
}

/// A consumer of `queue` on a connection of its own, and its first `n` deliveries.
async fn consume(
    queue: &str,
    n: usize,
) -> (Connection, lapin::Channel, lapin::Consumer, Vec<Delivery>) {
    let consuming = Connection::connect(URL, ConnectionProperties::default())
        .await
        .unwrap();
    let channel = consuming.create_channel().await.unwrap();
    channel
        .basic_qos(20, BasicQosOptions { global: false })
        .await
        .unwrap();
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut deliveries = Vec::new();
    while deliveries.len() < n {
        let delivery = consumer.next().await.unwrap().unwrap();
        // Tags rise by one per delivery on the channel, from 1; the body is the tag.
        assert_eq!(
            String::from_utf8_lossy(&delivery.data),
            delivery.delivery_tag.to_string()
        );
        deliveries.push(delivery);
    }
    (consuming, channel, consumer, deliveries)
}

/// Closes the consuming connection and the acks' task, then takes what is left in `queue`
/// (see [`left_in`]), deletes it and closes the admin connection.
async fn finish(
    consuming: Connection,
    acks: Acks,
    tracker: TaskTracker,
    (admin, channel): (Connection, lapin::Channel),
    queue: &str,
) -> BTreeSet<String> {
    consuming.close(200, "test done".into()).await.unwrap();
    drop(acks);
    tracker.close();
    tracker.wait().await;
    let left = left_in(&channel, queue).await;
    channel
        .queue_delete(queue.into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    let _ = admin.close(200, "test done".into()).await;
    left
}

#[tokio::test]
async fn runs_ack_what_was_settled_and_nothing_else() {
    let queue = unique_queue();
    let (admin, channel) = admin().await;
    quorum_queue(&channel, &queue).await;
    publish_numbers(&channel, &queue, 10).await;
    let (consuming, consumer_channel, _consumer, deliveries) = consume(&queue, 10).await;
    let tracker = TaskTracker::new();
    let counted = IntCounterVec::new(Opts::new("acks", "test"), &["sent"]).unwrap();
    let acks = Acks::start(&tracker, Duration::from_millis(50), counted.clone());
    let d = |n: usize| &deliveries[n - 1];

    // 3, 1 and 2 settle together: one run.
    let (a3, a1, a2) = tokio::join!(acks.ack(d(3)), acks.ack(d(1)), acks.ack(d(2)));
    assert!(a1.unwrap() && a2.unwrap() && a3.unwrap());
    // 4 is handed back (the run may pass it, but must not ack it).
    assert!(
        acks.nack(
            d(4),
            BasicNackOptions {
                requeue: true,
                multiple: false
            }
        )
        .await
        .unwrap()
    );
    // 6 and 7 settle behind 5, which is still in progress: after the hold they go alone.
    let (a6, a7) = tokio::join!(acks.ack(d(6)), acks.ack(d(7)));
    assert!(a6.unwrap() && a7.unwrap());
    // 5 closes the gap; 8 and 10 settle while 9 never does.
    let (a5, a8, a10) = tokio::join!(acks.ack(d(5)), acks.ack(d(8)), acks.ack(d(10)));
    assert!(a5.unwrap() && a8.unwrap() && a10.unwrap());

    // The settle barrier of `consumer.rs`: a synchronous command through the queue after the
    // acks, so closing the connection cannot drop them; what it takes goes straight back.
    acks.flush().await;
    if let Some(taken) = consumer_channel
        .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: false })
        .await
        .unwrap()
    {
        acks.reject(&taken.delivery, BasicRejectOptions { requeue: true })
            .await
            .unwrap();
    }
    let left = finish(consuming, acks, tracker, (admin, channel), &queue).await;
    assert_eq!(
        left,
        BTreeSet::from(["4".to_owned(), "9".to_owned()]),
        "only the nacked message and the one never settled are back in the queue"
    );
    // Eight acked: 6, 7 (behind 5) and 10 (behind 9) alone, the others in runs (unless this
    // machine stalled past the hold between two of them).
    let in_run = counted.with_label_values(&["in_run"]).get();
    let alone = counted.with_label_values(&["alone"]).get();
    assert_eq!(in_run + alone, 8, "in runs {in_run}, alone {alone}");
    assert!(alone >= 3, "6, 7 and 10 went alone: {alone}");
}

#[tokio::test]
async fn a_delivery_whose_processing_panics_is_handed_back_and_does_not_stop_the_run() {
    let queue = unique_queue();
    let (admin, channel) = admin().await;
    quorum_queue(&channel, &queue).await;
    publish_numbers(&channel, &queue, 3).await;
    let (consuming, _consumer_channel, mut consumer, deliveries) = consume(&queue, 3).await;
    let tracker = TaskTracker::new();
    let counted = IntCounterVec::new(Opts::new("acks", "test"), &["sent"]).unwrap();
    // A hold far longer than the test: acks stuck behind 1 would go alone, a minute late.
    let acks = Acks::start(&tracker, Duration::from_secs(60), counted.clone());
    let mut deliveries = deliveries.into_iter();
    let (d1, d2, d3) = (
        deliveries.next().unwrap(),
        deliveries.next().unwrap(),
        deliveries.next().unwrap(),
    );

    // 1's processing panics while its guard is armed.
    let processing = {
        let acks = acks.clone();
        tokio::spawn(async move {
            let _unsettled = acks.guard(&d1);
            panic!("a bug in processing");
        })
    };
    assert!(processing.await.unwrap_err().is_panic());
    // 2 is settled the ordinary way: its disarmed guard hands nothing back.
    acks.guard(&d2).disarm();
    let (a2, a3) = tokio::join!(acks.ack(&d2), acks.ack(&d3));
    assert!(a2.unwrap() && a3.unwrap());
    // 1 comes back, redelivered, and is acked after 3 in a run.
    let again = tokio::time::timeout(Duration::from_secs(120), consumer.next())
        .await
        .expect("the message handed back is delivered again")
        .unwrap()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&again.data), "1");
    assert!(again.redelivered);
    assert!(acks.ack(&again).await.unwrap());
    assert_eq!(counted.with_label_values(&["in_run"]).get(), 3);
    assert_eq!(counted.with_label_values(&["alone"]).get(), 0);

    let left = finish(consuming, acks, tracker, (admin, channel), &queue).await;
    assert!(left.is_empty(), "every message acked once: {left:?}");
}
