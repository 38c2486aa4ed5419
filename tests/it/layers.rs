//! The library's modules form layers: no module depends, directly or through
//! others, on a module that depends on it. Checked on the source: every
//! `crate::module` a top-level module names is an edge between top-level
//! modules, and every `super::sibling` or `crate::parent::sibling` is an
//! edge between the children of one module (a child using its parent's own
//! items is not a dependency on a sibling).

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

fn graphs() -> (Graph, BTreeMap<String, Graph>) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let crate_ref = regex::Regex::new(r"crate::([a-z_]+)(?:::([a-z_]+))?").expect("regex");
    let super_ref = regex::Regex::new(r"\bsuper::([a-z_]+)").expect("regex");
    let mut top = Graph::new();
    let mut within: BTreeMap<String, Graph> = BTreeMap::new();
    for file in files {
        let path = module_path(&src, &file);
        let Some(module) = path.first().filter(|m| *m != "lib" && *m != "main") else {
            continue;
        };
        let code = code(&file);
        top.entry(module.clone()).or_default();
        for c in crate_ref.captures_iter(&code) {
            let target = c[1].to_string();
            if target != *module {
                top.entry(module.clone()).or_default().insert(target);
            } else if let (Some(child), Some(sibling)) = (path.get(1), c.get(2)) {
                // crate::parent::sibling from parent/child.rs
                if sibling.as_str() != child {
                    within
                        .entry(module.clone())
                        .or_default()
                        .entry(child.clone())
                        .or_default()
                        .insert(sibling.as_str().to_string());
                }
            }
        }
        // super::sibling from parent/child.rs (one level deep).
        if path.len() == 2 {
            let child = &path[1];
            let graph = within.entry(module.clone()).or_default();
            graph.entry(child.clone()).or_default();
            for c in super_ref.captures_iter(&code) {
                let sibling = c[1].to_string();
                let is_child_module = src.join(module).join(format!("{sibling}.rs")).exists()
                    || src.join(module).join(&sibling).is_dir();
                if sibling != *child && is_child_module {
                    graph.entry(child.clone()).or_default().insert(sibling);
                }
            }
        }
    }
    (top, within)
}

#[test]
fn no_module_depends_on_a_module_that_depends_on_it() {
    let (top, within) = graphs();
    assert!(top.len() > 10, "the scan found the modules: {top:?}");
    if let Some(found) = cycle(&top) {
        panic!("a dependency cycle between modules: {}", found.join(" -> "));
    }
    for (parent, graph) in &within {
        if let Some(found) = cycle(graph) {
            panic!("a dependency cycle inside {parent}: {}", found.join(" -> "));
        }
    }
    // The layering the README draws, spot-checked.
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
