//! The bindings are generated from `../wit` by a macro, which cargo does
//! not track: rebuild when the WIT changes.

fn main() {
    println!("cargo::rerun-if-changed=../wit");
}
