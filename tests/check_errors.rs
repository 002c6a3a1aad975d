//! `scripts/check-errors.sh`: it flags `Result<_, String>` and string tests
//! on error text (with FILE:LINE), and leaves alone what only looks alike.

use std::path::{Path, PathBuf};
use std::process::Command;

fn run(root: &Path) -> (bool, String) {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/check-errors.sh");
    let out = Command::new("bash").arg(script).arg(root).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn tree(files: &[(&str, &str)]) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    for (p, body) in files {
        let p = d.path().join(p);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, body).unwrap();
    }
    d
}

#[test]
fn flags_string_errors_and_text_decisions_with_their_line() {
    let d = tree(&[(
        "src/a.rs",
        "fn ok() -> Result<HashMap<String, String>, MyError> { todo!() }\n\
         fn bad() -> Result<(u32, Vec<String>), String> { todo!() }\n\
         type R<T> = Result<T, String>;\n\
         fn f(e: &E) -> bool { e.message.contains(\"resync\") }\n\
         fn g(x: &X) -> bool {\n    x.error\n        .as_deref()\n        .is_some_and(|m| m.starts_with(\"resync required\"))\n}\n\
         fn h(e: &E) -> bool { e.to_string().ends_with(\"trusted\") }\n\
         fn names(n: &str) -> bool { n.ends_with(\".hrl\") }\n\
         // e.message.contains(\"in a comment\")\n\
         fn t(e: &E) { assert!(e.to_string().contains(\"tests may\")); }\n",
    )]);
    let (ok, out) = run(d.path());
    assert!(!ok, "{out}");
    for line in [2, 3, 4, 6, 10] {
        assert!(
            out.contains(&format!("src/a.rs:{line}:")),
            "line {line}:\n{out}"
        );
    }
    for line in [1, 11, 12, 13] {
        assert!(
            !out.contains(&format!("src/a.rs:{line}:")),
            "line {line}:\n{out}"
        );
    }
    assert!(out.contains("5 problem(s)"), "{out}");
}

#[test]
fn the_command_line_is_exempt_and_a_clean_tree_passes() {
    let d = tree(&[
        ("src/cli.rs", "fn a() -> Result<(), String> { Ok(()) }\n"),
        (
            "src/cli/fmt.rs",
            "fn b() -> Result<(), String> { Ok(()) }\n",
        ),
        (
            "src/lib.rs",
            "fn c() -> Result<(), std::io::Error> { Ok(()) }\n",
        ),
    ]);
    let (ok, out) = run(d.path());
    assert!(ok, "{out}");
}
