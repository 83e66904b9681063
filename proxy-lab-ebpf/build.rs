use which::which;

/// Rebuild when bpf-linker changes (it links the object); fail early with a clear message
/// when it is missing.
fn main() {
    match which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(e) => panic!("bpf-linker not found ({e}); run `cargo xtask bootstrap`"),
    }
}
