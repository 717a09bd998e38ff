//! Glue between the generated `Guest` trait and a [`Pattern`]. Not public API.

use std::any::Any;
use std::cell::RefCell;

use crate::{
    CallOutcome, CommittedEntry, InitContext, MemberEvent, NodeId, Pattern, Reply, Request,
};

thread_local! {
    // A component holds exactly one pattern type, so the downcast in `with`
    // always finds the type that `init` stored.
    static INSTANCE: RefCell<Option<Box<dyn Any>>> = const { RefCell::new(None) };
}

fn with<P: Pattern, R>(f: impl FnOnce(&mut P) -> R) -> R {
    INSTANCE.with(|cell| {
        let mut slot = cell.borrow_mut();
        let instance = slot
            .as_mut()
            .and_then(|b| b.downcast_mut::<P>())
            .expect("plexus: a hook was called before a successful init");
        f(instance)
    })
}

pub fn init<P: Pattern>(ctx: InitContext) -> Result<(), String> {
    let instance = P::init(ctx)?;
    INSTANCE.with(|cell| *cell.borrow_mut() = Some(Box::new(instance)));
    Ok(())
}

pub fn on_request<P: Pattern>(req: Request) -> Reply {
    with::<P, _>(|p| p.on_request(req))
}

pub fn on_message<P: Pattern>(from: NodeId, topic: String, payload: Vec<u8>) -> Option<Vec<u8>> {
    with::<P, _>(|p| p.on_message(from, topic, payload))
}

pub fn apply<P: Pattern>(entries: Vec<CommittedEntry>, dropped: Vec<u64>) {
    with::<P, _>(|p| {
        crate::consensus::forget(&dropped);
        crate::consensus::deliver_all(p, entries);
    });
}

pub fn on_reply<P: Pattern>(ticket: u64, outcome: CallOutcome) {
    with::<P, _>(|p| crate::replies::arrived(p, ticket, outcome))
}

pub fn on_membership<P: Pattern>(events: Vec<MemberEvent>) {
    with::<P, _>(|p| p.on_membership(events))
}

pub fn on_timer<P: Pattern>(id: u64) {
    with::<P, _>(|p| p.on_timer(id))
}

pub fn snapshot<P: Pattern>() -> Vec<u8> {
    with::<P, _>(|p| p.snapshot())
}

pub fn restore<P: Pattern>(state: Vec<u8>) -> Result<(), String> {
    with::<P, _>(|p| p.restore(state))
}
