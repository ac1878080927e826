//! Refuses what a web page in someone's browser could make the gateway do: cross-origin
//! requests that change something (CSRF; the gateway reads JSON whatever the content type,
//! so a "simple" `text/plain` POST needs no preflight) and, on a gateway without a token,
//! requests under a host name other than an IP address or `localhost` (DNS rebinding: a
//! name of the attacker's that resolves to 127.0.0.1 would otherwise read everything).

use axum::extract::{Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::AppState;
use crate::error::ApiError;

/// The host part of a `Host` header value or of an origin's authority, without the port.
fn host_only(authority: &str) -> &str {
    if let Some(rest) = authority.strip_prefix('[') {
        // [v6]:port
        return rest.split(']').next().unwrap_or(rest);
    }
    authority.rsplit_once(':').map_or(authority, |(h, _)| h)
}

/// True for names no one else can point at this machine: IP literals and `localhost`.
fn is_own_name(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost") || host.parse::<std::net::IpAddr>().is_ok()
}

/// What is wrong with a request a browser may have been made to send, if anything.
pub(crate) fn refusal(
    method: &Method,
    host: Option<&str>,
    origin: Option<&str>,
    token_set: bool,
) -> Option<String> {
    if let Some(host) = host
        && !token_set
        && !is_own_name(host_only(host))
    {
        return Some(format!(
            "refused a request for host '{host}': without --auth-token this gateway answers \
             only requests addressed to an IP address or localhost (a protection against DNS \
             rebinding)"
        ));
    }
    let changes = !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS);
    if changes && let Some(origin) = origin {
        let from = origin.split_once("://").map_or(origin, |(_, a)| a);
        if host != Some(from) {
            return Some(format!(
                "refused a cross-origin {method} from '{origin}': only pages served by this \
                 gateway may change things through it"
            ));
        }
    }
    None
}

/// Middleware applying [`refusal`].
pub(crate) async fn same_origin(State(st): State<AppState>, req: Request, next: Next) -> Response {
    // In a block: nothing borrowed from the request (whose body is not Sync) may live
    // across the await below.
    let why = {
        let header_str = |name| req.headers().get(name).and_then(|v| v.to_str().ok());
        refusal(
            req.method(),
            header_str(header::HOST),
            header_str(header::ORIGIN),
            st.token.is_some(),
        )
    };
    match why {
        Some(why) => ApiError::new(StatusCode::FORBIDDEN, why).into_response(),
        None => next.run(req).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn browsers_cannot_be_turned_against_the_gateway() {
        let post = Method::POST;
        // curl and the CLI: no Origin.
        assert_eq!(refusal(&post, Some("127.0.0.1:7480"), None, false), None);
        assert_eq!(refusal(&post, Some("localhost:7480"), None, false), None);
        assert_eq!(refusal(&post, Some("[::1]:7480"), None, false), None);
        // The dashboard: same origin.
        let own = Some("http://127.0.0.1:7480");
        assert_eq!(refusal(&post, Some("127.0.0.1:7480"), own, false), None);
        // Another page's POST.
        let evil = Some("https://evil.example");
        assert!(
            refusal(&post, Some("127.0.0.1:7480"), evil, false)
                .unwrap()
                .contains("cross-origin POST")
        );
        // Reading is not refused for an origin (answers are not readable cross-origin)...
        assert_eq!(
            refusal(&Method::GET, Some("127.0.0.1:7480"), evil, false),
            None
        );
        // ...but a rebound name is, without a token.
        assert!(
            refusal(&Method::GET, Some("evil.example:7480"), None, false)
                .unwrap()
                .contains("DNS rebinding")
        );
        assert_eq!(
            refusal(&Method::GET, Some("gateway.lan:7480"), None, true),
            None
        );
    }
}
