//! The architecture holds: no crate has an import circle between its modules, and the code
//! layout in `docs/architecture.md` names every source file there is (and none that is not).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use testkit::repo_root;

/// The workspace's crates, by folder.
const CRATES: [&str; 8] = [
    "crd",
    "etcd",
    "runtime",
    "agent",
    "controller",
    "ctl",
    "testkit",
    "bench",
];

/// Every `.rs` file under `dir`, sorted.
fn sources(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("read {}: {e}", d.display())) {
            let path = entry.expect("directory entry").path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// The module a library file holds (`status::liveness` for `src/status/liveness.rs`, `` for
/// `src/lib.rs`); `None` for binaries, which are crates of their own.
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).ok()?;
    let parts: Vec<String> = rel
        .with_extension("")
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    match parts.as_slice() {
        [first, ..] if first == "bin" => None,
        [only] if only == "main" => None,
        [only] if only == "lib" => Some(String::new()),
        [dirs @ .., last] if last == "mod" => Some(dirs.join("::")),
        all => Some(all.join("::")),
    }
}

/// The paths after `crate::` in `line`, with `use crate::{a::B, c}` groups spread out.
fn crate_paths(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = line;
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            out.extend(group[..end].split(',').map(|p| p.trim().to_string()));
            rest = &group[end..];
        } else {
            let end = rest
                .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
                .unwrap_or(rest.len());
            out.push(rest[..end].trim_end_matches(':').to_string());
            rest = &rest[end..];
        }
    }
    out
}

/// Each module's imports of other modules of its crate. Items of the crate root (its shared
/// constants and the wiring of `lib.rs`) are left out: the root holds every module.
fn imports(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let files: Vec<(String, PathBuf)> = sources(src)
        .into_iter()
        .filter_map(|f| Some((module_of(src, &f)?, f)))
        .collect();
    let modules: BTreeSet<&str> = files.iter().map(|(m, _)| m.as_str()).collect();
    let mut graph = BTreeMap::new();
    for (module, file) in &files {
        let text = std::fs::read_to_string(file).expect("source file");
        let mut uses = BTreeSet::new();
        for line in text.lines() {
            let code = line.trim_start();
            if code.starts_with("//") {
                continue;
            }
            for path in crate_paths(code) {
                // The longest prefix of the path that is a module.
                let segments: Vec<&str> = path.split("::").collect();
                let target = (1..=segments.len())
                    .rev()
                    .map(|n| segments[..n].join("::"))
                    .find(|m| modules.contains(m.as_str()));
                if let Some(target) = target
                    && &target != module
                    && !module.starts_with(&format!("{target}::"))
                {
                    uses.insert(target);
                }
            }
        }
        graph.insert(module.clone(), uses);
    }
    graph
}

/// A circle of imports, if the graph has one.
fn circle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|p| p == node) {
            let mut c = path[at..].to_vec();
            c.push(node.to_string());
            return Some(c);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(c) = visit(next, graph, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|m| visit(m, graph, &mut Vec::new(), &mut done))
}

#[test]
fn no_crate_has_an_import_circle() {
    for krate in CRATES {
        let graph = imports(&repo_root().join(krate).join("src"));
        assert!(
            graph.len() > 1 || krate != "controller",
            "{krate}: modules found"
        );
        if let Some(c) = circle(&graph) {
            panic!(
                "{krate}: modules import each other in a circle: {}",
                c.join(" -> ")
            );
        }
    }
}

#[test]
fn the_circle_check_finds_a_circle() {
    let graph = BTreeMap::from([
        ("a".to_string(), BTreeSet::from(["b".to_string()])),
        ("b".to_string(), BTreeSet::from(["c".to_string()])),
        ("c".to_string(), BTreeSet::from(["a".to_string()])),
        ("d".to_string(), BTreeSet::new()),
    ]);
    assert_eq!(circle(&graph).map(|c| c.len()), Some(4));
    assert_eq!(
        crate_paths("use crate::{error::Error, status::record::Verdict};"),
        ["error::Error", "status::record::Verdict"]
    );
    assert_eq!(
        crate_paths("let x = crate::status::Now::read();"),
        ["status::Now::read"]
    );
}

#[test]
fn the_code_layout_names_every_source_file() {
    let doc = std::fs::read_to_string(repo_root().join("docs/architecture.md"))
        .expect("docs/architecture.md");
    let layout = doc
        .split("\n## Code layout\n")
        .nth(1)
        .expect("docs/architecture.md has a \"## Code layout\" section");
    let layout = layout.split("\n## ").next().unwrap_or(layout);
    let named: BTreeSet<&str> = layout
        .split('`')
        .skip(1)
        .step_by(2)
        .filter(|s| s.ends_with(".rs"))
        .collect();
    let root = repo_root();
    let mut missing = Vec::new();
    for krate in CRATES {
        for file in sources(&root.join(krate).join("src")) {
            let rel = file.strip_prefix(&root).expect("inside the repository");
            let rel = rel.to_string_lossy().into_owned();
            if !named.contains(rel.as_str()) {
                missing.push(rel);
            }
        }
    }
    assert!(
        missing.is_empty(),
        "docs/architecture.md's code layout does not name: {missing:?}"
    );
    let stale: Vec<&&str> = named.iter().filter(|p| !root.join(p).is_file()).collect();
    assert!(
        stale.is_empty(),
        "docs/architecture.md's code layout names files that do not exist: {stale:?}"
    );
}
