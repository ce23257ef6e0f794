//! Proves the device page and the operator console work in a real browser: tests/browser/browser.test.mjs drives headless Chromium (Playwright) against a real `amends dev` — a confirmed payment, a refused one, an apology, sagas with their steps and compensation, an offline queue drained on reconnect, one op sent ten times, a reload mid-flight, the console's numbers moving and its trace — checking each answer on the decisions stream and auditing the log; the screenshots land in docs/screenshots/.
//!
//! Node, Chromium and the locked npm packages are what `scripts/setup`
//! installs; without one of them this test fails with the hint, it never
//! skips.

use std::path::Path;
use std::process::Command;

use crate::support::AMENDS;

/// Where scripts/setup puts the test's npm packages (`npm ci`).
const SUITE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/browser");

/// Debian's Chromium, what scripts/setup installs (`apt-get install chromium`).
const CHROMIUM_DEFAULT: &str = "/usr/bin/chromium";

#[test]
fn the_pages_work_in_headless_chromium_against_amends_dev() {
    let hint = "run scripts/setup (it installs Debian's chromium and this suite's locked npm packages with `npm ci`)";
    let node = Command::new("node").arg("--version").output();
    assert!(
        node.as_ref().is_ok_and(|o| o.status.success()),
        "node (20 or later) not found: install Node.js, then {hint}"
    );
    let chromium = std::env::var("AMENDS_CHROMIUM").unwrap_or_else(|_| CHROMIUM_DEFAULT.to_owned());
    assert!(
        Path::new(&chromium).is_file(),
        "Chromium not found at {chromium}: {hint}"
    );
    assert!(
        Path::new(SUITE)
            .join("node_modules/playwright-core")
            .is_dir(),
        "playwright-core is not installed in {SUITE}/node_modules: {hint}"
    );
    let shots = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/screenshots");
    let mut command = Command::new("node");
    command
        .args([
            "--test",
            "--test-concurrency=1",
            "--test-reporter=spec",
            "browser.test.mjs",
        ])
        .current_dir(SUITE)
        .env("AMENDS_BIN", AMENDS)
        .env("AMENDS_CHROMIUM", &chromium)
        .env("AMENDS_SCREENSHOTS", &shots);
    if let Some(server) = std::env::var_os("AMENDS_NATS_SERVER") {
        command.env("AMENDS_NATS_SERVER", server);
    }
    let output = command.output().unwrap();
    let report = format!(
        "stdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "the browser suite failed ({:?})\n{report}",
        output.status
    );
    for page in ["device.png", "console.png"] {
        assert!(
            shots.join(page).is_file(),
            "no screenshot {page} in {}\n{report}",
            shots.display()
        );
    }
}
