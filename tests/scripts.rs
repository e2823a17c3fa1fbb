//! The repository's scripts and documents, checked without root or network: which Debian mirror
//! the end-to-end test takes (`tests/systemd-e2e/run.sh --print-mirror`, against an apt
//! configuration made up here), and a benchmark document that names no directory of the
//! machine it was written on.

mod common;

use std::fs;
use std::process::Command;
use std::time::Duration;

use common::{TempDir, run_within};

const RUN_SH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/systemd-e2e/run.sh");

/// `run.sh --print-mirror` with `files` (path under /etc/apt, text) as the apt configuration.
fn mirror(files: &[(&str, &str)], env: &[(&str, &str)]) -> (i32, String, String) {
    let apt = TempDir::new("apt");
    fs::create_dir_all(apt.path.join("sources.list.d")).unwrap();
    for (name, text) in files {
        fs::write(apt.path.join(name), text).unwrap();
    }
    let mut cmd = Command::new("bash");
    cmd.args([RUN_SH, "--print-mirror"])
        .env("E2E_APT_ETC", &apt.path)
        .env_remove("E2E_MIRROR")
        .envs(env.iter().copied());
    run_within(&mut cmd, Duration::from_secs(10))
}

const DEB822: &str = "\
Types: deb
# http://snapshot.debian.org/archive/debian-security/20250520T000000Z
URIs: http://security.example/debian-security
Suites: bookworm-security
Components: main

Types: deb-src deb
URIs: http://mirror.example/debian
Suites: bookworm bookworm-updates
Components: main
";

#[test]
fn the_e2e_mirror_is_the_one_apt_uses_for_bookworm() {
    // deb822, as Debian 12 installs it: the bookworm stanza, not the security one before it.
    let (code, out, err) = mirror(&[("sources.list.d/debian.sources", DEB822)], &[]);
    assert_eq!(
        (code, out.as_str()),
        (0, "http://mirror.example/debian\n"),
        "{err}"
    );

    // One-line format with options in brackets.
    let list = "# deb http://old.example/debian bookworm main\n\
                deb [arch=amd64 signed-by=/usr/share/keyrings/k.gpg] http://one.example/debian \
                bookworm main contrib\n";
    let (code, out, err) = mirror(&[("sources.list", list)], &[]);
    assert_eq!(
        (code, out.as_str()),
        (0, "http://one.example/debian\n"),
        "{err}"
    );

    // A disabled stanza does not count; a Debian archive for another release will do.
    let disabled = "Types: deb\nURIs: http://off.example/debian\nSuites: bookworm\nEnabled: no\n";
    let (code, out, err) = mirror(
        &[
            ("sources.list.d/a.sources", disabled),
            (
                "sources.list.d/b.list",
                "deb http://node.example/node nodistro main\n\
                 deb http://trixie.example/debian/ trixie main\n",
            ),
        ],
        &[],
    );
    assert_eq!(
        (code, out.as_str()),
        (0, "http://trixie.example/debian/\n"),
        "{err}"
    );

    // Asked for by name.
    let (code, out, err) = mirror(&[], &[("E2E_MIRROR", "http://chosen.example/debian")]);
    assert_eq!(
        (code, out.as_str()),
        (0, "http://chosen.example/debian\n"),
        "{err}"
    );
}

#[test]
fn without_a_debian_mirror_in_apt_the_e2e_test_says_so_and_takes_none() {
    for files in [
        vec![],
        vec![(
            "sources.list.d/nodesource.sources",
            "Types: deb\nURIs: https://deb.example/node_20.x\nSuites: nodistro\n",
        )],
    ] {
        let (code, out, err) = mirror(&files, &[]);
        assert_eq!(code, 2, "{files:?}: stdout {out:?}, stderr {err:?}");
        assert_eq!(out, "", "{files:?}: a mirror was made up");
        assert!(
            err.contains("no Debian mirror in this machine's apt configuration")
                && err.contains("sources.list.d/*.sources")
                && err.contains("E2E_MIRROR"),
            "{files:?}: {err}"
        );
    }
}

#[test]
fn the_benchmark_results_name_no_directory_of_the_machine() {
    let doc =
        fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/BENCHMARKS.md")).unwrap();
    // Absolute paths are fine in system directories (/usr/bin/etcdctl, /dev/shm, /proc).
    let system = [
        "usr", "etc", "dev", "proc", "sys", "var", "run", "bin", "lib",
    ];
    let is_path_char = |c: char| c.is_ascii_alphanumeric() || "/._-+".contains(c);
    for (n, line) in doc.lines().enumerate() {
        // A path starts at a slash after a space, a quote, `(` or `=` (not `<target dir>/x`).
        // An etcd key prefix (`--etcd-prefix /bench/`, the cluster part) is no path.
        let starts = line.char_indices().filter(|&(i, c)| {
            c == '/'
                && !line[..i].ends_with("--etcd-prefix ")
                && line[..i]
                    .chars()
                    .next_back()
                    .is_none_or(|p| " \t`'\"(=".contains(p))
        });
        for (i, _) in starts {
            let word: String = line[i..].chars().take_while(|&c| is_path_char(c)).collect();
            let top = word[1..].split('/').next().unwrap_or("");
            if top.is_empty() {
                continue; // a lone slash, or a URL's `//`
            }
            assert!(
                system.contains(&top),
                "docs/BENCHMARKS.md:{}: {word} names a directory of the machine the results \
                 were made on: write it relative (target/…)",
                n + 1
            );
        }
    }
}
