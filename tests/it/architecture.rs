//! Invariants of the code base itself, checked on every test run.

use std::path::Path;

fn read_tree(dir: &Path, out: &mut Vec<(String, String)>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            read_tree(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs" || e == "toml") {
            out.push((
                path.display().to_string(),
                std::fs::read_to_string(&path).unwrap(),
            ));
        }
    }
}

#[test]
fn workers_have_no_way_to_reach_the_database() {
    let root = crate::common::repo_root();
    let mut files = Vec::new();
    read_tree(&root.join("workers"), &mut files);
    read_tree(&root.join("proto"), &mut files);
    assert!(files.iter().any(|(p, _)| p.ends_with("workers/Cargo.toml")));
    for (path, text) in &files {
        for forbidden in ["sqlx", "tokio-postgres", "DATABASE_URL", "postgres://"] {
            assert!(!text.contains(forbidden), "{path} mentions {forbidden}");
        }
    }
}

#[test]
fn only_the_store_runs_queries() {
    let root = crate::common::repo_root().join("src");
    let mut files = Vec::new();
    read_tree(&root, &mut files);
    for (path, text) in &files {
        if path.contains("/store/") {
            continue;
        }
        for call in ["sqlx::query", "sqlx::raw_sql", "query_as(", "query_scalar("] {
            assert!(
                !text.contains(call),
                "{path} runs SQL ({call}); move it to src/store"
            );
        }
    }
}

/// The source files under `dir` (relative to the crate root), as `(path, text)`.
fn sources(dir: &str) -> Vec<(String, String)> {
    let mut files = Vec::new();
    read_tree(&crate::common::repo_root().join(dir), &mut files);
    files.retain(|(p, _)| p.ends_with(".rs"));
    files
}

/// The code of a file: without `//` comments and string literals (roughly, which is
/// enough for these checks), and without its unit-test module.
fn code(text: &str) -> String {
    let mut out = String::new();
    for line in text.lines() {
        if line.starts_with("#[cfg(test)]") {
            break;
        }
        let line = line.split("//").next().unwrap_or_default();
        let mut in_string = false;
        let mut previous = ' ';
        for c in line.chars() {
            if c == '"' && previous != '\\' {
                in_string = !in_string;
            } else if !in_string {
                out.push(c);
            }
            previous = c;
        }
        out.push('\n');
    }
    out
}

/// The top-level module a file of `src/` belongs to (`src/api/keys.rs` → `api`).
fn top_module(path: &str) -> Option<String> {
    let rest = path.split("/src/").last()?;
    let first = rest.split('/').next()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    (!matches!(name, "lib" | "main")).then(|| name.to_owned())
}

/// The store functions that write (their SQL inserts, updates or deletes), as
/// `module::function`.
fn store_writes() -> Vec<String> {
    let mut writes = Vec::new();
    for (path, text) in sources("src/store") {
        let module = Path::new(&path)
            .file_stem()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let text = text.split("#[cfg(test)]").next().unwrap_or_default();
        for chunk in text.split("pub async fn ").skip(1) {
            let name: String = chunk
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            let body = chunk.split("\npub ").next().unwrap_or_default();
            if ["INSERT ", "UPDATE ", "DELETE "]
                .iter()
                .any(|w| body.contains(w))
            {
                writes.push(format!("{module}::{name}("));
            }
        }
    }
    assert!(
        writes.iter().any(|w| w == "principals::insert("),
        "{writes:?}"
    );
    writes
}

#[test]
fn api_writes_only_through_lifecycle() {
    let writes = store_writes();
    for (path, text) in sources("src/api") {
        let code = code(&text);
        for forbidden in [".acquire()", ".begin()", "Txn::"] {
            assert!(
                !code.contains(forbidden),
                "{path} opens its own connection or transaction ({forbidden}); write through lifecycle"
            );
        }
        for write in &writes {
            assert!(
                !code.contains(write.as_str()),
                "{path} writes through the store ({write}…); write through lifecycle"
            );
        }
    }
}

#[test]
fn no_http_types_below_api() {
    for (path, text) in sources("src") {
        if path.contains("/src/api/") || path.ends_with("/src/serve.rs") {
            continue;
        }
        let code = code(&text);
        for http in ["axum", "hyper", "tower", "http::"] {
            assert!(
                !code.contains(http),
                "{path} uses {http}; HTTP belongs in src/api"
            );
        }
    }
}

#[test]
fn the_domain_and_the_wire_contract_are_pure() {
    let mut files = sources("src/domain");
    files.extend(sources("proto/src"));
    for (path, text) in files {
        let code = code(&text);
        for io in ["sqlx", "axum", "async_nats", "tokio", "reqwest"] {
            assert!(
                !code.contains(io),
                "{path} uses {io}; the domain does no I/O"
            );
        }
    }
}

#[test]
fn no_import_cycles() {
    let mut graph: std::collections::BTreeMap<String, std::collections::BTreeSet<String>> =
        Default::default();
    for (path, text) in sources("src") {
        let Some(module) = top_module(&path) else {
            continue;
        };
        let deps = graph.entry(module.clone()).or_default();
        let code = code(&text);
        let mut rest = code.as_str();
        while let Some(i) = rest.find("crate::") {
            rest = &rest[i + "crate::".len()..];
            let names: Vec<&str> = match rest.strip_prefix('{') {
                Some(group) => group
                    .split('}')
                    .next()
                    .unwrap_or_default()
                    .split(',')
                    .collect(),
                None => vec![rest],
            };
            for name in names {
                let name: String = name
                    .trim()
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() && name != module {
                    deps.insert(name);
                }
            }
        }
    }
    assert!(graph.contains_key("lifecycle") && graph.contains_key("store"));
    // Depth-first search; a module met again while still on the path closes a cycle.
    fn visit(
        m: &str,
        graph: &std::collections::BTreeMap<String, std::collections::BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut std::collections::BTreeSet<String>,
    ) {
        if let Some(i) = path.iter().position(|p| p == m) {
            panic!("import cycle: {} → {m}", path[i..].join(" → "));
        }
        if !done.insert(m.to_owned()) {
            return;
        }
        path.push(m.to_owned());
        for d in graph.get(m).into_iter().flatten() {
            if graph.contains_key(d) {
                visit(d, graph, path, done);
            }
        }
        path.pop();
    }
    let mut done = Default::default();
    for m in graph.keys() {
        visit(m, &graph, &mut Vec::new(), &mut done);
    }
}

/// Longest function body allowed outside tests, in lines.
const FUNCTION_LINES: usize = 80;

#[test]
fn functions_stay_short() {
    let mut files = sources("src");
    files.extend(sources("workers/src"));
    files.extend(sources("proto/src"));
    let mut long = Vec::new();
    for (path, text) in files {
        let lines: Vec<&str> = text
            .lines()
            .take_while(|l| !l.starts_with("#[cfg(test)]"))
            .collect();
        for (i, line) in lines.iter().enumerate() {
            let trimmed = line.trim_start();
            let indent = &line[..line.len() - trimmed.len()];
            let is_fn = [
                "fn ",
                "pub fn ",
                "async fn ",
                "pub async fn ",
                "pub(crate) fn ",
                "pub(crate) async fn ",
                "pub(super) async fn ",
                "pub(super) fn ",
                "const fn ",
                "pub const fn ",
            ]
            .iter()
            .any(|p| trimmed.starts_with(p));
            if !is_fn || trimmed.ends_with(';') {
                continue;
            }
            // rustfmt closes a function at its own indentation.
            let close = format!("{indent}}}");
            let Some(len) = lines[i..].iter().position(|l| *l == close) else {
                continue;
            };
            if len + 1 > FUNCTION_LINES {
                long.push(format!("{path}:{} ({} lines)", i + 1, len + 1));
            }
        }
    }
    assert!(
        long.is_empty(),
        "functions over {FUNCTION_LINES} lines: {long:#?}"
    );
}

#[test]
fn operations_are_locked_only_through_lock_operation() {
    for (path, text) in sources("src") {
        if path.ends_with("/src/lifecycle/txn.rs") || path.contains("/src/store/") {
            continue;
        }
        assert!(
            !code(&text).contains("operations::lock_with_resource("),
            "{path} locks an operation row itself; use lifecycle::lock_operation (resource row first)"
        );
    }
}
