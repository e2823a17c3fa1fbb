//! Writes the man pages and shell completions from the clap definition, for packaging:
//!
//! ```text
//! cargo run --features assets -- __assets OUT_DIR
//! ```
//!
//! OUT_DIR/man/tcpnetlock.1 and one page per subcommand (tcpnetlock-server.1, ...), and
//! OUT_DIR/completions/{tcpnetlock.bash,_tcpnetlock,tcpnetlock.fish}. Built only with the
//! `assets` feature, so clap_mangen and clap_complete never reach the shipped program.

use std::fs;
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
    write_man(&cmd, "tcpnetlock", &man)?;
    for sub in cmd
        .get_subcommands()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help")
    {
        let name = format!("tcpnetlock-{}", sub.get_name());
        // clap keeps names as &'static str; this program ends right after.
        let sub = sub.clone().name(&*Box::leak(name.clone().into_boxed_str()));
        write_man(&sub, &name, &man)?;
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

fn write_man(cmd: &clap::Command, name: &str, dir: &Path) -> std::io::Result<()> {
    let mut page = Vec::new();
    clap_mangen::Man::new(cmd.clone()).render(&mut page)?;
    fs::write(dir.join(format!("{name}.1")), page)
}
