//! Every case of the project's suite, judged by the pure runner over IPv4 and
//! IPv6: the upstream expectations against the compiled entries and the oracle.

use std::path::PathBuf;

use portcullis_conformance::{
    Case, case_files, pure,
    report::{CaseOutcome, render},
    world::Family,
};

#[test]
fn every_case_passes_over_both_families() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("cases");
    let files = case_files(&[dir]).expect("case directory");
    // The public examples and the 48 upstream e2e cases, at least.
    assert!(files.len() >= 53, "only {} case files", files.len());
    let (mut passed, mut failed) = (0, Vec::new());
    for file in &files {
        let case = Case::load(file).unwrap_or_else(|e| panic!("{e}"));
        for family in [Family::V4, Family::V6] {
            let outcome = pure::run(&case, family).unwrap_or_else(|e| panic!("{e}"));
            match outcome {
                CaseOutcome::Pass => passed += 1,
                other => failed.push(format!("[{family:?}] {}", render(&case.name, &other))),
            }
        }
    }
    assert!(failed.is_empty(), "{passed} passed, {} failed:\n{}", failed.len(), failed.join("\n"));
    assert_eq!(passed, files.len() * 2);
}

#[test]
fn a_wrong_expectation_fails_with_both_tables() {
    let text = r#"
name: wrong
steps:
  - apply:
      - apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: deny, namespace: x}
        spec: {podSelector: {matchLabels: {pod: a}}, policyTypes: [Ingress]}
    probes:
      - port: 80
        expect: ["* -> *: allow"]
"#;
    let case = Case::parse("inline.yaml", text).expect("case");
    let CaseOutcome::Fail(probes) = pure::run(&case, Family::V4).expect("runs") else {
        panic!("should fail")
    };
    let out = render(&case.name, &CaseOutcome::Fail(probes));
    assert!(out.starts_with("FAIL wrong\n  step 1, probe 1 (TCP/80, pod-ip)\n"), "{out}");
    // x/a is blocked from everyone: its column differs on every row but its own.
    assert_eq!(out.matches("<-").count(), 8, "{out}");
}

#[test]
fn templates_resolve_against_the_run_family() {
    let text = r#"
name: templates
steps:
  - apply:
      - apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: only-from-b, namespace: x}
        spec:
          podSelector: {matchLabels: {pod: a}}
          ingress: [{from: [{ipBlock: {cidr: "$(cidr y/b 8)", except: ["$(host y/b)"]}}]}]
    probes:
      - port: 80
        expect: ["* -> *: allow", "* -> x/a: allow", "y/b -> x/a: deny"]
"#;
    let case = Case::parse("inline.yaml", text).expect("case");
    for family in [Family::V4, Family::V6] {
        assert!(matches!(pure::run(&case, family).expect("runs"), CaseOutcome::Pass), "{family:?}");
    }
}
