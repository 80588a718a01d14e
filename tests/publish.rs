//! Publishing as the booking platform does, against the real broker: a message the broker
//! nacks is not taken, and is published again until it is.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lapin::options::{BasicGetOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use portals_crm::amqp::{PublishError, Publisher};

const URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// A classic queue that holds one message and refuses more with a `basic.nack` to the
/// publisher (`x-overflow = reject-publish`,
/// <https://www.rabbitmq.com/docs/maxlength#overflow-behaviour>): the one server-sent nack a test
/// can cause on purpose. (A quorum queue applies the limit loosely and may take one more.)
async fn queue_of_one(channel: &lapin::Channel, name: &str) {
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongLongInt(1));
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
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

async fn take(channel: &lapin::Channel, queue: &str) -> Option<String> {
    channel
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .expect("basic.get")
        .map(|message| String::from_utf8(message.delivery.data.clone()).unwrap())
}

#[tokio::test]
async fn a_nacked_publish_is_published_again_until_the_broker_takes_it() {
    let connection = Connection::connect(URL, ConnectionProperties::default())
        .await
        .expect("broker on 127.0.0.1:5672");
    let publisher = Publisher::open(&connection).await.unwrap();
    let queue = format!(
        "test.publish.{}.{}",
        std::process::id(),
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    queue_of_one(publisher.channel(), &queue).await;
    let properties = BasicProperties::default();
    publisher
        .publish("", &queue, b"first", properties.clone())
        .await
        .expect("the queue takes one");
    let refused = publisher
        .publish("", &queue, b"second", properties.clone())
        .await;

    // Make room a little later, while the second message is being republished.
    let reader = connection.create_channel().await.unwrap();
    let room = {
        let (reader, queue) = (reader.clone(), queue.clone());
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            take(&reader, &queue).await
        })
    };
    let republished = publisher
        .publish_republishing("", &queue, b"second", properties)
        .await;
    let taken = [
        room.await.unwrap(),
        take(&reader, &queue).await,
        take(&reader, &queue).await,
    ];
    // The queue goes before any assertion, so that a failing run leaves nothing behind.
    reader
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    assert!(
        matches!(refused, Err(PublishError::Nacked)),
        "a full reject-publish queue nacks: {refused:?}"
    );
    assert!(
        republished.is_ok(),
        "taken once there is room: {republished:?}"
    );
    assert_eq!(
        taken.map(|body| body.unwrap_or_default()),
        ["first".to_owned(), "second".to_owned(), String::new()],
        "each once, in order"
    );
    connection.close(200, "done".into()).await.unwrap();
}
