//! `plexus:cluster/membership`: the member list as this node sees it.

use std::sync::Arc;

use wasmtime::component::{HasData, Linker};

pub use crate::cluster::membership::MembershipView;
use crate::runtime::bindings::plexus::cluster::membership as wit;
use crate::runtime::bindings::plexus::cluster::types::Member;
use crate::runtime::state::PluginState;

/// One plugin instance's membership context.
pub struct MembershipCtx {
    view: Arc<MembershipView>,
}

impl MembershipCtx {
    /// A context over the node's view.
    pub fn new(view: Arc<MembershipView>) -> Self {
        MembershipCtx { view }
    }
}

impl wit::Host for MembershipCtx {
    fn local_node(&mut self) -> wasmtime::Result<String> {
        Ok(self.view.local().to_string())
    }

    fn members(&mut self) -> wasmtime::Result<Vec<Member>> {
        Ok(self.view.snapshot().1)
    }

    fn epoch(&mut self) -> wasmtime::Result<u64> {
        Ok(self.view.snapshot().0)
    }
}

struct Membership;

impl HasData for Membership {
    type Data<'a> = &'a mut MembershipCtx;
}

/// Grants `membership`.
pub fn add_to_linker(linker: &mut Linker<PluginState>) -> wasmtime::Result<()> {
    wit::add_to_linker::<PluginState, Membership>(linker, |s| &mut s.membership)
}
