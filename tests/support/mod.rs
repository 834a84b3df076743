//! Real servers for the tests and the demo: a Prefect 3.9.1 server and a kube-apiserver
//! with etcd, provisioned by `scripts/test-assets.sh` and started on free loopback
//! ports. Each server runs under a small shell watchdog that stops it when the test
//! process exits, so no server outlives its test run. A server that cannot start makes
//! the test fail with its log, never skip.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub struct Assets {
    pub kube_dir: PathBuf,
    pub prefect_bin: PathBuf,
    /// The older Prefect servers provisioned, by version.
    pub older_prefect_bins: Vec<(String, PathBuf)>,
    pub helm: PathBuf,
    pub promtool: PathBuf,
}

/// Locates (and on first use provisions) the server binaries.
pub fn assets() -> &'static Assets {
    static ASSETS: OnceLock<Assets> = OnceLock::new();
    ASSETS.get_or_init(|| {
        let line = run_script("scripts/test-assets.sh");
        let get = |key: &str| export_value(&line, key);
        // PREFECT_SERVER_VERSION picks one of the older servers the script provisions
        // (the Prefect API suite runs against each); by default the current one.
        let older: Vec<(String, PathBuf)> = get("PREFECT_OLDER_BINS")
            .to_string_lossy()
            .split(' ')
            .filter_map(|pair| pair.split_once('='))
            .map(|(v, bin)| (v.to_string(), PathBuf::from(bin)))
            .collect();
        let prefect_bin = match std::env::var("PREFECT_SERVER_VERSION") {
            Ok(v) if !v.is_empty() => older
                .iter()
                .find(|(have, _)| *have == v)
                .map(|(_, bin)| bin.clone())
                .unwrap_or_else(|| panic!("PREFECT_SERVER_VERSION={v} is not provisioned")),
            _ => get("PREFECT_BIN"),
        };
        Assets {
            kube_dir: get("KUBEBUILDER_ASSETS"),
            prefect_bin,
            older_prefect_bins: older,
            helm: get("HELM_BIN"),
            promtool: get("PROMTOOL_BIN"),
        }
    })
}

/// Runs a provisioning script of the project; returns its last line (the exports).
fn run_script(script: &str) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("bash")
        .arg(root.join(script))
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("run {script}: {e}"));
    assert!(out.status.success(), "{script} failed");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap_or_default()
        .to_string()
}

/// The value of `KEY='value'` in a line of exports.
fn export_value(line: &str, key: &str) -> PathBuf {
    let start = line
        .find(&format!("{key}='"))
        .unwrap_or_else(|| panic!("{key} missing in {line:?}"))
        + key.len()
        + 2;
    let end = start + line[start..].find('\'').expect("closing quote");
    PathBuf::from(&line[start..end])
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts `program args` in the background under a watchdog tied to this process.
fn spawn_watched(program: &Path, args: &[String], envs: &[(&str, String)], log: &Path) -> Child {
    let quoted: Vec<String> = std::iter::once(program.display().to_string())
        .chain(args.iter().cloned())
        .map(|a| format!("'{}'", a.replace('\'', "'\\''")))
        .collect();
    let script = format!(
        "{cmd} > '{log}' 2>&1 & c=$!; trap 'kill $c 2>/dev/null; wait $c' EXIT TERM INT; \
         while kill -0 {pid} 2>/dev/null && kill -0 $c 2>/dev/null; do sleep 0.3; done",
        cmd = quoted.join(" "),
        log = log.display(),
        pid = std::process::id()
    );
    let mut cmd = Command::new("bash");
    cmd.arg("-c").arg(script).stdin(Stdio::null());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.spawn().expect("spawn watched process")
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// Minimal HTTP GET over loopback (avoids needing an async runtime while starting).
pub fn http_get(port: u16, path: &str, auth: Option<&str>) -> Option<(u16, String)> {
    let auth = auth
        .map(|a| format!("Authorization: {a}\r\n"))
        .unwrap_or_default();
    http(
        port,
        &format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n{auth}\r\n"),
    )
}

impl PrefectServer {
    /// GET an API path of this server from synchronous code, retrying the 503s SQLite
    /// gives under parallel load.
    pub fn get(&self, path: &str) -> (u16, String) {
        for _ in 0..20 {
            match http_get(self.port, path, None) {
                Some((503, _)) | None => std::thread::sleep(Duration::from_millis(300)),
                Some(answer) => return answer,
            }
        }
        panic!("Prefect kept answering 503 to GET {path}");
    }
}

/// Minimal HTTP POST of a JSON body over loopback.
pub fn http_post_json(port: u16, path: &str, body: &serde_json::Value) -> Option<(u16, String)> {
    let body = body.to_string();
    let head = format!("POST {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n", body.len());
    http(port, &format!("{head}{body}"))
}

fn http(port: u16, request: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    s.write_all(request.as_bytes()).ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let code = buf.split_whitespace().nth(1)?.parse().ok()?;
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((code, body))
}

pub struct PrefectServer {
    pub url: String,
    pub port: u16,
    _dir: tempfile::TempDir,
    _child: Child,
}

/// Every live process at or below `root`, with its CPU seconds so far (Linux's `/proc`;
/// nothing elsewhere).
fn process_tree(root: u32) -> Vec<(u32, f64)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    // pid -> (parent pid, utime + stime in clock ticks)
    let mut procs: HashMap<u32, (u32, u64)> = HashMap::new();
    for entry in dir.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|p| p.parse().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // After the command name in parentheses: state, ppid, ..., utime (12th), stime (13th).
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map_or("", |(_, rest)| rest)
            .split_whitespace()
            .collect();
        let num = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok());
        if let (Some(ppid), Some(u), Some(s)) = (num(1), num(11), num(12)) {
            procs.insert(pid, (ppid as u32, u + s));
        }
    }
    let below = |mut pid: u32| {
        while pid > 1 {
            if pid == root {
                return true;
            }
            pid = procs.get(&pid).map_or(0, |p| p.0);
        }
        false
    };
    procs
        .iter()
        .filter(|(pid, _)| below(**pid))
        .map(|(pid, p)| (*pid, p.1 as f64 / 100.0)) // USER_HZ on Linux
        .collect()
}

/// CPU seconds used so far by process `root` and every live process below it. A
/// benchmark reads it before and after a phase.
pub fn tree_cpu_seconds(root: u32) -> f64 {
    process_tree(root).iter().map(|p| p.1).sum()
}

/// Moves process `root`, every process below it and all their threads onto `cpus` (a
/// `taskset` list such as "0" or "1-3").
pub fn pin_tree(root: u32, cpus: &str) {
    for (pid, _) in process_tree(root) {
        let _ = Command::new("taskset")
            .args(["-a", "-p", "-c", cpus, &pid.to_string()])
            .stdout(Stdio::null())
            .status();
    }
}

impl PrefectServer {
    /// CPU seconds the server has used so far (with its worker processes).
    pub fn cpu_seconds(&self) -> f64 {
        tree_cpu_seconds(self._child.id())
    }

    /// Runs the server (its processes and their threads) on `cpus` only.
    pub fn pin(&self, cpus: &str) {
        pin_tree(self._child.id(), cpus)
    }

    /// Starts a Prefect server with its background services off (API only), optionally
    /// with basic auth (`user:password`).
    pub fn start(auth_string: Option<&str>) -> PrefectServer {
        Self::launch(None, auth_string, false, &[])
    }

    pub fn start_on(port: u16, auth_string: Option<&str>) -> PrefectServer {
        Self::start_with(port, auth_string, false)
    }

    /// `services`: run Prefect's background services (scheduler, triggers) too.
    pub fn start_with(port: u16, auth_string: Option<&str>, services: bool) -> PrefectServer {
        Self::launch(Some(port), auth_string, services, &[])
    }

    /// Services on, with extra `PREFECT_*` settings (for example the scheduler's).
    pub fn start_with_settings(settings: &[(&'static str, &str)]) -> PrefectServer {
        Self::launch(None, None, true, settings)
    }

    /// A server on a database of its own in `pg` (PostgreSQL), services as asked.
    pub fn start_on_postgres(pg: &Postgres, services: bool) -> PrefectServer {
        let url = pg.fresh_database();
        Self::launch(
            None,
            None,
            services,
            &[("PREFECT_API_DATABASE_CONNECTION_URL", &url)],
        )
    }

    /// A server on the database at `db_url` (kept when the server stops, so a server
    /// started again on it finds everything), on `port` when given.
    pub fn start_on_database(
        port: Option<u16>,
        db_url: &str,
        settings: &[(&'static str, &str)],
    ) -> PrefectServer {
        let mut all = vec![("PREFECT_API_DATABASE_CONNECTION_URL", db_url)];
        all.extend_from_slice(settings);
        Self::launch(port, None, false, &all)
    }

    /// Starts an older Prefect server (one of the versions `test-assets.sh` provisions),
    /// API only.
    pub fn start_version(version: &str) -> PrefectServer {
        let bin = assets()
            .older_prefect_bins
            .iter()
            .find(|(v, _)| v == version)
            .map(|(_, bin)| bin.clone())
            .unwrap_or_else(|| panic!("Prefect {version} is not provisioned by test-assets.sh"));
        Self::launch_bin(&bin, None, None, false, &[])
    }

    fn launch(
        port: Option<u16>,
        auth_string: Option<&str>,
        services: bool,
        settings: &[(&'static str, &str)],
    ) -> PrefectServer {
        Self::launch_bin(&assets().prefect_bin, port, auth_string, services, settings)
    }

    /// Starts a server on `port`, or on a free port of its own choosing. A port found
    /// free can be taken by another process before the server binds it: then the launch
    /// is retried on another port, so the race never fails a test.
    fn launch_bin(
        bin: &Path,
        port: Option<u16>,
        auth_string: Option<&str>,
        services: bool,
        settings: &[(&'static str, &str)],
    ) -> PrefectServer {
        let mut attempt = 0;
        loop {
            let p = port.unwrap_or_else(free_port);
            match Self::try_launch(bin, p, auth_string, services, settings) {
                Ok(server) => return server,
                Err(Launch::PortTaken(log)) if port.is_none() && attempt < 5 => {
                    eprintln!("port {p} was taken before Prefect bound it; retrying\n{log}");
                    attempt += 1;
                }
                Err(Launch::PortTaken(log)) | Err(Launch::Failed(log)) => {
                    panic!("Prefect server did not become healthy on port {p}; log:\n{log}")
                }
            }
        }
    }

    fn try_launch(
        bin: &Path,
        port: u16,
        auth_string: Option<&str>,
        services: bool,
        settings: &[(&'static str, &str)],
    ) -> Result<PrefectServer, Launch> {
        let dir = tempfile::tempdir().unwrap();
        if TcpListener::bind(("127.0.0.1", port)).is_err() {
            return Err(Launch::PortTaken(format!("port {port} is in use")));
        }
        let log = dir.path().join("prefect.log");
        let mut envs = vec![
            ("PREFECT_HOME", dir.path().display().to_string()),
            ("PREFECT_SERVER_ANALYTICS_ENABLED", "false".into()),
            ("PREFECT_SERVER_UI_ENABLED", "false".into()),
            ("PREFECT_LOGGING_LEVEL", "WARNING".into()),
        ];
        if let Some(s) = auth_string {
            envs.push(("PREFECT_SERVER_API_AUTH_STRING", s.into()));
        }
        envs.extend(settings.iter().map(|(k, v)| (*k, v.to_string())));
        let args: Vec<String> = [
            "server",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--no-ui",
            "--analytics-off",
            "--no-services",
        ]
        .iter()
        .filter(|s| !services || **s != "--no-services")
        .map(|s| s.to_string())
        .collect();
        let mut child = spawn_watched(bin, &args, &envs, &log);
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            if let Some((200, body)) = http_get(port, "/api/health", None) {
                if body.trim() == "true" {
                    break;
                }
            }
            // The watchdog ends with the server: a server that exited is not coming up.
            if let Ok(Some(_)) = child.try_wait() {
                let text = tail(&log);
                let taken = text.contains("address already in use") || text.contains("Errno 98");
                return Err(if taken {
                    Launch::PortTaken(text)
                } else {
                    Launch::Failed(text)
                });
            }
            if Instant::now() >= deadline {
                stop_watched(&mut child);
                return Err(Launch::Failed(tail(&log)));
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        Ok(PrefectServer {
            url: format!("http://127.0.0.1:{port}/api"),
            port,
            _dir: dir,
            _child: child,
        })
    }

    /// One server shared by all tests of a test binary.
    pub fn shared() -> &'static PrefectServer {
        static SERVER: OnceLock<PrefectServer> = OnceLock::new();
        SERVER.get_or_init(|| PrefectServer::start(None))
    }
}

/// Why a launch failed: the port went to someone else (worth another port), or the
/// server itself failed. Both carry the end of the server's log.
enum Launch {
    PortTaken(String),
    Failed(String),
}

impl Drop for PrefectServer {
    fn drop(&mut self) {
        stop_watched(&mut self._child);
    }
}

/// SIGTERM to a watchdog makes it stop its server and wait for it.
fn stop_watched(child: &mut Child) {
    let _ = Command::new("kill").arg(child.id().to_string()).status();
    let _ = child.wait();
}

pub struct ControlPlane {
    pub kubeconfig: PathBuf,
    pub url: String,
    pub dir: tempfile::TempDir,
    _etcd: Child,
    _apiserver: Child,
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Writes into `d` a throwaway CA (`ca.crt`, `ca.key`) and a serving certificate for
/// 127.0.0.1, localhost and prefect.invalid (a name only `ConnectProxy` resolves) signed
/// by it (`server.crt`, `server.key`): rustls refuses a
/// CA used as the server's own certificate.
fn throwaway_pki(d: &Path) {
    run(Command::new("openssl").current_dir(d).args([
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-subj",
        "/CN=test-ca",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]));
    run(Command::new("openssl").current_dir(d).args([
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]));
    std::fs::write(
        d.join("server.ext"),
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost,DNS:prefect.invalid\n",
    )
    .unwrap();
    run(Command::new("openssl").current_dir(d).args([
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-out",
        "server.crt",
        "-extfile",
        "server.ext",
    ]));
}

impl ControlPlane {
    /// CPU seconds the apiserver and etcd have used so far.
    pub fn cpu_seconds(&self) -> f64 {
        tree_cpu_seconds(self._apiserver.id()) + tree_cpu_seconds(self._etcd.id())
    }

    pub fn start() -> ControlPlane {
        let a = assets();
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let etcd_bin = {
            let in_assets = a.kube_dir.join("etcd");
            if in_assets.exists() {
                in_assets
            } else {
                etcd_bin_vendored::etcd_bin_path()
                    .expect("etcd for this platform")
                    .to_path_buf()
            }
        };
        // A throwaway CA and a serving certificate signed by it, and service-account keys.
        throwaway_pki(d);
        run(Command::new("openssl")
            .current_dir(d)
            .args(["genrsa", "-out", "sa.key", "2048"]));
        run(Command::new("openssl")
            .current_dir(d)
            .args(["rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub"]));
        std::fs::write(
            d.join("tokens.csv"),
            "admin-token,admin,admin,system:masters\n",
        )
        .unwrap();

        let version = Command::new(a.kube_dir.join("kube-apiserver"))
            .arg("--version")
            .output()
            .expect("kube-apiserver --version");
        let version = String::from_utf8_lossy(&version.stdout).to_string();
        let minor: u32 = version
            .trim()
            .trim_start_matches("Kubernetes v")
            .split('.')
            .nth(1)
            .and_then(|m| m.parse().ok())
            .unwrap_or(20);
        // Ports are picked by binding to port 0 and releasing it; another process can
        // take one before etcd or the apiserver binds it. Then both are stopped and
        // started again on fresh ports.
        let mut attempt = 0;
        loop {
            attempt += 1;
            match Self::launch(d, &etcd_bin, minor) {
                Ok((etcd, apiserver, kubeconfig, url)) => {
                    return ControlPlane {
                        kubeconfig,
                        url,
                        dir,
                        _etcd: etcd,
                        _apiserver: apiserver,
                    }
                }
                Err(Launch::PortTaken(log)) if attempt < 5 => {
                    eprintln!("control plane: a port was taken before it bound; retrying\n{log}");
                }
                Err(Launch::PortTaken(log)) | Err(Launch::Failed(log)) => panic!("{log}"),
            }
        }
    }

    /// One try at starting etcd and the apiserver on fresh ports, up to readiness.
    fn launch(
        d: &Path,
        etcd_bin: &Path,
        minor: u32,
    ) -> Result<(Child, Child, PathBuf, String), Launch> {
        let a = assets();
        let _ = std::fs::remove_dir_all(d.join("etcd"));
        let (etcd_port, peer_port, api_port) = (free_port(), free_port(), free_port());
        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let mut etcd = spawn_watched(
            etcd_bin,
            &[
                format!("--data-dir={}", d.join("etcd").display()),
                format!("--listen-client-urls={etcd_url}"),
                format!("--advertise-client-urls={etcd_url}"),
                format!("--listen-peer-urls=http://127.0.0.1:{peer_port}"),
                format!("--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}"),
                format!("--initial-cluster=default=http://127.0.0.1:{peer_port}"),
                "--unsafe-no-fsync".into(),
            ],
            &[],
            &d.join("etcd.log"),
        );
        let mut args = vec![
            format!("--etcd-servers={etcd_url}"),
            format!("--secure-port={api_port}"),
            "--bind-address=127.0.0.1".into(),
            "--advertise-address=127.0.0.1".into(),
            format!("--cert-dir={}", d.join("certs").display()),
            format!("--tls-cert-file={}", d.join("server.crt").display()),
            format!("--tls-private-key-file={}", d.join("server.key").display()),
            format!("--service-account-key-file={}", d.join("sa.pub").display()),
            format!(
                "--service-account-signing-key-file={}",
                d.join("sa.key").display()
            ),
            "--service-account-issuer=https://kubernetes.default.svc".into(),
            format!("--token-auth-file={}", d.join("tokens.csv").display()),
            "--authorization-mode=RBAC".into(),
            "--service-cluster-ip-range=10.96.0.0/24".into(),
            "--allow-privileged=true".into(),
        ];
        if minor < 24 {
            args.push("--insecure-port=0".into());
        }
        let log = d.join("kube-apiserver.log");
        let mut apiserver = spawn_watched(&a.kube_dir.join("kube-apiserver"), &args, &[], &log);

        let url = format!("https://127.0.0.1:{api_port}");
        let kubeconfig = d.join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {url}\n    certificate-authority: {ca}\nusers:\n- name: admin\n  user:\n    token: admin-token\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: admin\n    namespace: default\ncurrent-context: test\n",
                ca = d.join("ca.crt").display()
            ),
        )
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let ok = Command::new("kubectl")
                .args([
                    "--kubeconfig",
                    kubeconfig.to_str().unwrap(),
                    "get",
                    "--raw",
                    "/readyz",
                ])
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false);
            if ok {
                return Ok((etcd, apiserver, kubeconfig, url));
            }
            let exited = matches!(etcd.try_wait(), Ok(Some(_)))
                || matches!(apiserver.try_wait(), Ok(Some(_)));
            if exited || Instant::now() >= deadline {
                let text = format!(
                    "kube-apiserver did not become ready; log:\n{}\netcd log:\n{}",
                    tail(&log),
                    tail(&d.join("etcd.log"))
                );
                stop_watched(&mut apiserver);
                stop_watched(&mut etcd);
                return Err(if text.contains("address already in use") {
                    Launch::PortTaken(text)
                } else {
                    Launch::Failed(text)
                });
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    pub fn shared() -> &'static ControlPlane {
        static CP: OnceLock<ControlPlane> = OnceLock::new();
        CP.get_or_init(|| {
            let cp = ControlPlane::start();
            // The install command the README gives. Client-side apply without validation:
            // apiservers before 1.25 do not know x-kubernetes-validations, so kubectl's
            // check and server-side apply's typed patch refuse it, while a plain write is
            // stored (without the rules, which such servers do not run anyway).
            cp.kubectl_ok(&[
                "apply",
                "--validate=false",
                "-f",
                concat!(
                    env!("CARGO_MANIFEST_DIR"),
                    "/crds/prefectdeployments.prefect.io.yaml"
                ),
            ]);
            cp.kubectl_ok(&[
                "wait",
                "--for=condition=Established",
                "crd/prefectdeployments.prefect.io",
                "--timeout=60s",
            ]);
            cp
        })
    }

    /// Runs kubectl against this control plane; returns (success, stdout, stderr).
    pub fn kubectl(&self, args: &[&str]) -> (bool, String, String) {
        self.kubectl_stdin(args, None)
    }

    pub fn kubectl_stdin(&self, args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
        let mut cmd = Command::new("kubectl");
        cmd.arg("--kubeconfig").arg(&self.kubeconfig).args(args);
        cmd.stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("kubectl");
        if let Some(input) = stdin {
            child
                .stdin
                .take()
                .unwrap()
                .write_all(input.as_bytes())
                .unwrap();
        }
        let out = child.wait_with_output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into(),
            String::from_utf8_lossy(&out.stderr).into(),
        )
    }

    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        let (ok, out, err) = self.kubectl(args);
        assert!(ok, "kubectl {args:?} failed: {err}");
        out
    }

    pub async fn client(&self) -> kube::Client {
        install_crypto();
        let kc = kube::config::Kubeconfig::read_from(&self.kubeconfig).unwrap();
        let config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
            .await
            .unwrap();
        kube::Client::try_from(config).unwrap()
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        stop_watched(&mut self._apiserver);
        stop_watched(&mut self._etcd);
    }
}

pub fn install_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Creates a process work pool in Prefect (retrying the 503s SQLite gives under load).
pub fn create_pool(prefect: &PrefectServer) -> String {
    create_pool_named(prefect, &unique("pool"))
}

/// Creates a process work pool of this name in Prefect.
pub fn create_pool_named(prefect: &PrefectServer, pool: &str) -> String {
    let pool = pool.to_string();
    let body = serde_json::json!({"name": pool, "type": "process"});
    for _ in 0..10 {
        match http_post_json(prefect.port, "/api/work_pools/", &body) {
            Some((201, _)) => return pool,
            Some((503, _)) | None => std::thread::sleep(Duration::from_millis(300)),
            Some((code, text)) => panic!("creating work pool: {code} {text}"),
        }
    }
    panic!("Prefect kept failing to create a work pool");
}

/// GET a Prefect URL and decode the JSON answer, retrying the 503s SQLite gives under
/// parallel load.
pub async fn prefect_get(client: &reqwest::Client, url: &str) -> (u16, serde_json::Value) {
    prefect_call(client, reqwest::Method::GET, url, None).await
}

/// One call to Prefect made by a test itself (to edit, delete or list behind the
/// operator's back). SQLite answers 503 when writers collide, and the server drops a
/// kept-alive connection after an error; both are retried so a test only ever sees
/// Prefect's real answer.
pub async fn prefect_call(
    client: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    body: Option<&serde_json::Value>,
) -> (u16, serde_json::Value) {
    for _ in 0..20 {
        let mut req = client.request(method.clone(), url);
        if let Some(body) = body {
            req = req.json(body);
        }
        match req.send().await {
            Ok(r) if r.status().as_u16() != 503 => {
                let code = r.status().as_u16();
                return (code, r.json().await.unwrap_or(serde_json::Value::Null));
            }
            Ok(_) | Err(_) => tokio::time::sleep(Duration::from_millis(300)).await,
        }
    }
    panic!("Prefect kept answering 503 (or dropping the connection) to {method} {url}");
}

/// A short random suffix for names, so tests sharing a server never collide.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{:08x}", fastrand::u32(..))
}

/// kstatus's computed status of a custom resource (sigs.k8s.io/cli-utils kstatus, the
/// rules Flux and `kubectl wait`-style tools apply), written out as a table:
/// Terminating when deletion has started; InProgress while `status.observedGeneration`
/// is behind `metadata.generation`, while `Reconciling=True`, or while `Ready=False`;
/// Failed when `Stalled=True`; Current otherwise.
pub fn kstatus(obj: &serde_json::Value) -> &'static str {
    if !obj["metadata"]["deletionTimestamp"].is_null() {
        return "Terminating";
    }
    let status = &obj["status"];
    if let (Some(seen), Some(generation)) = (
        status["observedGeneration"].as_i64(),
        obj["metadata"]["generation"].as_i64(),
    ) {
        if seen != generation {
            return "InProgress";
        }
    }
    let empty = Vec::new();
    let conditions = status["conditions"].as_array().unwrap_or(&empty);
    let is = |t: &str, s: &str| {
        conditions
            .iter()
            .any(|c| c["type"] == t && c["status"] == s)
    };
    if is("Reconciling", "True") {
        "InProgress"
    } else if is("Stalled", "True") {
        "Failed"
    } else if is("Ready", "False") {
        "InProgress"
    } else {
        "Current"
    }
}

/// RFC 7386 JSON merge patch (fixtures describe cases as patches of a base).
pub fn merge_patch(target: &mut serde_json::Value, patch: &serde_json::Value) {
    use serde_json::Value;
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

/// Runs an Argo CD Lua script (`argocd/<script>.lua`) on an object file under `lua`
/// through one of the runners in `tests/argocd` (`run.lua` for the health check,
/// `action.lua` for actions); returns what the runner prints.
pub fn argocd_lua(lua: &str, runner: &str, script: &str, object: &Path) -> String {
    let root = env!("CARGO_MANIFEST_DIR");
    let out = Command::new(lua)
        .arg(format!("{root}/tests/argocd/{runner}"))
        .arg(format!("{root}/argocd/{script}.lua"))
        .arg(object)
        .output()
        .unwrap_or_else(|e| panic!("{lua}: {e} (scripts/test-assets.sh installs it)"));
    assert!(
        out.status.success(),
        "{lua} {script} {}: {}",
        object.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The Argo CD health check's status and message for an object file.
pub fn argocd_health(lua: &str, object: &Path) -> (String, String) {
    let text = argocd_lua(lua, "run.lua", "prefectdeployment-health", object);
    let mut lines = text.lines();
    (
        lines.next().unwrap_or("").to_string(),
        lines.next().unwrap_or("").to_string(),
    )
}

/// A PostgreSQL 15 instance on loopback for the benchmark (`scripts/bench-assets.sh`
/// installs it), run as the `postgres` user with its data in a temporary directory.
pub struct Postgres {
    bin: PathBuf,
    dir: tempfile::TempDir,
    pub port: u16,
}

impl Postgres {
    pub fn start() -> Postgres {
        let line = run_script("scripts/bench-assets.sh");
        let bin = export_value(&line, "PG_BIN");
        let dir = tempfile::tempdir().unwrap();
        // initdb and the server run as postgres: it must own the directory and reach it.
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        let owned = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(dir.path())
            .status()
            .expect("chown");
        assert!(owned.success(), "chown of the PostgreSQL directory failed");
        let data = dir.path().join("data").display().to_string();
        let initdb = pg_tool(&bin, "initdb")
            .args(["-D", &data, "-A", "trust", "-U", "postgres"])
            .status()
            .expect("initdb");
        assert!(initdb.success(), "initdb failed");
        let log = dir.path().join("pg.log");
        // A port found free may be taken before the server binds it: try another.
        for _ in 0..5 {
            let port = free_port();
            let opts = format!(
                "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=300",
                dir.path().display()
            );
            let started = pg_tool(&bin, "pg_ctl")
                .args([
                    "-D",
                    &data,
                    "-l",
                    &log.display().to_string(),
                    "-w",
                    "-o",
                    &opts,
                    "start",
                ])
                .status()
                .expect("pg_ctl");
            if started.success() {
                return Postgres { bin, dir, port };
            }
        }
        panic!("PostgreSQL did not start:\n{}", tail(&log));
    }

    /// A new empty database; its asyncpg URL for Prefect.
    pub fn fresh_database(&self) -> String {
        let name = unique("prefect").replace('-', "_");
        let status = pg_tool(&self.bin, "createdb")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), &name])
            .status()
            .expect("createdb");
        assert!(status.success(), "createdb {name} failed");
        format!(
            "postgresql+asyncpg://postgres@127.0.0.1:{}/{name}",
            self.port
        )
    }
}

/// A PostgreSQL tool run as the `postgres` user.
fn pg_tool(bin: &Path, tool: &str) -> Command {
    let mut cmd = Command::new("runuser");
    cmd.args(["-u", "postgres", "--"])
        .arg(bin.join(tool))
        .stdout(Stdio::null());
    cmd
}

impl Postgres {
    /// Stops the server (again is harmless). A `static` is never dropped, so its owner
    /// calls this before the process ends: `pg_ctl` runs the server detached, and it
    /// would outlive the benchmark.
    pub fn stop(&self) {
        let data = self.dir.path().join("data").display().to_string();
        let _ = pg_tool(&self.bin, "pg_ctl")
            .args(["-D", &data, "-m", "immediate", "stop"])
            .stderr(Stdio::null())
            .status();
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A reverse proxy in front of a Prefect server that records each request as
/// `METHOD /path`: what a client (say, the binary) asked, counted from outside it. It
/// runs on its own thread and runtime, so a test may block on a child process meanwhile.
pub struct CountingProxy {
    /// The proxy's API base, like the server's (`http://127.0.0.1:PORT/api`).
    pub url: String,
    seen: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    refused: std::sync::Arc<std::sync::Mutex<Option<String>>>,
}

impl CountingProxy {
    pub fn start(server: &PrefectServer) -> CountingProxy {
        let origin = server.url.trim_end_matches("/api").to_string();
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let refused = std::sync::Arc::new(std::sync::Mutex::new(None::<String>));
        let (log, refusing) = (seen.clone(), refused.clone());
        let port = serve_on_own_thread(move |listener| async move {
            let http = reqwest::Client::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (http, origin, log, refusing) =
                    (http.clone(), origin.clone(), log.clone(), refusing.clone());
                let service = hyper::service::service_fn(move |req| {
                    let (http, origin, log) = (http.clone(), origin.clone(), log.clone());
                    let refusing = refusing.lock().unwrap().clone();
                    async move { proxy_one(&http, &origin, &log, refusing.as_deref(), req).await }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service),
                );
            }
        });
        CountingProxy {
            url: format!("http://127.0.0.1:{port}/api"),
            seen,
            refused,
        }
    }

    /// From now on answers every request whose `METHOD /path` starts with `prefix` with
    /// a 500 of its own, without passing it on: a server failing one kind of request,
    /// which a real server cannot be made to do on demand.
    pub fn refuse(&self, prefix: &str) {
        *self.refused.lock().unwrap() = Some(prefix.to_string());
    }

    /// Passes every request on again.
    pub fn allow(&self) {
        *self.refused.lock().unwrap() = None;
    }

    /// The requests since the last call, oldest first.
    pub fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.seen.lock().unwrap())
    }
}

/// The front of two Prefect API replicas that share a database but no message broker:
/// event-stream websockets go to one, every other request to the other. An event posted
/// through the front (or made by a change through it) never reaches a stream opened
/// through it, yet the stream connects and authenticates as usual.
pub struct SplitFront {
    /// The front's API base (`http://127.0.0.1:PORT/api`).
    pub url: String,
}

impl SplitFront {
    pub fn start(api: &PrefectServer, stream: &PrefectServer) -> SplitFront {
        let (api, stream) = (api.port, stream.port);
        let port = serve_on_own_thread(move |listener| async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(async move {
                    // The request line decides; a client sends it in one piece.
                    let mut head = [0u8; 32];
                    let n = client.peek(&mut head).await.unwrap_or(0);
                    let to = if head[..n].starts_with(b"GET /api/events/out") {
                        stream
                    } else {
                        api
                    };
                    if let Ok(mut upstream) =
                        tokio::net::TcpStream::connect(("127.0.0.1", to)).await
                    {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                    }
                });
            }
        });
        SplitFront {
            url: format!("http://127.0.0.1:{port}/api"),
        }
    }
}

/// A front to one Prefect server that can cut its event-stream websockets: `cut` closes
/// the open ones and turns new ones away until `restore`; every other request passes.
/// Changes made meanwhile reach no stream, and a server that keeps no events (services
/// off) replays none of them to the next subscription.
pub struct StreamGate {
    /// The front's API base (`http://127.0.0.1:PORT/api`).
    pub url: String,
    closed: std::sync::Arc<tokio::sync::watch::Sender<bool>>,
}

/// What a `StreamGate`'s `cut` does.
#[derive(Clone, Copy, PartialEq)]
enum Cut {
    /// Closes the event-stream websockets and turns new ones away.
    Streams,
    /// The same for every connection: the server seems down.
    Everything,
    /// Keeps the event-stream websockets open but drops what the server sends on them:
    /// a stream that stays up and goes deaf.
    Mute,
}

impl StreamGate {
    pub fn start(server: &PrefectServer) -> StreamGate {
        Self::front(server, Cut::Streams)
    }

    /// A front whose `cut` turns away every connection, not only the event stream's: to
    /// the operator the server is down, while it keeps its data for `restore`.
    pub fn whole(server: &PrefectServer) -> StreamGate {
        Self::front(server, Cut::Everything)
    }

    /// A front whose `cut` leaves the event-stream websockets open but delivers nothing
    /// more on them (nor on new ones), not even answers to pings.
    pub fn muting(server: &PrefectServer) -> StreamGate {
        Self::front(server, Cut::Mute)
    }

    fn front(server: &PrefectServer, mode: Cut) -> StreamGate {
        let to = server.port;
        let closed = std::sync::Arc::new(tokio::sync::watch::Sender::new(false));
        let gate = closed.clone();
        let port = serve_on_own_thread(move |listener| async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    continue;
                };
                let mut closed = gate.subscribe();
                tokio::spawn(async move {
                    let mut head = [0u8; 32];
                    let n = client.peek(&mut head).await.unwrap_or(0);
                    let is_stream = head[..n].starts_with(b"GET /api/events/out");
                    let Ok(mut upstream) = tokio::net::TcpStream::connect(("127.0.0.1", to)).await
                    else {
                        return;
                    };
                    if mode == Cut::Mute {
                        if is_stream {
                            mute_when_cut(client, upstream, closed).await;
                        } else {
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                        }
                        return;
                    }
                    let stream = mode == Cut::Everything || is_stream;
                    if stream && *closed.borrow() {
                        return;
                    }
                    let copy = tokio::io::copy_bidirectional(&mut client, &mut upstream);
                    if stream {
                        tokio::select! {
                            _ = copy => {}
                            _ = closed.wait_for(|c| *c) => {}
                        }
                    } else {
                        let _ = copy.await;
                    }
                });
            }
        });
        StreamGate {
            url: format!("http://127.0.0.1:{port}/api"),
            closed,
        }
    }

    /// Closes the open event-stream websockets and turns new ones away.
    pub fn cut(&self) {
        self.closed.send_replace(true);
    }

    /// Lets event-stream websockets through again.
    pub fn restore(&self) {
        self.closed.send_replace(false);
    }
}

/// A TLS front to a Prefect server, with a certificate from a CA of its own: a server
/// behind an internal PKI, as the operator sees it. Websockets pass through too.
pub struct TlsFront {
    /// The front's API base (`https://127.0.0.1:PORT/api`).
    pub url: String,
    pub port: u16,
    /// The CA's certificate (PEM), for clients to trust.
    pub ca_file: PathBuf,
    _dir: tempfile::TempDir,
}

impl TlsFront {
    pub fn start(server: &PrefectServer) -> TlsFront {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let dir = tempfile::tempdir().unwrap();
        throwaway_pki(dir.path());
        let certs = CertificateDer::pem_file_iter(dir.path().join("server.crt"))
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_file(dir.path().join("server.key")).unwrap();
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
        let to = server.port;
        let port = serve_on_own_thread(move |listener| async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    // A client that does not trust the CA gives up in the handshake.
                    let Ok(mut client) = acceptor.accept(client).await else {
                        return;
                    };
                    let Ok(mut upstream) = tokio::net::TcpStream::connect(("127.0.0.1", to)).await
                    else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                });
            }
        });
        TlsFront {
            url: format!("https://127.0.0.1:{port}/api"),
            port,
            ca_file: dir.path().join("ca.crt"),
            _dir: dir,
        }
    }
}

/// An HTTP proxy that only tunnels (CONNECT), as corporate egress proxies do. It
/// resolves `prefect.invalid:PORT` to 127.0.0.1:PORT, a name nothing else resolves, so
/// whatever reaches a server by that name came through it. Records each tunnel's
/// target.
pub struct ConnectProxy {
    /// `http://127.0.0.1:PORT`
    pub url: String,
    tunnels: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl ConnectProxy {
    pub fn start() -> ConnectProxy {
        let tunnels = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = tunnels.clone();
        let port = serve_on_own_thread(move |listener| async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    continue;
                };
                let log = log.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    while !head.ends_with(b"\r\n\r\n") && head.len() < 8192 {
                        match client.read_u8().await {
                            Ok(b) => head.push(b),
                            Err(_) => return,
                        }
                    }
                    let text = String::from_utf8_lossy(&head).to_string();
                    let target = match text.split_whitespace().collect::<Vec<_>>()[..] {
                        ["CONNECT", target, ..] => target.to_string(),
                        _ => {
                            let _ = client
                                .write_all(b"HTTP/1.1 405 Method Not Allowed\r\n\r\n")
                                .await;
                            return;
                        }
                    };
                    log.lock().unwrap().push(target.clone());
                    let dial = target.replace("prefect.invalid:", "127.0.0.1:");
                    let Ok(mut upstream) = tokio::net::TcpStream::connect(dial).await else {
                        let _ = client.write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n").await;
                        return;
                    };
                    if client
                        .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                        .await
                        .is_err()
                    {
                        return;
                    }
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                });
            }
        });
        ConnectProxy {
            url: format!("http://127.0.0.1:{port}"),
            tunnels,
        }
    }

    /// The targets of the tunnels opened so far.
    pub fn tunnels(&self) -> Vec<String> {
        self.tunnels.lock().unwrap().clone()
    }
}

/// Relays a websocket between `client` and `upstream`. Once `closed` is set, the data
/// frames the server sends are dropped; its pings, pongs and close frames still pass,
/// so the connection stays up (as a stream behind API replicas without a shared broker
/// does) while nothing is delivered on it.
async fn mute_when_cut(
    client: tokio::net::TcpStream,
    upstream: tokio::net::TcpStream,
    closed: tokio::sync::watch::Receiver<bool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut from_client, mut to_client) = client.into_split();
    let (mut from_server, mut to_server) = upstream.into_split();
    let up = tokio::io::copy(&mut from_client, &mut to_server);
    let down = async {
        let mut pending: Vec<u8> = Vec::new();
        let mut upgraded = false;
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match from_server.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            pending.extend_from_slice(&buf[..n]);
            if !upgraded {
                // The HTTP answer to the upgrade passes as it is.
                let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") else {
                    continue;
                };
                let head: Vec<u8> = pending.drain(..end + 4).collect();
                if to_client.write_all(&head).await.is_err() {
                    return;
                }
                upgraded = true;
            }
            while let Some(len) = frame_len(&pending) {
                let frame: Vec<u8> = pending.drain(..len).collect();
                let control = frame[0] & 0x0f >= 8;
                if (control || !*closed.borrow()) && to_client.write_all(&frame).await.is_err() {
                    return;
                }
            }
        }
    };
    tokio::select! {
        _ = up => {}
        _ = down => {}
    }
}

/// The length of the websocket frame `buf` starts with, once all of it is there.
fn frame_len(buf: &[u8]) -> Option<usize> {
    if buf.len() < 2 {
        return None;
    }
    let mask = if buf[1] & 0x80 != 0 { 4 } else { 0 };
    let (ext, payload) = match buf[1] & 0x7f {
        126 if buf.len() >= 4 => (2, u16::from_be_bytes([buf[2], buf[3]]) as usize),
        127 if buf.len() >= 10 => (8, u64::from_be_bytes(buf[2..10].try_into().ok()?) as usize),
        126 | 127 => return None,
        n => (0, n as usize),
    };
    let total = 2 + ext + mask + payload;
    (buf.len() >= total).then_some(total)
}

/// Runs `serve` on a listener bound to a free loopback port, on a thread and runtime of
/// its own (so a test may block on a child process meanwhile), and returns the port.
fn serve_on_own_thread<F, Fut>(serve: F) -> u16
where
    F: FnOnce(tokio::net::TcpListener) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            serve(tokio::net::TcpListener::from_std(listener).unwrap()).await;
        });
    });
    port
}

/// Records `req` in `log` and forwards it to `origin`, answering with the upstream's
/// status, content type and body (502 when the upstream cannot be reached).
async fn proxy_one(
    http: &reqwest::Client,
    origin: &str,
    log: &std::sync::Mutex<Vec<String>>,
    refused: Option<&str>,
    req: hyper::Request<hyper::body::Incoming>,
) -> Result<hyper::Response<http_body_util::Full<hyper::body::Bytes>>, hyper::Error> {
    use http_body_util::{BodyExt, Full};
    use hyper::header::{CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, HOST, TRANSFER_ENCODING};
    let (parts, body) = req.into_parts();
    let line = format!("{} {}", parts.method, parts.uri.path());
    if refused.is_some_and(|p| line.starts_with(p)) {
        let refusal = hyper::Response::builder().status(500);
        return Ok(refusal
            .body(Full::new("refused by the test".into()))
            .unwrap());
    }
    log.lock().unwrap().push(line);
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let body = body.collect().await?.to_bytes();
    let mut forward = http
        .request(parts.method.clone(), format!("{origin}{path}"))
        .body(body);
    // Hop-by-hop and length headers are the proxy's own.
    for (k, v) in &parts.headers {
        if ![HOST, CONTENT_LENGTH, CONNECTION, TRANSFER_ENCODING].contains(k) {
            forward = forward.header(k, v);
        }
    }
    let mut answer = hyper::Response::builder();
    let body = match forward.send().await {
        Ok(r) => {
            answer = answer.status(r.status().as_u16());
            if let Some(t) = r.headers().get(CONTENT_TYPE) {
                answer = answer.header(CONTENT_TYPE, t.as_bytes());
            }
            r.bytes().await.unwrap_or_default()
        }
        Err(_) => {
            answer = answer.status(502);
            Default::default()
        }
    };
    Ok(answer.body(Full::new(body)).unwrap())
}
