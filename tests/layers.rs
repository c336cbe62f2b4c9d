//! The crate's layers (ARCHITECTURE.md): each top-level module of `src/` may use only modules of
//! lower layers, so the imports have one direction and no circle. Read from the `crate::x` paths
//! of the source, leaving out comments and `#[cfg(test)]` modules (tests may build higher-layer
//! fixtures). A new module must be placed in `LAYERS` (and in ARCHITECTURE.md's diagram).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Bottom first. A module may use the modules of earlier rows only.
const LAYERS: &[&[&str]] = &[
    &["error"],
    &["rng", "device"],
    &["base"],
    &["kernels", "io", "data"],
    &["quant"],
    &["lora"],
    &["nn"],
    &["models"],
    &["diffusion", "loss"],
    &["train"],
    &["report"],
    &["pipeline"],
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

/// `(module used, line)` for every `crate::x` path and every `x` of `use crate::{x::.., y}`.
fn uses(text: &str) -> Vec<(String, usize)> {
    let code = regex::Regex::new(r"#\[cfg\(test\)\]\s*mod\s+\w+").unwrap().split(text).next().unwrap_or("");
    let path = regex::Regex::new(r"crate::(\w+)").unwrap();
    let head = regex::Regex::new(r"^(\w+)").unwrap();
    let comment = regex::Regex::new(r"//[^\n]*").unwrap();
    let nested = regex::Regex::new(r"\{[^{}]*\}").unwrap();
    // Comments are blanked line by line so that line numbers stay right.
    let code: String = code.lines().map(|l| comment.replace(l, "").into_owned() + "\n").collect();
    let line_of = |at: usize| code[..at].matches('\n').count() + 1;
    let mut out = Vec::new();
    for m in path.captures_iter(&code) {
        out.push((m[1].to_string(), line_of(m.get(0).unwrap().start())));
    }
    for m in code.match_indices("use crate::{") {
        let start = m.0 + m.1.len();
        // The group's text up to its balanced closing brace.
        let (mut depth, mut end) = (1, start);
        for (i, ch) in code[start..].char_indices() {
            depth += match ch {
                '{' => 1,
                '}' => -1,
                _ => 0,
            };
            if depth == 0 {
                end = start + i;
                break;
            }
        }
        // Top-level names of the group only: drop nested `{...}` first.
        let mut inner = code[start..end].to_string();
        while nested.is_match(&inner) {
            inner = nested.replace_all(&inner, "").into_owned();
        }
        for part in inner.split(',') {
            if let Some(c) = head.captures(part.trim()) {
                out.push((c[1].to_string(), line_of(m.0)));
            }
        }
    }
    out
}

#[test]
fn top_level_modules_use_only_lower_layers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let layer: BTreeMap<&str, usize> =
        LAYERS.iter().enumerate().flat_map(|(i, row)| row.iter().map(move |m| (*m, i))).collect();
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let mut found = BTreeSet::new();
    let mut wrong = Vec::new();
    for file in &files {
        let rel = file.strip_prefix(&src).unwrap();
        let top = rel.components().next().unwrap().as_os_str().to_str().unwrap().trim_end_matches(".rs");
        if top == "main" || top == "lib" {
            continue;
        }
        found.insert(top.to_string());
        let Some(&mine) = layer.get(top) else {
            wrong.push(format!("src/{}: module `{top}` is in no layer of tests/layers.rs", rel.display()));
            continue;
        };
        let text = std::fs::read_to_string(file).unwrap();
        for (used, line) in uses(&text) {
            if used == top {
                continue;
            }
            match layer.get(used.as_str()) {
                Some(&theirs) if theirs < mine => {}
                Some(_) => wrong.push(format!(
                    "src/{}:{line}: `{top}` uses `{used}`, which is not below it in the layers",
                    rel.display()
                )),
                None => wrong.push(format!("src/{}:{line}: `{used}` is in no layer", rel.display())),
            }
        }
    }
    assert!(wrong.is_empty(), "imports against the layers (ARCHITECTURE.md):\n{}", wrong.join("\n"));
    let listed: BTreeSet<String> = layer.keys().map(|s| s.to_string()).collect();
    assert_eq!(found, listed, "tests/layers.rs lists modules that src/ does not have, or the reverse");
}

#[test]
fn the_reader_sees_paths_groups_and_skips_comments_and_tests() {
    let text = "use crate::a::X;\nuse crate::{b::Y, c, d::{e, f}};\n// crate::g\nfn h() { crate::i::j(); }\n#[cfg(test)]\nmod tests { use crate::k; }\n";
    let names: BTreeSet<String> = uses(text).into_iter().map(|(m, _)| m).collect();
    let want: BTreeSet<String> = ["a", "b", "c", "d", "i"].iter().map(|s| s.to_string()).collect();
    assert_eq!(names, want);
    assert!(uses(text).contains(&("i".to_string(), 4)), "line numbers: {:?}", uses(text));
}
