//! Rebuild when the bpf-linker binary changes: building this crate depends on it, and cargo
//! cannot express a dependency on a binary (rust-lang/cargo#12385).
use which::which;

fn main() {
    let bpf_linker =
        which("bpf-linker").expect("bpf-linker not found on PATH; run scripts/setup.sh");
    println!("cargo:rerun-if-changed={}", bpf_linker.display());
}
