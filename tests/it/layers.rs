//! The library's modules form layers: no module depends, directly or through
//! others, on a module that depends on it, at any depth. Checked on the
//! source: every module path a file names (`crate::…`, `super::…`,
//! `self::…`, grouped or not) is an edge between the two modules' ancestors
//! that share a parent (a child using its parent's own items is not a
//! dependency on a sibling).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

type Graph = BTreeMap<String, BTreeSet<String>>;

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The code of a file without comments (doc links name modules too, but
/// they are no dependency) and without its `#[cfg(test)]` module.
fn code(path: &Path) -> String {
    let text = std::fs::read_to_string(path).expect("read");
    let text = text
        .split("#[cfg(test)]\nmod tests")
        .next()
        .unwrap_or_default();
    text.lines()
        .map(|l| l.split("//").next().unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n")
}

/// `a -> b` edges of a path of module names (`["app", "mod"]` is app).
fn module_path(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).expect("under src");
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| {
            c.as_os_str()
                .to_string_lossy()
                .trim_end_matches(".rs")
                .to_string()
        })
        .collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    parts
}

/// A cycle in `graph`, if it has one.
fn cycle(graph: &Graph) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &Graph,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|n| n == node) {
            let mut found = path[at..].to_vec();
            found.push(node.to_string());
            return Some(found);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(found) = visit(next, graph, path, done) {
                return Some(found);
            }
        }
        path.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|node| visit(node, graph, &mut Vec::new(), &mut done))
}

/// Whether `path` (module names from the crate root) is a module of `src`.
fn is_module(src: &Path, path: &[String]) -> bool {
    let Some((last, parents)) = path.split_last() else {
        return true;
    };
    let dir = parents.iter().fold(src.to_path_buf(), |d, p| d.join(p));
    dir.join(format!("{last}.rs")).exists() || dir.join(last).join("mod.rs").exists()
}

/// The modules a file's code names: `crate::a::b::…`, `super::…` (any
/// number of them), `self::…`, each also in the `{x, y::z}` group form,
/// resolved to module paths from the crate root (the longest prefix of the
/// named path that is a module).
fn references(src: &Path, module: &[String], code: &str) -> Vec<Vec<String>> {
    let path_ref = regex::Regex::new(
        r"\b(crate|self|super(?:::super)*)((?:::[a-z_][a-z0-9_]*)*)(?:::\{([^}]*)\})?",
    )
    .expect("regex");
    let mut found = Vec::new();
    for c in path_ref.captures_iter(code) {
        let mut base: Vec<String> = match &c[1] {
            "crate" => Vec::new(),
            "self" => module.to_vec(),
            supers => {
                let up = supers.matches("super").count();
                module[..module.len().saturating_sub(up)].to_vec()
            }
        };
        base.extend(
            c[2].split("::")
                .filter(|s| !s.is_empty())
                .map(str::to_string),
        );
        let mut tails: Vec<Vec<String>> = vec![Vec::new()];
        if let Some(group) = c.get(3) {
            tails = group
                .as_str()
                .split(',')
                .map(|item| {
                    item.trim()
                        .split("::")
                        .filter(|s| !s.is_empty())
                        .map(str::to_string)
                        .collect()
                })
                .collect();
        }
        for tail in tails {
            let mut full = base.clone();
            full.extend(tail);
            while !full.is_empty() && !is_module(src, &full) {
                full.pop();
            }
            found.push(full);
        }
    }
    found
}

/// The graphs of dependencies between sibling modules, by parent ("" for
/// the crate's top level): a module that names another, or anything inside
/// it, depends on it; the edge is between their ancestors that are
/// children of their closest common parent. A module naming its own
/// ancestors' items, or its descendants, adds no edge.
fn graphs() -> BTreeMap<String, Graph> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut graphs: BTreeMap<String, Graph> = BTreeMap::new();
    for file in files {
        let module = module_path(&src, &file);
        if module.first().is_some_and(|m| m == "lib" || m == "main") {
            continue;
        }
        for (depth, name) in module.iter().enumerate() {
            graphs
                .entry(module[..depth].join("::"))
                .or_default()
                .entry(name.clone())
                .or_default();
        }
        for target in references(&src, &module, &code(&file)) {
            let common = module
                .iter()
                .zip(&target)
                .take_while(|(a, b)| a == b)
                .count();
            if common < module.len() && common < target.len() {
                graphs
                    .entry(module[..common].join("::"))
                    .or_default()
                    .entry(module[common].clone())
                    .or_default()
                    .insert(target[common].clone());
            }
        }
    }
    graphs
}

#[test]
fn no_module_depends_on_a_module_that_depends_on_it() {
    let graphs = graphs();
    let top = graphs[""].clone();
    assert!(top.len() > 10, "the scan found the modules: {top:?}");
    assert!(
        graphs.contains_key("registry::client"),
        "nested modules are checked too: {:?}",
        graphs.keys().collect::<Vec<_>>()
    );
    for (parent, graph) in &graphs {
        if let Some(found) = cycle(graph) {
            panic!(
                "a dependency cycle inside {}: {}",
                if parent.is_empty() {
                    "the crate"
                } else {
                    parent
                },
                found.join(" -> ")
            );
        }
    }
    // The layering docs/development.md draws, spot-checked.
    let depends = |a: &str, b: &str| top.get(a).is_some_and(|d| d.contains(b));
    for (a, b) in [
        ("app", "server"),
        ("app", "admission"),
        ("cli", "app"),
        ("server", "admission"),
        ("admission", "cache"),
        ("cache", "registry"),
    ] {
        assert!(depends(a, b), "{a} uses {b}: {:?}", top.get(a));
    }
    for low in [
        "registry",
        "cache",
        "admission",
        "secrets",
        "registration",
        "server",
    ] {
        for high in ["cli", "app"] {
            assert!(!depends(low, high), "{low} must not use {high}");
        }
    }
}

#[test]
fn the_scan_reads_every_form_of_path_a_module_names() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let module = vec!["registry".to_string(), "client".into(), "token".into()];
    let code = "use super::response::{Attempt, classify};\nuse super::{RegistryClient, transport::Rung};\nuse crate::registry::error::RegistryError;\nuse super::super::tokens::X;\n";
    let found = references(&src, &module, code);
    for want in [
        "registry::client::response",
        "registry::client::transport",
        "registry::error",
        "registry::tokens",
    ] {
        assert!(
            found.iter().any(|f| f.join("::") == want),
            "{want} in {found:?}"
        );
    }
}

#[test]
fn the_check_finds_a_cycle_when_there_is_one() {
    let mut graph = Graph::new();
    graph.entry("a".into()).or_default().insert("b".into());
    graph.entry("b".into()).or_default().insert("c".into());
    assert_eq!(cycle(&graph), None);
    graph.entry("c".into()).or_default().insert("a".into());
    assert_eq!(
        cycle(&graph),
        Some(vec!["a".into(), "b".into(), "c".into(), "a".into()])
    );
}
