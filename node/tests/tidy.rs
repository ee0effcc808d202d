//! The shape of `node/src`: imports point down the layers only, and no
//! modules depend on each other in a circle.
//!
//! Layers, lowest first: `util`, `metrics`, `identity`, `models` (L0, which
//! anyone may use), `net` (L1), `services` (L2), `inference` (L3), `api`
//! and `inbound` (L4), `node`, `chat` and the crate root (L5). A `crate::`
//! or `super::` path in code (not in comments) is an edge from the file's
//! module to the module it names. An edge may point to a lower layer, or
//! stay inside one top-level module (`services::dialer` ->
//! `services::dht`); leaves may use each other, and the crate root, which
//! declares and re-exports the modules, may name any. Every other edge, and every
//! circle of modules, fails the test with the files and edges involved.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The layer of a top-level module of `node/src`.
fn layer(top: &str) -> Option<u8> {
    Some(match top {
        "util" | "metrics" | "identity" | "models" => 0,
        "net" => 1,
        "services" => 2,
        "inference" => 3,
        "api" | "inbound" => 4,
        "node" | "chat" | "" => 5,
        _ => return None,
    })
}

/// A module path (`services::dht`; the crate root is ``), its file and its
/// source.
type Module = (String, String, String);

fn module_of(src_root: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src_root).unwrap().with_extension("");
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if parts.last().is_some_and(|p| p == "mod" || p == "lib") {
        parts.pop();
    }
    parts.join("::")
}

fn read_tree(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            read_tree(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Code with comments and string literals blanked out, so only real paths
/// are read, and without the unit tests at the end of the file (`mod
/// tests` sees its parent through `super`).
fn code_only(src: &str) -> String {
    let mut out = String::with_capacity(src.len());
    let mut lines = src.lines().peekable();
    while let Some(line) = lines.next() {
        if line.trim() == "#[cfg(test)]"
            && lines
                .peek()
                .is_some_and(|l| l.trim_start().starts_with("mod "))
        {
            break;
        }
        let mut in_str = false;
        let mut prev = ' ';
        let mut kept = String::new();
        let chars: Vec<char> = line.chars().collect();
        let mut i = 0;
        while i < chars.len() {
            let c = chars[i];
            if !in_str && c == '/' && chars.get(i + 1) == Some(&'/') {
                break;
            }
            if c == '"' && prev != '\\' {
                in_str = !in_str;
                kept.push(' ');
            } else if in_str {
                kept.push(' ');
            } else {
                kept.push(c);
            }
            prev = c;
            i += 1;
        }
        out.push_str(&kept);
        out.push('\n');
    }
    out
}

/// Expands `a::{b, c::{d, e}}` into `a::b`, `a::c::d`, `a::c::e`.
fn expand(path: &str) -> Vec<String> {
    let path: String = path.chars().filter(|c| !c.is_whitespace()).collect();
    let Some(open) = path.find('{') else {
        return vec![path];
    };
    let prefix = &path[..open];
    let inner = &path[open + 1..path.rfind('}').unwrap_or(path.len())];
    let mut items = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (i, c) in inner.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                items.push(&inner[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    items.push(&inner[start..]);
    items
        .into_iter()
        .filter(|s| !s.is_empty())
        .flat_map(|s| expand(&format!("{prefix}{s}")))
        .collect()
}

/// Every module path the code names: `crate::` and `super::` paths, inside
/// `use` items (braces expanded) and inline, and paths through the file's
/// own child modules (`mod x;` then `x::f`).
fn referenced(module: &str, code: &str) -> BTreeSet<String> {
    let mut paths = Vec::new();
    let children: Vec<&str> = code
        .lines()
        .filter_map(|l| {
            let l = l.trim().strip_prefix("pub ").unwrap_or(l.trim());
            l.strip_prefix("mod ")?.strip_suffix(';')
        })
        .collect();
    for child in children {
        let pat = format!("{child}::");
        let mut rest = code;
        while let Some(at) = rest.find(&pat) {
            let before = rest[..at].chars().last();
            rest = &rest[at + pat.len()..];
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
                continue;
            }
            paths.push(format!(
                "crate::{}{child}",
                if module.is_empty() {
                    String::new()
                } else {
                    format!("{module}::")
                }
            ));
        }
    }
    // `use` items, which may span lines and group names in braces.
    let mut rest = code;
    while let Some(at) = rest.find("use ") {
        let before = rest[..at].chars().last();
        let after = &rest[at + 4..];
        rest = after;
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let Some(end) = after.find(';') else { break };
        let item = after[..end].trim();
        if item.starts_with("crate::") || item.starts_with("super::") {
            paths.extend(expand(item));
        }
    }
    // Inline paths.
    for prefix in ["crate::", "super::"] {
        let mut rest = code;
        while let Some(at) = rest.find(prefix) {
            let before = rest[..at].chars().last();
            let tail = &rest[at..];
            rest = &rest[at + prefix.len()..];
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                continue;
            }
            let end = tail
                .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
                .unwrap_or(tail.len());
            paths.push(tail[..end].trim_end_matches(':').to_owned());
        }
    }
    let here: Vec<&str> = if module.is_empty() {
        Vec::new()
    } else {
        module.split("::").collect()
    };
    paths
        .into_iter()
        .map(|p| {
            let p = p.split(" as ").next().unwrap_or(&p).to_owned();
            if let Some(r) = p.strip_prefix("crate::") {
                return r.to_owned();
            }
            // `super` in module `a::b` is `a`, whichever file holds it.
            let mut base = here.clone();
            let mut rel = p.as_str();
            while let Some(r) = rel.strip_prefix("super::") {
                base.pop();
                rel = r;
            }
            let mut full: Vec<&str> = base;
            full.extend(rel.split("::"));
            full.join("::")
        })
        .collect()
}

/// The longest prefix of `path` that is a module (the crate root when
/// none is).
fn resolve(path: &str, modules: &BTreeSet<String>) -> Option<String> {
    let parts: Vec<&str> = path.split("::").collect();
    (0..=parts.len())
        .rev()
        .map(|n| parts[..n].join("::"))
        .find(|p| modules.contains(p))
}

fn top(module: &str) -> &str {
    module.split("::").next().unwrap_or("")
}

/// The faults of a tree of modules: edges up a layer or across top-level
/// modules of one layer, modules in no layer, and circles.
fn check(modules: &[Module]) -> Vec<String> {
    let names: BTreeSet<String> = modules.iter().map(|(m, _, _)| m.clone()).collect();
    let mut faults = Vec::new();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (module, file, src) in modules {
        let code = code_only(src);
        let from_top = top(module);
        let Some(from_layer) = layer(from_top) else {
            faults.push(format!("{file} ({module}): module in no layer"));
            continue;
        };
        for path in referenced(module, &code) {
            let Some(target) = resolve(&path, &names) else {
                continue;
            };
            if target == *module {
                continue;
            }
            let to_top = top(&target);
            let Some(to_layer) = layer(to_top) else {
                continue;
            };
            // The crate root declares and re-exports every module.
            let allowed = module.is_empty()
                || to_layer < from_layer
                || to_top == from_top
                || (to_layer == 0 && from_layer == 0);
            if !allowed {
                faults.push(format!(
                    "{file}: {module} -> {target}: points up or across a layer (L{from_layer} -> L{to_layer}, via `{path}`)"
                ));
            }
            if target != *module {
                graph.entry(module.clone()).or_default().insert(target);
            }
        }
    }
    for circle in circles(&graph) {
        let edges: Vec<String> = circle
            .iter()
            .flat_map(|a| {
                graph[a]
                    .iter()
                    .filter(|b| circle.contains(*b))
                    .map(move |b| format!("{a} -> {b}"))
            })
            .collect();
        let files: Vec<&str> = modules
            .iter()
            .filter(|(m, _, _)| circle.contains(m))
            .map(|(_, f, _)| f.as_str())
            .collect();
        faults.push(format!(
            "modules in a circle: {} (in {})",
            edges.join(", "),
            files.join(", ")
        ));
    }
    faults
}

/// Strongly connected components with more than one module (Tarjan).
fn circles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<BTreeSet<String>> {
    struct State<'a> {
        graph: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        next: usize,
        out: Vec<BTreeSet<String>>,
    }
    fn visit<'a>(s: &mut State<'a>, v: &'a str) {
        s.index.insert(v, s.next);
        s.low.insert(v, s.next);
        s.next += 1;
        s.stack.push(v);
        s.on_stack.insert(v);
        if let Some(targets) = s.graph.get(v) {
            for w in targets {
                let w = w.as_str();
                if !s.index.contains_key(w) {
                    visit(s, w);
                    let lw = s.low[w];
                    let lv = s.low[v];
                    s.low.insert(v, lv.min(lw));
                } else if s.on_stack.contains(w) {
                    let iw = s.index[w];
                    let lv = s.low[v];
                    s.low.insert(v, lv.min(iw));
                }
            }
        }
        if s.low[v] == s.index[v] {
            let mut scc = BTreeSet::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack.remove(w);
                scc.insert(w.to_owned());
                if w == v {
                    break;
                }
            }
            if scc.len() > 1 {
                s.out.push(scc);
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
        out: Vec::new(),
    };
    for v in graph.keys() {
        if !s.index.contains_key(v.as_str()) {
            visit(&mut s, v);
        }
    }
    s.out
}

#[test]
fn node_src_imports_point_down_the_layers_and_form_no_circle() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    read_tree(&root, &mut files);
    files.sort();
    let mut modules = Vec::new();
    for f in &files {
        if f.file_name().is_some_and(|n| n == "main.rs") {
            // The binary is a client of the library, not a module of it.
            continue;
        }
        let file = f
            .strip_prefix(root.parent().unwrap())
            .unwrap()
            .display()
            .to_string();
        modules.push((
            module_of(&root, f),
            file,
            std::fs::read_to_string(f).unwrap(),
        ));
    }
    assert!(modules.len() > 20, "read only {} modules", modules.len());
    let faults = check(&modules);
    assert!(
        faults.is_empty(),
        "node/src breaks its layering:\n{}",
        faults.join("\n")
    );
}

#[test]
fn the_check_names_upward_edges_and_circles() {
    let m = |name: &str, src: &str| {
        let file = format!("src/{}.rs", name.replace("::", "/"));
        (name.to_owned(), file, src.to_owned())
    };
    let modules = vec![
        m(
            "net::pool",
            "use crate::inbound::Inbound;\n// crate::api::x in a comment\n",
        ),
        m("inbound", "use crate::net::pool::Connections;\n"),
        m("services::a", "use crate::services::b::X;\n"),
        m("services::b", "fn f() { crate::services::a::y(); }\n"),
        m(
            "services::c",
            "use crate::{net::pool, services::{a::Z, b}};\n",
        ),
        m("api", "let s = \"crate::inbound\";\n"),
        m("inference", "pub mod x;\nfn f() { x::g(); }\n"),
        m(
            "inference::x",
            "use crate::inference::Y;\n#[cfg(test)]\nmod tests {\n    use crate::api::Z;\n}\n",
        ),
        m("wild", ""),
    ];
    let faults = check(&modules);
    let text = faults.join("\n");
    assert!(
        text.contains("src/net/pool.rs: net::pool -> inbound: points up"),
        "{text}"
    );
    assert!(!text.contains("api ->"), "a string is no edge: {text}");
    assert!(!text.contains("-> api"), "a comment is no edge: {text}");
    assert!(
        text.contains("src/wild.rs (wild): module in no layer"),
        "{text}"
    );
    assert!(
        text.contains(
            "modules in a circle: services::a -> services::b, services::b -> services::a"
        ),
        "{text}"
    );
    assert!(
        text.contains("modules in a circle: inbound -> net::pool, net::pool -> inbound"),
        "{text}"
    );
    assert!(
        text.contains("modules in a circle: inference -> inference::x, inference::x -> inference"),
        "a child module named by its parent: {text}"
    );
    assert!(
        !text.contains("inference::x -> api"),
        "unit tests are left out: {text}"
    );
    assert_eq!(faults.len(), 5, "{text}");
    assert_eq!(
        expand("crate::{net::pool, services::{a::Z, b}}"),
        vec![
            "crate::net::pool",
            "crate::services::a::Z",
            "crate::services::b"
        ]
    );
}
