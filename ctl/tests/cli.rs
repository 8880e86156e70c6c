//! The command line as a person meets it: `--help` with examples on every command, and
//! completion scripts that the shells load and that complete nodepulsectl's words. Needs no etcd.

use std::process::{Command, Output};

use testkit::project_bin;

fn ctl(args: &[&str]) -> Output {
    Command::new(project_bin("nodepulsectl"))
        .args(args)
        .output()
        .expect("run nodepulsectl")
}

fn stdout_of(args: &[&str]) -> String {
    let out = ctl(args);
    assert!(
        out.status.success(),
        "nodepulsectl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

#[test]
fn every_command_shows_examples_and_exit_codes_in_its_help() {
    for command in [
        &[][..],
        &["watch"],
        &["nodes"],
        &["config", "get"],
        &["config", "set"],
        &["config", "delete"],
    ] {
        let mut args = command.to_vec();
        args.push("--help");
        let help = stdout_of(&args);
        assert!(
            help.contains("Examples:\n  ") && help.contains("Exit codes:"),
            "nodepulsectl {}:\n{help}",
            args.join(" ")
        );
        // Each example line is a command that exists.
        for line in help.lines().filter(|l| l.starts_with("  nodepulsectl ")) {
            let words: Vec<&str> = line.split_whitespace().skip(1).collect();
            let sub: Vec<&str> = words
                .iter()
                .take_while(|w| !w.starts_with('-') && !w.contains("worker"))
                .copied()
                .collect();
            let mut check = sub.clone();
            check.push("--help");
            assert!(ctl(&check).status.success(), "example {line:?}");
        }
    }
}

/// What bash completes after `nodepulsectl <words>`, with the script sourced into a real bash.
fn bash_completes(words: &[&str]) -> Vec<String> {
    let script = stdout_of(&["completion", "bash"]);
    let line: Vec<String> = std::iter::once("nodepulsectl")
        .chain(words.iter().copied())
        .map(|w| format!("'{w}'"))
        .collect();
    let program = format!(
        "{script}\nCOMP_WORDS=({}); COMP_CWORD={}; COMP_LINE=\"${{COMP_WORDS[*]}}\"; COMP_POINT=${{#COMP_LINE}}; _nodepulsectl nodepulsectl \"${{COMP_WORDS[COMP_CWORD]}}\" \"${{COMP_WORDS[COMP_CWORD-1]}}\"; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
        line.join(" "),
        words.len()
    );
    let out = Command::new("bash")
        .args(["--norc", "-c", &program])
        .output()
        .expect("run bash");
    assert!(
        out.status.success(),
        "bash: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(String::from)
        .collect()
}

#[test]
fn bash_completes_commands_and_flags() {
    assert_eq!(bash_completes(&["con"]), ["config"]);
    let sub = bash_completes(&["config", ""]);
    for want in ["get", "set", "delete"] {
        assert!(sub.iter().any(|w| w == want), "{sub:?}");
    }
    let flags = bash_completes(&["config", "set", "--int"]);
    assert_eq!(flags, ["--interval"]);
    let shells = bash_completes(&["completion", ""]);
    for want in ["bash", "zsh", "fish"] {
        assert!(shells.iter().any(|w| w == want), "{shells:?}");
    }
}

#[test]
fn zsh_and_fish_scripts_name_the_commands() {
    let zsh = stdout_of(&["completion", "zsh"]);
    assert!(zsh.starts_with("#compdef nodepulsectl"), "{zsh}");
    let fish = stdout_of(&["completion", "fish"]);
    for word in ["watch", "nodes", "config", "completion", "interval"] {
        assert!(zsh.contains(word), "zsh lacks {word}");
        assert!(fish.contains(word), "fish lacks {word}");
    }
    let bad = ctl(&["completion", "tcsh"]);
    assert_eq!(
        bad.status.code(),
        Some(2),
        "an unknown shell is a usage error"
    );
}
