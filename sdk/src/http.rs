//! Client requests: helpers on [`Request`] and [`Response`], and a tiny
//! router for [`crate::Pattern::on_request`].

use std::borrow::Cow;

use serde::{Serialize, de::DeserializeOwned};

use crate::{Method, Reply, Request, Response};

impl From<Response> for Reply {
    fn from(response: Response) -> Reply {
        Reply::Done(response)
    }
}

impl Method {
    /// The method's name as HTTP spells it: `"GET"`, `"POST"`, ….
    pub fn as_str(&self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Head => "HEAD",
            Method::Post => "POST",
            Method::Put => "PUT",
            Method::Delete => "DELETE",
            Method::Patch => "PATCH",
            Method::Options => "OPTIONS",
        }
    }
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Request {
    /// Decodes the body as JSON.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T> {
        serde_json::from_slice(&self.body)
            .map_err(|e| Response::error(400, &format!("invalid JSON body: {e}")))
    }

    /// The value of a query parameter (`a=1&b=2`), percent-decoded and
    /// with `+` as a space. A value that does not decode to UTF-8 is given
    /// as it was sent.
    pub fn query_param(&self, name: &str) -> Option<String> {
        self.query.split('&').find_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            if percent_decode(k).as_deref().unwrap_or(k) != name {
                return None;
            }
            let v = v.replace('+', " ");
            // Malformed escapes: the value as it was sent.
            let decoded = match percent_decode(&v) {
                Some(Cow::Owned(d)) => Some(d),
                _ => None,
            };
            Some(decoded.unwrap_or(v))
        })
    }

    /// A query parameter parsed as `T`: `Ok(None)` when absent, a 400
    /// naming the parameter when it does not parse.
    pub fn query<T>(&self, name: &str) -> Result<Option<T>>
    where
        T: std::str::FromStr,
        T::Err: std::fmt::Display,
    {
        self.query_param(name)
            .map(|v| parse_named("query parameter", name, &v))
            .transpose()
    }

    /// The first header with this (lower-case) name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

impl Response {
    /// A response with a status and a body.
    pub fn new(status: u16, content_type: &str, body: Vec<u8>) -> Response {
        Response {
            status,
            headers: vec![("content-type".into(), content_type.into())],
            body,
        }
    }

    /// A JSON response.
    pub fn json<T: Serialize + ?Sized>(status: u16, value: &T) -> Response {
        match serde_json::to_vec(value) {
            Ok(body) => Response::new(status, "application/json", body),
            Err(e) => Response::error(500, &format!("cannot encode response: {e}")),
        }
    }

    /// A plain-text response.
    pub fn text(status: u16, text: &str) -> Response {
        Response::new(
            status,
            "text/plain; charset=utf-8",
            text.as_bytes().to_vec(),
        )
    }

    /// A JSON error body `{"error": message}`.
    pub fn error(status: u16, message: &str) -> Response {
        Response::json(status, &serde_json::json!({ "error": message }))
    }

    /// Adds a header.
    pub fn with_header(mut self, name: &str, value: &str) -> Response {
        self.headers.push((name.into(), value.into()));
        self
    }
}

/// Path parameters captured by a [`Router`] pattern, percent-decoded
/// (`/kv/a%2Fb` gives `{key}` = `a/b`; `%2F` inside a `{name}` segment does
/// not split it).
#[derive(Debug, Default, Clone)]
pub struct Params(Vec<(String, String)>);

impl Params {
    /// The value captured for `{name}` or `{*name}`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The value captured for `name`, parsed as `T`; a 400 naming the
    /// parameter and the reason when it does not parse.
    ///
    /// ```ignore
    /// fn show(this: &mut Shards, _: &Request, p: &Params) -> Result {
    ///     let shard: u32 = p.parse("shard")?;
    ///     // ...
    /// }
    /// ```
    pub fn parse<T>(&self, name: &str) -> Result<T>
    where
        T: std::str::FromStr,
        T::Err: std::fmt::Display,
    {
        match self.get(name) {
            Some(v) => parse_named("path parameter", name, v),
            None => Err(no_such_parameter(name)),
        }
    }

    /// The value captured for `name` as text of 1 to `max_bytes` bytes
    /// (a key, a role, a topic); a 400 naming the parameter otherwise.
    pub fn text(&self, name: &str, max_bytes: usize) -> Result<String> {
        match self.get(name) {
            Some(v) if !v.is_empty() && v.len() <= max_bytes => Ok(v.to_string()),
            Some(_) => Err(Response::error(
                400,
                &format!("path parameter `{name}` must be 1..={max_bytes} bytes"),
            )),
            None => Err(no_such_parameter(name)),
        }
    }
}

impl Params {
    /// The value captured for `name` as an identifier (a topic, a queue, a
    /// task id): 1 to 128 of `A-Z a-z 0-9 . _ -`, so it is safe inside a
    /// storage key; a 400 naming the parameter otherwise.
    pub fn ident(&self, name: &str) -> Result<String> {
        let value = self.text(name, 128)?;
        if !is_ident(&value) {
            return Err(Response::error(
                400,
                &format!("path parameter `{name}` may hold only A-Z, a-z, 0-9, `.`, `_` and `-`"),
            ));
        }
        Ok(value)
    }
}

/// Whether `s` is an identifier as [`Params::ident`] takes it: 1 to 128
/// of `A-Z a-z 0-9 . _ -`.
pub fn is_ident(s: &str) -> bool {
    (1..=128).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

fn no_such_parameter(name: &str) -> Response {
    Response::error(500, &format!("the route has no path parameter `{name}`"))
}

fn parse_named<T>(what: &str, name: &str, value: &str) -> Result<T>
where
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    value.parse().map_err(|e: T::Err| {
        Response::error(
            400,
            &format!("{what} `{name}`: `{value}` is not valid: {e}"),
        )
    })
}

/// Decodes `%XX` escapes (borrowing when there are none); `None` when an
/// escape is malformed or the bytes are not UTF-8.
fn percent_decode(s: &str) -> Option<Cow<'_, str>> {
    if !s.contains('%') {
        return Some(Cow::Borrowed(s));
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok().map(Cow::Owned)
}

/// What a route handler returns: `Ok` with a [`Response`] (or a
/// [`Reply`], to answer later), `Err` with an early error response, so
/// handlers can use `?` on [`Request::json`] and the like.
pub type Result<T = Response> = std::result::Result<T, Response>;

type Handler<P> = Box<dyn Fn(&mut P, &Request, &Params) -> Result<Reply>>;

/// Routes requests by method and path pattern.
///
/// Patterns are `/`-separated segments: a literal, `{name}` (one segment) or
/// a final `{*name}` (the rest of the path, possibly empty). The first
/// matching route wins; a path that matches no route is 404, and one that
/// matches only with another method is 405.
pub struct Router<P> {
    routes: Vec<(Method, String, Handler<P>)>,
}

impl<P> Default for Router<P> {
    fn default() -> Self {
        Router { routes: Vec::new() }
    }
}

/// A route handler: returns a [`Response`] now, or a [`Reply`] (such as
/// [`crate::consensus::Pending`] turned into one) to answer later.
pub type HandlerFn<P, R> = fn(&mut P, &Request, &Params) -> Result<R>;

impl<P: 'static> Router<P> {
    /// An empty router.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a route.
    pub fn route<R: Into<Reply> + 'static>(
        mut self,
        method: Method,
        pattern: &str,
        handler: HandlerFn<P, R>,
    ) -> Self {
        let handler: Handler<P> = Box::new(move |p: &mut P, req: &Request, params: &Params| {
            handler(p, req, params).map(Into::into)
        });
        self.routes.push((method, pattern.to_string(), handler));
        self
    }

    /// Adds a GET route.
    pub fn get<R: Into<Reply> + 'static>(self, pattern: &str, handler: HandlerFn<P, R>) -> Self {
        self.route(Method::Get, pattern, handler)
    }

    /// Adds a POST route.
    pub fn post<R: Into<Reply> + 'static>(self, pattern: &str, handler: HandlerFn<P, R>) -> Self {
        self.route(Method::Post, pattern, handler)
    }

    /// Adds a PUT route.
    pub fn put<R: Into<Reply> + 'static>(self, pattern: &str, handler: HandlerFn<P, R>) -> Self {
        self.route(Method::Put, pattern, handler)
    }

    /// Adds a DELETE route.
    pub fn delete<R: Into<Reply> + 'static>(self, pattern: &str, handler: HandlerFn<P, R>) -> Self {
        self.route(Method::Delete, pattern, handler)
    }

    /// Dispatches `req` to the first matching route. A path parameter
    /// whose `%` escapes do not decode to UTF-8 is a 400.
    pub fn handle(&self, pattern: &mut P, req: Request) -> Reply {
        let mut path_matched = false;
        for (method, route, handler) in &self.routes {
            if let Some(params) = match_path(route, &req.path) {
                if *method == req.method {
                    let params = match params.decoded() {
                        Ok(params) => params,
                        Err(name) => {
                            return Response::error(
                                400,
                                &format!(
                                    "path parameter `{name}`: malformed %-escape or not UTF-8"
                                ),
                            )
                            .into();
                        }
                    };
                    return handler(pattern, &req, &params).unwrap_or_else(Reply::from);
                }
                path_matched = true;
            }
        }
        if path_matched {
            Response::error(405, "method not allowed").into()
        } else {
            Response::error(404, &format!("no route for {}", req.path)).into()
        }
    }
}

impl Params {
    /// The same parameters, percent-decoded; the name of the first that
    /// does not decode.
    fn decoded(self) -> std::result::Result<Params, String> {
        self.0
            .into_iter()
            .map(|(k, v)| {
                let decoded = match percent_decode(&v) {
                    None => return Err(k),
                    Some(Cow::Owned(d)) => Some(d),
                    Some(Cow::Borrowed(_)) => None,
                };
                Ok((k, decoded.unwrap_or(v)))
            })
            .collect::<std::result::Result<_, _>>()
            .map(Params)
    }
}

fn match_path(pattern: &str, path: &str) -> Option<Params> {
    let mut params = Vec::new();
    let mut rest = path.trim_start_matches('/');
    let segments: Vec<&str> = pattern.trim_start_matches('/').split('/').collect();
    for (i, seg) in segments.iter().enumerate() {
        if let Some(name) = seg.strip_prefix("{*").and_then(|s| s.strip_suffix('}')) {
            if i + 1 != segments.len() {
                return None;
            }
            params.push((name.to_string(), rest.to_string()));
            return Some(Params(params));
        }
        let (head, tail) = rest.split_once('/').unwrap_or((rest, ""));
        if let Some(name) = seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
            if head.is_empty() {
                return None;
            }
            params.push((name.to_string(), head.to_string()));
        } else if *seg != head {
            return None;
        }
        rest = tail;
        if i + 1 < segments.len() && rest.is_empty() && !segments[i + 1].starts_with("{*") {
            return None;
        }
    }
    rest.is_empty().then_some(Params(params))
}

/// Headers that describe one hop, not the request (RFC 9110, section
/// 7.6.1), with `host` and `content-length`, which the host sets on each
/// request it sends.
pub const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "host",
    "content-length",
];

/// The headers of `headers` a proxy passes on: all but [`HOP_BY_HOP`] and
/// those the `connection` header names.
///
/// ```
/// let h = |k: &str, v: &str| (k.to_string(), v.to_string());
/// let kept = plexus_sdk::http::end_to_end(&[
///     h("connection", "x-trace-hop"), h("x-trace-hop", "1"), h("Host", "a"), h("accept", "*/*"),
/// ]);
/// assert_eq!(kept, [h("accept", "*/*")]);
/// ```
pub fn end_to_end(headers: &[(String, String)]) -> Vec<(String, String)> {
    let named: Vec<String> = headers
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case("connection"))
        .flat_map(|(_, v)| v.split(',').map(|t| t.trim().to_ascii_lowercase()))
        .collect();
    headers
        .iter()
        .filter(|(k, _)| {
            let k = k.to_ascii_lowercase();
            !HOP_BY_HOP.contains(&k.as_str()) && !named.contains(&k)
        })
        .cloned()
        .collect()
}

pub use crate::bindings::plexus::cluster::outbound_http::OutgoingRequest;
pub use crate::bindings::plexus::cluster::types::HttpError as FetchError;

impl OutgoingRequest {
    /// A request with no headers or body.
    pub fn new(method: Method, url: &str) -> OutgoingRequest {
        OutgoingRequest {
            method,
            url: url.to_string(),
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    /// A GET of `url`.
    pub fn get(url: &str) -> OutgoingRequest {
        OutgoingRequest::new(Method::Get, url)
    }

    /// A POST of `body` to `url`.
    pub fn post(url: &str, body: Vec<u8>) -> OutgoingRequest {
        OutgoingRequest {
            body,
            ..OutgoingRequest::new(Method::Post, url)
        }
    }

    /// Adds a header.
    pub fn header(mut self, name: &str, value: &str) -> OutgoingRequest {
        self.headers.push((name.into(), value.into()));
        self
    }
}

/// Sends `req` to a service outside the cluster without waiting. When the
/// response arrives (or the call fails, or `timeout_ms` passes), `then`
/// runs; what it returns answers the client of the request that returned
/// the [`crate::Pending`].
///
/// Needs the `outbound-http` capability, and the URL's origin in the
/// plugin's `allowed_outbound_hosts`. Errors returned here are definite:
/// nothing was sent. In `then`, [`FetchError::Timeout`] and
/// [`FetchError::Broken`] leave the outcome unknown (the server may have
/// handled the request); the other errors are definite.
///
/// ```no_run
/// # use plexus_sdk::{http::{self, OutgoingRequest}, Pattern, Request, Response, InitContext};
/// # struct Proxy;
/// # impl Pattern for Proxy { type Command = (); type Output = (); fn init(_: InitContext) -> Result<Self, String> { Ok(Proxy) } }
/// fn pass(p: &mut Proxy, req: &Request, _: &http::Params) -> http::Result<plexus_sdk::Pending> {
///     let url = format!("http://127.0.0.1:8080{}", req.path);
///     http::fetch(p, OutgoingRequest::get(&url), 1000, |_p: &mut Proxy, r| match r {
///         Ok(response) => response,
///         Err(e) => Response::error(502, &format!("{e:?}")),
///     })
///     .map_err(|e| Response::error(502, &format!("{e:?}")))
/// }
/// ```
pub fn fetch<P: crate::Pattern, R: Into<Reply>>(
    pattern: &mut P,
    req: OutgoingRequest,
    timeout_ms: u32,
    then: impl FnOnce(&mut P, std::result::Result<Response, FetchError>) -> R + 'static,
) -> std::result::Result<crate::Pending, FetchError> {
    let _ = pattern;
    let ticket = crate::host::outbound_http::fetch(&req, timeout_ms)?;
    crate::replies::expect::<P>(ticket, move |p, outcome| {
        let result = match outcome {
            crate::CallOutcome::Http(r) => r,
            _ => Err(FetchError::InvalidRequest(
                "a different kind of outcome".into(),
            )),
        };
        then(p, result).into()
    });
    Ok(crate::Pending(ticket))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(method: Method, path: &str, query: &str) -> Request {
        Request {
            method,
            path: path.into(),
            query: query.into(),
            headers: Vec::new(),
            body: Vec::new(),
            source: crate::RequestSource::Client,
        }
    }

    fn answered(reply: Reply) -> Response {
        match reply {
            Reply::Done(r) => r,
            _ => panic!("not answered at once"),
        }
    }

    fn body(r: &Response) -> String {
        String::from_utf8(r.body.clone()).unwrap()
    }

    #[test]
    fn path_parameters_are_percent_decoded_and_typed() {
        fn show(_: &mut (), _: &Request, p: &Params) -> Result {
            let n: u32 = p.parse("n")?;
            Ok(Response::text(
                200,
                &format!("{}:{n}", p.get("key").unwrap()),
            ))
        }
        let router = Router::<()>::new().get("/kv/{key}/{n}", show);
        let ok = answered(router.handle(&mut (), request(Method::Get, "/kv/a%2Fb%20c/7", "")));
        assert_eq!((ok.status, body(&ok)), (200, "a/b c:7".to_string()));
        let bad = answered(router.handle(&mut (), request(Method::Get, "/kv/k/seven", "")));
        assert_eq!(bad.status, 400);
        assert_eq!(
            body(&bad),
            r#"{"error":"path parameter `n`: `seven` is not valid: invalid digit found in string"}"#
        );
        let bad = answered(router.handle(&mut (), request(Method::Get, "/kv/%ff/1", "")));
        assert_eq!(bad.status, 400);
        assert_eq!(
            body(&bad),
            r#"{"error":"path parameter `key`: malformed %-escape or not UTF-8"}"#
        );
    }

    #[test]
    fn query_parameters_are_decoded_and_typed() {
        let req = request(Method::Get, "/", "limit=10&name=a%26b+c&bad=x");
        assert_eq!(req.query_param("name").as_deref(), Some("a&b c"));
        assert_eq!(req.query::<u32>("limit").unwrap(), Some(10));
        assert_eq!(req.query::<u32>("absent").unwrap(), None);
        let err = req.query::<u32>("bad").unwrap_err();
        assert_eq!(err.status, 400);
        assert!(
            body(&err).contains("query parameter `bad`"),
            "{}",
            body(&err)
        );
    }

    #[test]
    fn literal_and_named_segments_match() {
        let p = match_path("/kv/{key}", "/kv/apple").unwrap();
        assert_eq!(p.get("key"), Some("apple"));
        assert!(match_path("/kv/{key}", "/kv").is_none());
        assert!(match_path("/kv/{key}", "/kv/a/b").is_none());
        assert!(match_path("/kv", "/kv").is_some());
    }

    #[test]
    fn rest_segment_takes_the_remainder() {
        let p = match_path("/files/{*path}", "/files/a/b/c").unwrap();
        assert_eq!(p.get("path"), Some("a/b/c"));
        let p = match_path("/files/{*path}", "/files/").unwrap();
        assert_eq!(p.get("path"), Some(""));
    }
}
