//! Proves the Python client package (clients/python) installs with pip, routes every vector right, and passes its own test suite and the demo against a real `amends serve`.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::{Serve, Server, client};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const PYTHON_DEADLINE: Duration = Duration::from_secs(15);
/// The live suite waits out the serve's 1 s duplicate window and apology
/// fetches.
const SUITE_DEADLINE: Duration = Duration::from_secs(90);

/// What a finished `python3` run left: its exit code, stdout and stderr.
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// Runs `python3 <args>` in the repo root with the inherited environment
/// (PYTHONPATH included), killing it if it outlives [`PYTHON_DEADLINE`].
fn python(args: &[&str]) -> Run {
    python_with(args, &[], PYTHON_DEADLINE)
}

/// [`python`] with more environment variables and its own deadline.
fn python_with(args: &[&str], envs: &[(&str, String)], within: Duration) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let (out_path, err_path) = (dir.path().join("stdout"), dir.path().join("stderr"));
    let mut child = Command::new("python3")
        .args(args)
        .envs(envs.iter().map(|(k, v)| (k, v)))
        .current_dir(ROOT)
        .stdin(Stdio::null())
        .stdout(File::create(&out_path).unwrap())
        .stderr(File::create(&err_path).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run python3 (Python 3.9+ is required): {e}"));
    let deadline = Instant::now() + within;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
    let run = Run {
        code: status.and_then(|s| s.code()),
        stdout: read(&out_path),
        stderr: read(&err_path),
    };
    assert!(
        status.is_some(),
        "python3 {args:?} ran over {within:?}; killed\n{run}"
    );
    run
}

/// clients/python installed with pip into a temporary folder, as a user
/// would (`pip install --target`, without its dependencies, offline: the
/// build backend is scripts/setup's setuptools).
struct Installed {
    dir: tempfile::TempDir,
}

impl Installed {
    fn new() -> Installed {
        let setuptools = Path::new(ROOT).join(".tools/pypi/setuptools");
        assert!(
            setuptools.join("setuptools").is_dir(),
            "no setuptools at {}: run scripts/setup (scripts/test does)",
            setuptools.display()
        );
        let dir = tempfile::tempdir().unwrap();
        // A copy, so that parallel tests never share setuptools' build/.
        let src = dir.path().join("src");
        copy_dir(&Path::new(ROOT).join("clients/python"), &src);
        let target = dir.path().join("site");
        let (src, target_s) = (src.display().to_string(), target.display().to_string());
        let run = python_with(
            &[
                "-m",
                "pip",
                "install",
                "--disable-pip-version-check",
                "--no-input",
                "--quiet",
                "--no-deps",
                "--no-build-isolation",
                "--no-index",
                "--target",
                &target_s,
                &src,
            ],
            &[
                ("PYTHONPATH", setuptools.display().to_string()),
                ("PIP_ROOT_USER_ACTION", "ignore".to_owned()),
            ],
            Duration::from_secs(60),
        );
        assert_eq!(run.code, Some(0), "pip install clients/python\n{run}");
        assert!(target.join("amends/py.typed").is_file(), "{run}");
        Installed { dir }
    }

    fn site(&self) -> PathBuf {
        self.dir.path().join("site")
    }

    /// PYTHONPATH: the installed package first, then the inherited one
    /// (nats-py).
    fn env(&self) -> (&'static str, String) {
        let inherited = std::env::var("PYTHONPATH").unwrap_or_default();
        let mut path = self.site().display().to_string();
        if !inherited.is_empty() {
            path = format!("{path}:{inherited}");
        }
        ("PYTHONPATH", path)
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name();
        if matches!(name.to_str(), Some("build" | "__pycache__"))
            || name.to_string_lossy().ends_with(".egg-info")
        {
            continue;
        }
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &to.join(&name));
        } else {
            std::fs::copy(entry.path(), to.join(&name)).unwrap();
        }
    }
}

/// The installed package beside `amends serve` (4 partitions) on its own
/// nats-server, once the deployment is up.
struct Deployment {
    installed: Installed,
    server: Server,
    serve: Serve,
    _dir: tempfile::TempDir,
}

impl Deployment {
    async fn start() -> Deployment {
        assert_nats_py();
        let installed = tokio::task::spawn_blocking(Installed::new).await.unwrap();
        let server = Server::start();
        let dir = tempfile::tempdir().unwrap();
        let serve = Serve::start(&server, &dir.path().join("data"), 4);
        let _client = client(&server, 4).await;
        Deployment {
            installed,
            server,
            serve,
            _dir: dir,
        }
    }
}

fn assert_nats_py() {
    let nats = python(&["-c", "import nats"]);
    assert_eq!(
        nats.code,
        Some(0),
        "nats-py is not importable: run scripts/setup and put .tools/pypi/nats-py on \
         PYTHONPATH (scripts/test does both)\n{nats}"
    );
}

#[test]
fn python_client_reproduces_every_routing_vector() {
    // Proves the Python FNV-1a 64 + jump hash matches every vector of
    // specs/vectors/routing.json (its fnv1a_64 and all partition counts),
    // run from the package as pip installed it.
    let installed = Installed::new();
    let run = python_with(
        &[
            "-m",
            "amends",
            "--check-vectors",
            "specs/vectors/routing.json",
        ],
        &[installed.env()],
        PYTHON_DEADLINE,
    );
    assert_eq!(run.code, Some(0), "{run}");
    assert!(run.stdout.contains("65 vectors"), "{run}");
    assert!(run.stdout.contains(" 0 failures"), "{run}");
}

#[test]
fn python_package_installs_with_pip_and_imports_from_the_install() {
    // Proves `pip install clients/python` makes an importable, typed
    // package named amends whose metadata names amends-client and nats-py.
    assert_nats_py();
    let installed = Installed::new();
    let run = python_with(
        &[
            "-c",
            "import amends, importlib.metadata as m; print(amends.__file__); \
             print(m.version('amends-client')); print(m.requires('amends-client'))",
        ],
        &[installed.env()],
        PYTHON_DEADLINE,
    );
    assert_eq!(run.code, Some(0), "{run}");
    let site = installed.site().display().to_string();
    assert!(
        run.stdout
            .starts_with(&format!("{site}/amends/__init__.py")),
        "{run}"
    );
    assert!(run.stdout.contains("nats-py"), "{run}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_suite_passes_against_amends_serve() {
    // Proves the installed package against `amends serve` (4 partitions, a
    // 1 s duplicate window): clients/python/tests covers confirmed and
    // rejected decisions with their reasons, a duplicate answered with the
    // same decision inside and after the duplicate window, a conflict, a
    // resubmission after a lost reply (answered through the status query),
    // submit then wait, status/balance/claim/stats answers, wrong_partition,
    // and an apology consumed and acknowledged from the apology stream.
    let Deployment {
        installed,
        server,
        serve,
        _dir,
    } = Deployment::start().await;

    let envs = vec![
        installed.env(),
        ("AMENDS_NATS_URL", server.url()),
        ("AMENDS_PARTITIONS", "4".to_owned()),
        ("AMENDS_REPO_ROOT", ROOT.to_owned()),
        (
            "AMENDS_EXPECT_INSTALLED_IN",
            installed.site().display().to_string(),
        ),
    ];
    let run = tokio::task::spawn_blocking(move || {
        python_with(
            &[
                "-m",
                "unittest",
                "discover",
                "-v",
                "-s",
                "clients/python/tests",
            ],
            &envs,
            SUITE_DEADLINE,
        )
    })
    .await
    .unwrap();
    assert_eq!(run.code, Some(0), "{run}\n--- serve log\n{}", serve.log());
    // unittest reports on stderr; every test ran (none skipped for want
    // of a server).
    assert!(
        run.stderr.contains("\nOK\n") || run.stderr.ends_with("OK\n"),
        "{run}"
    );
    assert!(!run.stderr.contains("skipped"), "{run}");
    let ran = run
        .stderr
        .lines()
        .find_map(|l| {
            l.strip_prefix("Ran ")?
                .split(' ')
                .next()?
                .parse::<u32>()
                .ok()
        })
        .unwrap_or_else(|| panic!("no test count\n{run}"));
    assert!(ran >= 13, "ran {ran} tests\n{run}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_demo_gets_the_expected_decisions_from_amends_serve() {
    // Proves the Python client works end to end against `amends serve`: it
    // reads the partition count from AMENDS_META, routes, publishes with
    // Nats-Msg-Id and Amends-Reply-To, and gets each decision: open and
    // credit confirmed, an overdraft rejected insufficient_funds, a first
    // claim confirmed and a second one rejected already_claimed, a transfer
    // (a saga, routed by its op id) confirmed and one refused naming its
    // step.
    let Deployment {
        installed,
        server,
        serve,
        _dir,
    } = Deployment::start().await;

    let url = server.url();
    let env = installed.env();
    let run = tokio::task::spawn_blocking(move || {
        python_with(
            &["examples/python/demo.py", "--nats-url", &url],
            &[env],
            PYTHON_DEADLINE,
        )
    })
    .await
    .unwrap();
    assert_eq!(run.code, Some(0), "{run}\n--- serve log\n{}", serve.log());
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert!(lines.contains(&"partitions: 4"), "{run}");
    let expected = [
        ("open account: ok ", "\"outcome\": \"confirmed\""),
        ("credit 100: ok ", "\"balance\": 100"),
        ("debit 150: ok ", "\"code\": \"insufficient_funds\""),
        ("claim as ann: ok ", "\"outcome\": \"confirmed\""),
        ("claim as bob: ok ", "\"owner\": \"ann\""),
        ("transfer 30: ok ", "\"outcome\": \"confirmed\""),
        ("transfer 500: ok ", "\"code\": \"insufficient_funds\""),
    ];
    for (label, field) in expected {
        let line = lines
            .iter()
            .find(|l| l.starts_with(label))
            .unwrap_or_else(|| panic!("no line {label:?}\n{run}"));
        assert!(line.contains(field), "{label}: want {field}\n{run}");
    }
    assert!(run.stdout.contains("all outcomes as expected"), "{run}");
}
