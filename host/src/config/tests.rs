//! Parsing and the placing of errors, on whole config texts.

use super::*;
use crate::fuzz::Rng;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, "node.toml", Path::new("/etc/plexus"))
}

#[test]
fn embedded_default_is_valid() {
    let c = Config::embedded_default();
    assert_eq!(c.plugins.len(), 7);
    assert_eq!(c.plugins[0].name, "kv");
}

#[test]
fn type_error_names_file_line_column_and_key() {
    let text = "version = 1\n\n[[plugins]]\nname = \"kv\"\ncomponent = \"bundled:replicated-kv\"\nlimits = { memory_mib = \"lots\" }\n";
    let e = parse(text).unwrap_err();
    assert_eq!(e.file, "node.toml");
    assert_eq!(e.key, "plugins[0].limits.memory_mib");
    assert_eq!(e.line, 6);
    assert!(e.column > 1, "{e}");
    assert!(e.message.contains("string"), "{e}");
}

#[test]
fn unknown_key_is_rejected_with_its_path() {
    let e = parse("version = 1\n[node]\nid = \"a\"\nport = 3\n").unwrap_err();
    assert_eq!(e.key, "node.port");
    assert!(e.message.contains("port"), "{e}");
    assert_eq!(e.line, 4);
}

#[test]
fn semantic_error_points_at_the_value() {
    let e = parse("version = 1\n[[plugins]]\nname = \"Bad Name\"\ncomponent = \"x.wasm\"\n")
        .unwrap_err();
    assert_eq!(e.key, "plugins[0].name");
    assert_eq!((e.line, e.column), (3, 8));
}

#[test]
fn unknown_capability_is_rejected() {
    let e = parse("version = 1\n[[plugins]]\nname = \"a\"\ncomponent = \"x.wasm\"\ncapabilities = [\"filesystem\"]\n").unwrap_err();
    assert_eq!(e.key, "plugins[0].capabilities[0]");
    assert!(e.message.contains("filesystem"), "{e}");
}

/// Mutated configs (bytes changed, cut, repeated, multi-byte characters
/// put in anywhere) are accepted or refused with an error, never a
/// panic, and an error always points inside the text.
#[test]
fn mutated_configs_never_panic_the_parser() {
    let base = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/cluster/node-1.toml"
    ))
    .unwrap();
    let pieces = [
        "é",
        "日本",
        "\u{1F600}",
        "\"",
        "[",
        "]]",
        "=",
        "\n",
        "#",
        "'''",
        "0x",
        "-1",
        "1e999",
    ];
    let mut rng = Rng(0x5eed_0001);
    for case in 0..2_000 {
        let mut text = base.clone().into_bytes();
        for _ in 0..1 + rng.below(4) {
            let at = rng.below(text.len());
            match rng.below(4) {
                0 => text[at] = rng.next() as u8,
                1 => {
                    let end = (at + rng.below(40)).min(text.len());
                    text.drain(at..end);
                }
                2 => {
                    let piece = pieces[rng.below(pieces.len())].as_bytes();
                    text.splice(at..at, piece.iter().copied());
                }
                _ => {
                    let end = (at + rng.below(40)).min(text.len());
                    let copy = text[at..end].to_vec();
                    text.splice(at..at, copy);
                }
            }
        }
        let Ok(text) = String::from_utf8(text) else {
            continue;
        };
        if let Err(e) = parse(&text) {
            let lines = text.lines().count().max(1);
            assert!(e.line >= 1 && e.line <= lines + 1, "case {case}: {e}");
        }
    }
}
