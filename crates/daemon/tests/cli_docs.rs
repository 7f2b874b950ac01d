//! Shell completions and the man page, generated from the CLI's clap definitions
//! (`uvdpa completions SHELL`, `uvdpa man`): each names every subcommand and the daemon's
//! options, and is valid for the program that reads it (`bash -n`, `zsh -n`, `fish -n`
//! where installed; `man -l` where man-db and groff are installed).

use std::io::Write;
use std::process::{Command, Stdio};

fn uvdpa(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_uvdpa"))
        .args(args)
        .output()
        .expect("run uvdpa");
    assert!(
        out.status.success(),
        "uvdpa {args:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

const SUBCOMMANDS: [&str; 7] = [
    "daemon",
    "mgmtdev",
    "dev",
    "monitor",
    "res",
    "completions",
    "man",
];

/// Runs `prog ARGS` with `input` on stdin; `None` if `prog` is not installed.
fn check_with(prog: &str, args: &[&str], input: &str) -> Option<(bool, String)> {
    let mut child = match Command::new(prog)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => panic!("run {prog}: {e}"),
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    Some((
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    ))
}

#[test]
fn bash_completion_parses_and_names_every_subcommand_and_daemon_option() {
    let script = uvdpa(&["completions", "bash"]);
    for word in
        SUBCOMMANDS
            .iter()
            .chain(&["--check-config", "--takeover", "--metrics", "--run-dir"])
    {
        assert!(script.contains(word), "bash completion lacks {word}");
    }
    let (ok, msg) = check_with("bash", &["-n"], &script).expect("bash is installed");
    assert!(ok, "bash -n rejects the completion script: {msg}");
    // The function it registers completes `uvdpa d` to the subcommands starting with d.
    let probe = format!(
        "{script}\nCOMP_WORDS=(uvdpa d); COMP_CWORD=1; COMP_LINE='uvdpa d'; COMP_POINT=7; \
         _uvdpa uvdpa d uvdpa; printf '%s\\n' \"${{COMPREPLY[@]}}\""
    );
    let (ok, words) = check_with("bash", &[], &probe).expect("bash is installed");
    assert!(ok, "running the completion failed: {words}");
    let words: Vec<&str> = words.lines().collect();
    assert!(
        words.contains(&"daemon") && words.contains(&"dev") && !words.contains(&"monitor"),
        "`uvdpa d<TAB>` completed to {words:?}"
    );
}

#[test]
fn other_shells_get_their_own_scripts() {
    let zsh = uvdpa(&["completions", "zsh"]);
    assert!(
        zsh.starts_with("#compdef uvdpa"),
        "zsh: {}",
        &zsh[..80.min(zsh.len())]
    );
    let fish = uvdpa(&["completions", "fish"]);
    assert!(fish.contains("complete -c uvdpa"), "fish script");
    for (prog, script) in [("zsh", &zsh), ("fish", &fish)] {
        if let Some((ok, msg)) = check_with(prog, &["-n"], script) {
            assert!(ok, "{prog} -n rejects its completion script: {msg}");
        }
    }
    let out = Command::new(env!("CARGO_BIN_EXE_uvdpa"))
        .args(["completions", "nosuchshell"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "an unknown shell is refused");
    assert!(String::from_utf8_lossy(&out.stderr).contains("bash"));
}

#[test]
fn man_page_is_roff_with_every_subcommand() {
    let page = uvdpa(&["man"]);
    assert!(
        page.contains(".TH uvdpa 1"),
        "title line: {}",
        &page[..200.min(page.len())]
    );
    for section in [".SH NAME", ".SH SYNOPSIS", ".SH OPTIONS", ".SH SUBCOMMANDS"] {
        assert!(page.contains(section), "man page lacks {section}");
    }
    for cmd in SUBCOMMANDS {
        assert!(
            page.contains(&format!("uvdpa\\-{cmd}(1)")),
            "man page lacks the subcommand {cmd}"
        );
    }
    // Rendered by man where it is installed: the text names the program and a subcommand.
    let dir = std::env::temp_dir().join(format!("uvdpa-man-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("uvdpa.1");
    std::fs::write(&file, &page).unwrap();
    let rendered = Command::new("man")
        .args(["-l", "-P", "cat"])
        .arg(&file)
        .env("MANWIDTH", "100")
        .output();
    let _ = std::fs::remove_dir_all(&dir);
    if let Ok(out) = rendered {
        if out.status.success() && !out.stdout.is_empty() {
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(text.contains("uvdpa") && text.contains("monitor"), "{text}");
        }
    }
}
