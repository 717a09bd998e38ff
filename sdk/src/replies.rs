//! Answers that come later: requests pending on a call, and the calls'
//! outcomes.
//!
//! A handler that starts a call ([`crate::messaging::call`],
//! [`crate::plugins::call`], [`crate::http::fetch`],
//! [`crate::consensus::submit`]) hands the SDK a closure and returns the
//! [`Pending`] it got. When the outcome arrives, the SDK runs the closure;
//! what the closure returns answers the waiting client:
//! - a [`Response`] answers it;
//! - another [`Pending`] (the closure started a further call) makes the
//!   client wait on that call instead, so a handler can chain calls:
//!   fetch, then submit what came back, then answer.
//!
//! A client nobody answers gets a 504 from the host at the node's request
//! timeout.
//!
//! ```no_run
//! use plexus_sdk::http::{self, OutgoingRequest, Params};
//! use plexus_sdk::{consensus, InitContext, Pattern, Pending, Reply, Request, Response};
//!
//! #[derive(serde::Serialize, serde::Deserialize)]
//! struct Remember(Vec<u8>);
//!
//! struct Cache { last: Vec<u8> }
//!
//! impl Pattern for Cache {
//!     type Command = Remember;
//!     type Output = ();
//!     fn init(_: InitContext) -> Result<Self, String> { Ok(Cache { last: Vec::new() }) }
//!     fn apply(&mut self, _index: u64, Remember(bytes): Remember) -> Result<(), consensus::Rejected> {
//!         self.last = bytes;
//!         Ok(())
//!     }
//! }
//!
//! // Fetch, then write what came back through the log, then answer.
//! fn refresh(c: &mut Cache, _: &Request, _: &Params) -> http::Result<Pending> {
//!     let get = OutgoingRequest::get("http://127.0.0.1:8080/users/7");
//!     http::fetch(c, get, 2000, |this, r| -> Reply {
//!         let Ok(user) = r else { return Response::error(502, "the user service failed").into() };
//!         match consensus::submit(this, &Remember(user.body), |_, _| Response::text(200, "remembered")) {
//!             Ok(pending) => pending.into(), // the client now waits on the write
//!             Err(e) => Response::from(e).into(),
//!         }
//!     })
//!     .map_err(Response::from)
//! }
//! ```

use std::any::Any;
use std::cell::RefCell;
use std::collections::HashMap;

use crate::host::replies as wit;
use crate::{CallOutcome, Pattern, Reply, Response};

/// A request answered later. Return it from a request handler (it
/// converts into a [`Reply`]), or from a call's closure to chain calls.
#[must_use = "return it from the request handler, or the client waits for nothing"]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pending(pub u64);

impl From<Pending> for Reply {
    fn from(p: Pending) -> Reply {
        Reply::Pending(p.0)
    }
}

type Then<P> = Box<dyn FnOnce(&mut P, CallOutcome) -> Reply>;

thread_local! {
    // What to do with each call's outcome, by ticket. Each is a `Then<P>`
    // of the component's one pattern type.
    static THEN: RefCell<HashMap<u64, Box<dyn Any>>> = RefCell::new(HashMap::new());
}

/// Keeps `then` until the outcome of the call with `ticket` arrives.
pub(crate) fn expect<P: Pattern>(
    ticket: u64,
    then: impl FnOnce(&mut P, CallOutcome) -> Reply + 'static,
) {
    let then: Then<P> = Box::new(then);
    THEN.with(|t| t.borrow_mut().insert(ticket, Box::new(then)));
}

/// Runs what was kept for `ticket` and answers its client with the
/// result. An outcome nothing was kept for goes to
/// [`Pattern::on_reply`].
pub(crate) fn arrived<P: Pattern>(pattern: &mut P, ticket: u64, outcome: CallOutcome) {
    let then = THEN
        .with(|t| t.borrow_mut().remove(&ticket))
        .and_then(|a| a.downcast::<Then<P>>().ok());
    match then {
        Some(then) => settle(ticket, then(pattern, outcome)),
        None => pattern.on_reply(ticket, outcome),
    }
}

/// Answers the client waiting on `ticket` with `reply`.
pub(crate) fn settle(ticket: u64, reply: Reply) {
    match reply {
        Reply::Done(response) => wit::answer(ticket, &response),
        Reply::Pending(next) if next != ticket => wit::chain(ticket, next),
        Reply::Pending(_) => {}
        Reply::Forward(_) => wit::answer(
            ticket,
            &Response::error(
                500,
                "the plugin tried to forward a request from a call's outcome; only a request handler can forward",
            ),
        ),
    }
}

/// A ticket for a request answered later by [`answer`], from any hook (a
/// long poll answered by a timer or by the next applied entry). The host
/// answers 504 if nothing does before the node's request timeout.
pub fn hold() -> Pending {
    Pending(wit::hold())
}

/// Answers the client waiting on `pending`, when this hook returns.
pub fn answer(pending: Pending, response: Response) {
    wit::answer(pending.0, &response);
}

/// Forgets every closure kept: the instance they belonged to is gone.
#[cfg(all(feature = "testing", not(target_arch = "wasm32")))]
pub(crate) fn forget_all() {
    THEN.with(|t| t.borrow_mut().clear());
}
