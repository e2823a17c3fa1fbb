//! Runs tcpnetlock 0.1.8's own Python test suite against this crate's server binary, through
//! tests/conformance/run.sh (which downloads 0.1.8 into a scratch dir and reuses it later), and
//! then 0.1.8's CLI tests against this crate's drop-in `tcpnetlock_do` and `tcpnetlock_client`.
//! Needs python3 with venv and access to PyPI on the first run.
//!
//! With TCPNETLOCK_TEST_ETCD=1 (and `--features etcd`), every server the suite starts is a cluster
//! member on a 3-member etcd started for the run (tests/common/mod.rs).

mod common;

use std::process::Command;

fn run_sh(args: &[&str], etcd: Option<&str>) {
    let mut cmd = Command::new("bash");
    cmd.arg("tests/conformance/run.sh")
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("TCPNETLOCK_BIN", env!("CARGO_BIN_EXE_tcpnetlock"))
        .env_remove("TCPNETLOCK_CONFORMANCE_ETCD");
    if let Some(endpoints) = etcd {
        cmd.env("TCPNETLOCK_CONFORMANCE_ETCD", endpoints);
    }
    let out = cmd
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
    let etcd = common::cluster_mode().then(common::etcd::EtcdCluster::start3);
    let endpoints = etcd.as_ref().map(|e| e.endpoints().join(","));
    run_sh(&[], endpoints.as_deref());
    run_sh(&["--dropin"], endpoints.as_deref());
}
