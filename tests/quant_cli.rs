//! `msfp formats` and `msfp quantize` end to end: JSON out, and exit code 2 for bad input.

use std::io::Write;
use std::process::{Command, Output, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_msfp");

fn msfp(args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(BIN)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn msfp");
    child.stdin.take().expect("stdin").write_all(stdin.as_bytes()).expect("write stdin");
    child.wait_with_output().expect("msfp output")
}

fn json(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "status {:?}, stderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("stdout is one JSON value")
}

fn numbers(v: &serde_json::Value) -> Vec<f64> {
    serde_json::from_value(v.clone()).expect("array of numbers")
}

fn quantize(args: &[&str], input: &str) -> Vec<f64> {
    let mut all = vec!["quantize"];
    all.extend_from_slice(args);
    numbers(&json(&msfp(&all, input)))
}

#[test]
fn formats_prints_one_json_object() {
    let v = json(&msfp(&["formats", "e2m1"], ""));
    assert_eq!(v["spec"], "e2m1");
    assert_eq!(v["signed"], true);
    assert_eq!((v["exp_bits"].as_u64(), v["man_bits"].as_u64()), (Some(2), Some(1)));
    assert_eq!(v["bias"], 1);
    assert_eq!(v["max"], 6.0);
    assert_eq!(
        numbers(&v["values"]),
        [-6., -4., -3., -2., -1.5, -1., -0.5, 0., 0.5, 1., 1.5, 2., 3., 4., 6.]
    );

    let int4 = json(&msfp(&["formats", "int4"], ""));
    assert_eq!((int4["exp_bits"].as_u64(), int4["man_bits"].as_u64()), (Some(0), Some(3)));
    assert_eq!(int4["bias"], 0);
    assert_eq!(numbers(&int4["values"]).len(), 15);
}

#[test]
fn quantize_rounds_to_nearest_even_and_saturates() {
    // 0.25: tie 0 | 0.5 -> 0 (code 0); 0.75: tie 0.5 | 1 -> 1 (code 2); 2.5: tie 2 | 3 -> 2
    // (code 4); 5: tie 4 | 6 -> 4 (code 6); 7 saturates to 6; -0.3 is nearest -0.5.
    assert_eq!(quantize(&["--format", "e2m1"], "[0.25, 0.75, 2.5, 5, 7, -0.3]"), [0., 1., 2., 4., 6., -0.5]);
}

#[test]
fn quantize_scales_by_max_and_shifts_by_zero_point() {
    // --max 12: s = 2, grid {0, 1, 2, 3, 4, 6, 8, 12}; 5 is the tie 4 | 6 -> 4, 13 saturates.
    assert_eq!(quantize(&["--format", "e2m1", "--max", "12"], "[1, 3, 5, 13, -7]"), [1., 3., 4., 12., -8.]);
    // z = 1: (x - 1) = [0.25, -1, 7, -8] -> [0, -1, 6, -6], plus 1.
    assert_eq!(quantize(&["--format", "e2m1", "--zero-point", "1"], "[1.25, 0, 8, -7]"), [1., 0., 7., -5.]);
    // Unsigned with a negative zero point (SiLU-like inputs): (x + 0.5) on ue2m2, minus 0.5.
    assert_eq!(
        quantize(&["--format", "ue2m2", "--zero-point", "-0.5"], "[-1, 0, 0.5, 10]"),
        [-0.5, 0., 0.5, 6.5]
    );
}

#[test]
fn bad_input_exits_with_code_2() {
    let cases: [(&[&str], &str); 9] = [
        (&["formats", "e3m3"], ""),
        (&["quantize", "--format", "fp4"], "[1]"),
        (&["quantize", "--format", "e2m1"], "[1, 2"),
        (&["quantize", "--format", "e2m1"], "{\"x\": 1}"),
        (&["quantize", "--format", "e2m1"], "[1e999]"),
        (&["quantize", "--format", "e2m1"], "[1e39]"),
        (&["quantize", "--format", "e2m1", "--max", "0"], "[1]"),
        (&["quantize", "--format", "e2m1", "--max", "-3"], "[1]"),
        (&["quantize", "--format", "e2m1", "--max", "NaN"], "[1]"),
    ];
    for (args, input) in cases {
        let out = msfp(args, input);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?} {input}: {stderr}");
        assert!(out.stdout.is_empty(), "{args:?}");
        assert_eq!(stderr.trim().lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.starts_with("error: "), "{args:?}: {stderr}");
    }
}
