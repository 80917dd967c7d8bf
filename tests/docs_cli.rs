//! Docs that cannot drift from the CLI: every `wiremesh ...` command line in README.md and
//! docs/*.md is checked against the real clap definition. A line in a fenced code block must
//! parse as it stands; a command in inline code (often a synopsis with placeholders such as
//! `NAME` or `[--flag X]`) must name existing subcommands and flags only. The agent's flag
//! table in docs/install.md lists every agent flag, and docs/cli.md's command table every
//! command the `--help` list shows.

use std::path::PathBuf;

use clap::{CommandFactory as _, Parser as _};
use wiremesh::cli::Cli;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn documents() -> Vec<(String, String)> {
    let mut paths = vec![root().join("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root().join("docs"))
        .expect("docs/")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    paths.extend(docs);
    paths
        .iter()
        .map(|p| {
            let name = p.strip_prefix(root()).unwrap_or(p).display().to_string();
            (name, std::fs::read_to_string(p).expect("read doc"))
        })
        .collect()
}

/// The `NAME=value` assignments before a command, and its words after the program name.
type Invocation = (Vec<(String, String)>, Vec<String>);

/// A `wiremesh` command in a line of a shell example: the `NAME=value` assignments before it
/// and the words after the program name, up to a shell operator, a comment or a description
/// column (two spaces). The program starts the line (after `sudo` and assignments) or follows
/// `--` (`kubectl exec ... -- wiremesh status`); `None` when the line does not run wiremesh.
fn invocation(line: &str) -> Option<Invocation> {
    invocation_with(line, &[])
}

/// [`invocation`], where `$<alias>` also names the program (`W=target/release/wiremesh`).
fn invocation_with(line: &str, aliases: &[String]) -> Option<Invocation> {
    let is_program = |w: &str| {
        let w = w.trim_matches('"');
        w == "wiremesh"
            || w.ends_with("/wiremesh")
            || w == "$wiremesh"
            || aliases.iter().any(|a| w.strip_prefix('$') == Some(a))
    };
    let line = line.trim();
    // Each word with its byte offset, so the command can be cut where a description begins.
    let mut offsets = Vec::new();
    let mut words = Vec::new();
    let mut at = 0;
    for w in line.split(' ') {
        if !w.is_empty() {
            offsets.push(at);
            words.push(w);
        }
        at += w.len() + 1;
    }
    let mut env = Vec::new();
    let mut start = None;
    for (i, w) in words.iter().enumerate() {
        if *w == "sudo" {
            continue;
        }
        if let Some((name, value)) = w.split_once('=')
            && name.chars().all(|c| c.is_ascii_uppercase() || c == '_')
        {
            env.push((name.to_string(), value.to_string()));
            continue;
        }
        if is_program(w) {
            start = Some(i);
        }
        break;
    }
    if start.is_none() {
        start = words
            .windows(2)
            .position(|pair| pair[0] == "--" && is_program(pair[1]))
            .map(|i| i + 1);
    }
    let start = start?;
    // The command ends where a description column (two spaces) begins.
    let after = &line[offsets[start] + words[start].len()..];
    let command = after.split("  ").next().unwrap_or_default();
    let mut args = Vec::new();
    for w in command.split_whitespace() {
        if ["|", "||", "&&", ";", ">", ">>", "2>", "2>&1", "<", ")"].contains(&w)
            || w.starts_with('#')
        {
            break;
        }
        args.push(w.trim_matches('"').trim_matches('\'').to_string());
    }
    Some((env, args))
}

/// Parses `args` as the CLI would with the `env` assignments in force: each assignment to a
/// flag's environment variable becomes that flag.
fn parse(env: &[(String, String)], args: Vec<String>) -> Result<(), clap::Error> {
    let mut command = Cli::command();
    command.build();
    let mut argv = vec!["wiremesh".to_string()];
    argv.extend(args.iter().cloned());
    // The flags come from the subcommand the words name.
    let mut current = &command;
    for word in &args {
        if let Some(sub) = current.find_subcommand(word) {
            current = sub;
        }
    }
    for (name, value) in env {
        if let Some(arg) = current
            .get_arguments()
            .find(|a| a.get_env().is_some_and(|e| e.to_string_lossy() == *name))
            && let Some(long) = arg.get_long()
        {
            argv.push(format!("--{long}={value}"));
        }
    }
    Cli::try_parse_from(argv).map(|_| ())
}

/// Lines of fenced code blocks with their line numbers (a line continued with `\` joined to
/// the next), and the names the block gives the wiremesh binary (`W=target/release/wiremesh`).
fn code_lines(text: &str) -> Vec<(usize, String, Vec<String>)> {
    let mut inside = false;
    let mut aliases: Vec<String> = Vec::new();
    let mut pending: Option<(usize, String)> = None;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim_start().starts_with("```") {
            inside = !inside;
            aliases.clear();
            continue;
        }
        if !inside {
            continue;
        }
        if let Some((name, value)) = line.trim().split_once('=')
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            && value.trim_matches('"').ends_with("wiremesh")
        {
            aliases.push(name.to_string());
            continue;
        }
        let (start, mut joined) = pending.take().unwrap_or((i + 1, String::new()));
        let part = if joined.is_empty() {
            line
        } else {
            line.trim_start()
        };
        joined.push_str(part.trim_end_matches('\\').trim_end());
        if line.ends_with('\\') {
            joined.push(' ');
            pending = Some((start, joined));
        } else {
            out.push((start, joined, aliases.clone()));
        }
    }
    out
}

/// Inline code spans that start with `wiremesh `, outside fenced blocks.
fn inline_commands(text: &str) -> Vec<(usize, String)> {
    let mut inside = false;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim_start().starts_with("```") {
            inside = !inside;
            continue;
        }
        if inside {
            continue;
        }
        for (n, span) in line.split('`').enumerate() {
            if n % 2 == 1 && span.starts_with("wiremesh ") {
                out.push((i + 1, span.replace("\\|", "|")));
            }
        }
    }
    out
}

/// The subcommand path of a synopsis and the flags it names, checked against the command tree.
fn check_synopsis(span: &str) -> Result<(), String> {
    let mut command = Cli::command();
    command.build();
    let mut current = &command;
    let mut words = span.split_whitespace().skip(1).peekable();
    // Subcommands: leading words that are not flags or placeholders.
    while let Some(word) = words.peek() {
        let word = word.trim_matches(|c| "[]()".contains(c));
        if word.starts_with('-') || word.is_empty() {
            break;
        }
        // `check|which-endpoints|unused`: every alternative must exist.
        let names: Vec<&str> = word.split('|').collect();
        let found: Vec<&clap::Command> = names
            .iter()
            .filter_map(|n| current.find_subcommand(n))
            .collect();
        if found.len() == names.len() && names.len() == 1 {
            current = found[0];
            words.next();
        } else if found.len() == names.len() {
            words.next();
            break;
        } else if current.has_subcommands()
            && names
                .iter()
                .all(|n| n.chars().all(|c| c.is_ascii_lowercase() || c == '-'))
        {
            return Err(format!(
                "no subcommand {word:?} of `{}`",
                current.get_name()
            ));
        } else {
            // A positional value or a placeholder (NAME, <shell>, key=value).
            words.next();
        }
    }
    for word in words {
        for flag in word
            .split(['|', '[', ']', '(', ')', '='])
            .filter(|w| w.starts_with('-') && w.len() > 1 && *w != "--")
        {
            let known = current.get_arguments().any(|a| {
                a.get_long().is_some_and(|l| flag == format!("--{l}"))
                    || a.get_short().is_some_and(|s| flag == format!("-{s}"))
            }) || ["--help", "-h", "--version"].contains(&flag);
            if !known {
                return Err(format!("`{}` has no flag {flag}", current.get_name()));
            }
        }
    }
    Ok(())
}

#[test]
fn every_documented_command_line_parses() {
    let mut problems = Vec::new();
    let mut checked = 0;
    for (name, text) in documents() {
        let commands = code_lines(&text)
            .into_iter()
            .flat_map(|(n, line, aliases)| {
                // `a; b` and `a && b` are two commands (a comment ends them all).
                let line = line.split(" #").next().unwrap_or_default().to_string();
                line.split(';')
                    .flat_map(|c| c.split("&&"))
                    .map(|c| (n, c.to_string(), aliases.clone()))
                    .collect::<Vec<_>>()
            });
        for (line_no, line, aliases) in commands {
            let Some((env, args)) = invocation_with(&line, &aliases) else {
                continue;
            };
            checked += 1;
            if let Err(e) = parse(&env, args) {
                let kind = e.kind();
                // `--help` and `--version` "fail" by printing; that is a valid line.
                if !matches!(
                    kind,
                    clap::error::ErrorKind::DisplayHelp
                        | clap::error::ErrorKind::DisplayVersion
                        | clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
                ) {
                    let first = e.to_string().lines().next().unwrap_or_default().to_string();
                    problems.push(format!("{name}:{line_no}: `{}`: {first}", line.trim()));
                }
            }
        }
        for (line_no, span) in inline_commands(&text) {
            checked += 1;
            if let Err(e) = check_synopsis(&span) {
                problems.push(format!("{name}:{line_no}: `{span}`: {e}"));
            }
        }
    }
    assert!(checked > 40, "only {checked} command lines found");
    assert!(problems.is_empty(), "{problems:#?}");
}

/// Every agent flag (and its environment variable) is in docs/install.md's table.
#[test]
fn the_install_guide_lists_every_agent_flag() {
    let text = std::fs::read_to_string(root().join("docs/install.md")).expect("install.md");
    let command = Cli::command();
    let agent = command.find_subcommand("agent").expect("agent");
    let missing: Vec<String> = agent
        .get_arguments()
        .filter(|a| !a.is_hide_set() && a.get_long().is_some_and(|l| l != "help"))
        .filter_map(|a| {
            let flag = format!("`--{}`", a.get_long()?);
            let env = a.get_env().map(|e| format!("`{}`", e.to_string_lossy()));
            let row = text
                .lines()
                .find(|l| l.starts_with('|') && l.contains(&flag));
            match (row, env) {
                (None, _) => Some(flag),
                (Some(row), Some(env)) if !row.contains(&env) => Some(format!("{flag} {env}")),
                _ => None,
            }
        })
        .collect();
    assert!(missing.is_empty(), "docs/install.md misses {missing:?}");
}

/// docs/cli.md's command table has a row for every command `wiremesh --help` lists.
#[test]
fn the_cli_reference_lists_every_command() {
    let text = std::fs::read_to_string(root().join("docs/cli.md")).expect("cli.md");
    let missing: Vec<String> = Cli::command()
        .get_subcommands()
        .filter(|c| !c.is_hide_set())
        .map(|c| c.get_name().to_string())
        .filter(|name| {
            !text
                .lines()
                .any(|l| l.starts_with("| `") && l.contains(&format!("`{name}")))
        })
        .collect();
    assert!(missing.is_empty(), "docs/cli.md misses {missing:?}");
}

/// One environment naming scheme: a flag's variable is `WIREMESH_` and the flag's long name
/// in upper snake case, `WIREMESH_LAB_...` for the lab's own flags.
#[test]
fn environment_variables_follow_one_scheme() {
    fn walk(command: &clap::Command, path: &str, problems: &mut Vec<String>) {
        for arg in command.get_arguments() {
            let (Some(env), Some(long)) = (arg.get_env(), arg.get_long()) else {
                continue;
            };
            let scope = if path.starts_with("wiremesh lab") && long != "log-format" {
                "LAB_"
            } else {
                ""
            };
            let want = format!("WIREMESH_{scope}{}", long.to_uppercase().replace('-', "_"));
            if env.to_string_lossy() != want {
                problems.push(format!(
                    "{path} --{long}: {} (want {want})",
                    env.to_string_lossy()
                ));
            }
        }
        for sub in command.get_subcommands() {
            walk(sub, &format!("{path} {}", sub.get_name()), problems);
        }
    }
    let mut problems = Vec::new();
    walk(&Cli::command(), "wiremesh", &mut problems);
    assert!(problems.is_empty(), "{problems:#?}");
}

/// The binary's own `--help` examples are real commands too.
#[test]
fn help_examples_parse() {
    fn walk(command: &clap::Command, problems: &mut Vec<String>) {
        let text = command
            .get_after_help()
            .map(|h| h.to_string())
            .unwrap_or_default();
        for line in text.lines() {
            let Some((env, args)) = invocation(line) else {
                continue;
            };
            if let Err(e) = parse(&env, args)
                && !matches!(e.kind(), clap::error::ErrorKind::DisplayHelp)
            {
                let first = e.to_string().lines().next().unwrap_or_default().to_string();
                problems.push(format!("`{}`: {first}", line.trim()));
            }
        }
        for sub in command.get_subcommands() {
            walk(sub, problems);
        }
    }
    let mut problems = Vec::new();
    walk(&Cli::command(), &mut problems);
    assert!(problems.is_empty(), "{problems:#?}");
}

#[test]
fn the_line_scanner_finds_invocations() {
    let words = |v: &[&str]| v.iter().map(|w| w.to_string()).collect::<Vec<_>>();
    assert_eq!(
        invocation("sudo WIREMESH_LOG=debug wiremesh status -o json | jq ."),
        Some((
            vec![("WIREMESH_LOG".into(), "debug".into())],
            words(&["status", "-o", "json"])
        ))
    );
    assert_eq!(
        invocation("kubectl -n wiremesh exec ds/wiremesh -- wiremesh status --cluster  # all"),
        Some((vec![], words(&["status", "--cluster"])))
    );
    assert_eq!(
        invocation("wiremesh crds --dir crds/     (what CI compares)"),
        Some((vec![], words(&["crds", "--dir", "crds/"])))
    );
    assert_eq!(
        invocation("kubectl -n wiremesh logs daemonset/wiremesh"),
        None
    );
    assert_eq!(invocation("Run wiremesh now"), None);
    assert!(check_synopsis("wiremesh policy explain --iface IF [--bogus]").is_err());
    assert!(check_synopsis("wiremesh lab verify --count 1").is_ok());
    assert!(check_synopsis("wiremesh lab nonsense").is_err());
}

/// A YAML block that follows a link to a file in `examples/` shows that file (its comment lines
/// aside), so the docs cannot drift from the example the tests use.
#[test]
fn documented_examples_match_their_files() {
    let mut checked = 0;
    let mut problems = Vec::new();
    for (name, text) in documents() {
        let mut rest = text.as_str();
        while let Some(at) = rest.find("](../examples/") {
            let after = &rest[at + 2..];
            let Some(end) = after.find(')') else { break };
            let file = &after[3..end];
            rest = &after[end..];
            let Some(block) = rest
                .split_once("```yaml\n")
                .and_then(|(before, block)| (!before.contains("](")).then_some(block))
                .and_then(|block| block.split_once("\n```").map(|(b, _)| b))
            else {
                continue;
            };
            checked += 1;
            let example = std::fs::read_to_string(root().join(file)).expect("example file");
            let body: Vec<&str> = example.lines().filter(|l| !l.starts_with('#')).collect();
            if body.join("\n").trim() != block.trim() {
                problems.push(format!(
                    "{name}: the block after the link to {file} differs from it"
                ));
            }
        }
    }
    assert!(checked >= 1, "no linked example found");
    assert!(problems.is_empty(), "{problems:#?}");
}
