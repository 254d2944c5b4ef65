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
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
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
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
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
