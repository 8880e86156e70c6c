//! Prints the nodepulse CRDs as YAML: `cargo run -p nodepulse-crd --bin crdgen > crds.yaml`.
fn main() {
    print!("{}", nodepulse_crd::crds_yaml());
}
