//! The replicated log: propose entries, read linearizably.
//!
//! Two ways to write:
//! - [`propose`] waits: it returns the [`Pattern::Output`] of applying the
//!   proposed command, after applying every earlier undelivered entry of
//!   the stream. The plugin handles nothing else meanwhile.
//! - [`submit`] does not: it hands the entry to the host with the code
//!   that will turn its output into the client's [`Response`], and returns
//!   a [`Pending`] for the request handler to return. The plugin goes on
//!   with the next request, so many writes are in flight at once and the
//!   host batches them into the log. Use it for writes on the request path.

use std::any::Any;
use std::cell::RefCell;
use std::collections::HashMap;

use crate::host::consensus as wit;
use crate::{CommittedEntry, NodeId, Pattern, Reply, Response};

pub use crate::replies::Pending;

pub use wit::ConsensusError as Error;

/// The outcome of a committed command that [`Pattern::apply`] accepted.
#[derive(Debug)]
pub struct Committed<O> {
    /// Index of the proposed entry in the log.
    pub index: u64,
    /// What [`Pattern::apply`] returned for it.
    pub output: O,
}

/// A command [`Pattern::apply`] refused, as the response its proposer's
/// client gets. Refusing is deterministic: every node refuses the same
/// command.
///
/// ```
/// use plexus_sdk::consensus::Rejected;
/// let r = Rejected::new(409, "not the holder");
/// assert_eq!(r.response().status, 409);
/// let r = Rejected::json(409, &serde_json::json!({ "error": "version mismatch", "current": 7 }))
///     .with_header("x-version", "7");
/// assert!(r.response().headers.contains(&("x-version".to_string(), "7".to_string())));
/// ```
#[derive(Debug, Clone)]
pub struct Rejected(Response);

impl Rejected {
    /// Refuses with `status` and `{"error": message}`.
    pub fn new(status: u16, message: &str) -> Rejected {
        Rejected(Response::error(status, message))
    }

    /// Refuses with `status` and `body` as JSON.
    pub fn json<T: serde::Serialize + ?Sized>(status: u16, body: &T) -> Rejected {
        Rejected(Response::json(status, body))
    }

    /// Adds a header to the response.
    pub fn with_header(self, name: &str, value: &str) -> Rejected {
        Rejected(self.0.with_header(name, value))
    }

    /// The response the client gets.
    pub fn response(&self) -> &Response {
        &self.0
    }
}

impl From<Rejected> for Response {
    fn from(r: Rejected) -> Response {
        r.0
    }
}

impl From<Response> for Rejected {
    fn from(r: Response) -> Rejected {
        Rejected(r)
    }
}

impl From<crate::storage::Error> for Rejected {
    fn from(e: crate::storage::Error) -> Rejected {
        Rejected(e.into())
    }
}

impl std::fmt::Display for Rejected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let body = String::from_utf8_lossy(&self.0.body);
        write!(f, "refused with {}: {body}", self.0.status)
    }
}

/// Why a [`propose`] did not give an output: the log failed, or the
/// command was refused.
#[derive(Debug)]
pub enum ProposeError {
    /// Nothing was committed, or the outcome is unknown; see [`Error`].
    Consensus(Error),
    /// The command was committed and [`Pattern::apply`] refused it.
    Rejected(Rejected),
}

impl From<Error> for ProposeError {
    fn from(e: Error) -> ProposeError {
        ProposeError::Consensus(e)
    }
}

impl From<ProposeError> for Response {
    fn from(e: ProposeError) -> Response {
        match e {
            ProposeError::Consensus(e) => e.into(),
            ProposeError::Rejected(r) => r.into(),
        }
    }
}

impl std::fmt::Display for ProposeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProposeError::Consensus(e) => write!(f, "{e}"),
            ProposeError::Rejected(r) => write!(f, "{r}"),
        }
    }
}

impl std::error::Error for ProposeError {}

type AnswerFn<P> = Box<dyn FnOnce(&mut P, Committed<<P as Pattern>::Output>) -> Reply>;

thread_local! {
    // Answers of submitted writes, by ticket. Each is an `AnswerFn<P>` of
    // the component's one pattern type.
    static WAITING: RefCell<HashMap<u64, Box<dyn Any>>> = RefCell::new(HashMap::new());
}

/// Encodes `command` with [`crate::codec`], proposes it and applies,
/// through `pattern`, every entry the host hands back. Returns once the
/// command is committed and applied, with what [`Pattern::apply`] made of
/// it.
pub fn propose<P: Pattern>(
    pattern: &mut P,
    command: &P::Command,
) -> Result<Committed<P::Output>, ProposeError> {
    // The host always ends the list with the proposed entry (which has no
    // ticket); an empty list would be a host bug, reported as a storage
    // failure rather than a panic.
    let entries = wit::propose(&crate::codec::encode(command))?;
    let last = deliver_all(pattern, entries)
        .ok_or_else(|| Error::Storage("host returned no committed entry".into()))?;
    let index = last.index;
    last.output
        .map(|output| Committed { index, output })
        .map_err(ProposeError::Rejected)
}

/// Encodes `command` and submits it without waiting. Once the entry is
/// committed and applied on this node, `answer` turns its output into the
/// response for the request that returned the [`Pending`] (or into
/// another [`Pending`], to chain a further call). A command
/// [`Pattern::apply`] refused is answered with its [`Rejected`] response
/// instead, and `answer` is dropped.
///
/// Submissions in flight are independent: two of them may commit in
/// either order (each is applied in log order, like every entry).
///
/// If the submission fails later (no quorum in time, the node stopping),
/// the host answers the request itself (504 when the outcome is unknown,
/// 503 otherwise) and `answer` is dropped. Errors returned here are
/// definite: nothing was submitted.
///
/// ```no_run
/// # use plexus_sdk::{consensus, http, Pattern, Request, Response, InitContext};
/// # struct Counter { n: u64 }
/// # impl Pattern for Counter {
/// #     type Command = ();
/// #     type Output = u64;
/// #     fn init(_: InitContext) -> Result<Self, String> { Ok(Counter { n: 0 }) }
/// #     fn apply(&mut self, _: u64, _: ()) -> Result<u64, consensus::Rejected> { self.n += 1; Ok(self.n) }
/// # }
/// fn bump(c: &mut Counter, _req: &Request, _: &http::Params) -> http::Result<consensus::Pending> {
///     Ok(consensus::submit(c, &(), |_c: &mut Counter, done| {
///         Response::json(200, &done.output)
///     })?)
/// }
/// ```
pub fn submit<P: Pattern, R: Into<Reply>>(
    pattern: &mut P,
    command: &P::Command,
    answer: impl FnOnce(&mut P, Committed<P::Output>) -> R + 'static,
) -> Result<Pending, Error> {
    let _ = pattern;
    let ticket = wit::submit(&crate::codec::encode(command))?;
    let answer: AnswerFn<P> = Box::new(move |p, done| answer(p, done).into());
    WAITING.with(|w| w.borrow_mut().insert(ticket, Box::new(answer)));
    Ok(Pending(ticket))
}

/// One applied entry: its index and what applying it gave.
pub(crate) struct Applied<O> {
    index: u64,
    output: Result<O, Rejected>,
}

/// Applies `entries` in order, then calls [`Pattern::after_apply`] once if
/// there were any. Returns what [`deliver`] returns for the last one.
pub(crate) fn deliver_all<P: Pattern>(
    pattern: &mut P,
    entries: Vec<CommittedEntry>,
) -> Option<Applied<P::Output>> {
    let any = !entries.is_empty();
    let mut last = None;
    for entry in entries {
        last = deliver(pattern, entry);
    }
    if any {
        pattern.after_apply();
    }
    last
}

/// Decodes and applies one entry. If it answers a submitted write (this
/// instance's, or one it took over at a swap), the answer is queued for
/// the host and `None` is returned; otherwise what applying gave.
fn deliver<P: Pattern>(pattern: &mut P, entry: CommittedEntry) -> Option<Applied<P::Output>> {
    let (index, ticket) = (entry.index, entry.ticket);
    let output = match crate::codec::decode::<P::Command>(&entry.data) {
        Ok(command) => pattern.apply(index, command),
        // Not logged: that would make every plugin import `log`.
        Err(e) => Err(Rejected::new(
            500,
            &format!("entry {index} is not a command of this plugin version: {e}"),
        )),
    };
    let Some(ticket) = ticket else {
        return Some(Applied { index, output });
    };
    let answer = WAITING
        .with(|w| w.borrow_mut().remove(&ticket))
        .and_then(|a| a.downcast::<AnswerFn<P>>().ok());
    // Without an answer of this instance's, the write was submitted by
    // the version before a swap.
    let reply = match (output, answer) {
        (Err(rejected), _) => Some(Reply::Done(rejected.into())),
        (Ok(output), Some(answer)) => Some(answer(pattern, Committed { index, output })),
        (Ok(output), None) => pattern
            .answer_inherited(Committed { index, output })
            .map(Reply::Done),
    };
    if let Some(reply) = reply {
        crate::replies::settle(ticket, reply);
    }
    None
}

/// Forgets every answer kept: the instance they belonged to is gone.
#[cfg(all(feature = "testing", not(target_arch = "wasm32")))]
pub(crate) fn forget_all() {
    WAITING.with(|w| w.borrow_mut().clear());
}

/// Drops the answers of submissions the host gave up on.
pub(crate) fn forget(tickets: &[u64]) {
    WAITING.with(|w| {
        let mut w = w.borrow_mut();
        for t in tickets {
            w.remove(t);
        }
    });
}

/// Waits for a linearizable read point and applies what the host hands back.
/// After it returns, local state reflects every write committed before the
/// call.
pub fn read_barrier<P: Pattern>(pattern: &mut P) -> Result<(), Error> {
    deliver_all(pattern, wit::read_barrier()?);
    Ok(())
}

/// The leader this node knows of.
pub fn leader() -> Option<NodeId> {
    wit::leader()
}

/// The current term.
pub fn term() -> u64 {
    wit::current_term()
}

/// Index of the last committed entry known on this node.
pub fn commit_index() -> u64 {
    wit::commit_index()
}
