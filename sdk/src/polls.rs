//! Long polls: requests held until something they wait for happens on
//! this node, or until their deadline.
//!
//! A handler that finds nothing to answer yet parks the request with
//! [`LongPolls::hold`]; the hook that makes something happen (an `apply`
//! of a publish, a submit) calls [`LongPolls::wake`] with its key; and
//! `on_timer` hands what [`LongPolls::due`] returns back to the plugin's
//! own code, which looks again ([`submit_again`] does it through the log)
//! and answers, or parks the poll once more with [`LongPolls::park`]. A poll whose deadline passes is answered
//! with the response given to [`LongPolls::new`]. Polls live in the
//! instance's memory: a swap or a restart answers them 504 (as any held
//! request), and the client asks again.
//!
//! ```
//! use plexus_sdk::polls::LongPolls;
//! use plexus_sdk::Response;
//! let polls: LongPolls<u32> = LongPolls::new(7, Response::json(200, &Vec::<u8>::new()));
//! assert!(polls.is_empty());
//! ```

use crate::consensus::{self, Committed};
use crate::replies::{self, Pending};
use crate::{Pattern, Response, timers};

/// A parked request: its reply ticket, what it waits on, until when, and
/// what the plugin needs to look again for it.
pub struct Poll<T> {
    /// The client's held reply.
    pub held: Pending,
    /// What it waits on (a topic, a queue).
    pub key: String,
    /// The monotonic time it is answered at if nothing comes.
    pub until_ms: u64,
    /// The plugin's own part (who asks, for how much).
    pub item: T,
}

impl<T> Poll<T> {
    /// Whether its deadline has passed.
    pub fn expired(&self) -> bool {
        timers::monotonic_ms() >= self.until_ms
    }
}

/// The long polls of one instance, with the timer they use.
pub struct LongPolls<T> {
    timer: u64,
    every_ms: Option<u64>,
    on_timeout: Response,
    waiting: Vec<Poll<T>>,
    woken: Vec<String>,
}

impl<T> LongPolls<T> {
    /// Polls that use timer `timer` (keep its id for them) and are
    /// answered `on_timeout` at their deadline.
    pub fn new(timer: u64, on_timeout: Response) -> Self {
        LongPolls {
            timer,
            every_ms: None,
            on_timeout,
            waiting: Vec::new(),
            woken: Vec::new(),
        }
    }

    /// Also looks again every `ms`, for what happens without a
    /// [`LongPolls::wake`] (a lease that ran out, a delay that passed).
    pub fn every(mut self, ms: u64) -> Self {
        self.every_ms = Some(ms);
        self
    }

    /// Whether no request is parked.
    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }

    /// Holds the current request until something happens to `key`, for
    /// up to `wait_ms`; return the [`Pending`] from the handler (or the
    /// closure of a write) so that the client waits on it.
    pub fn hold(&mut self, key: &str, wait_ms: u64, item: T) -> Pending {
        let held = replies::hold();
        let until_ms = timers::monotonic_ms().saturating_add(wait_ms);
        self.park(Poll {
            held,
            key: key.to_string(),
            until_ms,
            item,
        });
        held
    }

    /// Parks a poll again: it looked and found nothing.
    pub fn park(&mut self, poll: Poll<T>) {
        self.waiting.push(poll);
        self.arm();
    }

    /// Something happened to `key`: its polls look again when this hook
    /// is over (the timer fires at once).
    pub fn wake(&mut self, key: &str) {
        if self.waiting.iter().any(|p| p.key == key) && !self.woken.iter().any(|k| k == key) {
            self.woken.push(key.to_string());
            timers::set(self.timer, 0);
        }
    }

    /// From `on_timer(id)`: answers the polls whose deadline passed and
    /// returns those that should look again (woken, or all of them when
    /// looking [`LongPolls::every`] so often). Nothing for another timer.
    pub fn due(&mut self, id: u64) -> Vec<Poll<T>> {
        if id != self.timer {
            return Vec::new();
        }
        let now = timers::monotonic_ms();
        let woken = std::mem::take(&mut self.woken);
        let every = self.every_ms.is_some();
        let (due, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.waiting)
            .into_iter()
            .partition(|p| every || p.until_ms <= now || woken.contains(&p.key));
        self.waiting = kept;
        let mut again = Vec::new();
        for p in due {
            if p.until_ms <= now {
                replies::answer(p.held, self.on_timeout.clone());
            } else {
                again.push(p);
            }
        }
        self.arm();
        again
    }

    /// Sets the timer for the earliest deadline (or sooner, when looking
    /// every so often).
    fn arm(&self) {
        let now = timers::monotonic_ms();
        if let Some(next) = self.waiting.iter().map(|p| p.until_ms).min() {
            let wait = next.saturating_sub(now);
            timers::set(self.timer, self.every_ms.map_or(wait, |e| wait.min(e)));
        }
    }
}

/// Looks again for `poll` through the log: submits `command`, and once it
/// is applied here answers the poll with `answer` when `found` says the
/// output holds something, or parks it again in `polls(pattern)` until its
/// deadline. A submission that fails answers the poll with the failure.
pub fn submit_again<P: Pattern, T: 'static>(
    pattern: &mut P,
    poll: Poll<T>,
    command: &P::Command,
    polls: fn(&mut P) -> &mut LongPolls<T>,
    found: fn(&P::Output) -> bool,
    answer: fn(&mut P, Committed<P::Output>) -> Response,
) {
    let held = poll.held;
    let sent = consensus::submit(pattern, command, move |p: &mut P, done| {
        if !found(&done.output) && !poll.expired() {
            polls(p).park(poll);
        } else {
            replies::answer(poll.held, answer(p, done));
        }
        // Nobody waits on this submission itself.
        Response::new(204, "text/plain", Vec::new())
    });
    if let Err(e) = sent {
        replies::answer(held, e.into());
    }
}
