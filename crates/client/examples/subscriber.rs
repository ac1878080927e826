//! Follows a topic as a named subscriber and prints every message as it arrives.
//!
//! `cargo run --release -p peerbus-client --example subscriber -- TOPIC NAME [INDEX]`

use futures::StreamExt;
use peerbus_client::Client;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let topic = args.next().unwrap_or_else(|| "news".into());
    let name = args.next().unwrap_or_else(|| "example".into());
    let index = args.next().unwrap_or_else(|| "127.0.0.1:7400".into());
    let client = Client::new(index);
    // Resumes where this subscriber left off; a new one starts at the oldest message.
    let mut sub = client.follow(&topic, &name, None).await?;
    while let Some(m) = sub.next().await {
        let m = m?;
        println!("{} {}", m.offset, String::from_utf8_lossy(&m.payload));
    }
    Ok(())
}
