//! The documentation says what the code does: every link and anchor leads
//! somewhere, every flag, environment variable, metric, file and name it
//! quotes exists. A renamed flag or a moved file fails here, not in an
//! operator's terminal.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use clap::CommandFactory as _;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// What a reader reads, relative to the repository root.
fn documents() -> Vec<PathBuf> {
    let mut docs: Vec<PathBuf> = [
        "README.md",
        "CONTRIBUTING.md",
        "SECURITY.md",
        "CHANGELOG.md",
        "certs/README.md",
    ]
    .iter()
    .map(PathBuf::from)
    .collect();
    let mut pages: Vec<PathBuf> = std::fs::read_dir(Path::new(ROOT).join("docs"))
        .expect("docs/")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .map(|p| p.strip_prefix(ROOT).expect("under root").to_path_buf())
        .collect();
    pages.sort();
    docs.extend(pages);
    docs
}

fn read(doc: &Path) -> String {
    std::fs::read_to_string(Path::new(ROOT).join(doc))
        .unwrap_or_else(|e| panic!("{}: {e}", doc.display()))
}

/// Runs `check` over every document and fails with every complaint at once.
fn check_all(what: &str, check: impl Fn(&Path, &str) -> Vec<String>) {
    let mut problems = Vec::new();
    for doc in documents() {
        let text = read(&doc);
        for p in check(&doc, &text) {
            problems.push(format!("{}: {p}", doc.display()));
        }
    }
    assert!(problems.is_empty(), "{what}:\n  {}", problems.join("\n  "));
}

/// Lines outside fenced code blocks, with their line numbers.
fn prose_lines(text: &str) -> Vec<(usize, &str)> {
    let mut fenced = false;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if !fenced {
            out.push((i + 1, line));
        }
    }
    out
}

/// The anchor GitHub gives a heading: lower case, punctuation dropped,
/// spaces made hyphens, `-1`, `-2`… for repeats.
fn anchors(text: &str) -> BTreeSet<String> {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut out = BTreeSet::new();
    for (_, line) in prose_lines(text) {
        let Some(title) = line.strip_prefix('#') else {
            continue;
        };
        let title = title.trim_start_matches('#').trim();
        let slug: String = title
            .to_lowercase()
            .chars()
            .filter(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_'))
            .map(|c| if c == ' ' { '-' } else { c })
            .collect();
        let n = seen.entry(slug.clone()).or_insert(0);
        out.insert(if *n == 0 {
            slug.clone()
        } else {
            format!("{slug}-{n}")
        });
        *n += 1;
    }
    out
}

/// `[text](target)` link targets in prose.
fn link_targets(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    for (n, line) in prose_lines(text) {
        let mut rest = line;
        while let Some(i) = rest.find("](") {
            rest = &rest[i + 2..];
            let end = rest.find(')').unwrap_or(rest.len());
            out.push((n, rest[..end].to_string()));
            rest = &rest[end..];
        }
    }
    out
}

#[test]
fn every_relative_link_and_anchor_leads_somewhere() {
    check_all("broken links", |doc, text| {
        let dir = doc.parent().unwrap_or(Path::new(""));
        let mut problems = Vec::new();
        for (n, target) in link_targets(text) {
            if target.starts_with("http://")
                || target.starts_with("https://")
                || target.starts_with("mailto:")
            {
                continue;
            }
            let (path, anchor) = match target.split_once('#') {
                Some((p, a)) => (p, Some(a)),
                None => (target.as_str(), None),
            };
            let file = if path.is_empty() {
                doc.to_path_buf()
            } else {
                dir.join(path)
            };
            let full = Path::new(ROOT).join(&file);
            if !full.exists() {
                problems.push(format!("line {n}: {target}: no such file"));
                continue;
            }
            if let Some(anchor) = anchor {
                let target_text = std::fs::read_to_string(&full).unwrap_or_default();
                if !anchors(&target_text).contains(anchor) {
                    problems.push(format!("line {n}: {target}: no such heading"));
                }
            }
        }
        problems
    });
}

/// Every long flag of every subcommand, and every environment variable.
fn our_flags_and_variables() -> (BTreeSet<String>, BTreeSet<String>) {
    fn walk(cmd: &clap::Command, flags: &mut BTreeSet<String>, vars: &mut BTreeSet<String>) {
        for arg in cmd.get_arguments() {
            if let Some(long) = arg.get_long() {
                flags.insert(long.to_string());
            }
            if let Some(env) = arg.get_env() {
                vars.insert(env.to_string_lossy().into_owned());
            }
        }
        for sub in cmd.get_subcommands() {
            walk(sub, flags, vars);
        }
    }
    let mut cmd = fn_image_resolver::cli::Cli::command();
    cmd.build();
    let (mut flags, mut vars) = (BTreeSet::new(), BTreeSet::new());
    walk(&cmd, &mut flags, &mut vars);
    (flags, vars)
}

/// Flags the documents quote that belong to other programs, and whose.
/// A flag of one of our scripts must be in that script.
const OTHER_PROGRAMS_FLAGS: &[(&str, &str)] = &[
    ("locked", "cargo"),
    ("example", "cargo"),
    ("flag", "any flag of ours, as a placeholder"),
    ("all-targets", "cargo"),
    ("bench", "cargo"),
    ("cascade", "kubectl"),
    ("dry-run", "kubectl"),
    ("from-file", "kubectl"),
    ("cert", "kubectl create secret tls"),
    ("key", "kubectl create secret tls"),
    ("port", "Porch's wrapper-server"),
    ("max-request-body-size", "Porch's wrapper-server"),
    ("fetch", "scripts/build-image.sh"),
    ("insecure", "scripts/build-image.sh"),
];

/// `--name` tokens: after a non-word character, a lower-case letter first.
fn flags_in(line: &str) -> Vec<String> {
    let bytes = line.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(off) = line[i..].find("--") {
        let start = i + off;
        let name_start = start + 2;
        let before_ok =
            start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'-');
        let name_end = line[name_start..]
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'))
            .map_or(line.len(), |e| name_start + e);
        let name = line[name_start..name_end].trim_end_matches('-');
        if before_ok && name.starts_with(|c: char| c.is_ascii_lowercase()) {
            out.push(name.to_string());
        }
        i = name_end.max(name_start);
    }
    out
}

#[test]
fn every_quoted_flag_and_variable_exists() {
    let (flags, vars) = our_flags_and_variables();
    assert!(flags.contains("cache-max-bytes") && vars.contains("FN_IMAGE_RESOLVER_LISTEN"));
    for (flag, owner) in OTHER_PROGRAMS_FLAGS {
        assert!(
            !flags.contains(*flag),
            "--{flag} is ours now: drop it from OTHER_PROGRAMS_FLAGS"
        );
        if owner.ends_with(".sh") {
            let script = std::fs::read_to_string(Path::new(ROOT).join(owner)).expect(owner);
            assert!(
                script.contains(&format!("--{flag}")),
                "{owner} has no --{flag} any more"
            );
        }
    }
    check_all("flags or variables that do not exist", |_, text| {
        let mut problems = Vec::new();
        for (n, line) in text.lines().enumerate() {
            for flag in flags_in(line) {
                let other = OTHER_PROGRAMS_FLAGS.iter().any(|(f, _)| *f == flag);
                if !flags.contains(&flag) && !other {
                    problems.push(format!("line {}: --{flag}", n + 1));
                }
            }
            let variable = |c: char| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_';
            for var in tokens(line, "FN_IMAGE_RESOLVER_", variable) {
                if !vars.contains(var) {
                    problems.push(format!("line {}: {var}", n + 1));
                }
            }
        }
        problems
    });
}

/// Top-level directories whose paths the documents quote from the root.
const REPO_DIRS: &[&str] = &[
    ".ci/",
    "benches/",
    "certs/",
    "deploy/",
    "docs/",
    "examples/",
    "fuzz/",
    "scripts/",
    "src/",
    "tests/",
    "webhook-config/",
];

/// Paths that only exist once something has run.
const MADE_BY_RUNNING: &[&str] = &["certs/out", "fuzz/corpus"];

/// Repository paths quoted as text (not link targets, which have their own
/// test): a repository directory first, after a space, a backtick, a quote
/// or `=`, at the start of a line.
fn repo_paths_in(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (i, _) in line.char_indices() {
        let before = line[..i].chars().next_back();
        if !before.is_none_or(|c| matches!(c, ' ' | '\t' | '`' | '"' | '\'' | '=')) {
            continue;
        }
        let rest = &line[i..];
        if !REPO_DIRS.iter().any(|d| rest.starts_with(d)) {
            continue;
        }
        let end = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '/' | '-')))
            .unwrap_or(rest.len());
        if rest[end..].starts_with(['*', '<', '{', '…']) {
            continue; // a pattern, not a path
        }
        out.push(rest[..end].trim_end_matches(['.', '/']).to_string());
    }
    out
}

#[test]
fn every_quoted_repository_path_exists() {
    check_all("paths that do not exist", |_, text| {
        let mut problems = Vec::new();
        for (n, line) in text.lines().enumerate() {
            for path in repo_paths_in(line) {
                if MADE_BY_RUNNING.iter().any(|m| path.starts_with(m)) {
                    continue;
                }
                if !Path::new(ROOT).join(&path).exists() {
                    problems.push(format!("line {}: {path}", n + 1));
                }
            }
        }
        problems
    });
}

/// Every metric the service exports, with the suffixes Prometheus shows.
fn exported_metric_names() -> BTreeSet<String> {
    let text = crate::monitoring::every_family_once().encode();
    let mut names = BTreeSet::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let mut parts = rest.split_whitespace();
        let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
            continue;
        };
        let suffixes: &[&str] = match kind {
            "counter" => &["_total"],
            "histogram" => &["_bucket", "_sum", "_count"],
            _ => &[""],
        };
        names.insert(name.to_string());
        for s in suffixes {
            names.insert(format!("{name}{s}"));
        }
    }
    names
}

#[test]
fn every_quoted_metric_is_exported() {
    let exported = exported_metric_names();
    // Every family registered is in the text, or a quoted one could be
    // missed for never having been used in this test.
    let source =
        std::fs::read_to_string(Path::new(ROOT).join("src/metrics.rs")).expect("src/metrics.rs");
    let registered = source.matches(".register(").count();
    let types = exported
        .iter()
        .filter(|n| {
            !n.ends_with("_total")
                && !n.ends_with("_bucket")
                && !n.ends_with("_sum")
                && !n.ends_with("_count")
        })
        .count();
    assert!(
        types >= registered,
        "{registered} families registered, {types} exported: every_family_once misses some"
    );
    check_all("metrics not exported", |_, text| {
        let name = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_';
        tokens(text, "fn_image_resolver_", name)
            .into_iter()
            .filter(|m| *m != "fn_image_resolver" && !exported.contains(*m))
            .map(str::to_string)
            .collect()
    });
}

/// docs/operations.md lists every metric, without the prefix, and nothing
/// else.
#[test]
fn the_metrics_table_lists_every_family() {
    let text = read(Path::new("docs/operations.md"));
    let section = text
        .split("\n## Metrics\n")
        .nth(1)
        .and_then(|s| s.split("\n## ").next())
        .expect("a Metrics section");
    let mut listed = BTreeSet::new();
    for row in section.lines().filter(|l| l.starts_with("| `")) {
        let first = row.split('|').nth(1).expect("a first cell");
        for quoted in first.split('`').skip(1).step_by(2) {
            let name = quoted.split('{').next().unwrap_or(quoted);
            listed.insert(format!("fn_image_resolver_{name}"));
        }
    }
    let exported = exported_metric_names();
    let unknown: Vec<_> = listed.iter().filter(|m| !exported.contains(*m)).collect();
    assert!(unknown.is_empty(), "listed, not exported: {unknown:?}");
    // A family is listed when one of its names is.
    let text = crate::monitoring::every_family_once().encode();
    let families: BTreeSet<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .collect();
    let unlisted: Vec<_> = families
        .iter()
        .filter(|f| {
            ["", "_total", "_bucket", "_sum", "_count"]
                .iter()
                .all(|suffix| !listed.contains(&format!("{f}{suffix}")))
        })
        .collect();
    assert!(
        unlisted.is_empty(),
        "exported, not in docs/operations.md: {unlisted:?}"
    );
}

/// Names of ours the documents quote (annotations, Secrets, the Service,
/// the webhook) are the names the code and manifests use.
#[test]
fn every_quoted_name_of_ours_is_used() {
    let mut corpus = String::new();
    for dir in [
        "src",
        "deploy",
        "webhook-config",
        "scripts",
        "tests",
        "certs",
    ] {
        gather(&Path::new(ROOT).join(dir), &mut corpus);
    }
    // What a reader makes themselves: the directory `kpt pkg get` writes.
    let made_by_reader = ["fn-image-resolver/deployment.yaml"];
    check_all("names nothing uses", |_, text| {
        let name = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '/' | '-');
        tokens(text, "fn-image-resolver", name)
            .into_iter()
            .filter(|t| {
                *t != "fn-image-resolver" && !made_by_reader.contains(t) && !corpus.contains(*t)
            })
            .map(str::to_string)
            .collect()
    });
}

/// Each place `prefix` starts a run of `allowed` characters: the run, less
/// the punctuation that ends a sentence or a prefix.
fn tokens<'a>(text: &'a str, prefix: &str, allowed: impl Fn(char) -> bool) -> Vec<&'a str> {
    text.match_indices(prefix)
        .map(|(i, _)| {
            let run = &text[i..];
            let end = run.find(|c: char| !allowed(c)).unwrap_or(run.len());
            run[..end].trim_end_matches(['.', '/', '-', '_'])
        })
        .collect()
}

fn gather(path: &Path, into: &mut String) {
    if path.is_dir() {
        let mut entries: Vec<_> = std::fs::read_dir(path)
            .expect("dir")
            .map(|e| e.expect("entry").path())
            .collect();
        entries.sort();
        for entry in entries {
            // The test's own lists would make every name "used".
            if !entry.ends_with("tests/it/docs.rs") {
                gather(&entry, into);
            }
        }
    } else if let Ok(text) = std::fs::read_to_string(path) {
        into.push_str(&text);
        into.push('\n');
    }
}

/// The namespaces (`-n X`, `--namespace X`, `namespace: X`) and ports
/// (`:N`, `port N`) the documents quote are the ones the code, the
/// manifests and the scripts use.
#[test]
fn every_quoted_namespace_and_port_is_ours() {
    let mut corpus = String::new();
    for dir in ["src", "deploy", "webhook-config", "scripts"] {
        gather(&Path::new(ROOT).join(dir), &mut corpus);
    }
    check_all("namespaces or ports nothing uses", |_, text| {
        let mut problems = Vec::new();
        for (n, line) in text.lines().enumerate() {
            for ns in namespaces_in(line) {
                if !corpus.contains(&format!("{ns}\n")) && !corpus.contains(&format!("\"{ns}\"")) {
                    problems.push(format!("line {}: namespace {ns}", n + 1));
                }
            }
            for port in ports_in(line) {
                if !contains_number(&corpus, &port) {
                    problems.push(format!("line {}: port {port}", n + 1));
                }
            }
        }
        problems
    });
}

fn namespaces_in(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    for marker in ["-n ", "--namespace ", "--namespace=", "namespace: "] {
        let mut rest = line;
        while let Some(i) = rest.find(marker) {
            let boundary =
                i == 0 || !rest[..i].ends_with(|c: char| c.is_ascii_alphanumeric() || c == '-');
            rest = &rest[i + marker.len()..];
            let ns: String = rest
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-')
                .collect();
            if boundary && ns.starts_with(|c: char| c.is_ascii_lowercase()) {
                out.push(ns);
            }
        }
    }
    out
}

/// `number` in `text`, not as part of a longer number.
fn contains_number(text: &str, number: &str) -> bool {
    text.match_indices(number).any(|(i, _)| {
        let before = text[..i].chars().next_back();
        let after = text[i + number.len()..].chars().next();
        !before.is_some_and(|c| c.is_ascii_digit()) && !after.is_some_and(|c| c.is_ascii_digit())
    })
}

fn ports_in(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    for marker in [":", "port "] {
        let mut rest = line;
        while let Some(i) = rest.find(marker) {
            rest = &rest[i + marker.len()..];
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            let after = rest[digits.len()..].chars().next();
            if (3..=5).contains(&digits.len()) && !after.is_some_and(|c| c.is_ascii_alphanumeric())
            {
                out.push(digits);
            }
        }
    }
    out
}

/// The image the documents tell an operator to replace is the one the
/// Deployment names.
#[test]
fn the_quoted_release_image_is_the_deployments() {
    let deployment = std::fs::read_to_string(Path::new(ROOT).join("deploy/deployment.yaml"))
        .expect("deploy/deployment.yaml");
    let image = deployment
        .lines()
        .find_map(|l| l.trim().strip_prefix("image: "))
        .expect("the Deployment's image")
        .trim()
        .to_string();
    let repository = image.split(':').next().expect("repository");
    check_all("release images that are not the Deployment's", |_, text| {
        let mut problems = Vec::new();
        let mut rest = text;
        while let Some(i) = rest.find(repository) {
            let quoted: String = rest[i..]
                .chars()
                .take_while(|c| !c.is_whitespace() && !matches!(c, '`' | '#' | '\'' | '"'))
                .collect();
            rest = &rest[i + repository.len()..];
            if quoted.starts_with(&format!("{repository}:")) && quoted != image {
                problems.push(format!("{quoted} (the Deployment has {image})"));
            }
        }
        problems
    });
}

/// The documents speak to operators and users: nothing from how the
/// project was planned.
#[test]
fn documents_do_not_point_at_planning_material() {
    check_all("planning references", |_, text| {
        let lower = text.to_lowercase();
        ["SPEC.md", "PORCH.md", "CRATES.md", "TESTING.md"]
            .iter()
            .filter(|w| text.contains(*w))
            .chain(
                ["../shared", "the seeds", "seeds'", "design document"]
                    .iter()
                    .filter(|w| lower.contains(*w)),
            )
            .map(|w| format!("mentions {w:?}"))
            .collect()
    });
}

/// The example function pod is one Porch would make: a Pod in the function
/// namespace, with the function label and the wrapper-server's arguments.
#[test]
fn the_example_function_pod_has_porchs_shape() {
    let text = std::fs::read_to_string(Path::new(ROOT).join("docs/examples/function-pod.yaml"))
        .expect("docs/examples/function-pod.yaml");
    let pod: k8s_openapi::api::core::v1::Pod =
        serde_saphyr::from_str(&text).expect("the example is a Pod");
    let meta = &pod.metadata;
    assert_eq!(meta.namespace.as_deref(), Some("porch-fn-system"));
    assert!(
        meta.labels
            .as_ref()
            .is_some_and(|l| l.contains_key("fn.kpt.dev/image")),
        "the function label"
    );
    let spec = pod.spec.expect("spec");
    let function = spec
        .containers
        .iter()
        .find(|c| c.name == "function")
        .expect("the function container");
    let args = function.args.clone().unwrap_or_default();
    assert!(
        args.iter().any(|a| a == "--"),
        "the wrapper-server's `--` before the entrypoint: {args:?}"
    );
    assert!(
        spec.init_containers
            .unwrap_or_default()
            .iter()
            .any(|c| c.name == "copy-wrapper-server"),
        "the wrapper-server copy"
    );
}

#[test]
fn the_checks_see_what_they_look_for() {
    assert_eq!(
        flags_in("run `serve --listen=:1` then --cache-max-bytes, not a--b or ---"),
        ["listen", "cache-max-bytes"]
    );
    assert_eq!(
        repo_paths_in("see `deploy/` and src/app/mod.rs. (../src/x) tests/*.rs"),
        ["deploy", "src/app/mod.rs"]
    );
    assert_eq!(
        namespaces_in("kubectl -n porch-system get x; kpt --namespace=a-b; my-namespace: c"),
        ["porch-system", "a-b"]
    );
    assert_eq!(
        ports_in("https://a:8443/x, port 9447, 10:3, :80a"),
        ["8443", "9447"]
    );
    let slugs = anchors("# Top\n## What `--flag` does?\n```\n# not a heading\n```\n## Top\n");
    assert_eq!(
        slugs.into_iter().collect::<Vec<_>>(),
        ["top", "top-1", "what---flag-does"]
    );
}

/// The README's first commands are the ones that are tested: the quickstart
/// (tests/it/quickstart.rs runs it) and the test command `.ci/run` runs.
#[test]
fn the_readmes_first_commands_are_the_tested_ones() {
    let readme = read(Path::new("README.md"));
    let block = readme
        .split("```sh\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("a sh block in the README");
    let commands: Vec<&str> = block
        .lines()
        .map(|l| l.split(" # ").next().unwrap_or(l).trim())
        .filter(|l| !l.is_empty())
        .collect();
    assert_eq!(
        commands,
        [
            "scripts/quickstart.sh",
            "scripts/install-test-deps.sh && cargo test --locked"
        ]
    );
    let ci = std::fs::read_to_string(Path::new(ROOT).join(".ci/run")).expect(".ci/run");
    let ci_lines: Vec<&str> = ci.lines().map(str::trim).collect();
    assert!(ci_lines.contains(&"scripts/install-test-deps.sh"));
    assert!(ci_lines.contains(&"cargo test --locked"));
}
