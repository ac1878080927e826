//! Client commands: topics, publish, subscribe, pull, peers.

use std::io::{BufRead, Write};
use std::time::Duration;

use anyhow::{Context, bail};
use futures::StreamExt;
use peerbus_client::{Client, Message, PublishAck, Retention, StartFrom};
use serde_json::json;

use crate::{Cli, Command, TopicCommand};

/// Acknowledgements awaited at most in flight by `publish -`; bounds memory on huge inputs.
const PUBLISH_WINDOW: usize = 1 << 17;

fn parse_from(from: Option<&str>) -> anyhow::Result<Option<StartFrom>> {
    Ok(match from {
        None => None,
        Some("earliest") => Some(StartFrom::Earliest),
        Some("latest") => Some(StartFrom::Latest),
        Some(n) => Some(StartFrom::Offset(n.parse().map_err(|_| {
            anyhow::anyhow!("--from {n:?} is not earliest, latest or an offset")
        })?)),
    })
}

fn time(ms: u64) -> String {
    humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

fn print_message(
    out: &mut impl Write,
    json: bool,
    topic: &str,
    m: &Message,
) -> std::io::Result<()> {
    let text = String::from_utf8_lossy(&m.payload);
    if json {
        writeln!(
            out,
            "{}",
            json!({"topic": topic, "offset": m.offset, "timestamp": time(m.timestamp_ms), "message": text})
        )
    } else {
        writeln!(out, "{text}")
    }
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let client = Client::with_token(cli.index.clone(), cli.auth_token.clone());
    let json = cli.json;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    match cli.command {
        Command::Topic(TopicCommand::Create {
            names,
            peer,
            max_messages,
            max_bytes,
            max_age,
            consumed,
        }) => {
            let mut retention = Retention {
                max_messages,
                max_age_secs: max_age,
                consumed,
                ..Retention::default()
            };
            if max_bytes.is_some() {
                retention.max_bytes = max_bytes;
            }
            let names = expand_stdin(names)?;
            if let [name] = names.as_slice() {
                let loc = client
                    .create_topic(name, peer.as_deref(), retention)
                    .await?;
                if json {
                    print_location(&mut out, &loc)?;
                } else {
                    writeln!(
                        out,
                        "created topic '{}' on peer {} ({})",
                        loc.topic, loc.peer_name, loc.addr
                    )?;
                }
            } else {
                // In bulk: a request per chunk rather than per topic.
                for chunk in names.chunks(BULK_CREATE_CHUNK) {
                    let hosts = client
                        .create_topics(chunk.to_vec(), peer.as_deref(), retention)
                        .await?;
                    for h in hosts {
                        if json {
                            writeln!(
                                out,
                                "{}",
                                json!({"peer": h.peer_name, "addr": h.addr, "created": h.count})
                            )?;
                        } else {
                            let noun = if h.count == 1 { "topic" } else { "topics" };
                            writeln!(
                                out,
                                "created {} {noun} on peer {} ({})",
                                h.count, h.peer_name, h.addr
                            )?;
                        }
                    }
                }
            }
        }
        Command::Topic(TopicCommand::Delete { names }) => {
            for name in names {
                client.delete_topic(&name).await?;
                if json {
                    writeln!(out, "{}", json!({"deleted": name}))?;
                } else {
                    writeln!(out, "deleted topic '{name}'")?;
                }
            }
        }
        Command::Topic(TopicCommand::List { prefix }) => {
            // Page by page, so a million topics never sit in memory at once.
            let mut after: Option<String> = None;
            loop {
                let page = client
                    .list_topics_page(prefix.as_deref(), after.as_deref())
                    .await?;
                for t in &page {
                    if json {
                        print_location(&mut out, t)?;
                    } else {
                        writeln!(out, "{}\t{}\t{}", t.topic, t.peer_name, t.addr)?;
                    }
                }
                if page.len() < peerbus_proto::LIST_PAGE {
                    break;
                }
                after = page.last().map(|t| t.topic.clone());
            }
        }
        Command::Topic(TopicCommand::Lookup { name }) => {
            let t = client.lookup(&name).await?;
            if json {
                print_location(&mut out, &t)?;
            } else {
                writeln!(out, "{} {}", t.peer_name, t.addr)?;
            }
        }
        Command::Publish { topic, messages } => {
            publish(&client, &topic, &messages, json, &mut out).await?;
        }
        Command::Subscribe {
            topics,
            subscriber,
            follow,
            from,
        } => {
            let from = parse_from(from.as_deref())?;
            if !follow {
                for t in topics {
                    let next = client.subscribe(&t, &subscriber, from).await?;
                    if json {
                        writeln!(
                            out,
                            "{}",
                            json!({"topic": t, "subscriber": subscriber, "next_offset": next})
                        )?;
                    } else {
                        writeln!(
                            out,
                            "subscribed '{subscriber}' to topic '{t}' at offset {next}"
                        )?;
                    }
                }
            } else {
                drop(out);
                follow_topics(&client, topics, &subscriber, from, json).await?;
                return Ok(());
            }
        }
        Command::Pull {
            topic,
            subscriber,
            max,
            no_commit,
        } => {
            let mut left = max.unwrap_or(u64::MAX);
            while left > 0 {
                let set = client
                    .pull_uncommitted(&topic, &subscriber, left.min(8192) as u32, Duration::ZERO)
                    .await?;
                if set.is_empty() {
                    break;
                }
                left -= set.len() as u64;
                for m in set.messages() {
                    print_message(&mut out, json, &topic, &m)?;
                }
                if no_commit {
                    break;
                }
                // Committed only once written: a reader that went away (`| head -1`) makes
                // the flush fail, and the batch is printed again next time.
                out.flush()?;
                client.ack(&topic, &subscriber, set.next_offset()).await?;
            }
        }
        Command::Ack {
            topic,
            subscriber,
            offset,
        } => {
            client.ack_through(&topic, &subscriber, offset).await?;
            if json {
                writeln!(
                    out,
                    "{}",
                    json!({"topic": topic, "subscriber": subscriber, "acked": offset})
                )?;
            } else {
                writeln!(
                    out,
                    "acknowledged '{subscriber}' on topic '{topic}' up to offset {offset}"
                )?;
            }
        }
        Command::Unsubscribe { topic, subscriber } => {
            client.unsubscribe(&topic, &subscriber).await?;
            if !json {
                writeln!(out, "unsubscribed '{subscriber}' from topic '{topic}'")?;
            } else {
                writeln!(
                    out,
                    "{}",
                    json!({"topic": topic, "unsubscribed": subscriber})
                )?;
            }
        }
        Command::Subscribers { topic } => {
            for s in client.subscribers(&topic).await? {
                if json {
                    writeln!(
                        out,
                        "{}",
                        json!({"topic": topic, "subscriber": s.name, "next_offset": s.next_offset})
                    )?;
                } else {
                    writeln!(out, "{}\tnext offset {}", s.name, s.next_offset)?;
                }
            }
        }
        Command::Peers => {
            let peers = client.peers().await?;
            if !json {
                writeln!(
                    out,
                    "ID  NAME          ADDRESS                ACTIVE  REGS  LAST REGISTERED           TTL LEFT  TOPICS  FILES"
                )?;
            }
            for p in peers {
                let last = time(p.last_registered_ms);
                let ttl = p.ttl_left_ms.div_ceil(1000);
                if json {
                    writeln!(
                        out,
                        "{}",
                        json!({
                            "id": p.id, "name": p.name, "addr": p.addr, "http": p.http,
                            "active": p.active, "registrations": p.registrations,
                            "last_registered": last, "ttl_left": ttl,
                            "topics": p.topics, "files": p.files,
                        })
                    )?;
                } else {
                    writeln!(
                        out,
                        "{:<3} {:<13} {:<22} {:<7} {:<5} {:<25} {:<9} {:<7} {}",
                        p.id,
                        p.name,
                        p.addr,
                        if p.active { "yes" } else { "no" },
                        p.registrations,
                        last,
                        format!("{ttl}s"),
                        p.topics,
                        p.files
                    )?;
                }
            }
        }
        Command::Files { peer } => {
            let hits = client.peer_files(&peer, "").await?;
            print_hits(&mut out, json, &hits)?;
        }
        Command::Search {
            pattern,
            distributed,
        } => {
            let hits = if distributed {
                client.search_files_distributed(&pattern).await?
            } else {
                client.search_files(&pattern).await?
            };
            print_hits(&mut out, json, &hits)?;
        }
        Command::Get { key, output, peer } => {
            let mut reports = Vec::new();
            if let Some(addr) = &peer {
                // The peer picks where its copy lands; the request names only the file.
                let req = peerbus_proto::Request::Fetch { key: key.clone() };
                match client.request_at(addr, req, false).await? {
                    peerbus_proto::Response::Fetched(r) => {
                        reports.push(peerbus_client::DownloadReport {
                            name: r.name,
                            hash: r.hash,
                            size: r.size,
                            sources: r.sources,
                            path: r.path.into(),
                        })
                    }
                    other => bail!("peer {addr} answered {other:?} to a fetch"),
                }
            }
            if peer.is_none() || output.is_some() {
                // This command writes the file itself, as the user who ran it.
                let hit = client.lookup_file(&key).await?;
                let dest = output.unwrap_or_else(|| {
                    let base = hit.name.rsplit('/').next().unwrap_or(&hit.name);
                    std::path::PathBuf::from(base)
                });
                let bar = crate::progress::DownloadBar::new();
                let r = client.download(&hit.hash, &dest, Some(bar.clone())).await;
                bar.finish();
                reports.push(r?);
            }
            for report in reports {
                print_download(&mut out, json, &report)?;
            }
        }
        Command::Index { .. }
        | Command::Peer { .. }
        | Command::Up { .. }
        | Command::Bench { .. } => {
            unreachable!("node and bench commands are run by main")
        }
    }
    out.flush()?;
    Ok(())
}

/// Topics one bulk create request carries.
const BULK_CREATE_CHUNK: usize = 10_000;

/// `names` with a "-" replaced by the lines of stdin (blank lines skipped).
fn expand_stdin(names: Vec<String>) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::with_capacity(names.len());
    for n in names {
        if n == "-" {
            for line in std::io::stdin().lines() {
                let line =
                    line.map_err(|e| anyhow::anyhow!("cannot read topic names from stdin: {e}"))?;
                let line = line.trim();
                if !line.is_empty() {
                    out.push(line.to_string());
                }
            }
        } else {
            out.push(n);
        }
    }
    Ok(out)
}

fn print_download(
    out: &mut impl Write,
    json: bool,
    report: &peerbus_client::DownloadReport,
) -> std::io::Result<()> {
    if json {
        writeln!(
            out,
            "{}",
            json!({"name": report.name, "size": report.size, "hash": report.hash,
                   "sources": report.sources, "path": report.path.display().to_string()})
        )
    } else {
        writeln!(
            out,
            "downloaded file '{}' ({} bytes, blake3 {}) from {} to {}",
            report.name,
            report.size,
            report.hash,
            if report.sources.is_empty() {
                "a copy already held".to_string()
            } else {
                report.sources.join(", ")
            },
            report.path.display()
        )
    }
}

fn print_location(out: &mut impl Write, t: &peerbus_client::TopicLocation) -> std::io::Result<()> {
    writeln!(
        out,
        "{}",
        json!({"topic": t.topic, "peer": t.peer_name, "addr": t.addr})
    )
}

fn print_hits(
    out: &mut impl Write,
    json: bool,
    hits: &[peerbus_client::FileHit],
) -> std::io::Result<()> {
    for h in hits {
        let addrs: Vec<&str> = h.peers.iter().map(|p| p.addr.as_str()).collect();
        if json {
            writeln!(
                out,
                "{}",
                json!({"name": h.name, "size": h.size, "hash": h.hash, "peers": addrs})
            )?;
        } else {
            let names: Vec<&str> = h.peers.iter().map(|p| p.name.as_str()).collect();
            writeln!(
                out,
                "{}\t{}\t{}\t{}",
                h.name,
                h.size,
                h.hash,
                names.join(",")
            )?;
        }
    }
    Ok(())
}

async fn publish(
    client: &Client,
    topic: &str,
    messages: &[String],
    json: bool,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let mut window: std::collections::VecDeque<PublishAck> = std::collections::VecDeque::new();
    let mut acked = 0u64;
    let mut report = |out: &mut dyn Write, offset: u64| -> std::io::Result<()> {
        acked += 1;
        if json {
            writeln!(out, "{}", json!({"topic": topic, "offset": offset}))?;
        }
        Ok(())
    };
    let send = |payload: bytes::Bytes, window: &mut std::collections::VecDeque<PublishAck>| {
        window.push_back(client.publish_nowait(topic, payload));
    };
    for m in messages {
        if m == "-" {
            let stdin = std::io::stdin();
            let mut lines = stdin.lock();
            let mut line = Vec::new();
            loop {
                line.clear();
                let n = lines
                    .read_until(b'\n', &mut line)
                    .context("reading stdin")?;
                if n == 0 {
                    break;
                }
                if line.last() == Some(&b'\n') {
                    line.pop();
                    if line.last() == Some(&b'\r') {
                        line.pop();
                    }
                }
                send(bytes::Bytes::copy_from_slice(&line), &mut window);
                if window.len() >= PUBLISH_WINDOW {
                    let off = window.pop_front().expect("window is full").await?;
                    report(out, off)?;
                }
            }
        } else {
            send(bytes::Bytes::copy_from_slice(m.as_bytes()), &mut window);
        }
    }
    while let Some(ack) = window.pop_front() {
        let off = ack.await?;
        report(out, off)?;
    }
    if !json {
        let noun = if acked == 1 { "message" } else { "messages" };
        writeln!(out, "published {acked} {noun} to '{topic}'")?;
    }
    Ok(())
}

async fn follow_topics(
    client: &Client,
    topics: Vec<String>,
    subscriber: &str,
    from: Option<StartFrom>,
    json: bool,
) -> anyhow::Result<()> {
    let mut streams = Vec::new();
    for t in &topics {
        let sub = client.follow(t, subscriber, from).await?;
        streams.push(sub.map(move |m| (t.clone(), m)));
    }
    if streams.is_empty() {
        bail!("no topic to follow");
    }
    let mut all = futures::stream::select_all(streams);
    let stdout = std::io::stdout();
    // The subscriptions acknowledge a batch when the next is asked for; what was written
    // since is acknowledged here on Ctrl-C, so a restart does not print it again.
    let mut written: std::collections::HashMap<String, u64> = std::collections::HashMap::new();
    loop {
        tokio::select! {
            next = all.next() => match next {
                Some((topic, Ok(m))) => {
                    let mut out = stdout.lock();
                    print_message(&mut out, json, &topic, &m)?;
                    out.flush()?;
                    written.insert(topic, m.offset + 1);
                }
                Some((topic, Err(e))) => bail!("subscription to topic '{topic}' ended: {e}"),
                None => return Ok(()),
            },
            _ = tokio::signal::ctrl_c() => {
                for (topic, next) in written {
                    client.ack(&topic, subscriber, next).await?;
                }
                return Ok(());
            }
        }
    }
}
