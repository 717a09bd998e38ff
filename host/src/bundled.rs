//! The plugins built from `plugins/`, embedded in the binary so that
//! `plexus up` needs no files besides itself.

include!(concat!(env!("OUT_DIR"), "/bundled.rs"));

/// The component bytes of a bundled plugin.
pub fn get(name: &str) -> Option<&'static [u8]> {
    PLUGINS.iter().find(|(n, _)| *n == name).map(|(_, b)| *b)
}

/// Names of the bundled plugins.
pub fn names() -> impl Iterator<Item = &'static str> {
    PLUGINS.iter().map(|(n, _)| *n)
}
