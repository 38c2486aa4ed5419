//! The configuration reference (docs/configuration.md), made from the
//! command-line definition itself, so that the page and `--help` cannot
//! disagree: `cargo run --example config_reference > docs/configuration.md`
//! writes it, and a test compares the committed page with this.

use std::fmt::Write as _;

use clap::CommandFactory as _;

use super::Cli;

/// One line of text: help paragraphs joined, table pipes escaped, and
/// angle brackets outside code spans escaped (Markdown would take
/// `<prefix>` for a tag).
fn one_line(text: &str) -> String {
    let joined = text.split_whitespace().collect::<Vec<_>>().join(" ");
    joined
        .split('`')
        .enumerate()
        .map(|(i, part)| {
            let part = part.replace('|', "\\|");
            if i % 2 == 0 {
                part.replace('<', "&lt;").replace('>', "&gt;")
            } else {
                part
            }
        })
        .collect::<Vec<_>>()
        .join("`")
}

fn flag(arg: &clap::Arg) -> String {
    match arg.get_long() {
        Some(long) => {
            let mut text = format!("`--{long}`");
            if let Some(value) = arg
                .get_value_names()
                .and_then(|v| v.first())
                .filter(|_| arg.get_action().takes_values())
            {
                text = format!("`--{long} {value}`");
            }
            let aliases: Vec<String> = arg
                .get_visible_aliases()
                .into_iter()
                .flatten()
                .map(|a| format!("`--{a}`"))
                .collect();
            if !aliases.is_empty() {
                text.push_str(&format!(" (alias {})", aliases.join(", ")));
            }
            text
        }
        None => format!(
            "`{}` (positional)",
            arg.get_value_names()
                .and_then(|v| v.first())
                .map_or_else(|| arg.get_id().to_string(), ToString::to_string)
        ),
    }
}

fn table(out: &mut String, args: &[&clap::Arg]) {
    out.push_str("| flag | environment | default | what it does |\n|---|---|---|---|\n");
    for arg in args {
        let env = arg
            .get_env()
            .map(|e| format!("`{}`", e.to_string_lossy()))
            .unwrap_or_else(|| "–".into());
        let defaults: Vec<String> = arg
            .get_default_values()
            .iter()
            .map(|d| d.to_string_lossy().into_owned())
            .collect();
        let default = if defaults.is_empty() {
            "–".to_string()
        } else {
            format!("`{}`", defaults.join(","))
        };
        let help = arg
            .get_long_help()
            .or_else(|| arg.get_help())
            .map(|h| one_line(&h.to_string()))
            .unwrap_or_default();
        let _ = writeln!(out, "| {} | {env} | {default} | {help} |", flag(arg));
    }
    out.push('\n');
}

/// The Markdown page.
pub fn markdown() -> String {
    let cli = Cli::command();
    let mut out = String::from(
        "# Configuration reference\n\n\
         For everyone who sets a flag. Every flag of every subcommand, its \
         environment variable and its default, as `--help` says them: this \
         page is made from the command-line definition \
         (`cargo run --example config_reference > docs/configuration.md`), \
         and a test fails when the two disagree.\n\n\
         A flag set in the environment takes the variable's value; lists \
         (`--insecure-registry`, `--prewarm-images`, …) take commas there. \
         Booleans accept `--flag`, `--flag=true|false|1|0|yes|no`. \
         What the flags mean together: [install](install.md), \
         [failure modes](failure-modes.md), [operations](operations.md).\n\n",
    );
    let global: Vec<&clap::Arg> = cli
        .get_arguments()
        .filter(|a| a.is_global_set() || a.get_long().is_some())
        .filter(|a| !matches!(a.get_id().as_str(), "help" | "version"))
        .collect();
    out.push_str("## Every subcommand\n\n");
    table(&mut out, &global);
    for sub in cli.get_subcommands() {
        let _ = writeln!(out, "## `fn-image-resolver {}`\n", sub.get_name());
        if let Some(about) = sub.get_long_about().or_else(|| sub.get_about()) {
            let _ = writeln!(out, "{}\n", one_line(&about.to_string()));
        }
        let args: Vec<&clap::Arg> = sub
            .get_arguments()
            .filter(|a| !matches!(a.get_id().as_str(), "help" | "version"))
            .filter(|a| !global.iter().any(|g| g.get_id() == a.get_id()))
            .collect();
        if args.is_empty() {
            continue;
        }
        // Grouped as --help groups them.
        let mut headings: Vec<Option<&str>> = Vec::new();
        for arg in &args {
            if !headings.contains(&arg.get_help_heading()) {
                headings.push(arg.get_help_heading());
            }
        }
        for heading in headings {
            let group: Vec<&clap::Arg> = args
                .iter()
                .copied()
                .filter(|a| a.get_help_heading() == heading)
                .collect();
            if let Some(heading) = heading {
                let _ = writeln!(out, "### {heading}\n");
            }
            table(&mut out, &group);
        }
    }
    out.trim_end().to_string() + "\n"
}
