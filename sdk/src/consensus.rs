//! The replicated log: propose entries, read linearizably.
//!
//! Two ways to write:
//! - [`propose`] waits: it returns the [`Pattern::Output`] of applying the
//!   proposed entry, after applying every earlier undelivered entry of the
//!   stream. The plugin handles nothing else meanwhile.
//! - [`submit`] does not: it hands the entry to the host with the code
//!   that will turn its output into the client's [`Response`](crate::Response), and returns
//!   a [`Pending`] for the request handler to return. The plugin goes on
//!   with the next request, so many writes are in flight at once and the
//!   host batches them into the log. Use it for writes on the request path.

use std::any::Any;
use std::cell::RefCell;
use std::collections::HashMap;

use serde::Serialize;

use crate::bindings::plexus::cluster::consensus as wit;
use crate::{CommittedEntry, NodeId, Pattern, Reply};

pub use crate::replies::Pending;

pub use wit::ConsensusError as Error;

/// The outcome of a committed proposal.
#[derive(Debug)]
pub struct Committed<O> {
    /// Index of the proposed entry in the log.
    pub index: u64,
    /// What [`Pattern::apply`] returned for it.
    pub output: O,
}

type AnswerFn<P> = Box<dyn FnOnce(&mut P, Committed<<P as Pattern>::Output>) -> Reply>;

thread_local! {
    // Answers of submitted writes, by ticket. Each is an `AnswerFn<P>` of
    // the component's one pattern type.
    static WAITING: RefCell<HashMap<u64, Box<dyn Any>>> = RefCell::new(HashMap::new());
}

/// Proposes raw bytes and applies, through `pattern`, every entry the host
/// hands back. Returns once the entry is committed and applied.
pub fn propose_raw<P: Pattern>(
    pattern: &mut P,
    data: &[u8],
) -> Result<Committed<P::Output>, Error> {
    // The host always ends the list with the proposed entry (which has no
    // ticket); an empty list would be a host bug, reported as a storage
    // failure rather than a panic.
    deliver_all(pattern, wit::propose(data)?)
        .ok_or_else(|| Error::Storage("host returned no committed entry".into()))
}

/// Encodes `command` with [`crate::codec`] and proposes it.
pub fn propose<P: Pattern, C: Serialize + ?Sized>(
    pattern: &mut P,
    command: &C,
) -> Result<Committed<P::Output>, Error> {
    propose_raw(pattern, &crate::codec::encode(command))
}

/// Encodes `command` and submits it without waiting. Once the entry is
/// committed and applied on this node, `answer` turns its output into the
/// response for the request that returned the [`Pending`] (or into
/// another [`Pending`], to chain a further call).
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
/// # use plexus_sdk::{consensus, http, Pattern, Request, Response, InitContext, CommittedEntry};
/// # struct Counter { n: u64 }
/// # impl Pattern for Counter {
/// #     type Output = u64;
/// #     fn init(_: InitContext) -> Result<Self, String> { Ok(Counter { n: 0 }) }
/// #     fn apply(&mut self, _: CommittedEntry) -> u64 { self.n += 1; self.n }
/// # }
/// fn bump(c: &mut Counter, _req: &Request, _: &http::Params) -> http::Result<consensus::Pending> {
///     consensus::submit(c, &(), |_c: &mut Counter, done| {
///         Response::json(200, &done.output)
///     })
///     .map_err(|e| Response::error(503, &format!("{e:?}")))
/// }
/// ```
pub fn submit<P: Pattern, C: Serialize + ?Sized, R: Into<Reply>>(
    pattern: &mut P,
    command: &C,
    answer: impl FnOnce(&mut P, Committed<P::Output>) -> R + 'static,
) -> Result<Pending, Error> {
    let _ = pattern;
    let ticket = wit::submit(&crate::codec::encode(command))?;
    let answer: AnswerFn<P> = Box::new(move |p, done| answer(p, done).into());
    WAITING.with(|w| w.borrow_mut().insert(ticket, Box::new(answer)));
    Ok(Pending(ticket))
}

/// Applies `entries` in order, then calls [`Pattern::after_apply`] once if
/// there were any. Returns what [`deliver`] returns for the last one.
pub(crate) fn deliver_all<P: Pattern>(
    pattern: &mut P,
    entries: Vec<CommittedEntry>,
) -> Option<Committed<P::Output>> {
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

/// Applies one entry. If it answers a submitted write (this instance's, or
/// one it took over at a swap), the answer is queued for the host and
/// `None` is returned; otherwise its output.
fn deliver<P: Pattern>(pattern: &mut P, entry: CommittedEntry) -> Option<Committed<P::Output>> {
    let (index, ticket) = (entry.index, entry.ticket);
    let done = Committed {
        index,
        output: pattern.apply(entry),
    };
    let Some(ticket) = ticket else {
        return Some(done);
    };
    let answer = WAITING
        .with(|w| w.borrow_mut().remove(&ticket))
        .and_then(|a| a.downcast::<AnswerFn<P>>().ok());
    // Without an answer of this instance's, the write was submitted by
    // the version before a swap.
    let reply = match answer {
        Some(answer) => Some(answer(pattern, done)),
        None => pattern.answer_inherited(done).map(Reply::Done),
    };
    if let Some(reply) = reply {
        crate::replies::settle(ticket, reply);
    }
    None
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

/// Decodes an entry's data with [`crate::codec`].
pub fn decode<T: serde::de::DeserializeOwned>(
    entry: &CommittedEntry,
) -> Result<T, crate::codec::CodecError> {
    crate::codec::decode(&entry.data)
}
