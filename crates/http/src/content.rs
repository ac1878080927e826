//! File content over HTTP, fetched piece by piece from a holder and verified against the
//! file's BLAKE3 hash tree before any byte is sent, with single `Range` support.

use std::io;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::stream;
use peerbus_client::tree::{verify_manifest, verify_piece};
use peerbus_client::{Client, FileHit};
use peerbus_proto::{Manifest, Request, Response as Answer};

use crate::AppState;
use crate::error::{ApiError, ErrorBody, P};

/// A byte range to send, both ends included.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ByteRange {
    pub start: u64,
    pub end: u64,
}

/// What a `Range` header asks of a file of `size` bytes.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Ranged {
    /// No usable range: send the whole file. A header that is malformed or asks several
    /// ranges is ignored this way, as RFC 9110 allows.
    Whole,
    /// This part.
    Part(ByteRange),
    /// Nothing of the file is in the range: 416.
    Unsatisfiable,
}

/// Parses `bytes=a-b`, `bytes=a-` and `bytes=-n`.
pub(crate) fn parse_range(header: &str, size: u64) -> Ranged {
    let Some(spec) = header.trim().strip_prefix("bytes=") else {
        return Ranged::Whole;
    };
    if spec.contains(',') {
        return Ranged::Whole;
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return Ranged::Whole;
    };
    let (a, b) = (a.trim(), b.trim());
    let num = |s: &str| s.parse::<u64>().ok();
    match (a.is_empty(), b.is_empty()) {
        // Suffix: the last n bytes.
        (true, false) => match num(b) {
            Some(0) => Ranged::Unsatisfiable,
            Some(_) if size == 0 => Ranged::Unsatisfiable,
            Some(n) => Ranged::Part(ByteRange {
                start: size.saturating_sub(n),
                end: size - 1,
            }),
            None => Ranged::Whole,
        },
        (false, _) => {
            let Some(start) = num(a) else {
                return Ranged::Whole;
            };
            let end = if b.is_empty() { Some(u64::MAX) } else { num(b) };
            match end {
                None => Ranged::Whole,
                Some(end) if end < start => Ranged::Whole,
                Some(_) if start >= size => Ranged::Unsatisfiable,
                Some(end) => Ranged::Part(ByteRange {
                    start,
                    end: end.min(size - 1),
                }),
            }
        }
        (true, true) => Ranged::Whole,
    }
}

fn unexpected(addr: &str, what: &Answer) -> String {
    format!("{addr} answered {what:?}")
}

/// The file's manifest from the first holder that gives one matching the file's hash,
/// and the holders with that one first.
async fn manifest(client: &Client, hit: &FileHit) -> Result<(Manifest, Vec<String>), ApiError> {
    let mut holders: Vec<String> = hit.peers.iter().map(|p| p.addr.clone()).collect();
    let mut failures = Vec::new();
    for (i, addr) in holders.iter().enumerate() {
        let req = Request::FileManifest {
            hash: hit.hash.clone(),
        };
        let why = match client.request_at(addr, req, false).await {
            Ok(Answer::Manifest(m)) => match verify_manifest(&m, &hit.hash) {
                Ok(()) => {
                    holders.rotate_left(i);
                    return Ok((m, holders));
                }
                Err(e) => e.to_string(),
            },
            Ok(other) => unexpected(addr, &other),
            Err(e) => e.to_string(),
        };
        tracing::warn!("no manifest of {} from {addr}: {why}", hit.hash);
        failures.push(format!("{addr}: {why}"));
    }
    Err(ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        format!(
            "no holder of '{}' gave a valid manifest ({})",
            hit.name,
            failures.join("; ")
        ),
    ))
}

/// Piece `index`, verified, from the first holder that gives a good one. A holder that
/// fails moves to the back so the next piece starts with one that worked.
async fn piece(
    client: &Client,
    m: &Manifest,
    holders: &mut [String],
    index: u64,
) -> io::Result<Bytes> {
    let piece_no = u32::try_from(index)
        .map_err(|_| io::Error::other(format!("piece {index} is beyond the protocol's range")))?;
    for _ in 0..holders.len() {
        let addr = holders[0].clone();
        let req = Request::ReadPiece {
            hash: m.hash.clone(),
            index: piece_no,
        };
        let why = match client.request_at(&addr, req, false).await {
            Ok(Answer::Piece(data)) if verify_piece(m, index, &data) => return Ok(data),
            Ok(Answer::Piece(_)) => "a piece that does not match the hash tree".to_string(),
            Ok(other) => unexpected(&addr, &other),
            Err(e) => e.to_string(),
        };
        tracing::warn!("piece {index} of {} from {addr} failed: {why}", m.hash);
        holders.rotate_left(1);
    }
    Err(io::Error::other(format!(
        "no holder gave a valid piece {index} of {}",
        m.hash
    )))
}

/// The bytes `range` of the file, streamed piece by piece.
fn body(client: Client, m: Manifest, holders: Vec<String>, range: ByteRange) -> Body {
    let piece_len = u64::from(m.piece_len);
    let first = range.start / piece_len;
    let last = range.end / piece_len;
    let pieces = stream::unfold(Some((client, m, holders, first)), move |state| async move {
        let (client, m, mut holders, index) = state?;
        if index > last {
            return None;
        }
        match piece(&client, &m, &mut holders, index).await {
            Ok(data) => {
                let base = index * piece_len;
                let from = range.start.saturating_sub(base) as usize;
                let to = ((range.end - base + 1) as usize).min(data.len());
                Some((
                    Ok(data.slice(from..to)),
                    Some((client, m, holders, index + 1)),
                ))
            }
            // The headers are sent: all that is left is to cut the body short, which
            // the HTTP client sees as a truncated transfer.
            Err(e) => Some((Err(e), None)),
        }
    });
    Body::from_stream(pieces)
}

/// A file name safe to put inside a quoted `Content-Disposition` filename.
fn disposition(name: &str) -> String {
    let base = name.rsplit('/').next().unwrap_or(name);
    let clean: String = base
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() && c != '"' && c != '\\' || c == ' ' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("attachment; filename=\"{clean}\"")
}

/// The file's bytes, fetched from a holder and verified piece by piece. Supports one
/// `Range: bytes=…` (206 with `Content-Range`; 416 when outside the file).
#[utoipa::path(get, path = "/api/v1/files/{key}/content", tag = "v1",
    params(("key" = String, Path, description = "The file's BLAKE3 hash (hex) or name"),
        ("Range" = Option<String>, Header, description = "One range: bytes=a-b, bytes=a- or bytes=-n")),
    responses((status = 200, description = "The whole file", content_type = "application/octet-stream"),
        (status = 206, description = "The requested range", content_type = "application/octet-stream"),
        (status = 404, body = ErrorBody), (status = 416, body = ErrorBody),
        (status = 503, description = "No holder answered", body = ErrorBody)))]
pub(crate) async fn download(
    State(st): State<AppState>,
    P(key): P<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let hit = st.client.lookup_file(&key).await?;
    let (m, holders) = manifest(&st.client, &hit).await?;
    let size = m.size;
    let ranged = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .map_or(Ranged::Whole, |v| parse_range(v, size));
    let (status, range) = match ranged {
        Ranged::Unsatisfiable => {
            let mut resp = ApiError::new(
                StatusCode::RANGE_NOT_SATISFIABLE,
                format!("the range is outside the file's {size} bytes"),
            )
            .into_response();
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
                resp.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            return Ok(resp);
        }
        Ranged::Part(r) => (StatusCode::PARTIAL_CONTENT, Some(r)),
        Ranged::Whole => (StatusCode::OK, None),
    };
    let mut out = HeaderMap::new();
    out.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    out.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if let Ok(v) = HeaderValue::from_str(&format!("\"{}\"", m.hash)) {
        out.insert(header::ETAG, v);
    }
    if let Ok(v) = HeaderValue::from_str(&disposition(&hit.name)) {
        out.insert(header::CONTENT_DISPOSITION, v);
    }
    let len = range.map_or(size, |r| r.end - r.start + 1);
    out.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    if let Some(r) = range
        && let Ok(v) = HeaderValue::from_str(&format!("bytes {}-{}/{size}", r.start, r.end))
    {
        out.insert(header::CONTENT_RANGE, v);
    }
    let body = match range.or((size > 0).then_some(ByteRange {
        start: 0,
        end: size.saturating_sub(1),
    })) {
        Some(r) => body(st.client.clone(), m, holders, r),
        None => Body::empty(),
    };
    Ok((status, out, body).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(start: u64, end: u64) -> Ranged {
        Ranged::Part(ByteRange { start, end })
    }

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-9", 100), part(0, 9));
        assert_eq!(parse_range("bytes=90-", 100), part(90, 99));
        assert_eq!(parse_range("bytes=90-1000", 100), part(90, 99));
        assert_eq!(parse_range("bytes=-10", 100), part(90, 99));
        assert_eq!(parse_range("bytes=-1000", 100), part(0, 99));
        assert_eq!(parse_range("bytes=100-", 100), Ranged::Unsatisfiable);
        assert_eq!(parse_range("bytes=-0", 100), Ranged::Unsatisfiable);
        assert_eq!(parse_range("bytes=0-", 0), Ranged::Unsatisfiable);
        assert_eq!(parse_range("bytes=5-1", 100), Ranged::Whole);
        assert_eq!(parse_range("bytes=0-1,5-6", 100), Ranged::Whole);
        assert_eq!(parse_range("items=0-1", 100), Ranged::Whole);
        assert_eq!(parse_range("bytes=x-1", 100), Ranged::Whole);
    }

    #[test]
    fn dispositions_are_quoted_safely() {
        assert_eq!(disposition("a/b/c.txt"), "attachment; filename=\"c.txt\"");
        assert_eq!(disposition("x\"y\\z\n"), "attachment; filename=\"x_y_z_\"");
    }
}
