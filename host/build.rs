//! Builds every crate under `plugins/` into a wasm32-wasip2 component and
//! embeds them (`plexus::bundled`). The binary and the tests share this one
//! step. A plugin fails the build without an integration test under
//! `tests/it/` that loads its real `.wasm`, or without native unit tests
//! in its own crate.

use std::path::{Path, PathBuf};
use std::process::Command;

const TARGET: &str = "wasm32-wasip2";

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let root = manifest.parent().expect("workspace root").to_path_buf();
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    for dir in ["plugins", "sdk", "wit"] {
        println!("cargo::rerun-if-changed={}", root.join(dir).display());
    }
    println!(
        "cargo::rerun-if-changed={}",
        root.join("Cargo.lock").display()
    );

    let plugins = plugin_dirs(&root.join("plugins"));
    for name in &plugins {
        check_tested(&root, name);
    }

    ensure_target();
    let target_dir = root.join("target/plugins");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&root)
        .env("CARGO_PROFILE_RELEASE_DEBUG", "false")
        .env("CARGO_PROFILE_RELEASE_STRIP", "debuginfo")
        .args(["build", "--release", "--target", TARGET, "--target-dir"])
        .arg(&target_dir);
    for name in &plugins {
        cmd.args(["-p", &format!("plexus-plugin-{name}")]);
    }
    // The outer build's settings are for the host, not for the guests.
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_TARGET",
        "CARGO_TARGET_DIR",
        "RUSTC_WORKSPACE_WRAPPER",
    ] {
        cmd.env_remove(var);
    }
    let status = cmd.status().expect("running cargo for the plugins");
    assert!(status.success(), "building the plugins for {TARGET} failed");

    let mut generated = String::from(
        "/// Every plugin under `plugins/`, by name, as component bytes.\npub static PLUGINS: &[(&str, &[u8])] = &[\n",
    );
    for name in &plugins {
        let built = target_dir
            .join(TARGET)
            .join("release")
            .join(format!("plexus_plugin_{}.wasm", name.replace('-', "_")));
        let copy = out.join(format!("{name}.wasm"));
        std::fs::copy(&built, &copy).unwrap_or_else(|e| panic!("copying {}: {e}", built.display()));
        generated.push_str(&format!(
            "    ({name:?}, include_bytes!({:?})),\n",
            copy.display().to_string()
        ));
    }
    generated.push_str("];\n");
    std::fs::write(out.join("bundled.rs"), generated).expect("writing bundled.rs");
}

/// Panics unless `tests/it/<name>.rs` loads the bundled plugin (names it
/// outside comments, as `"<name>"` or `bundled:<name>`) and the plugin's
/// sources hold a `#[test]`.
fn check_tested(root: &Path, name: &str) {
    let test = root
        .join("tests/it")
        .join(format!("{}.rs", name.replace('-', "_")));
    println!("cargo::rerun-if-changed={}", test.display());
    let Ok(source) = std::fs::read_to_string(&test) else {
        panic!(
            "plugin `{name}` has no integration test: add {} that loads its real .wasm",
            test.display()
        );
    };
    let code: String = source
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n");
    if !code.contains(&format!("\"{name}\"")) && !code.contains(&format!("bundled:{name}")) {
        panic!(
            "{} does not load plugin `{name}`: it must name it, as `wasm(\"{name}\")`, \
             a load of \"{name}\" or `component = \"bundled:{name}\"`",
            test.display()
        );
    }
    let src = root.join("plugins").join(name).join("src");
    let has_tests = std::fs::read_dir(&src)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .any(|s| s.contains("#[test]"));
    if !has_tests {
        panic!(
            "plugin `{name}` has no native unit tests: add a `#[cfg(test)]` module in {} \
             that runs it on `plexus_sdk::testing::TestHost`",
            src.display()
        );
    }
}

fn plugin_dirs(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("reading plugins/")
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("Cargo.toml").exists())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn ensure_target() {
    let installed = Command::new("rustc")
        .args(["--print", "target-libdir", "--target", TARGET])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
        .is_some_and(|p| p.exists());
    if installed {
        return;
    }
    println!("cargo::warning=installing the {TARGET} target with rustup");
    let ok = Command::new("rustup")
        .args(["target", "add", TARGET])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "the {TARGET} target is missing and `rustup target add {TARGET}` failed"
    );
}
