//! Every value of the shared bad-config table is rejected, with a message that says why.

mod support {
    pub mod bad_configs;
}

use nodepulse_crd::wire::ConfigValue;
use support::bad_configs::bad_configs;

#[test]
fn every_bad_config_is_rejected_with_its_reason() {
    let table = bad_configs();
    assert!(table.len() >= 25, "the issue asks for at least 25 values");
    let mut previous = String::new();
    for row in &table {
        let err = ConfigValue::parse(&row.value)
            .expect_err(row.what)
            .to_string();
        assert!(
            err.contains(row.reason),
            "{}: error {err:?} does not mention {:?}",
            row.what,
            row.reason
        );
        // The end-to-end test tells one rejection from the previous one by its message.
        assert_ne!(
            err, previous,
            "{}: same message as the row before",
            row.what
        );
        previous = err;
    }
}
