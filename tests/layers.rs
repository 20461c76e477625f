//! The never-arrows of docs/architecture.md, checked on the source: the core never imports a
//! transport or `app`; `config` never imports `turn`; transports never import `store`; pure
//! modules never import tokio or read a clock. A `use` that breaks one fails here with the file
//! and line; if one must be broken, change docs/architecture.md in the same commit and this list.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::path::{Path, PathBuf};

const CORE: &[&str] = &[
    "hub", "calls", "store", "auth", "turn", "wire", "services", "client",
];
const TRANSPORTS: &[&str] = &["ws", "http", "socketio"];
/// Pure: state machines and codecs that take `now` as an argument.
const PURE: &[&str] = &[
    "wire",
    "hub/presence.rs",
    "calls/machine.rs",
    "turn/engine",
    "turn/filter.rs",
    "auth/jwt.rs",
    "limits.rs",
    "ws/codec.rs",
];

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every `.rs` file at `rel` (a file or a directory) under `src/`.
fn files(rel: &str) -> Vec<PathBuf> {
    let path = src().join(rel);
    let mut out = Vec::new();
    let single = path.with_extension("rs");
    if path.is_file() {
        out.push(path);
    } else if single.is_file() {
        out.push(single);
    }
    let mut dirs = vec![src().join(rel.trim_end_matches(".rs"))];
    while let Some(d) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

/// The lines of `file` that are code (not comments), up to its unit tests.
fn code_lines(file: &Path) -> Vec<(usize, String)> {
    let text = std::fs::read_to_string(file).unwrap();
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("#[cfg(test)]") {
            break;
        }
        if trimmed.starts_with("//") {
            continue;
        }
        out.push((i + 1, line.to_owned()));
    }
    out
}

/// The first segments of every path rooted at `crate::` or `switchboard::` in `code`, with the
/// offset they start at: `crate::ws::x` gives `ws`; `crate::{app, store::Y}` gives `app` and
/// `store` (a brace list may span lines).
fn roots(code: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    for prefix in ["crate::", "switchboard::"] {
        let mut from = 0;
        while let Some(at) = code[from..].find(prefix) {
            let start = from + at;
            from = start + prefix.len();
            // `foo_crate::` is not `crate::`.
            if code[..start]
                .chars()
                .last()
                .is_some_and(|c| c.is_alphanumeric() || c == '_')
            {
                continue;
            }
            let rest = &code[from..];
            if let Some(list) = rest.strip_prefix('{') {
                let mut depth = 1;
                let mut item = String::new();
                let mut items = Vec::new();
                for c in list.chars() {
                    match c {
                        '{' => depth += 1,
                        '}' => depth -= 1,
                        ',' if depth == 1 => items.push(std::mem::take(&mut item)),
                        _ => {}
                    }
                    if depth == 0 {
                        break;
                    }
                    if depth == 1 && c != ',' {
                        item.push(c);
                    }
                }
                items.push(item);
                for it in items {
                    let name: String = it
                        .trim()
                        .chars()
                        .take_while(|c| c.is_alphanumeric() || *c == '_')
                        .collect();
                    if !name.is_empty() {
                        out.push((start, name));
                    }
                }
            } else {
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                out.push((start, name));
            }
        }
    }
    out
}

/// Where any of `files` names a path rooted at one of `targets`.
fn violations(files: &[PathBuf], targets: &[&str]) -> Vec<String> {
    let mut out = Vec::new();
    for f in files {
        if f.file_name().is_some_and(|n| n == "tests.rs") {
            continue;
        }
        let lines = code_lines(f);
        let mut code = String::new();
        let mut line_at = Vec::new();
        for (n, line) in &lines {
            line_at.push((code.len(), *n));
            code.push_str(line);
            code.push('\n');
        }
        for (offset, root) in roots(&code) {
            if targets.contains(&root.as_str()) {
                let n = line_at
                    .iter()
                    .rev()
                    .find(|(start, _)| *start <= offset)
                    .map_or(0, |(_, n)| *n);
                out.push(format!("{}:{n}: crate::{root}", f.display()));
            }
        }
    }
    out
}

#[test]
fn the_core_never_imports_a_transport_or_app() {
    let mut bad = Vec::new();
    for m in CORE {
        let fs = files(m);
        assert!(!fs.is_empty(), "src/{m} has no files");
        bad.extend(violations(&fs, &["ws", "http", "socketio", "app"]));
    }
    assert!(bad.is_empty(), "core → transport/app:\n{}", bad.join("\n"));
}

#[test]
fn config_never_imports_turn() {
    let bad = violations(&files("config.rs"), &["turn"]);
    assert!(bad.is_empty(), "config → turn:\n{}", bad.join("\n"));
}

#[test]
fn transports_never_import_the_store() {
    let mut bad = Vec::new();
    for t in TRANSPORTS {
        bad.extend(violations(&files(t), &["store"]));
    }
    assert!(bad.is_empty(), "transport → store:\n{}", bad.join("\n"));
}

#[test]
fn pure_modules_never_import_tokio_or_read_a_clock() {
    let mut bad = Vec::new();
    for m in PURE {
        let fs = files(m);
        assert!(!fs.is_empty(), "src/{m} has no files");
        for f in fs {
            if f.file_name().is_some_and(|n| n == "tests.rs") {
                continue;
            }
            for (n, line) in code_lines(&f) {
                let clock = ["now_ms(", "Instant::now", "SystemTime::now", "tokio"]
                    .iter()
                    .any(|c| line.contains(c));
                if clock {
                    bad.push(format!("{}:{n}: {}", f.display(), line.trim()));
                }
            }
        }
    }
    assert!(
        bad.is_empty(),
        "pure module → tokio/clock:\n{}",
        bad.join("\n")
    );
}

#[test]
fn the_checks_catch_what_they_look_for() {
    // The scanner itself, on a file written for it.
    let dir = std::env::temp_dir().join(format!("layers-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("x.rs");
    std::fs::write(
        &f,
        "// use crate::ws::x; (a comment)\nuse crate::ws::session;\nuse crate::{store, app};\n\
         use crate::{\n    auth::x,\n    http::{a, b},\n};\nuse my_crate::ws;\n#[cfg(test)]\nuse crate::http::y;\n",
    )
    .unwrap();
    let hits = violations(std::slice::from_ref(&f), &["ws", "app", "http"]);
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(hits.len(), 3, "{hits:?}");
    assert!(hits[0].ends_with(":2: crate::ws"), "{hits:?}");
    assert!(hits[1].ends_with(":3: crate::app"), "{hits:?}");
    assert!(hits[2].ends_with(":4: crate::http"), "{hits:?}");
}
