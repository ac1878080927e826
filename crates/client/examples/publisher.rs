//! Publishes N numbered messages to a topic (creating it if needed) and reports the rate.
//!
//! `cargo run --release -p peerbus-client --example publisher -- TOPIC [N] [INDEX]`

use std::time::Instant;

use peerbus_client::{Client, ErrorCode, Retention};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let topic = args.next().unwrap_or_else(|| "news".into());
    let n: u64 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(1000);
    let index = args.next().unwrap_or_else(|| "127.0.0.1:7400".into());
    let client = Client::new(index);
    match client
        .create_topic(&topic, None, Retention::default())
        .await
    {
        Ok(loc) => println!("created '{topic}' on {} ({})", loc.peer_name, loc.addr),
        Err(e) if e.code() == Some(ErrorCode::Exists) => {}
        Err(e) => return Err(e.into()),
    }
    let start = Instant::now();
    // Queue everything, then wait: the client batches while a batch is in flight.
    let acks: Vec<_> = (0..n)
        .map(|i| client.publish_nowait(&topic, format!("message {i}")))
        .collect();
    let mut last = 0;
    for a in acks {
        last = a.await?;
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "published {n} messages to '{topic}' (last offset {last}) in {secs:.3} s: {:.0} msg/s",
        n as f64 / secs
    );
    Ok(())
}
