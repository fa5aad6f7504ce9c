//! The committed artifacts in `contracts/artifacts/` are exactly what `contracts/build.js`
//! produces from the Solidity sources (recompiled with solc-js, compared byte for byte).

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;

#[test]
fn committed_artifacts_match_the_sources() {
    let contracts = Path::new(env!("CARGO_MANIFEST_DIR")).join("../contracts");
    assert!(
        contracts.join("node_modules/solc").is_dir(),
        "solc-js is not installed: run scripts/install-chain.sh"
    );
    let out = Command::new("node")
        .arg("build.js")
        .arg("--check")
        .current_dir(&contracts)
        .output()
        .expect("node must be installed (scripts/install-chain.sh)");
    assert!(
        out.status.success(),
        "contracts/artifacts are stale; run `node contracts/build.js`:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn every_source_has_its_hash_in_an_artifact() {
    // A cheap second check that needs no compiler: each artifact records the SHA-256 of
    // its source file, which must be the current one.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../contracts");
    for name in ["IPSXToken", "Centralizer", "ReentrantToken"] {
        let text = std::fs::read_to_string(root.join(format!("artifacts/{name}.json"))).unwrap();
        let a: serde_json::Value = serde_json::from_str(&text).unwrap();
        let src = std::fs::read(root.join(a["sourceName"].as_str().unwrap())).unwrap();
        let digest = sha256_hex(&src);
        assert_eq!(
            a["sourceHash"].as_str().unwrap(),
            digest,
            "{name}: source changed since the build"
        );
        assert!(
            a["bytecode"].as_str().unwrap().len() > 100,
            "{name}: no bytecode"
        );
    }
}

fn sha256_hex(data: &[u8]) -> String {
    use std::io::Write as _;
    let mut child = Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(data).unwrap();
    let out = child.wait_with_output().unwrap();
    let s = String::from_utf8(out.stdout).unwrap();
    s.split_whitespace().next().unwrap().to_owned()
}
