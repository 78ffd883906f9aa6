//! The module graph points one way: no module imports another that imports it back, and no
//! module imports a higher layer. The rule is read from the source (every `crate::`,
//! `super::` and `self::` path in `worker/**/*.rs`, test modules included), so a new import
//! that breaks it fails here with the offending edge named.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Layers from the top down; a module may import its own layer (without cycles) and below.
const LAYERS: &[&[&str]] = &[
    &["cli"],
    &["app"],
    &["ingest", "ops", "api", "web"],
    &["store", "pop3", "oauth", "telemetry"],
    &["model", "config", "secrets", "tls", "display", "retry"],
];

fn layer_of(top: &str) -> Option<usize> {
    LAYERS.iter().position(|layer| layer.contains(&top))
}

/// Module path of a source file: `worker/store/pilots.rs` → `["store", "pilots"]`.
fn module_path(root: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(root).unwrap().with_extension("");
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    if matches!(parts.last().map(String::as_str), Some("mod" | "lib")) {
        parts.pop();
    }
    parts
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            if path.file_name().is_some_and(|n| n == "lab") {
                continue; // its own package, built on top of this one
            }
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Strips `//` comments and string literals crudely enough for path scanning.
fn code_only(src: &str) -> String {
    src.lines()
        .map(|line| match line.find("//") {
            Some(i) => &line[..i],
            None => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every `crate::a::b`, `super::x`, `self::y` path in `src`, resolved against `me`.
fn imported_paths(me: &[String], src: &str) -> Vec<Vec<String>> {
    let bytes = src.as_bytes();
    let mut found = Vec::new();
    for kw in ["crate::", "super::", "self::"] {
        let mut from = 0;
        while let Some(i) = src[from..].find(kw) {
            let start = from + i;
            from = start + kw.len();
            if start > 0 && (bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_') {
                continue;
            }
            let tail: String = src[start..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == ':')
                .collect();
            let mut segs: Vec<&str> = tail.split("::").filter(|s| !s.is_empty()).collect();
            let head = segs.remove(0);
            let mut path: Vec<String> = match head {
                "crate" => Vec::new(),
                "self" => me.to_vec(),
                _ => me[..me.len().saturating_sub(1)].to_vec(),
            };
            while segs.first() == Some(&"super") {
                segs.remove(0);
                path.pop();
            }
            path.extend(segs.iter().map(|s| s.to_string()));
            found.push(path);
        }
    }
    found
}

struct Graph {
    edges: BTreeMap<String, BTreeSet<String>>,
}

fn build_graph(depth: usize) -> Graph {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("worker");
    let mut files = Vec::new();
    rust_files(&root, &mut files);
    let mut modules = BTreeMap::new();
    for file in &files {
        if file.ends_with("main.rs") && file.parent() == Some(root.as_path()) {
            continue; // the binary's entry point sits above everything
        }
        modules.insert(
            module_path(&root, file),
            std::fs::read_to_string(file).unwrap(),
        );
    }
    let known: BTreeSet<Vec<String>> = modules.keys().cloned().collect();
    let key = |p: &[String]| p.iter().take(depth).cloned().collect::<Vec<_>>().join("::");
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (me, src) in &modules {
        for mut target in imported_paths(me, &code_only(src)) {
            while !target.is_empty() && !known.contains(&target) {
                target.pop();
            }
            let (from, to) = (key(me), key(&target));
            let nested = |a: &str, b: &str| b.starts_with(&format!("{a}::"));
            if from.is_empty() || to.is_empty() || from == to || nested(&from, &to) {
                continue;
            }
            if nested(&to, &from) {
                continue; // a child naming its parent's items is the parent's own code
            }
            edges.entry(from).or_default().insert(to);
        }
    }
    Graph { edges }
}

/// Strongly connected components with more than one member (Tarjan).
fn cycles(graph: &Graph) -> Vec<Vec<String>> {
    struct State<'a> {
        graph: &'a Graph,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        next: usize,
        found: Vec<Vec<String>>,
    }
    fn visit<'a>(s: &mut State<'a>, v: &'a str) {
        s.index.insert(v, s.next);
        s.low.insert(v, s.next);
        s.next += 1;
        s.stack.push(v);
        s.on_stack.insert(v);
        for w in s.graph.edges.get(v).into_iter().flatten() {
            let w = w.as_str();
            if !s.index.contains_key(w) {
                visit(s, w);
                let lw = s.low[w];
                s.low.insert(v, s.low[v].min(lw));
            } else if s.on_stack.contains(w) {
                let iw = s.index[w];
                s.low.insert(v, s.low[v].min(iw));
            }
        }
        if s.low[v] == s.index[v] {
            let mut comp = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack.remove(w);
                comp.push(w.to_string());
                if w == v {
                    break;
                }
            }
            if comp.len() > 1 {
                comp.sort();
                s.found.push(comp);
            }
        }
    }
    let mut s = State {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        next: 0,
        found: Vec::new(),
    };
    for v in graph.edges.keys() {
        if !s.index.contains_key(v.as_str()) {
            visit(&mut s, v);
        }
    }
    s.found
}

#[test]
fn no_module_imports_one_that_imports_it_back() {
    for depth in 1..=3 {
        let found = cycles(&build_graph(depth));
        assert!(
            found.is_empty(),
            "module cycles at depth {depth}: {found:?}"
        );
    }
}

#[test]
fn every_import_points_down_or_sideways() {
    let graph = build_graph(1);
    let mut wrong = Vec::new();
    for (from, targets) in &graph.edges {
        let Some(lf) = layer_of(from) else {
            wrong.push(format!(
                "{from} is in no layer: add it to LAYERS and the lib.rs map"
            ));
            continue;
        };
        for to in targets {
            match layer_of(to) {
                Some(lt) if lt >= lf => {}
                Some(_) => wrong.push(format!("{from} imports the higher layer {to}")),
                None => wrong.push(format!("{to} is in no layer")),
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn the_scanner_sees_imports() {
    // Guards the test itself: a scanner that finds nothing would pass the two rules above.
    let graph = build_graph(1);
    assert!(
        graph
            .edges
            .get("ingest")
            .is_some_and(|t| t.contains("store"))
    );
}

#[test]
fn only_the_store_names_sqlx() {
    // Callers hold `store::Db`, `Conn` and `Tx`; the database driver stays behind them. The
    // lab (its own package) is skipped by `rust_files`; tests may use sqlx for raw checks.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("worker");
    let store = root.join("store");
    let mut files = Vec::new();
    rust_files(&root, &mut files);
    let mut store_mentions = 0;
    let mut leaks = Vec::new();
    for file in &files {
        let src = std::fs::read_to_string(file).unwrap();
        let mentions = src.contains("sqlx");
        if file.starts_with(&store) {
            store_mentions += usize::from(mentions);
        } else if mentions {
            leaks.push(file.strip_prefix(&root).unwrap().display().to_string());
        }
    }
    assert!(
        store_mentions > 0,
        "the scan found the store's own sqlx use"
    );
    assert!(
        leaks.is_empty(),
        "sqlx named outside worker/store/: {}",
        leaks.join(", ")
    );
}
