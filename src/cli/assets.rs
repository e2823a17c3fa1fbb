//! Writes the man pages and shell completions from the clap definitions, for packaging:
//!
//! ```text
//! cargo run --features assets -- __assets OUT_DIR
//! ```
//!
//! OUT_DIR/man/: tcpnetlock.1, one page per subcommand (tcpnetlock-server.1, ...) and one per
//! drop-in name (tcpnetlock_server.1, tcpnetlock_client.1, tcpnetlock_do.1: each name on the
//! system gets its own page, as Debian policy asks, made from the flags that name accepts).
//! OUT_DIR/completions/{tcpnetlock.bash,_tcpnetlock,tcpnetlock.fish}. Built only with the
//! `assets` feature, so clap_mangen and clap_complete never reach the shipped program.
//! packaging/build gzips the pages.

use std::fs;
use std::io::Write;
use std::path::Path;

use clap::CommandFactory;
use clap_complete::Shell;

/// `tcpnetlock __assets OUT_DIR`.
pub fn main(out: &Path) -> std::io::Result<()> {
    let man = out.join("man");
    let completions = out.join("completions");
    fs::create_dir_all(&man)?;
    fs::create_dir_all(&completions)?;

    let mut cmd = super::Cli::command();
    cmd.build();
    // The main page lists the subcommands' pages already; it points to the drop-in names'.
    let dropins: Vec<String> = super::dropin::commands()
        .iter()
        .map(|c| c.get_name().to_owned())
        .collect();
    let dropins: Vec<&str> = dropins.iter().map(String::as_str).collect();
    write_man(&cmd, "tcpnetlock", &dropins, &man)?;

    for sub in cmd
        .get_subcommands()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help")
    {
        let name = format!("tcpnetlock-{}", sub.get_name());
        // clap keeps names as &'static str; this program ends right after.
        let sub = sub.clone().name(&*Box::leak(name.clone().into_boxed_str()));
        write_man(&sub, &name, &["tcpnetlock"], &man)?;
    }

    for dropin in super::dropin::commands() {
        let name = dropin.get_name().to_owned();
        // Each name's modern form: tcpnetlock_server is `tcpnetlock server`, tcpnetlock_do
        // is `tcpnetlock do`, tcpnetlock_client is closest to `tcpnetlock lock`.
        let modern = match name.as_str() {
            "tcpnetlock_server" => "tcpnetlock-server",
            "tcpnetlock_do" => "tcpnetlock-do",
            _ => "tcpnetlock-lock",
        };
        write_man(&dropin, &name, &["tcpnetlock", modern], &man)?;
    }

    for (shell, file) in [
        (Shell::Bash, "tcpnetlock.bash"),
        (Shell::Zsh, "_tcpnetlock"),
        (Shell::Fish, "tcpnetlock.fish"),
    ] {
        let mut f = fs::File::create(completions.join(file))?;
        clap_complete::generate(shell, &mut cmd, "tcpnetlock", &mut f);
    }
    Ok(())
}

/// Writes `dir/name.1`: clap_mangen's page, then SEE ALSO naming the related pages (section 1).
fn write_man(
    cmd: &clap::Command,
    name: &str,
    see_also: &[&str],
    dir: &Path,
) -> std::io::Result<()> {
    let mut page = Vec::new();
    // Every page's footer names the package and version, the drop-in pages' too (their
    // commands carry no version of their own).
    clap_mangen::Man::new(cmd.clone())
        .source(format!("tcpnetlock {}", env!("CARGO_PKG_VERSION")))
        .render(&mut page)?;
    if !see_also.is_empty() {
        let refs: Vec<String> = see_also
            .iter()
            // roff: \fB bold \fR roman; a '-' in a name is the hyphen \-.
            .map(|n| format!("\\fB{}\\fR(1)", n.replace('-', "\\-")))
            .collect();
        writeln!(page, ".SH \"SEE ALSO\"\n{}", refs.join(",\n"))?;
    }
    fs::write(dir.join(format!("{name}.1")), page)
}
