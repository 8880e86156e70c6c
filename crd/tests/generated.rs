//! The committed CRD YAML must be exactly what the Rust types generate.

use std::path::Path;

#[test]
fn committed_crds_match_the_rust_types() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let want = nodepulse_crd::crds_yaml();
    for path in nodepulse_crd::GENERATED_CRD_PATHS {
        let got = std::fs::read_to_string(root.join(path))
            .unwrap_or_else(|e| panic!("read {path}: {e}; run `make generate`"));
        assert!(
            got == want,
            "{path} has drifted from crd/src/v1alpha1.rs: run `make generate` and commit the result"
        );
    }
}
