//! One `POST` over `wasi:http` (the broker sends it, if the sidecar's `network` lists the
//! URL's `host:port`): the JSON body, the configured headers, every wait bounded by
//! `timeout_ms`, and the answer's status code.

use std::io::Write as _;

use wasip2::http::outgoing_handler;
use wasip2::http::types::{
    ErrorCode, Fields, FutureIncomingResponse, Method, OutgoingBody, OutgoingRequest,
    RequestOptions, Scheme as WasiScheme,
};

use crate::config::{Scheme, Target};

/// Sends `body` to `target`; the response's status code, or why there is none.
pub fn post(
    target: &Target,
    headers: &[(String, String)],
    timeout_ms: u32,
    body: &[u8],
) -> Result<u16, String> {
    let fields = Fields::new();
    let length = body.len().to_string();
    let fixed = [
        ("content-type", b"application/json".as_slice()),
        ("content-length", length.as_bytes()),
    ];
    let extra = headers.iter().map(|(n, v)| (n.as_str(), v.as_bytes()));
    for (name, value) in fixed.into_iter().chain(extra) {
        fields
            .append(name, value)
            .map_err(|e| format!("header {name}: {e:?}"))?;
    }
    let request = OutgoingRequest::new(fields);
    let scheme = match target.scheme {
        Scheme::Http => WasiScheme::Http,
        Scheme::Https => WasiScheme::Https,
    };
    let parts = [
        request.set_method(&Method::Post),
        request.set_scheme(Some(&scheme)),
        request.set_authority(Some(&target.authority)),
        request.set_path_with_query(Some(&target.path_with_query)),
    ];
    if parts.iter().any(Result::is_err) {
        return Err("the host refused the request's URL".to_owned());
    }
    let outgoing = request
        .body()
        .map_err(|()| "request body unavailable".to_owned())?;

    let options = RequestOptions::new();
    let wait = Some(u64::from(timeout_ms) * 1_000_000);
    // A host that does not support one of them keeps its own bound.
    let _ = options.set_connect_timeout(wait);
    let _ = options.set_first_byte_timeout(wait);
    let _ = options.set_between_bytes_timeout(wait);

    let response = outgoing_handler::handle(request, Some(options)).map_err(|e| describe(&e))?;
    // The body streams to the connection the host opened; a write fails if the request
    // was refused or the connection dropped, and the response then says why.
    let sent = write_body(outgoing, body);
    match wait_for(&response) {
        Ok(status) => sent.map(|()| status),
        Err(why) => Err(why),
    }
}

fn write_body(outgoing: OutgoingBody, body: &[u8]) -> Result<(), String> {
    {
        let mut stream = outgoing
            .write()
            .map_err(|()| "request body stream unavailable".to_owned())?;
        // No flush: each write hands its bytes to the connection, which drops the
        // stream's other end as soon as it has Content-Length bytes (a flush then fails).
        stream
            .write_all(body)
            .map_err(|e| format!("sending the body: {e}"))?;
        // The stream must be gone before the body is finished.
    }
    OutgoingBody::finish(outgoing, None).map_err(|e| describe(&e))
}

fn wait_for(response: &FutureIncomingResponse) -> Result<u16, String> {
    response.subscribe().block();
    match response.get() {
        Some(Ok(Ok(r))) => Ok(r.status()),
        Some(Ok(Err(e))) => Err(describe(&e)),
        Some(Err(())) | None => Err("no response".to_owned()),
    }
}

fn describe(e: &ErrorCode) -> String {
    match e {
        ErrorCode::HttpRequestDenied => {
            "request denied by the broker (is the URL's host:port in the sidecar's network list?)"
                .to_owned()
        }
        ErrorCode::ConnectionRefused => "connection refused".to_owned(),
        ErrorCode::ConnectionTimeout => "connect timed out".to_owned(),
        ErrorCode::ConnectionReadTimeout => "no answer in time".to_owned(),
        other => format!("{other:?}"),
    }
}
