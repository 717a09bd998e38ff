//! How entries are framed in a plugin's stream: a first byte tells a
//! guest's proposal, a ticketed one and a host control entry apart. The log
//! finds control entries by it; the consensus context unwraps the rest.

use std::sync::OnceLock;

use super::log::Entry;

/// First byte of every stored entry: a guest's proposal. Guests cannot
/// write any other tag, so they cannot forge host control entries.
pub const TAG_GUEST: u8 = 0;
/// First byte of a host control entry (see [`Control`]).
pub const TAG_CONTROL: u8 = 1;

/// A host control entry in a plugin's stream, applied by the host at its
/// log index on every node.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub enum Control {
    /// Replace the plugin by this component (and config, when given).
    Swap {
        /// The component's bytes.
        component: Vec<u8>,
        /// New `config` JSON for `init`.
        config: Option<String>,
    },
}

impl Control {
    /// The stored form: the control tag, then the encoded entry.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![TAG_CONTROL];
        out.extend(postcard::to_allocvec(self).expect("control entries encode"));
        out
    }

    /// Decodes a stored control entry.
    pub fn decode(data: &[u8]) -> Option<Control> {
        match data.split_first() {
            Some((&TAG_CONTROL, rest)) => postcard::from_bytes(rest).ok(),
            _ => None,
        }
    }
}

/// First byte of a guest entry sent with `submit`: then the issuing
/// process's boot id and the ticket (8 bytes each, little-endian), then the
/// guest's bytes.
pub const TAG_TICKETED: u8 = 2;
pub(crate) const TICKET_HEADER: usize = 17;

/// Whether a stored entry is a host control entry.
pub fn is_control(e: &Entry) -> bool {
    e.data.first() == Some(&TAG_CONTROL)
}

/// This process's identity in ticketed entries: tickets are only
/// recognised by the process that issued them.
pub(crate) fn boot() -> u64 {
    static BOOT: OnceLock<u64> = OnceLock::new();
    *BOOT.get_or_init(|| {
        let mut b = [0u8; 8];
        getrandom::fill(&mut b).expect("the OS random source works");
        u64::from_le_bytes(b)
    })
}

/// Splits a stored guest entry into its ticket (if this process submitted
/// it) and the guest's bytes.
pub(crate) fn unwrap_entry(mut data: Vec<u8>) -> (Option<u64>, Vec<u8>) {
    match data.first() {
        Some(&TAG_TICKETED) if data.len() >= TICKET_HEADER => {
            let word =
                |at: usize| u64::from_le_bytes(data[at..at + 8].try_into().expect("8 bytes"));
            let ticket = (word(1) == boot()).then(|| word(9));
            data.drain(..TICKET_HEADER);
            (ticket, data)
        }
        Some(_) => {
            data.remove(0);
            (None, data)
        }
        None => (None, data),
    }
}
