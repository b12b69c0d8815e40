//! Compiles gateway-ebpf for the bpf target with aya-build and leaves the object in OUT_DIR,
//! where `redirect` embeds it, so a plain `cargo build` builds kernel and user side together.
use anyhow::{Context as _, anyhow};
use aya_build::Toolchain;

fn main() -> anyhow::Result<()> {
    // Fuzzing and other builds that never install interception can skip the eBPF build
    // (AYA_BUILD_SKIP=1); they get an empty object, which `redirect` refuses to load.
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    if std::env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true")) {
        let out = std::path::PathBuf::from(std::env::var("OUT_DIR").context("OUT_DIR not set")?);
        std::fs::write(out.join("gateway"), b"").context("writing the empty eBPF object")?;
        return Ok(());
    }
    let cargo_metadata::Metadata { packages, .. } = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = packages
        .into_iter()
        .find(|p| p.name.as_str() == "gateway-ebpf")
        .ok_or_else(|| anyhow!("gateway-ebpf package not found in the workspace"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("no parent for {}", ebpf.manifest_path))?;
    let package = aya_build::Package {
        name: ebpf.name.as_str(),
        root_dir: root_dir.as_str(),
        ..Default::default()
    };
    aya_build::build_ebpf([package], Toolchain::default())
        .context("building gateway-ebpf; is bpf-linker installed (scripts/setup.sh)?")
}
