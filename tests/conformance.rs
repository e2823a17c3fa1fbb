//! Runs tcpnetlock 0.1.8's own Python test suite against this crate's server binary, through
//! tests/conformance/run.sh (which downloads 0.1.8 into a scratch dir and reuses it later), and
//! then 0.1.8's CLI tests against this crate's drop-in `tcpnetlock_do` and `tcpnetlock_client`.
//! Needs python3 with venv and access to PyPI on the first run.

use std::process::Command;

fn run_sh(args: &[&str]) {
    let out = Command::new("bash")
        .arg("tests/conformance/run.sh")
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("TCPNETLOCK_BIN", env!("CARGO_BIN_EXE_tcpnetlock"))
        .output()
        .expect("cannot run bash tests/conformance/run.sh");
    assert!(
        out.status.success(),
        "conformance run failed ({}):\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One test, two passes in turn: they share run.sh's scratch dir (venv, sdist, logs).
#[test]
fn python_0_1_8_suite_passes_against_our_server_and_drop_in_programs() {
    run_sh(&[]);
    run_sh(&["--dropin"]);
}
