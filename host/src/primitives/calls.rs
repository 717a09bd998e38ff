//! Calls that never hold a plugin, and the answers to requests it did not
//! answer at once (`plexus:cluster/replies`).
//!
//! A call that waits on another party (`messaging.call`, `plugins.call`,
//! `outbound-http.fetch`) gets a ticket from [`Calls::start`]; its work is
//! a future that the plugin's actor takes when the hook returns and polls
//! beside its mailbox (no task of its own, no channel back). Its outcome
//! arrives as one [`Done`], which the actor hands to the guest's
//! `on-reply` if the instance that made the call is still the one
//! running. A hook that traps starts none of its calls.
//!
//! Answers given with `replies.answer` are buffered in the [`Book`] and
//! sent by the actor when the hook returns, so a hook that traps answers
//! nobody.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use wasmtime::component::{HasSelf, Linker};

use crate::runtime::bindings::plexus::cluster::replies;
use crate::runtime::bindings::plexus::cluster::types::{CallOutcome, Response};
use crate::runtime::state::PluginState;

/// The outcome of one call, on its way to the actor.
#[derive(Debug)]
pub struct Done {
    /// The instance that made the call.
    pub generation: u64,
    /// The call's ticket.
    pub ticket: u64,
    /// What came of it.
    pub outcome: CallOutcome,
}

/// A call's work, as the actor polls it: `None` for work that answers a
/// client itself (a forward).
pub type CallFuture = Pin<Box<dyn Future<Output = Option<Done>> + Send>>;

/// One instance's calls in flight and the answers of its current hook.
#[derive(Default)]
pub struct Book {
    generation: u64,
    max_in_flight: u32,
    /// Calls whose outcome has not reached the guest yet.
    in_flight: HashSet<u64>,
    /// Tickets issued during the current hook: a request handler may
    /// return `pending` on any of them.
    fresh: HashSet<u64>,
    /// `replies.answer` calls of the current hook.
    answers: Vec<(u64, Response)>,
    /// `replies.chain` calls of the current hook.
    chains: Vec<(u64, u64)>,
    /// Calls started in the current hook, for the actor to poll.
    started: Vec<CallFuture>,
}

/// What a hook asked of the host's waiting clients, taken when it
/// returned.
#[derive(Debug, Default)]
pub struct Said {
    /// Clients to answer, by ticket.
    pub answers: Vec<(u64, Response)>,
    /// Clients that now wait on another ticket: (from, to).
    pub chains: Vec<(u64, u64)>,
}

/// A shared handle to an instance's [`Book`]: every interface that makes
/// calls holds one.
#[derive(Clone, Default)]
pub struct Calls {
    book: Arc<Mutex<Book>>,
    /// Whether the current hook put anything in the book: most hooks make
    /// no call and answer nobody, and then the actor's bookkeeping around
    /// them takes no lock.
    touched: Arc<AtomicBool>,
}

/// Why [`Calls::start`] refused a call: the instance has this many in
/// flight already.
#[derive(Debug, Clone, Copy)]
pub struct Busy(pub u32);

impl Calls {
    /// A book for the instance `generation`.
    pub fn new(generation: u64, max_in_flight: u32) -> Calls {
        Calls {
            book: Arc::new(Mutex::new(Book {
                generation,
                max_in_flight,
                ..Book::default()
            })),
            touched: Arc::default(),
        }
    }

    fn book(&self) -> std::sync::MutexGuard<'_, Book> {
        self.book.lock().expect("call book poisoned")
    }

    /// The book, for a change made by the current hook.
    fn touch(&self) -> std::sync::MutexGuard<'_, Book> {
        self.touched.store(true, Ordering::Relaxed);
        self.book()
    }

    fn touched(&self) -> bool {
        self.touched.load(Ordering::Relaxed)
    }

    /// Starts a call: once the hook returns, the actor polls `work`, and
    /// its outcome, or `late` once `deadline` has passed, comes back as a
    /// [`Done`].
    pub fn start<F>(&self, deadline: Duration, work: F, late: CallOutcome) -> Result<u64, Busy>
    where
        F: Future<Output = CallOutcome> + Send + 'static,
    {
        let mut book = self.touch();
        if book.in_flight.len() >= book.max_in_flight as usize {
            return Err(Busy(book.max_in_flight));
        }
        let ticket = super::consensus::next_ticket();
        book.in_flight.insert(ticket);
        book.fresh.insert(ticket);
        let generation = book.generation;
        book.started.push(Box::pin(async move {
            let outcome = tokio::time::timeout(deadline, work).await.unwrap_or(late);
            Some(Done {
                generation,
                ticket,
                outcome,
            })
        }));
        Ok(ticket)
    }

    /// The calls the hook that just returned started.
    pub fn take_started(&self) -> Vec<CallFuture> {
        if !self.touched() {
            return Vec::new();
        }
        std::mem::take(&mut self.book().started)
    }

    /// Takes `done` for delivery if it belongs to this instance and was
    /// not delivered yet.
    pub fn settle(&self, done: &Done) -> bool {
        let mut book = self.book();
        book.generation == done.generation && book.in_flight.remove(&done.ticket)
    }

    /// Calls in flight.
    pub fn in_flight(&self) -> usize {
        self.book().in_flight.len()
    }

    /// Whether a request handler may return `pending(ticket)`: the ticket
    /// was issued in this hook, or is a call still in flight.
    pub fn may_wait_on(&self, ticket: u64) -> bool {
        let book = self.book();
        book.fresh.contains(&ticket) || book.in_flight.contains(&ticket)
    }

    /// A hook call starts.
    pub fn begin(&self) {
        if !self.touched() {
            return;
        }
        let mut book = self.book();
        book.fresh.clear();
        book.answers.clear();
        book.chains.clear();
        // Calls the last hook started stay until the actor takes them.
        let pending = !book.started.is_empty();
        self.touched.store(pending, Ordering::Relaxed);
    }

    /// The hook that just ran failed: nothing it said or started happens,
    /// and the calls it started are not in flight.
    pub fn discard(&self) {
        let mut book = self.book();
        book.answers.clear();
        book.chains.clear();
        book.started.clear();
        let fresh = std::mem::take(&mut book.fresh);
        book.in_flight.retain(|t| !fresh.contains(t));
    }

    /// What the hook that just returned asked for.
    pub fn take_said(&self) -> Said {
        if !self.touched() {
            return Said::default();
        }
        let mut book = self.book();
        Said {
            answers: std::mem::take(&mut book.answers),
            chains: std::mem::take(&mut book.chains),
        }
    }

    fn hold(&self) -> u64 {
        let ticket = super::consensus::next_ticket();
        self.touch().fresh.insert(ticket);
        ticket
    }
}

/// Clamps a guest's deadline to 1 ms ..= 60 s.
pub fn clamp_timeout(timeout_ms: u32) -> Duration {
    Duration::from_millis(u64::from(timeout_ms.clamp(1, 60_000)))
}

impl replies::Host for PluginState {
    fn answer(&mut self, ticket: u64, response: Response) -> wasmtime::Result<()> {
        self.calls.touch().answers.push((ticket, response));
        Ok(())
    }

    fn hold(&mut self) -> wasmtime::Result<u64> {
        Ok(self.calls.hold())
    }

    fn chain(&mut self, ticket: u64, next: u64) -> wasmtime::Result<()> {
        self.calls.touch().chains.push((ticket, next));
        Ok(())
    }
}

/// Adds `replies`, which every plugin may import.
pub fn add_to_linker(linker: &mut Linker<PluginState>) -> wasmtime::Result<()> {
    replies::add_to_linker::<PluginState, HasSelf<PluginState>>(linker, |s| s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::bindings::plexus::cluster::types::MessagingError;

    fn message(bytes: &[u8]) -> CallOutcome {
        CallOutcome::Message(Ok(bytes.to_vec()))
    }

    async fn run_one(calls: &Calls) -> Done {
        let mut started = calls.take_started();
        assert_eq!(started.len(), 1);
        started.pop().unwrap().await.unwrap()
    }

    #[tokio::test]
    async fn a_call_past_its_deadline_reports_the_late_outcome_once() {
        let calls = Calls::new(7, 2);
        let ticket = calls
            .start(
                Duration::from_millis(5),
                std::future::pending(),
                CallOutcome::Message(Err(MessagingError::Timeout)),
            )
            .unwrap();
        assert!(calls.may_wait_on(ticket));
        let done = run_one(&calls).await;
        assert_eq!(done.ticket, ticket);
        assert!(matches!(
            done.outcome,
            CallOutcome::Message(Err(MessagingError::Timeout))
        ));
        assert!(calls.settle(&done));
        assert!(!calls.settle(&done), "delivered twice");
        assert_eq!(calls.in_flight(), 0);
    }

    #[tokio::test]
    async fn calls_past_the_limit_are_refused_and_other_generations_ignored() {
        let calls = Calls::new(1, 1);
        let first = calls
            .start(
                Duration::from_secs(5),
                async { message(b"x") },
                message(b""),
            )
            .unwrap();
        let refused = calls.start(
            Duration::from_secs(5),
            async { message(b"y") },
            message(b""),
        );
        assert!(matches!(refused, Err(Busy(1))), "{refused:?}");
        let mut done = run_one(&calls).await;
        assert_eq!(done.ticket, first);
        done.generation = 2;
        assert!(!calls.settle(&done), "another instance's outcome");
        done.generation = 1;
        assert!(calls.settle(&done));
        calls.begin();
        assert!(
            !calls.may_wait_on(first),
            "delivered and from an earlier hook"
        );
    }

    #[tokio::test]
    async fn a_failed_hook_starts_none_of_its_calls() {
        let calls = Calls::new(1, 4);
        calls.begin();
        let ticket = calls
            .start(Duration::from_secs(1), async { message(b"") }, message(b""))
            .unwrap();
        calls.discard();
        assert!(calls.take_started().is_empty());
        assert_eq!(calls.in_flight(), 0);
        assert!(!calls.may_wait_on(ticket));
    }
}
